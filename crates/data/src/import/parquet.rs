//! Generic Parquet input: an interactions file with user, item and timestamp columns and a
//! catalogue file with item id and title columns, all names configurable. Ids may be strings
//! or integers (kept as their decimal text as the source id); timestamps integers or floats.
//! Only the named columns are read (projection).

use super::float_timestamp;
use crate::interactions::{FnvMap, RawLog, SourceCatalog};
use crate::parquet_io::{read_columns, ColumnSpec};
use anyhow::{bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type, UInt32Type, UInt64Type};
use arrow_array::{Array, ArrayRef};
use arrow_schema::DataType;
use std::fmt::Write;
use std::path::Path;

/// Column names of the two files (the item id column has the same name in both).
#[derive(Clone, Debug)]
pub struct ParquetColumns {
    pub user: String,
    pub item: String,
    pub timestamp: String,
    pub title: String,
}

const ID_TYPES: &[DataType] = &[
    DataType::Utf8,
    DataType::LargeUtf8,
    DataType::Int32,
    DataType::Int64,
    DataType::UInt32,
    DataType::UInt64,
];
const TS_TYPES: &[DataType] = &[
    DataType::Int64,
    DataType::Int32,
    DataType::UInt32,
    DataType::UInt64,
    DataType::Float64,
];

/// Interns owned strings (one allocation per distinct id).
#[derive(Default)]
struct Ids {
    map: FnvMap<String, u32>,
    order: Vec<String>,
}

impl Ids {
    fn intern(&mut self, s: &str) -> u32 {
        if let Some(&i) = self.map.get(s) {
            return i;
        }
        let i = self.order.len() as u32;
        self.map.insert(s.to_string(), i);
        self.order.push(s.to_string());
        i
    }
}

/// The id at row `r` as text in `buf`; `None` when null.
fn id_text<'b>(col: &ArrayRef, r: usize, buf: &'b mut String) -> Option<&'b str> {
    if col.is_null(r) {
        return None;
    }
    buf.clear();
    match col.data_type() {
        DataType::Utf8 => buf.push_str(col.as_string::<i32>().value(r)),
        DataType::LargeUtf8 => buf.push_str(col.as_string::<i64>().value(r)),
        DataType::Int32 => write!(buf, "{}", col.as_primitive::<Int32Type>().value(r)).unwrap(),
        DataType::Int64 => write!(buf, "{}", col.as_primitive::<Int64Type>().value(r)).unwrap(),
        DataType::UInt32 => write!(buf, "{}", col.as_primitive::<UInt32Type>().value(r)).unwrap(),
        DataType::UInt64 => write!(buf, "{}", col.as_primitive::<UInt64Type>().value(r)).unwrap(),
        other => unreachable!("id type {other} was not accepted"),
    }
    Some(buf.as_str())
}

/// The timestamp at row `r`, or what is wrong with it: null, not finite, or out of range (a
/// float beyond what the RecBole reader takes, see [`float_timestamp`], or a `u64` above
/// `i64::MAX`), never saturated.
fn timestamp_at(col: &ArrayRef, r: usize) -> Result<i64, String> {
    if col.is_null(r) {
        return Err("null timestamp".into());
    }
    Ok(match col.data_type() {
        DataType::Int64 => col.as_primitive::<Int64Type>().value(r),
        DataType::Int32 => col.as_primitive::<Int32Type>().value(r) as i64,
        DataType::UInt32 => col.as_primitive::<UInt32Type>().value(r) as i64,
        DataType::UInt64 => {
            let v = col.as_primitive::<UInt64Type>().value(r);
            i64::try_from(v)
                .map_err(|_| format!("timestamp {v} is out of range (above {})", i64::MAX))?
        }
        DataType::Float64 => {
            let f = col.as_primitive::<Float64Type>().value(r);
            if !f.is_finite() {
                return Err(format!("non-finite timestamp {f}"));
            }
            float_timestamp(f).ok_or_else(|| {
                format!("timestamp {f:e} is out of range (|t| must be below 9e18)")
            })?
        }
        other => unreachable!("timestamp type {other} was not accepted"),
    })
}

