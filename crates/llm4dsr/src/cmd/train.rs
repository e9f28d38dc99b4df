//! `llm4dsr train`: train SASRec / GRU4Rec / Caser on a prepared dataset directory, select the
//! epoch on the validation split, and write checkpoints (`<out>/best`, `<out>/last`), the
//! metrics of the best epoch on valid and test (`<out>/metrics.json`, and a row of
//! `--results-csv`), and a manifest.

use crate::config::ConfigFile;
use anyhow::{bail, Context, Result};
use llm4dsr_comm::{Comm, Local};
use llm4dsr_data::Manifest;
use llm4dsr_rec::adam::AdamConfig;
use llm4dsr_rec::train::{final_metrics, write_json, CheckpointPlan};
use llm4dsr_rec::{
    Engine, EvalOptions, LossKind, Metrics, ModelConfig, ModelKind, RecDataset, SelectOn, Targets,
    TrainConfig,
};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct TrainArgs {
    /// Prepared dataset directory (windows/{train,valid,test}.parquet + catalog.parquet).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Run directory for checkpoints, metrics.json and manifest.json.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Backbone architecture.
    #[arg(long, value_enum, default_value_t = ModelKind::Sasrec)]
    pub model: ModelKind,
    /// Loss: full-softmax cross-entropy (`ce`) or BCE with one sampled negative (`bce`).
    #[arg(long, value_enum, default_value_t = LossKind::Ce)]
    pub loss: LossKind,
    /// Which window positions are training targets.
    #[arg(long, value_enum, default_value_t = Targets::EveryPrefix)]
    pub targets: Targets,
    /// Maximum number of epochs.
    #[arg(long, default_value_t = 50)]
    pub epochs: usize,
    /// Stop after this many epochs without a better selection NDCG@10 (0 = never).
    #[arg(long, default_value_t = 5)]
    pub patience: usize,
    /// Global batch size (instances per optimizer step, over all ranks).
    #[arg(long, default_value_t = 256)]
    pub batch_size: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Adam beta2 (0.98 in the reference SASRec, 0.999 in RecBole).
    #[arg(long, default_value_t = 0.999)]
    pub beta2: f64,
    /// L2 weight decay added to the gradient.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Seed of every random draw (init, shuffles, dropout, negatives).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Split that picks the best epoch. `test` reproduces the reference code (optimistic).
    #[arg(long, value_enum, default_value_t = SelectOn::Valid)]
    pub select_on: SelectOn,
    /// Embedding / hidden size (default 64).
    #[arg(long)]
    pub dim: Option<usize>,
    /// History items used per instance (default 10).
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Dropout rate (defaults: SASRec 0.5, GRU4Rec 0.3, Caser 0.4).
    #[arg(long)]
    pub dropout: Option<f32>,
    /// SASRec attention dropout (default: the dropout rate).
    #[arg(long)]
    pub attn_dropout: Option<f32>,
    /// SASRec blocks (default 2).
    #[arg(long)]
    pub blocks: Option<usize>,
    /// SASRec heads (default 1).
    #[arg(long)]
    pub heads: Option<usize>,
    /// SASRec feed-forward inner size (default 64).
    #[arg(long)]
    pub inner: Option<usize>,
    /// SASRec feed-forward activation: relu (default) or gelu.
    #[arg(long)]
    pub act: Option<String>,
    /// GRU4Rec hidden size (default 128).
    #[arg(long)]
    pub gru_hidden: Option<usize>,
    /// Caser vertical filters (default 4).
    #[arg(long)]
    pub nv: Option<usize>,
    /// Caser horizontal filters per height (default 16).
    #[arg(long)]
    pub nh: Option<usize>,
    /// Training-step implementation: `fused` (hand-written CPU forward and backward, the
    /// default through `auto`) or `candle` (autograd; the reference). Both compute the
    /// same function (equal to float tolerance); the fused engine is several times faster.
    #[arg(long, value_enum, default_value_t = Engine::Auto)]
    pub engine: Engine,
    /// Instances per evaluation batch.
    #[arg(long, default_value_t = 1024)]
    pub eval_batch_size: usize,
    /// Exclude history items from the ranking (off by default, as RecBole and the reference).
    #[arg(long)]
    pub mask_history: bool,
    /// Continue from `<out>/last`.
    #[arg(long)]
    pub resume: bool,
    /// Replace an existing run directory.
    #[arg(long)]
    pub overwrite: bool,
    /// CSV table to append the test metrics row to (created with a header if absent).
    #[arg(long)]
    pub results_csv: Option<PathBuf>,
    /// Label of this run in the CSV (e.g. `clean`, `noisy-0.1`, `llm4dsr`).
    #[arg(long, default_value = "")]
    pub label: String,
}

