//! Training: Adam on the chosen loss, early stopping on the validation split's NDCG@10.
//!
//! Data parallel by construction, and the normal single-process path with `Local`:
//! - identical initial weights on every rank (seeded init, then a broadcast from rank 0);
//! - each epoch's instance order is one keyed shuffle; each global batch is cut into
//!   contiguous per-rank slices; dropout masks and negatives are keyed by (epoch, instance
//!   id), so what an instance contributes never depends on the rank count;
//! - each rank's loss is a SUM over its terms; the gradients of all parameters and the loss
//!   go into ONE f32 buffer, all-reduced once per step and divided by the global number of
//!   loss terms, so n ranks take the step one rank would (to float reassociation);
//! - identical Adam steps everywhere; checkpoints are written by rank 0 only.

use crate::adam::{Adam, AdamConfig};
use crate::batch::{
    check_targets, loss_terms, training_instances, Dropout, Instance, SeqBatch, Targets,
};
use crate::evaluate::{evaluate, rank_slice, EvalOptions};
use crate::fused::{FusedEngine, FusedLoss};
use crate::metrics::Metrics;
use crate::model::{ModelConfig, Recommender};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, D};
use llm4dsr_comm::Comm;
use llm4dsr_data::rng::{mix64, KeyedRng, Purpose};
use llm4dsr_data::Windows;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The training loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Full softmax cross-entropy over the whole catalogue (RecBole's default).
    Ce,
    /// Binary cross-entropy with one sampled negative per target (the reference SASRec's).
    Bce,
}

/// Which implementation computes the training step.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Engine {
    /// The fused CPU engine (every model has one today; a model without would take candle).
    #[default]
    Auto,
    /// Hand-written forward + backward on flat buffers (`sasrec_fused.rs`,
    /// `gru4rec_fused.rs`, `caser_fused.rs`).
    Fused,
    /// candle ops with autograd (every model; the reference the fused engine is tested
    /// against).
    Candle,
}

/// Which split picks the best epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SelectOn {
    /// The validation split (the held-out protocol; the test split is touched once, at the end).
    Valid,
    /// Compatibility mode reproducing the reference code (selects on TEST: optimistic).
    Test,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub model: ModelConfig,
    pub loss: LossKind,
    pub targets: Targets,
    pub adam: AdamConfig,
    pub batch_size: usize,
    pub epochs: usize,
    /// Stop after this many evaluations without a better selection metric (0 = never).
    pub patience: usize,
    pub seed: u64,
    pub select_on: SelectOn,
    pub eval_batch_size: usize,
    pub mask_history: bool,
    /// Training-step implementation (results agree to float tolerance).
    #[serde(default)]
    pub engine: Engine,
}

impl TrainConfig {
    /// Refuse values no run can use (each named by its `train` flag / config key).
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        let a = &self.adam;
        let checks = [
            (self.epochs >= 1, "epochs must be at least 1"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (
                self.eval_batch_size >= 1,
                "eval_batch_size must be at least 1",
            ),
            (
                a.lr.is_finite() && a.lr > 0.0,
                "lr must be a positive finite number",
            ),
            ((0.0..1.0).contains(&a.beta2), "beta2 must be in [0, 1)"),
            (
                a.weight_decay.is_finite() && a.weight_decay >= 0.0,
                "weight_decay must be a finite number >= 0",
            ),
        ];
        for (ok, why) in checks {
            if !ok {
                bail!(
                    "train: {why} (got epochs {}, batch_size {}, eval_batch_size {}, lr {}, \
                     beta2 {}, weight_decay {})",
                    self.epochs,
                    self.batch_size,
                    self.eval_batch_size,
                    a.lr,
                    a.beta2,
                    a.weight_decay
                );
            }
        }
        Ok(())
    }

    pub fn new(model: ModelConfig) -> Self {
        Self {
            model,
            loss: LossKind::Ce,
            targets: Targets::EveryPrefix,
            adam: AdamConfig {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            batch_size: 256,
            epochs: 50,
            patience: 5,
            seed: 42,
            select_on: SelectOn::Valid,
            eval_batch_size: 1024,
            mask_history: false,
            engine: Engine::Auto,
        }
    }
}

/// One epoch's record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EpochLog {
    pub epoch: usize,
    /// Mean loss per term.
    pub loss: f64,
    pub train_seconds: f64,
    /// CPU seconds (user + system, all threads) of the epoch's training; on a shared
    /// machine this is the figure that does not depend on the load. 0 where unknown.
    #[serde(default)]
    pub train_cpu_seconds: f64,
    /// NDCG@10 on the selection split.
    pub select_ndcg10: f64,
    pub select_hr10: f64,
}