/// Read the catalogue: item id + title; titles must be non-empty, ids unique.
pub fn read_catalog(path: &Path, cols: &ParquetColumns) -> Result<SourceCatalog> {
    let batches = read_columns(
        path,
        &[
            ColumnSpec {
                name: &cols.item,
                accepts: ID_TYPES,
            },
            ColumnSpec {
                name: &cols.title,
                accepts: &[DataType::Utf8, DataType::LargeUtf8],
            },
        ],
    )?;
    let mut cat = SourceCatalog {
        path: path.to_path_buf(),
        ..Default::default()
    };
    let mut seen: FnvMap<String, usize> = FnvMap::default();
    let mut buf = String::new();
    let mut row = 0usize;
    for b in &batches {
        let (ids, titles) = (b.column(0), b.column(1));
        for r in 0..b.num_rows() {
            let Some(id) = id_text(ids, r, &mut buf) else {
                bail!(
                    "{}: row {row}, field `{}`: null item id",
                    path.display(),
                    cols.item
                );
            };
            if id.is_empty() {
                bail!(
                    "{}: row {row}, field `{}`: empty item id",
                    path.display(),
                    cols.item
                );
            }
            let id = id.to_string();
            let title = if titles.is_null(r) {
                ""
            } else if let Some(s) = titles.as_string_opt::<i32>() {
                s.value(r)
            } else {
                titles.as_string::<i64>().value(r)
            };
            let title = title.trim();
            if title.is_empty() {
                bail!(
                    "{}: row {row}, field `{}`: null or empty title for item `{id}`",
                    path.display(),
                    cols.title
                );
            }
            if let Some(first) = seen.insert(id.clone(), row) {
                bail!(
                    "{}: row {row}, field `{}`: item id `{id}` repeats row {first}",
                    path.display(),
                    cols.item
                );
            }
            cat.source_ids.push(id);
            cat.titles.push(title.to_string());
            row += 1;
        }
    }
    Ok(cat)
}

/// Read the interactions against `catalog`.
pub fn read_log(path: &Path, catalog: SourceCatalog, cols: &ParquetColumns) -> Result<RawLog> {
    let batches = read_columns(
        path,
        &[
            ColumnSpec {
                name: &cols.user,
                accepts: ID_TYPES,
            },
            ColumnSpec {
                name: &cols.item,
                accepts: ID_TYPES,
            },
            ColumnSpec {
                name: &cols.timestamp,
                accepts: TS_TYPES,
            },
        ],
    )?;
    let mut item_index: FnvMap<&str, u32> = FnvMap::default();
    for (i, id) in catalog.source_ids.iter().enumerate() {
        item_index.insert(id.as_str(), i as u32);
    }
    let n: usize = batches.iter().map(|b| b.num_rows()).sum();
    let mut users = Ids::default();
    let (mut user, mut item, mut timestamp) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut buf = String::new();
    let mut row = 0usize;
    for b in &batches {
        for r in 0..b.num_rows() {
            let Some(u) = id_text(b.column(0), r, &mut buf) else {
                bail!(
                    "{}: row {row}, field `{}`: null user id",
                    path.display(),
                    cols.user
                );
            };
            if u.is_empty() {
                bail!(
                    "{}: row {row}, field `{}`: empty user id",
                    path.display(),
                    cols.user
                );
            }
            user.push(users.intern(u));
            let Some(it) = id_text(b.column(1), r, &mut buf) else {
                bail!(
                    "{}: row {row}, field `{}`: null item id",
                    path.display(),
                    cols.item
                );
            };
            let Some(&i) = item_index.get(it) else {
                bail!(
                    "{}: row {row}, field `{}`: unknown item id `{it}` (not in the catalogue {})",
                    path.display(),
                    cols.item,
                    catalog.path.display()
                );
            };
            item.push(i);
            let t = match timestamp_at(b.column(2), r) {
                Ok(t) => t,
                Err(why) => bail!(
                    "{}: row {row}, field `{}`: {why}",
                    path.display(),
                    cols.timestamp
                ),
            };
            timestamp.push(t);
            row += 1;
        }
    }
    drop(item_index);
    Ok(RawLog {
        catalog,
        user_source_ids: users.order,
        user,
        item,
        timestamp,
        path: path.to_path_buf(),
        user_field: cols.user.clone(),
        item_field: cols.item.clone(),
    })
}

