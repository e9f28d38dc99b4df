//! `llm4dsr evaluate`: full-ranking metrics of a checkpoint on one split of a prepared
//! dataset (JSON to --out or stdout, and a row of --results-csv).

use crate::cmd::train::{csv_header, csv_row};
use crate::config::ConfigFile;
use anyhow::{bail, Context, Result};
use llm4dsr_comm::{Comm, Local};
use llm4dsr_rec::{EvalOptions, RecDataset};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct EvaluateArgs {
    /// Checkpoint directory (a run directory means its `best/`).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Prepared dataset directory.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Split to rank: train, valid or test.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Metrics JSON to write (stdout when absent).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// CSV table to append a row to.
    #[arg(long)]
    pub results_csv: Option<PathBuf>,
    /// Label of this row in the CSV.
    #[arg(long, default_value = "")]
    pub label: String,
    /// Instances per scoring batch.
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
    /// Exclude history items from the ranking (off by default, as RecBole and the reference).
    #[arg(long)]
    pub mask_history: bool,
}

pub fn run(args: EvaluateArgs, _config: &ConfigFile) -> Result<()> {
    run_with(args, &Local)
}

pub fn run_with(args: EvaluateArgs, comm: &dyn Comm) -> Result<()> {
    let mut ckpt = args
        .checkpoint
        .clone()
        .context("--checkpoint is required")?;
    let dataset = args.dataset.clone().context("--dataset is required")?;
    if ckpt.join("best").join("config.json").exists() {
        ckpt = ckpt.join("best");
    }
    let cc = llm4dsr_rec::checkpoint::read_config(&ckpt)?;
    let data = RecDataset::load(&dataset)?;
    if cc.num_items != data.num_items {
        bail!(
            "{}: checkpoint was trained on a catalogue of {} items, {} has {} (field `num_items` of {})",
            ckpt.display(),
            cc.num_items,
            dataset.display(),
            data.num_items,
            ckpt.join("config.json").display()
        );
    }
    // The run's manifest (beside `best/` or `last/`) names the catalogue it trained on: item
    // ids mean nothing against another catalogue of the same size.
    let run_manifest = ckpt.parent().map(|p| p.join("manifest.json"));
    match run_manifest.filter(|p| p.is_file()) {
        Some(mp) => {
            let m = llm4dsr_data::Manifest::read(mp.parent().unwrap())?;
            let trained = m
                .inputs
                .iter()
                .find(|i| i.path.ends_with("catalog.parquet"));
            let here = dataset.join("catalog.parquet");
            let (sha, _) = llm4dsr_data::manifest::sha256_file(&here)?;
            if let Some(t) = trained.filter(|t| t.sha256 != sha) {
                bail!(
                    "{}: the checkpoint was trained on the catalogue {} (sha256 {}), {} has \
                     another one (sha256 {sha}): its item ids name other items",
                    ckpt.display(),
                    t.path,
                    t.sha256,
                    here.display()
                );
            }
        }
        None => tracing::warn!(
            "{}: no run manifest.json beside the checkpoint: cannot check that {} has the \
             catalogue it was trained on (only its size)",
            ckpt.display(),
            dataset.display()
        ),
    }
    if data.num_users > cc.num_users && cc.model.kind == llm4dsr_rec::ModelKind::Caser {
        bail!(
            "{}: Caser checkpoint knows {} users, the dataset has {}",
            ckpt.display(),
            cc.num_users,
            data.num_users
        );
    }
    anyhow::ensure!(
        args.batch_size >= 1,
        "--batch-size must be at least 1 (or `batch_size` in [evaluate])"
    );
    let (model, _) = llm4dsr_rec::checkpoint::load(&ckpt)?;
    let w = data.split(&args.split)?;
    let m = llm4dsr_rec::evaluate(
        &model,
        w,
        EvalOptions {
            batch_size: args.batch_size,
            mask_history: args.mask_history,
            engine: Default::default(),
        },
        comm,
    )?;
    if !comm.is_root() {
        return Ok(());
    }
    // Windows of the target alone have no history to rank from: counted, not ranked.
    let windows = w.len() as u64;
    let no_history = windows - llm4dsr_rec::batch::eval_instances(w).len() as u64;
    if no_history > 0 {
        tracing::warn!(
            "{}: {no_history} of {windows} `{}` windows hold only their target (no history) \
             and are not ranked",
            dataset.display(),
            args.split
        );
    }
    let v = serde_json::json!({
        "checkpoint": ckpt.display().to_string(),
        "dataset": dataset.display().to_string(),
        "split": args.split,
        "model": cc.model.kind.to_string(),
        "epoch": cc.epoch,
        "mask_history": args.mask_history,
        "rank_ties": "pessimistic (tied items count above the target)",
        "windows": windows,
        "windows_ranked": m.count,
        "windows_without_history": no_history,
        "metrics": m,
    });
    match &args.out {
        Some(p) => llm4dsr_rec::train::write_json(p, &v)?,
        None => println!("{}", serde_json::to_string_pretty(&v)?),
    }
    if let Some(csv) = &args.results_csv {
        let row = csv_row(
            &args.label,
            &dataset,
            cc.model.kind,
            &args.split,
            "",
            cc.epoch,
            cc.epoch,
            f64::NAN,
            &m,
        );
        llm4dsr_rec::metrics::append_csv_row(csv, &csv_header(), &row)?;
    }
    Ok(())
}