/// Resumable training state (`state.json` of the `last/` checkpoint).
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct TrainState {
    pub epochs_done: usize,
    pub best_epoch: usize,
    pub best_ndcg10: f64,
    pub bad_evals: usize,
    pub history: Vec<EpochLog>,
    pub stopped_early: bool,
    /// What identifies the training data (the caller's [`CheckpointPlan::data`]), so that a
    /// resume on other data is refused.
    #[serde(default)]
    pub data: String,
}

/// Where training writes checkpoints (rank 0): `<dir>/last` every epoch, `<dir>/best` on
/// improvement.
pub struct CheckpointPlan {
    pub dir: PathBuf,
    /// Continue from `<dir>/last`.
    pub resume: bool,
    /// What identifies the training data (e.g. the hashes of the dataset's files), kept in
    /// `last/state.json`: a resume on other data is refused. Empty: not checked.
    pub data: String,
}

/// The settings a resumed run may change: how long it trains, when it stops early, and the
/// evaluation batch (which does not change any result).
const RESUMABLE_CHANGES: &[&str] = &["epochs", "patience", "eval_batch_size"];

/// Refuse a resume whose training settings or data differ from the checkpoint's (`last`
/// names it): the run would record settings its first epochs did not use.
fn check_resume(
    last: &Path,
    saved: &serde_json::Value,
    now: &serde_json::Value,
    saved_data: &str,
    data: &str,
) -> Result<()> {
    if let (Some(a), Some(b)) = (saved.as_object(), now.as_object()) {
        for (k, v) in b {
            if RESUMABLE_CHANGES.contains(&k.as_str()) {
                continue;
            }
            if a.get(k) != Some(v) {
                bail!(
                    "{}: cannot resume: `{k}` was {} in the checkpoint, {v} now (only {} may \
                     change on resume; --overwrite starts afresh)",
                    last.join("config.json").display(),
                    a.get(k).unwrap_or(&serde_json::Value::Null),
                    RESUMABLE_CHANGES.join(", ")
                );
            }
        }
    }
    if !saved_data.is_empty() && !data.is_empty() && saved_data != data {
        bail!(
            "{}: cannot resume: the checkpoint was trained on other data (the dataset's files \
             changed since); --overwrite starts afresh",
            last.join("state.json").display()
        );
    }
    Ok(())
}

/// What training produced.
pub struct TrainOutcome {
    /// The model with the best epoch's weights.
    pub model: Recommender,
    pub state: TrainState,
    pub instances: usize,
    pub loss_terms: u64,
    pub steps_per_epoch: usize,
    /// Bytes all-reduced per optimizer step (the gradient + loss buffer).
    pub allreduce_bytes_per_step: usize,
}

impl TrainOutcome {
    /// Mean training seconds per epoch (excluding evaluation).
    pub fn seconds_per_epoch(&self) -> f64 {
        let h = &self.state.history;
        if h.is_empty() {
            return 0.0;
        }
        h.iter().map(|e| e.train_seconds).sum::<f64>() / h.len() as f64
    }

    /// Mean training CPU seconds per epoch (user + system, all threads).
    pub fn cpu_seconds_per_epoch(&self) -> f64 {
        let h = &self.state.history;
        if h.is_empty() {
            return 0.0;
        }
        h.iter().map(|e| e.train_cpu_seconds).sum::<f64>() / h.len() as f64
    }
}

const SHUFFLE_TAG: u64 = 0x5348_5546_0000_0000;
const NEGATIVE_TAG: u64 = 0x4E45_4700_0000_0000;

