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
    /// Score every item of every window with a noise detector (sharded over the job's ranks).
    Score(cmd::score::ScoreArgs),
    /// Map generated titles to catalogue items: exact title match, else the nearest title
    /// embedding (the grounding kernel on a GPU; sharded over the job's ranks).
    Ground(cmd::ground::GroundArgs),
    /// Check the communicator under the cluster's launcher: placement and every collective.
    CommCheck(cmd::comm_check::CommCheckArgs),
    /// Train SASRec / GRU4Rec / Caser on a prepared dataset; checkpoints + test metrics.
    Train(cmd::train::TrainArgs),
    /// Full-ranking HR@K / NDCG@K of a checkpoint on a dataset split.
    Evaluate(cmd::evaluate::EvaluateArgs),
    /// Model utilities: convert a GGUF model to an HF directory.
    #[command(subcommand)]
    Model(cmd::model::ModelCommand),
    /// Print the LLM's first-token and full-title noise scores of every item of a few windows.
    InspectScores(cmd::inspect::InspectArgs),
    /// The main job: assets, prepare (clean + noisy), noise detectors, LLM scores, backbones on
    /// clean vs noisy data, report. Without --config it runs the embedded ML-100K default.
    ///
    /// Assets are fetched into ~/.cache/llm4dsr ($LLM4DSR_CACHE overrides); every step writes
    /// under --workdir, and the report is <workdir>/report.md. A re-run keeps each step whose
    /// output is this run's and intact (sha256 against its manifest) and redoes the others.
    Run(cmd::run::RunArgs),
}

pub fn main() -> Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)
        .map_err(|e| e.exit())
        .unwrap();
    // The communicator comes first: every log line of a multi-rank job carries its rank.
    let comm = match llm4dsr_comm::init() {
        Ok(c) => c,
        Err(e) => {
            crate::logging::init(cli.verbose, 0, 1);
            return Err(e.context("choosing the communicator"));
        }
    };
    crate::logging::init(cli.verbose, comm.rank(), comm.size());
    if comm.size() > 1 {
        // One line per rank: where each rank landed (the host picks the node's GPUs).
        tracing::info!(
            "joined a job of {} ranks via {}: local rank {} of {} on {}",
            comm.size(),
            comm.backend(),
            comm.local_rank(),
            comm.local_size(),
            hostname()
        );
    }
    // One GPU per local rank (wrapping when ranks outnumber GPUs), for the kernels and the
    // LLM alike. Counting GPUs initialises the driver, so only where one is installed.
    if llm4dsr_kernels::backend::driver_present() {
        let visible = llm4dsr_kernels::backend::visible_devices();
        if visible > 0 {
            let ordinal = llm4dsr_kernels::backend::set_device_ordinal(llm4dsr_comm::gpu_ordinal(
                comm.as_ref(),
                visible,
            ));
            tracing::debug!("GPU {ordinal} of {visible} visible");
        }
    }
    let result = (|| -> Result<()> {
        let config = match &cli.config {
            Some(p) => ConfigFile::load(p)?,
            None => ConfigFile::default(),
        };
        let comm = comm.as_ref();
        let (name, sub) = matches.subcommand().expect("subcommand required");
        match name {
            // Single-process stages: rank 0 runs them, the other ranks wait for its outcome.
            "assets" => root_only(comm, name, || cmd::assets::run(&config, sub)),
            "prepare" => root_only(comm, name, || {
                cmd::prepare::run(config.resolve("prepare", sub)?, &config)
            }),
            "score" => cmd::score::run(config.resolve("score", sub)?, &config, comm),
            "ground" => cmd::ground::run(config.resolve("ground", sub)?, &config, comm),
            "comm-check" => cmd::comm_check::run(config.resolve("comm-check", sub)?, comm),
            "train" => cmd::train::run_with(config.resolve("train", sub)?, comm),
            "evaluate" => cmd::evaluate::run_with(config.resolve("evaluate", sub)?, comm),
            "run" => cmd::run::run(config.resolve("run", sub)?, &config, comm),
            "model" => root_only(comm, name, || cmd::model::run(&config, sub)),
            "inspect-scores" => root_only(comm, name, || {
                cmd::inspect::run(config.resolve("inspect-scores", sub)?)
            }),
            other => unreachable!("unhandled subcommand {other}"),
        }
    })();
    if let Err(e) = &result {
        if comm.size() > 1 {
            // Other ranks may be waiting in a collective for this one: stop the whole job, with
            // the reason in this rank's log.
            tracing::error!("{e:#}");
            tracing::error!("aborting all {} ranks of the job", comm.size());
            comm.abort(1);
        }
    }
    result
}

/// Run a stage that is not written for many ranks on rank 0 only; every rank returns its
/// outcome, so a pipeline script can run all stages under one launcher.
fn root_only(
    comm: &dyn llm4dsr_comm::Comm,
    stage: &str,
    f: impl FnOnce() -> Result<()>,
) -> Result<()> {
    if comm.size() == 1 {
        return f();
    }
    let mut outcome = Vec::new();
    if comm.is_root() {
        let r: std::result::Result<(), String> = f().map_err(|e| format!("{e:#}"));
        outcome = serde_json::to_vec(&r)?;
    } else {
        tracing::debug!("`{stage}` runs on rank 0 only; waiting for it");
    }
    comm.broadcast_bytes(0, &mut outcome)?;
    let r: std::result::Result<(), String> = serde_json::from_slice(&outcome)?;
    r.map_err(|msg| {
        if comm.is_root() {
            anyhow::anyhow!(msg)
        } else {
            anyhow::anyhow!("`{stage}` failed on rank 0: {msg}")
        }
    })
}

/// This machine's name, for logs.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "?".into())
}