impl TrainArgs {
    pub fn model_config(&self) -> ModelConfig {
        let mut m = ModelConfig::defaults(self.model);
        if let Some(v) = self.dim {
            m.dim = v;
        }
        if let Some(v) = self.max_len {
            m.max_len = v;
        }
        if let Some(v) = self.dropout {
            m.dropout = v;
            m.attn_dropout = v;
        }
        if let Some(v) = self.attn_dropout {
            m.attn_dropout = v;
        }
        if let Some(v) = self.blocks {
            m.blocks = v;
        }
        if let Some(v) = self.heads {
            m.heads = v;
        }
        if let Some(v) = self.inner {
            m.inner = v;
        }
        if let Some(v) = &self.act {
            m.act = v.clone();
        }
        if let Some(v) = self.gru_hidden {
            m.gru_hidden = v;
        }
        if let Some(v) = self.nv {
            m.nv = v;
        }
        if let Some(v) = self.nh {
            m.nh = v;
        }
        m
    }

    pub fn train_config(&self) -> TrainConfig {
        let mut c = TrainConfig::new(self.model_config());
        c.loss = self.loss;
        c.targets = self.targets;
        c.adam = AdamConfig {
            lr: self.lr,
            beta1: 0.9,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
        };
        c.batch_size = self.batch_size;
        c.epochs = self.epochs;
        c.patience = self.patience;
        c.seed = self.seed;
        c.select_on = self.select_on;
        c.eval_batch_size = self.eval_batch_size;
        c.mask_history = self.mask_history;
        c.engine = self.engine;
        c
    }
}

