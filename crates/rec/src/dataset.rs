//! The inputs of `train`/`evaluate`: a prepared dataset directory's three window splits and
//! its catalogue size, read and checked before any output is created.

use anyhow::{bail, Context, Result};
use llm4dsr_data::{read_split, Catalog, Windows};
use std::path::{Path, PathBuf};

/// A prepared dataset, as the backbones need it.
pub struct RecDataset {
    pub dir: PathBuf,
    pub train: Windows,
    pub valid: Windows,
    pub test: Windows,
    pub num_items: u32,
    /// Largest user id in any split (user ids are dense and 1-based).
    pub num_users: u32,
}

impl RecDataset {
    /// Read and validate `<dir>/windows/{train,valid,test}.parquet` and `<dir>/catalog.parquet`.
    pub fn load(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            bail!("{}: dataset directory does not exist", dir.display());
        }
        let cat_path = dir.join("catalog.parquet");
        if !cat_path.exists() {
            bail!(
                "{}: no catalogue (is {} a prepared dataset directory?)",
                cat_path.display(),
                dir.display()
            );
        }
        let num_items = Catalog::read_dataset(dir)?.num_items();
        let mut splits = Vec::new();
        for s in llm4dsr_data::windows::SPLITS {
            let w = read_split(dir, s)?;
            let p = dir.join("windows").join(format!("{s}.parquet"));
            if w.is_empty() {
                bail!("{}: split `{s}` has no windows", p.display());
            }
            w.validate_ids(num_items, &p)?;
            splits.push(w);
        }
        let test = splits.pop().unwrap();
        let valid = splits.pop().unwrap();
        let train = splits.pop().unwrap();
        let num_users = [&train, &valid, &test]
            .iter()
            .flat_map(|w| w.user.iter().copied())
            .max()
            .context("no users")?;
        Ok(Self {
            dir: dir.to_path_buf(),
            train,
            valid,
            test,
            num_items,
            num_users,
        })
    }

    pub fn split(&self, name: &str) -> Result<&Windows> {
        match name {
            "train" => Ok(&self.train),
            "valid" => Ok(&self.valid),
            "test" => Ok(&self.test),
            other => bail!("unknown split `{other}` (train, valid or test)"),
        }
    }
}
