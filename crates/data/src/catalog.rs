//! The catalogue: item id -> title (and the id the source data used). One type, one file
//! (`catalog.parquet`: `item_id` u32, `title` utf8, `source_id` utf8), ids dense from 1.
//! Id 0 is padding and has the empty title.

use crate::parquet_io::{read_columns, write_batches, ColumnSpec};
use anyhow::{bail, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;
use arrow_array::{Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use std::path::Path;
use std::sync::Arc;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Catalog {
    /// `titles[id]`; `titles[0]` is "" (padding).
    pub titles: Vec<String>,
    /// The source data's id of each item; `source_ids[0]` is "".
    pub source_ids: Vec<String>,
}

impl Catalog {
    pub fn new() -> Self {
        Self {
            titles: vec![String::new()],
            source_ids: vec![String::new()],
        }
    }

    /// Number of real items (ids 1..=num_items).
    pub fn num_items(&self) -> u32 {
        (self.titles.len() - 1) as u32
    }

    /// Add an item, returning its id.
    pub fn push(&mut self, title: String, source_id: String) -> u32 {
        if self.titles.is_empty() {
            *self = Self::new();
        }
        self.titles.push(title);
        self.source_ids.push(source_id);
        self.num_items()
    }

    pub fn title(&self, id: u32) -> &str {
        &self.titles[id as usize]
    }

    pub fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("item_id", DataType::UInt32, false),
            Field::new("title", DataType::Utf8, false),
            Field::new("source_id", DataType::Utf8, false),
        ]))
    }

    pub fn to_record_batch(&self) -> Result<RecordBatch> {
        let n = self.num_items() as usize;
        Ok(RecordBatch::try_new(
            Self::schema(),
            vec![
                Arc::new(UInt32Array::from_iter_values(1..=n as u32)),
                Arc::new(StringArray::from_iter_values(self.titles[1..].iter())),
                Arc::new(StringArray::from_iter_values(self.source_ids[1..].iter())),
            ],
        )?)
    }

    pub fn write_parquet(&self, path: &Path) -> Result<()> {
        write_batches(path, Self::schema(), &[self.to_record_batch()?])
    }

    /// Read `catalog.parquet`: ids must be exactly 1..=n in order, titles non-empty.
    pub fn read_parquet(path: &Path) -> Result<Catalog> {
        let batches = read_columns(
            path,
            &[
                ColumnSpec {
                    name: "item_id",
                    accepts: &[DataType::UInt32],
                },
                ColumnSpec {
                    name: "title",
                    accepts: &[DataType::Utf8],
                },
                ColumnSpec {
                    name: "source_id",
                    accepts: &[DataType::Utf8],
                },
            ],
        )?;
        let mut c = Catalog::new();
        for b in &batches {
            let ids = b.column(0).as_primitive::<UInt32Type>();
            let titles = b.column(1).as_string::<i32>();
            let src = b.column(2).as_string::<i32>();
            for r in 0..b.num_rows() {
                let expect = c.num_items() + 1;
                if ids.is_null(r) || ids.value(r) != expect {
                    bail!(
                        "{}: field `item_id`: expected id {expect} at this row, found {:?}",
                        path.display(),
                        ids.is_valid(r).then(|| ids.value(r))
                    );
                }
                if titles.is_null(r) || titles.value(r).is_empty() {
                    bail!(
                        "{}: field `title`: item {expect} has a null or empty title",
                        path.display()
                    );
                }
                c.push(
                    titles.value(r).to_string(),
                    if src.is_null(r) {
                        String::new()
                    } else {
                        src.value(r).to_string()
                    },
                );
            }
        }
        Ok(c)
    }

    /// Read `<dataset>/catalog.parquet`.
    pub fn read_dataset(dataset: &Path) -> Result<Catalog> {
        Self::read_parquet(&dataset.join("catalog.parquet"))
    }
}
