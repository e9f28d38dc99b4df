//! Interaction logs, before and after `prepare`.
//!
//! [`RawLog`] is what an importer produces: every row of the source file in file order, with
//! user and item ids interned to dense indices (one `String` per distinct id, never per row)
//! and the source catalogue beside it. [`Interactions`] is the prepared log that
//! `interactions.parquet` stores: one row per kept interaction, grouped by user and in time
//! order, with the synthetic-noise mask and the clean item.
//!
//! | column      | type | meaning                                               |
//! |-------------|------|-------------------------------------------------------|
//! | `user`      | u32  | dense user id (1-based, see `users.parquet`)          |
//! | `item`      | u32  | item id as the sequence holds it (noised when noise=1) |
//! | `timestamp` | i64  | source timestamp                                      |
//! | `noise`     | u8   | 1 if synthetic noise replaced this interaction        |
//! | `original`  | u32  | the clean item                                        |
//!
//! `users.parquet` (`user` u32, `source_id` utf8) maps dense user ids back to the source's.

use crate::parquet_io::{read_columns, write_batches, ColumnSpec};
use anyhow::{bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Int64Type, UInt32Type, UInt8Type};
use arrow_array::{Int64Array, RecordBatch, StringArray, UInt32Array, UInt8Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The source catalogue: one entry per row of the item file, in file order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SourceCatalog {
    /// The item id as the source spells it.
    pub source_ids: Vec<String>,
    /// The display title (already unescaped / composed with the year where configured).
    pub titles: Vec<String>,
    /// The file the catalogue came from (for error messages).
    pub path: PathBuf,
}

/// An imported interaction log: rows in file order, ids interned.
#[derive(Clone, Debug, Default)]
pub struct RawLog {
    pub catalog: SourceCatalog,
    /// Source id of each user index.
    pub user_source_ids: Vec<String>,
    /// Per row: user index, catalogue index, timestamp.
    pub user: Vec<u32>,
    pub item: Vec<u32>,
    pub timestamp: Vec<i64>,
    /// The interactions file (for error messages).
    pub path: PathBuf,
    /// Name of the user / item fields in the source (for error messages).
    pub user_field: String,
    pub item_field: String,
}

impl RawLog {
    pub fn len(&self) -> usize {
        self.user.len()
    }
    pub fn is_empty(&self) -> bool {
        self.user.is_empty()
    }
}

/// FNV-1a: a fast, deterministic hash for interning short ids (SipHash costs ~3x more here and
/// the inputs are not adversarial).
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

impl Hasher for Fnv {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 {
            0xcbf2_9ce4_8422_2325
        } else {
            self.0
        };
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

pub type FnvMap<K, V> = HashMap<K, V, BuildHasherDefault<Fnv>>;

/// Interns borrowed strings to dense indices in order of first sight; allocates one `String`
/// per distinct value only when [`Interner::into_strings`] is called.
#[derive(Default)]
pub struct Interner<'a> {
    map: FnvMap<&'a str, u32>,
    /// The distinct values in first-sight order (index = id).
    pub order: Vec<&'a str>,
}

impl<'a> Interner<'a> {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            map: FnvMap::with_capacity_and_hasher(n, Default::default()),
            order: Vec::with_capacity(n),
        }
    }
    #[inline]
    pub fn intern(&mut self, s: &'a str) -> u32 {
        let next = self.order.len() as u32;
        let order = &mut self.order;
        *self.map.entry(s).or_insert_with(|| {
            order.push(s);
            next
        })
    }
    pub fn get(&self, s: &str) -> Option<u32> {
        self.map.get(s).copied()
    }
    pub fn len(&self) -> usize {
        self.order.len()
    }
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
    pub fn into_strings(self) -> Vec<String> {
        self.order.into_iter().map(str::to_string).collect()
    }
}

/// The prepared log (`interactions.parquet`), grouped by user, time-ordered within a user.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Interactions {
    pub user: Vec<u32>,
    pub item: Vec<u32>,
    pub timestamp: Vec<i64>,
    pub noise: Vec<u8>,
    pub original: Vec<u32>,
}

impl Interactions {
    pub fn len(&self) -> usize {
        self.user.len()
    }
    pub fn is_empty(&self) -> bool {
        self.user.is_empty()
    }

