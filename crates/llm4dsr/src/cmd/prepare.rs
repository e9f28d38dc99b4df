//! `llm4dsr prepare`: interactions + catalogue -> dataset directory.

use crate::config::ConfigFile;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct PrepareArgs {
    /// Output dataset directory.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(_args: PrepareArgs, _config: &ConfigFile) -> Result<()> {
    bail!("`prepare` is not built yet")
}