/// Train a backbone on `train`, selecting on `select` (valid, or test in compatibility mode).
pub fn train(
    train: &Windows,
    select: &Windows,
    num_items: u32,
    num_users: u32,
    cfg: &TrainConfig,
    comm: &dyn Comm,
    ckpt: Option<&CheckpointPlan>,
) -> Result<TrainOutcome> {
    let l = cfg.model.max_len;
    tune_allocator();
    cfg.validate()?;
    check_targets(train, cfg.targets)?;
    let insts = training_instances(train, cfg.targets);
    if insts.is_empty() {
        bail!("no training instances: every training window has a single item");
    }
    let terms: Vec<u32> = insts
        .iter()
        .map(|&i| loss_terms(i, cfg.targets, l) as u32)
        .collect();
    let total_terms: u64 = terms.iter().map(|&t| t as u64).sum();
    let model = Recommender::new(cfg.model.clone(), num_items, num_users, cfg.seed)?;
    let n = model.params.numel();
    let mut flat = model.params.flat_values()?;
    if comm.size() > 1 {
        // Seeded init already agrees; the broadcast makes even a mismatch unable to diverge.
        let mut bytes: Vec<u8> = flat.iter().flat_map(|x| x.to_le_bytes()).collect();
        comm.broadcast_bytes(0, &mut bytes)?;
        if bytes.len() != n * 4 {
            bail!(
                "initial weights from rank 0 have {} bytes, expected {}",
                bytes.len(),
                n * 4
            );
        }
        flat = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        model.params.set_flat(&flat)?;
    }
    let mut fused = match cfg.engine {
        Engine::Candle => None,
        Engine::Auto | Engine::Fused => {
            FusedEngine::for_model(&cfg.model, num_items, num_users, &model.params)?
        }
    };
    let mut adam = Adam::new(cfg.adam, n);
    let cfg_json = serde_json::to_value(cfg)?;
    let mut state = TrainState::default();
    let mut best_flat = flat.clone();
    if let Some(plan) = ckpt.filter(|p| p.resume) {
        let last = plan.dir.join("last");
        let (m, c) = crate::checkpoint::load(&last)?;
        if c.model != cfg.model || c.num_items != num_items {
            bail!("{}: checkpoint was made with another model config or catalogue size; cannot resume", last.display());
        }
        let st = crate::checkpoint::load_optimizer(&last, &mut adam)?;
        state = serde_json::from_value(st)?;
        check_resume(&last, &c.train, &cfg_json, &state.data, &plan.data)?;
        flat = m.params.flat_values()?;
        model.params.set_flat(&flat)?;
        best_flat = if state.best_epoch > 0 {
            crate::checkpoint::load(&plan.dir.join("best"))?
                .0
                .params
                .flat_values()?
        } else {
            flat.clone()
        };
        tracing::info!(
            epochs_done = state.epochs_done,
            "resuming from {}",
            last.display()
        );
    }
    if let Some(plan) = ckpt {
        state.data = plan.data.clone();
    }
    let steps = insts.len().div_ceil(cfg.batch_size);
    let mut buf = vec![0f32; n + 1];
    let pad_bias = {
        let mut v = vec![0f32; num_items as usize + 1];
        v[0] = -1e9;
        Tensor::from_vec(v, (1, num_items as usize + 1), &Device::Cpu)?
    };
    let eval_opts = EvalOptions {
        batch_size: cfg.eval_batch_size,
        mask_history: cfg.mask_history,
        engine: cfg.engine,
    };
    tracing::info!(
        model = %cfg.model.kind,
        instances = insts.len(),
        loss_terms = total_terms,
        params = n,
        steps_per_epoch = steps,
        ranks = comm.size(),
        engine = if fused.is_some() { "fused" } else { "candle" },
        "training"
    );
    let mut epoch = state.epochs_done;
    while epoch < cfg.epochs && !state.stopped_early {
        let t0 = Instant::now();
        let cpu0 = process_cpu_seconds();
        let mut order: Vec<u32> = (0..insts.len() as u32).collect();
        KeyedRng::new(cfg.seed, Purpose::Train, mix64(SHUFFLE_TAG ^ epoch as u64))
            .shuffle(&mut order);
        let pb = progress(comm, steps as u64, epoch + 1, cfg.epochs);
        let mut loss_sum = 0f64;
        for chunk in order.chunks(cfg.batch_size) {
            let global_terms: u64 = chunk.iter().map(|&i| terms[i as usize] as u64).sum();
            let (lo, hi) = rank_slice(chunk.len(), comm.rank(), comm.size());
            let mine = &chunk[lo..hi];
            if mine.is_empty() {
                buf.iter_mut().for_each(|x| *x = 0.0);
            } else {
                let sel: Vec<Instance> = mine.iter().map(|&i| insts[i as usize]).collect();
                let ids: Vec<u64> = mine.iter().map(|&i| i as u64).collect();
                let batch = SeqBatch::build(train, &sel, &ids, cfg.targets, l)?;
                let dropout = Dropout {
                    seed: cfg.seed,
                    epoch: epoch as u64,
                    rate: cfg.model.dropout,
                };
                if let Some(f) = fused.as_mut() {
                    let negs = match cfg.loss {
                        LossKind::Bce => sample_negatives(&batch, cfg.seed, epoch, num_items),
                        LossKind::Ce => Vec::new(),
                    };
                    let fl = match cfg.loss {
                        LossKind::Ce => FusedLoss::Ce,
                        LossKind::Bce => FusedLoss::Bce { negatives: &negs },
                    };
                    let loss = f.loss_and_grad(&flat, &batch, Some(&dropout), fl, &mut buf[..n])?;
                    buf[n] = loss as f32;
                } else {
                    let h = model.net.hidden(&batch, Some(&dropout))?;
                    let loss = loss_sum_of(&model, &h, &batch, cfg, epoch, &pad_bias, num_items)?;
                    let grads = loss.backward()?;
                    model.params.flat_grads(&grads, &mut buf[..n])?;
                    buf[n] = loss.to_scalar::<f32>()?;
                }
            }
            comm.all_reduce_sum_f32(&mut buf)?;
            let scale = 1.0 / global_terms as f32;
            buf.iter_mut().for_each(|x| *x *= scale);
            loss_sum += buf[n] as f64 * global_terms as f64;
            adam.step(&mut flat, &buf[..n]);
            if fused.is_none() {
                model.params.set_flat(&flat)?;
            }
            pb.set_message(format!("loss {:.4}", buf[n]));
            pb.inc(1);
        }
        if fused.is_some() {
            // The fused engine reads the flat vector; the candle model (evaluation,
            // checkpoints) is brought up to date once per epoch.
            model.params.set_flat(&flat)?;
        }
        let train_seconds = t0.elapsed().as_secs_f64();
        let train_cpu_seconds = process_cpu_seconds() - cpu0;
        epoch += 1;
        let m = evaluate(&model, select, eval_opts, comm)?;
        let (ndcg, hr) = (m.get("NDCG@10"), m.get("HR@10"));
        let loss = loss_sum / total_terms as f64;
        pb.finish_and_clear();
        tracing::info!(
            epoch,
            loss = format!("{loss:.4}"),
            select_ndcg10 = format!("{ndcg:.4}"),
            select_hr10 = format!("{hr:.4}"),
            seconds = format!("{train_seconds:.1}"),
            cpu_seconds = format!("{train_cpu_seconds:.1}"),
            "epoch done"
        );
        if !loss.is_finite() {
            bail!("epoch {epoch}: the training loss is {loss} (diverged; lower the learning rate)");
        }
        state.history.push(EpochLog {
            epoch,
            loss,
            train_seconds,
            train_cpu_seconds,
            select_ndcg10: ndcg,
            select_hr10: hr,
        });
        state.epochs_done = epoch;
        let improved = state.best_epoch == 0 || ndcg > state.best_ndcg10;
        if improved {
            state.best_epoch = epoch;
            state.best_ndcg10 = ndcg;
            state.bad_evals = 0;
            best_flat.copy_from_slice(&flat);
        } else {
            state.bad_evals += 1;
            if cfg.patience > 0 && state.bad_evals >= cfg.patience {
                state.stopped_early = true;
                tracing::info!(
                    best_epoch = state.best_epoch,
                    "early stop: no better NDCG@10 for {} epochs",
                    cfg.patience
                );
            }
        }
        if let (Some(plan), true) = (ckpt, comm.is_root()) {
            if improved {
                crate::checkpoint::save(&plan.dir.join("best"), &model, &cfg_json, epoch, None)?;
            }
            let st = serde_json::to_value(&state)?;
            crate::checkpoint::save(
                &plan.dir.join("last"),
                &model,
                &cfg_json,
                epoch,
                Some((&adam, &st)),
            )?;
        }
    }
    model.params.set_flat(&best_flat)?;
    Ok(TrainOutcome {
        model,
        state,
        instances: insts.len(),
        loss_terms: total_terms,
        steps_per_epoch: steps,
        allreduce_bytes_per_step: (n + 1) * 4,
    })
}