    pub fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("user", DataType::UInt32, false),
            Field::new("item", DataType::UInt32, false),
            Field::new("timestamp", DataType::Int64, false),
            Field::new("noise", DataType::UInt8, false),
            Field::new("original", DataType::UInt32, false),
        ]))
    }

    pub fn write_parquet(&self, path: &Path) -> Result<()> {
        let batch = RecordBatch::try_new(
            Self::schema(),
            vec![
                Arc::new(UInt32Array::from(self.user.clone())),
                Arc::new(UInt32Array::from(self.item.clone())),
                Arc::new(Int64Array::from(self.timestamp.clone())),
                Arc::new(UInt8Array::from(self.noise.clone())),
                Arc::new(UInt32Array::from(self.original.clone())),
            ],
        )?;
        write_batches(path, Self::schema(), &[batch])
    }

    pub fn read_parquet(path: &Path) -> Result<Self> {
        let batches = read_columns(
            path,
            &[
                ColumnSpec {
                    name: "user",
                    accepts: &[DataType::UInt32],
                },
                ColumnSpec {
                    name: "item",
                    accepts: &[DataType::UInt32],
                },
                ColumnSpec {
                    name: "timestamp",
                    accepts: &[DataType::Int64],
                },
                ColumnSpec {
                    name: "noise",
                    accepts: &[DataType::UInt8],
                },
                ColumnSpec {
                    name: "original",
                    accepts: &[DataType::UInt32],
                },
            ],
        )?;
        let mut out = Self::default();
        for b in &batches {
            if b.columns().iter().any(|c| c.null_count() > 0) {
                bail!("{}: null values in interactions", path.display());
            }
            out.user
                .extend_from_slice(b.column(0).as_primitive::<UInt32Type>().values());
            out.item
                .extend_from_slice(b.column(1).as_primitive::<UInt32Type>().values());
            out.timestamp
                .extend_from_slice(b.column(2).as_primitive::<Int64Type>().values());
            out.noise
                .extend_from_slice(b.column(3).as_primitive::<UInt8Type>().values());
            out.original
                .extend_from_slice(b.column(4).as_primitive::<UInt32Type>().values());
        }
        Ok(out)
    }
}

/// `users.parquet`: dense user id (1-based) -> the source's user id.
pub fn users_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("user", DataType::UInt32, false),
        Field::new("source_id", DataType::Utf8, false),
    ]))
}

/// Write `users.parquet`; `source_ids[i]` is user `i + 1`.
pub fn write_users(path: &Path, source_ids: &[String]) -> Result<()> {
    let batch = RecordBatch::try_new(
        users_schema(),
        vec![
            Arc::new(UInt32Array::from_iter_values(1..=source_ids.len() as u32)),
            Arc::new(StringArray::from_iter_values(source_ids.iter())),
        ],
    )?;
    write_batches(path, users_schema(), &[batch])
}

/// Read `users.parquet` into source ids (`[i]` is user `i + 1`).
pub fn read_users(path: &Path) -> Result<Vec<String>> {
    let batches = read_columns(
        path,
        &[
            ColumnSpec {
                name: "user",
                accepts: &[DataType::UInt32],
            },
            ColumnSpec {
                name: "source_id",
                accepts: &[DataType::Utf8],
            },
        ],
    )?;
    let mut out = Vec::new();
    for b in &batches {
        let u = b.column(0).as_primitive::<UInt32Type>();
        let s = b.column(1).as_string::<i32>();
        for r in 0..b.num_rows() {
            if u.value(r) as usize != out.len() + 1 {
                bail!(
                    "{}: field `user`: expected {} at row {}, found {}",
                    path.display(),
                    out.len() + 1,
                    out.len(),
                    u.value(r)
                );
            }
            out.push(s.value(r).to_string());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interner_is_dense_in_first_sight_order() {
        let mut i = Interner::default();
        assert_eq!(i.intern("b"), 0);
        assert_eq!(i.intern("a"), 1);
        assert_eq!(i.intern("b"), 0);
        assert_eq!(i.into_strings(), vec!["b", "a"]);
    }

    #[test]
    fn interactions_and_users_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let x = Interactions {
            user: vec![1, 1, 2],
            item: vec![3, 9, 4],
            timestamp: vec![5, 6, 7],
            noise: vec![0, 1, 0],
            original: vec![3, 2, 4],
        };
        let p = dir.path().join("i.parquet");
        x.write_parquet(&p).unwrap();
        assert_eq!(Interactions::read_parquet(&p).unwrap(), x);
        let u = dir.path().join("u.parquet");
        write_users(&u, &["a".into(), "b".into()]).unwrap();
        assert_eq!(read_users(&u).unwrap(), vec!["a", "b"]);
    }
}