/// Read `<inter>` and `<item>`.
pub fn read(inter: &Path, item: &Path, cols: &ParquetColumns) -> Result<RawLog> {
    let catalog = read_catalog(item, cols)?;
    read_log(inter, catalog, cols)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parquet_io::write_batches;
    use arrow_array::{Int64Array, RecordBatch, StringArray};
    use arrow_schema::{Field, Schema};
    use std::sync::Arc;

    #[test]
    fn reads_integer_and_string_ids_with_custom_names() {
        let d = tempfile::tempdir().unwrap();
        let cs = Arc::new(Schema::new(vec![
            Field::new("asin", DataType::Utf8, false),
            Field::new("name", DataType::Utf8, true),
        ]));
        let cat = d.path().join("cat.parquet");
        write_batches(
            &cat,
            cs.clone(),
            &[RecordBatch::try_new(
                cs,
                vec![
                    Arc::new(StringArray::from(vec!["a", "b"])),
                    Arc::new(StringArray::from(vec!["Alpha", "Beta"])),
                ],
            )
            .unwrap()],
        )
        .unwrap();
        let ls = Arc::new(Schema::new(vec![
            Field::new("uid", DataType::Int64, false),
            Field::new("asin", DataType::Utf8, false),
            Field::new("ts", DataType::Int64, false),
        ]));
        let log = d.path().join("log.parquet");
        write_batches(
            &log,
            ls.clone(),
            &[RecordBatch::try_new(
                ls,
                vec![
                    Arc::new(Int64Array::from(vec![7, 7, 9])),
                    Arc::new(StringArray::from(vec!["b", "a", "z"])),
                    Arc::new(Int64Array::from(vec![1, 2, 3])),
                ],
            )
            .unwrap()],
        )
        .unwrap();
        let cols = ParquetColumns {
            user: "uid".into(),
            item: "asin".into(),
            timestamp: "ts".into(),
            title: "name".into(),
        };
        let e = read(&log, &cat, &cols).unwrap_err().to_string();
        assert!(
            e.contains("log.parquet: row 2, field `asin`: unknown item id `z`"),
            "{e}"
        );
        let cols2 = ParquetColumns {
            timestamp: "time".into(),
            ..cols.clone()
        };
        let e = read(&log, &cat, &cols2).unwrap_err().to_string();
        assert!(e.contains("log.parquet: missing column `time`"), "{e}");
    }

    #[test]
    fn empty_ids_and_out_of_range_timestamps_are_refused() {
        use arrow_array::{Float64Array, UInt64Array};
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, cols: Vec<(&str, ArrayRef)>| {
            let p = d.path().join(name);
            let b = RecordBatch::try_from_iter(cols).unwrap();
            write_batches(&p, b.schema(), &[b]).unwrap();
            p
        };
        let cat = write(
            "cat.parquet",
            vec![
                (
                    "item",
                    Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
                ),
                ("title", Arc::new(StringArray::from(vec!["Alpha", "Beta"]))),
            ],
        );
        let cols = ParquetColumns {
            user: "user".into(),
            item: "item".into(),
            timestamp: "ts".into(),
            title: "title".into(),
        };
        let log = |name: &str, users: Vec<&str>, ts: ArrayRef| {
            write(
                name,
                vec![
                    ("user", Arc::new(StringArray::from(users)) as ArrayRef),
                    ("item", Arc::new(StringArray::from(vec!["a", "b", "a"]))),
                    ("ts", ts),
                ],
            )
        };
        let ok = log(
            "ok.parquet",
            vec!["u", "v", "u"],
            Arc::new(Float64Array::from(vec![1.0, -8.9e18, 8.9e18])),
        );
        let l = read(&ok, &cat, &cols).unwrap();
        assert_eq!(
            l.timestamp,
            vec![1, -8_900_000_000_000_000_000, 8_900_000_000_000_000_000]
        );
        // Floats beyond what the RecBole reader takes are refused, not saturated.
        let p = log(
            "big.parquet",
            vec!["u", "v", "u"],
            Arc::new(Float64Array::from(vec![1.0, 1e30, 2.0])),
        );
        let e = read(&p, &cat, &cols).unwrap_err().to_string();
        assert!(
            e.contains("big.parquet: row 1, field `ts`: timestamp 1e30 is out of range"),
            "{e}"
        );
        let p = log(
            "nan.parquet",
            vec!["u", "v", "u"],
            Arc::new(Float64Array::from(vec![1.0, 2.0, f64::NAN])),
        );
        let e = read(&p, &cat, &cols).unwrap_err().to_string();
        assert!(
            e.contains("nan.parquet: row 2, field `ts`: non-finite timestamp NaN"),
            "{e}"
        );
        let p = log(
            "u64.parquet",
            vec!["u", "v", "u"],
            Arc::new(UInt64Array::from(vec![1, u64::MAX, 2])),
        );
        let e = read(&p, &cat, &cols).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "u64.parquet: row 1, field `ts`: timestamp {} is out of range",
                u64::MAX
            )),
            "{e}"
        );
        let p = log(
            "null.parquet",
            vec!["u", "v", "u"],
            Arc::new(Int64Array::from(vec![Some(1), None, Some(2)])),
        );
        let e = read(&p, &cat, &cols).unwrap_err().to_string();
        assert!(
            e.contains("null.parquet: row 1, field `ts`: null timestamp"),
            "{e}"
        );
        // An empty user id is refused, as the RecBole reader refuses it.
        let p = log(
            "empty.parquet",
            vec!["u", "", "u"],
            Arc::new(Int64Array::from(vec![1, 2, 3])),
        );
        let e = read(&p, &cat, &cols).unwrap_err().to_string();
        assert!(
            e.contains("empty.parquet: row 1, field `user`: empty user id"),
            "{e}"
        );
        // So is an empty item id in the catalogue.
        let cat = write(
            "cat2.parquet",
            vec![
                (
                    "item",
                    Arc::new(StringArray::from(vec!["a", ""])) as ArrayRef,
                ),
                ("title", Arc::new(StringArray::from(vec!["Alpha", "Beta"]))),
            ],
        );
        let e = read_catalog(&cat, &cols).unwrap_err().to_string();
        assert!(
            e.contains("cat2.parquet: row 1, field `item`: empty item id"),
            "{e}"
        );
    }
}