/// User + system CPU seconds of this process so far (Linux `/proc/self/stat`; 0 elsewhere).
pub fn process_cpu_seconds() -> f64 {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn sysconf(name: i32) -> i64;
        }
        const SC_CLK_TCK: i32 = 2;
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return 0.0;
        };
        // Fields after the parenthesised command name: utime and stime are the 12th and 13th.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            return 0.0;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
            + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf reads a constant of the C library.
        let hz = unsafe { sysconf(SC_CLK_TCK) }.max(1) as f64;
        ticks / hz
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        0.0
    }
}

/// candle allocates a fresh buffer for every op's output; glibc returns large freed blocks to
/// the kernel, so each step pays page faults again (20% of the time in profiles). Raising the
/// mmap and trim thresholds keeps freed memory in the heap for reuse. Process-wide, once.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            extern "C" {
                fn mallopt(param: i32, value: i32) -> i32;
            }
            const M_TRIM_THRESHOLD: i32 = -1;
            const M_MMAP_THRESHOLD: i32 = -3;
            // SAFETY: mallopt only changes allocator tunables; called before heavy allocation.
            unsafe {
                mallopt(M_MMAP_THRESHOLD, 256 << 20);
                mallopt(M_TRIM_THRESHOLD, 1 << 30);
            }
        });
    }
}

