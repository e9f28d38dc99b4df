//! Top-level command line. Each subcommand's flags live in `cmd/<stage>.rs` beside the code
//! that runs it; this file only dispatches.

use crate::cmd;
use crate::config::ConfigFile;
use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "llm4dsr",
    version,
    about = "Denoise sequential-recommendation interaction logs with a large language model",
    long_about = "llm4dsr cleans the interaction sequences that sequential recommenders learn from. \
A causal LLM, fine-tuned to spot an item swapped into a user's title sequence, flags noisy items, \
suggests replacements grounded in the catalogue, and corrects only confident cases; SASRec, GRU4Rec \
or Caser then train on the cleaned data.\n\nStages read a dataset directory and write a new one \
(Parquet + manifest.json). Every flag can also come from a TOML config (--config), in the table \
named after the stage; the command line wins."
)]
pub struct Cli {
    /// TOML config file; each stage reads its flags from the table of its name ([prepare], [train], ...).
    #[arg(long, global = true, env = "LLM4DSR_CONFIG")]
    pub config: Option<PathBuf>,
    /// More log output (-v debug, -vv trace). RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fetch, verify and unpack the real datasets and models (MovieLens, SmolLM2, MiniLM).
    #[command(subcommand)]
    Assets(cmd::assets::AssetsCommand),
    /// Import interactions + catalogue and write a windowed, split, noised dataset directory.
    Prepare(cmd::prepare::PrepareArgs),
    /// Model utilities: convert a GGUF model to an HF directory.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Print the LLM's first-token and full-title noise scores of every item of a few windows.
    InspectScores(cmd::inspect::InspectArgs),
}

pub fn main() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)
        .map_err(|e| e.exit())
        .unwrap();
    crate::logging::init(cli.verbose, 0, 1);
    let config = match &cli.config {
        Some(p) => ConfigFile::load(p)?,
        None => ConfigFile::default(),
    };
    let (name, sub) = matches.subcommand().expect("subcommand required");
    match name {
        "assets" => cmd::assets::run(&config, sub),
        "prepare" => cmd::prepare::run(config.resolve("prepare", sub)?, &config),
        "model" => cmd::model::run(&config, sub),
        "inspect-scores" => cmd::inspect::run(config.resolve("inspect-scores", sub)?),
        other => unreachable!("unhandled subcommand {other}"),
    }
}