/// The columns of the results CSV (`train` and `evaluate` write the same table).
pub fn csv_header() -> Vec<String> {
    let mut h: Vec<String> = [
        "label",
        "dataset",
        "model",
        "split",
        "select_on",
        "epochs",
        "best_epoch",
        "s_per_epoch",
        "count",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    h.extend(llm4dsr_rec::Metrics::names());
    h
}

#[allow(clippy::too_many_arguments)]
pub fn csv_row(
    label: &str,
    dataset: &Path,
    model: ModelKind,
    split: &str,
    select_on: &str,
    epochs: usize,
    best_epoch: usize,
    s_per_epoch: f64,
    m: &llm4dsr_rec::Metrics,
) -> Vec<String> {
    let mut r = vec![
        label.to_string(),
        dataset.display().to_string(),
        model.to_string(),
        split.to_string(),
        select_on.to_string(),
        epochs.to_string(),
        best_epoch.to_string(),
        format!("{s_per_epoch:.2}"),
        m.count.to_string(),
    ];
    r.extend(Metrics::names().iter().map(|n| format!("{:.6}", m.get(n))));
    r
}
pub fn run(args: TrainArgs, _config: &ConfigFile) -> Result<()> {
    // The MPI communicator plugs in here once it lands; one process is the `Local` path.
    run_with(args, &Local)
}

pub fn run_with(args: TrainArgs, comm: &dyn Comm) -> Result<()> {
    let dataset = args
        .dataset
        .clone()
        .context("--dataset is required (or `dataset` in [train])")?;
    let out = args
        .out
        .clone()
        .context("--out is required (or `out` in [train])")?;
    let cfg = args.train_config();
    cfg.validate()?;
    // Every input is read and checked before anything is written.
    let data = RecDataset::load(&dataset)?;
    llm4dsr_rec::batch::check_targets(&data.train, cfg.targets)
        .with_context(|| format!("{}", dataset.join("windows/train.parquet").display()))?;
    let exists = out.exists();
    // Every rank decides from the same state of the disk, before rank 0 changes it.
    comm.barrier()?;
    if exists && comm.is_root() {
        // A run killed while replacing a checkpoint leaves it moved aside: bring it back.
        for d in ["last", "best"] {
            llm4dsr_data::atomic::recover_moved_aside(&out.join(d))?;
        }
    }
    comm.barrier()?;
    if exists && !args.resume {
        if !args.overwrite {
            if !out.join("last").join("state.json").exists() {
                bail!(
                    "{}: run directory exists but holds no checkpoint to resume (a run killed \
                     before its first epoch ended, or another directory): pass --overwrite to \
                     start afresh there",
                    out.display()
                );
            }
            bail!("{}: run directory exists (pass --resume to continue it or --overwrite to replace it)", out.display());
        }
        if comm.is_root() {
            std::fs::remove_dir_all(&out).with_context(|| format!("removing {}", out.display()))?;
        }
    }
    if args.resume && !out.join("last").join("state.json").exists() {
        bail!("{}: nothing to resume (no last/state.json)", out.display());
    }
    let created = !out.exists();
    if comm.is_root() {
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    }
    comm.barrier()?;
    let result = train_in(&args, &cfg, &data, &dataset, &out, comm);
    // A run that failed before its first checkpoint leaves nothing to resume: no directory.
    if result.is_err() && created && comm.is_root() && !out.join("last").join("state.json").exists()
    {
        std::fs::remove_dir_all(&out).ok();
    }
    result
}

/// Train into the run directory `out` (created), then write metrics, manifest and CSV row.
fn train_in(
    args: &TrainArgs,
    cfg: &llm4dsr_rec::TrainConfig,
    data: &RecDataset,
    dataset: &std::path::Path,
    out: &std::path::Path,
    comm: &dyn Comm,
) -> Result<()> {
    let select = match cfg.select_on {
        SelectOn::Valid => &data.valid,
        SelectOn::Test => {
            tracing::warn!("--select-on test: the best epoch is chosen on the TEST split (reference-code compatibility mode; test metrics are optimistic)");
            &data.test
        }
    };
    // The dataset's files identify the data a resume must continue on.
    let mut data_id = Vec::new();
    for f in [
        "windows/train.parquet",
        "windows/valid.parquet",
        "windows/test.parquet",
        "catalog.parquet",
    ] {
        data_id.push(llm4dsr_data::manifest::sha256_file(&dataset.join(f))?.0);
    }
    let plan = CheckpointPlan {
        dir: out.to_path_buf(),
        resume: args.resume,
        data: llm4dsr_data::manifest::sha256_bytes(data_id.join(",").as_bytes()),
    };
    let outcome = llm4dsr_rec::train(
        &data.train,
        select,
        data.num_items,
        data.num_users,
        cfg,
        comm,
        Some(&plan),
    )?;
    let opts = EvalOptions {
        batch_size: cfg.eval_batch_size,
        mask_history: cfg.mask_history,
        engine: cfg.engine,
    };
    let (valid_m, test_m) = final_metrics(&outcome.model, &data.valid, &data.test, opts, comm)?;
    let spe = outcome.seconds_per_epoch();
    let select_on = match cfg.select_on {
        SelectOn::Valid => "valid",
        SelectOn::Test => "test (reference compatibility mode)",
    };
    tracing::info!(
        best_epoch = outcome.state.best_epoch,
        test_hr10 = format!("{:.4}", test_m.get("HR@10")),
        test_ndcg10 = format!("{:.4}", test_m.get("NDCG@10")),
        seconds_per_epoch = format!("{spe:.2}"),
        "trained"
    );
    if !comm.is_root() {
        return Ok(());
    }
    let summary = serde_json::json!({
        "dataset": dataset.display().to_string(),
        "model": cfg.model.kind.to_string(),
        "select_on": select_on,
        "epochs_run": outcome.state.epochs_done,
        "best_epoch": outcome.state.best_epoch,
        "stopped_early": outcome.state.stopped_early,
        "seconds_per_epoch": spe,
        "cpu_seconds_per_epoch": outcome.cpu_seconds_per_epoch(),
        "instances": outcome.instances,
        "loss_terms": outcome.loss_terms,
        "steps_per_epoch": outcome.steps_per_epoch,
        "ranks": comm.size(),
        "allreduce_bytes_per_step": outcome.allreduce_bytes_per_step,
        "rank_ties": "pessimistic (tied items count above the target)",
        "valid": valid_m,
        "test": test_m,
        "history": outcome.state.history,
        "config": cfg,
    });
    write_json(&out.join("metrics.json"), &summary)?;
    let mut manifest = Manifest::new("train", cfg.seed, serde_json::to_value(args)?);
    for s in llm4dsr_data::windows::SPLITS {
        manifest.add_input(&dataset.join("windows").join(format!("{s}.parquet")))?;
    }
    manifest.add_input(&dataset.join("catalog.parquet"))?;
    manifest.count("train.windows", data.train.len() as u64);
    manifest.count("train.instances", outcome.instances as u64);
    manifest.count("train.loss_terms", outcome.loss_terms);
    // windows = ranked + without history (the target alone: nothing to rank from).
    for (split, w, m) in [
        ("valid", &data.valid, &valid_m),
        ("test", &data.test, &test_m),
    ] {
        manifest.count(&format!("{split}.windows"), w.len() as u64);
        manifest.count(&format!("{split}.ranked"), m.count);
        manifest.count(
            &format!("{split}.windows_without_history"),
            w.len() as u64 - m.count,
        );
    }
    manifest.count("epochs_run", outcome.state.epochs_done as u64);
    manifest.count("best_epoch", outcome.state.best_epoch as u64);
    manifest
        .notes
        .push(format!("model selected on {select_on}"));
    manifest.notes.push(format!(
        "targets: {:?} (training instances {} from {} windows)",
        cfg.targets,
        outcome.instances,
        data.train.len()
    ));
    manifest.add_outputs_under(out)?;
    manifest.write(out)?;
    if let Some(csv) = &args.results_csv {
        let sel = if cfg.select_on == SelectOn::Valid {
            "valid"
        } else {
            "test"
        };
        let row = csv_row(
            &args.label,
            dataset,
            cfg.model.kind,
            "test",
            sel,
            outcome.state.epochs_done,
            outcome.state.best_epoch,
            spe,
            &test_m,
        );
        llm4dsr_rec::metrics::append_csv_row(csv, &csv_header(), &row)?;
    }
    println!(
        "{} test HR@10 {:.4} NDCG@10 {:.4} HR@20 {:.4} NDCG@20 {:.4} | best epoch {} of {} | {:.2} s/epoch",
        cfg.model.kind,
        test_m.get("HR@10"),
        test_m.get("NDCG@10"),
        test_m.get("HR@20"),
        test_m.get("NDCG@20"),
        outcome.state.best_epoch,
        outcome.state.epochs_done,
        spe
    );
    Ok(())
}