fn progress(comm: &dyn Comm, steps: u64, epoch: usize, epochs: usize) -> indicatif::ProgressBar {
    if !comm.is_root() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(steps);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})",
        )
        .unwrap()
        .progress_chars("=> "),
    );
    pb.set_prefix(format!("{epoch}/{epochs}"));
    pb
}

/// The SUM of the loss over the batch's target terms.
pub(crate) fn loss_sum_of(
    model: &Recommender,
    h: &Tensor,
    batch: &SeqBatch,
    cfg: &TrainConfig,
    epoch: usize,
    pad_bias: &Tensor,
    num_items: u32,
) -> Result<Tensor> {
    let table = model.net.item_table();
    let dev = Device::Cpu;
    let n = batch.targets.len();
    let tg = Tensor::from_slice(&batch.targets, n, &dev)?;
    match cfg.loss {
        LossKind::Ce => {
            let logits = h.matmul(&table.t()?)?.broadcast_add(pad_bias)?;
            let lsm = crate::layers::log_softmax_last(&logits)?;
            Ok(lsm.gather(&tg.unsqueeze(1)?, 1)?.sum_all()?.neg()?)
        }
        LossKind::Bce => {
            let negs = sample_negatives(batch, cfg.seed, epoch, num_items);
            let ng = Tensor::from_vec(negs, n, &dev)?;
            let pos = (h * table.index_select(&tg, 0)?)?.sum(D::Minus1)?;
            let neg = (h * table.index_select(&ng, 0)?)?.sum(D::Minus1)?;
            Ok((softplus(&pos.neg()?)? + softplus(&neg)?)?.sum_all()?)
        }
    }
}

/// log(1 + e^x), stable for large |x|.
fn softplus(x: &Tensor) -> Result<Tensor> {
    Ok((x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?)
}

/// One uniform negative per target term, keyed by (epoch, instance id); never the target or
/// an item of the instance's input.
pub(crate) fn sample_negatives(
    batch: &SeqBatch,
    seed: u64,
    epoch: usize,
    num_items: u32,
) -> Vec<u32> {
    let l = batch.len;
    let mut out = Vec::with_capacity(batch.targets.len());
    let mut r = 0usize;
    while r < batch.targets.len() {
        let row = batch.target_rows[r] as usize;
        let mut rng = KeyedRng::new2(
            seed,
            Purpose::Train,
            mix64(NEGATIVE_TAG ^ epoch as u64),
            batch.instance_ids[row],
        );
        let input = &batch.ids_host[row * l..(row + 1) * l];
        while r < batch.targets.len() && batch.target_rows[r] as usize == row {
            let t = batch.targets[r];
            let neg = loop {
                let c = 1 + rng.below(num_items as u64) as u32;
                if c != t && (num_items as usize <= l + 1 || !input.contains(&c)) {
                    break c;
                }
            };
            out.push(neg);
            r += 1;
        }
    }
    out
}

/// Write a metrics JSON atomically.
pub fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    llm4dsr_data::atomic::write_file(path, (serde_json::to_string_pretty(v)? + "\n").as_bytes())
}

/// Metrics of a trained model on valid and test.
pub fn final_metrics(
    model: &Recommender,
    valid: &Windows,
    test: &Windows,
    opts: EvalOptions,
    comm: &dyn Comm,
) -> Result<(Metrics, Metrics)> {
    Ok((
        evaluate(model, valid, opts, comm)?,
        evaluate(model, test, opts, comm)?,
    ))
}
