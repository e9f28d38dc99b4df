//! Parquet in and out. Files are written with zstd and page-level statistics (so later stages
//! can skip row groups) through a temp file + rename; reads project only the named columns and
//! check their types, naming the file and the field when something is wrong.

use anyhow::{anyhow, bail, Context, Result};
use arrow_array::RecordBatch;
use arrow_schema::{DataType, SchemaRef};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use std::path::Path;

/// Rows per row group: small enough for statistics to prune, large enough to compress well.
pub const ROW_GROUP_ROWS: usize = 64 * 1024;

pub fn writer_properties() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1).unwrap()))
        // Dictionary encoding cost ~18% of `prepare` on ML-1M (hashing every value) and zstd
        // already finds the repeats in id columns: plain encoding + zstd is faster at a similar size.
        .set_dictionary_enabled(false)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        // Fixed `created_by` so files are byte-identical across builds of the same version.
        .set_created_by(format!("llm4dsr {}", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Write `batches` (all of `schema`) to `path` atomically.
pub fn write_batches(path: &Path, schema: SchemaRef, batches: &[RecordBatch]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = crate::atomic::temp_sibling(path);
    let result = (|| -> Result<()> {
        let file =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = ArrowWriter::try_new(file, schema, Some(writer_properties()))?;
        for b in batches {
            w.write(b)?;
        }
        w.close()?;
        Ok(())
    })();
    if let Err(e) = result {
        std::fs::remove_file(&tmp).ok();
        return Err(e.context(format!("writing {}", path.display())));
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} -> {}", tmp.display(), path.display()))?;
    Ok(())
}

/// A column a reader needs: its name and the types it accepts.
pub struct ColumnSpec<'a> {
    pub name: &'a str,
    pub accepts: &'a [DataType],
}

/// Does a column of type `have` satisfy `want`? Equal types do; so does a list whose items have
/// the wanted item type whatever the child field's name (arrow-rs names it `item`, pyarrow
/// `element`), and a non-nullable child where a nullable one is wanted (it holds no nulls;
/// readers that cannot take nulls check the values).
fn type_accepted(have: &DataType, want: &DataType) -> bool {
    match (have, want) {
        (DataType::List(h), DataType::List(w))
        | (DataType::LargeList(h), DataType::LargeList(w)) => {
            (w.is_nullable() || !h.is_nullable()) && type_accepted(h.data_type(), w.data_type())
        }
        _ => have == want,
    }
}

/// Read only `columns` of `path`, in that order, checking that each exists with an accepted
/// type. Errors name the file and the field.
pub fn read_columns(path: &Path, columns: &[ColumnSpec<'_>]) -> Result<Vec<RecordBatch>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let schema = builder.schema().clone();
    let mut indices = Vec::with_capacity(columns.len());
    for c in columns {
        let (i, field) = schema.column_with_name(c.name).ok_or_else(|| {
            let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            anyhow!(
                "{}: missing column `{}` (columns present: {})",
                path.display(),
                c.name,
                have.join(", ")
            )
        })?;
        if !c.accepts.is_empty()
            && !c
                .accepts
                .iter()
                .any(|t| type_accepted(field.data_type(), t))
        {
            bail!(
                "{}: column `{}` has type {}, expected {}",
                path.display(),
                c.name,
                field.data_type(),
                c.accepts
                    .iter()
                    .map(|t| t.to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            );
        }
        indices.push(i);
    }
    // Parquet leaf indices differ from Arrow field indices for nested types: project roots.
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices.iter().copied());
    let reader = builder.with_projection(mask).build()?;
    let mut out = Vec::new();
    for b in reader {
        let b = b.with_context(|| format!("decoding {}", path.display()))?;
        // Reorder to the requested order (projection keeps file order).
        let cols = columns
            .iter()
            .map(|c| {
                b.column_by_name(c.name).cloned().ok_or_else(|| {
                    anyhow!("{}: column `{}` lost in projection", path.display(), c.name)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let fields: Vec<_> = columns
            .iter()
            .map(|c| b.schema().field_with_name(c.name).cloned())
            .collect::<std::result::Result<_, _>>()?;
        out.push(RecordBatch::try_new(
            std::sync::Arc::new(arrow_schema::Schema::new(fields)),
            cols,
        )?);
    }
    Ok(out)
}
