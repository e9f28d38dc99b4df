//! `llm4dsr score`: how likely each item of each window is noise, by one detector
//! ([`NoiseScorer`]), for every split of a prepared dataset. Sharded over the job's ranks by
//! user ([`crate::sharded`]), so any number of ranks writes the same bytes.
//!
//! Output directory:
//!
//! ```text
//! <out>/scores/{train,valid,test}.parquet
//!     user u32, pos u32             the window (as in windows/<split>.parquet)
//!     method utf8                   the detector, e.g. "popularity"
//!     items list<u32>               the items scored: the whole window for train, the history
//!                                   (all but the target) for valid/test, from position 0
//!     scores list<f32>              one score per scored item, higher = more likely noise
//! <out>/manifest.json               config, input hashes, counts per split
//! ```
//!
//! Rows are in shard order (shard of the user), and within a shard in the input's order.
//!
//! Detectors built here are the cheap comparators of the paper's setting, from training-split
//! statistics every rank computes itself (reading the train windows once, ~1 s for ML-1M):
//! - `popularity`: score = -ln((count + 1) / (interactions + items)), the add-one-smoothed
//!   surprisal of the item's training frequency; the least popular item scores highest.
//! - `cooccurrence`: score = -mean over the other scored items j of ln(1 + C(item, j)), where
//!   C counts how often two items occur within one window span of each other in a user's
//!   training sequence; the item least co-occurring with the rest of the window scores highest.
//!
//! The LLM detectors come from `llm4dsr-llm` ([`llm4dsr_llm::LlmNoiseScorer`]): `llm-first-token`
//! (the reference method: log P(first title token | prompt)), `llm-full-title` (sum of the
//! title's token log-probs, no first-token ties) and `llm-full-title-mean` (length-normalised).
//! `--model` picks the model (default: the SmolLM2-135M-Instruct asset); its hash is part of
//! each shard's fingerprint, so a resumed run never mixes two models' scores.

use crate::config::ConfigFile;
use crate::sharded::{
    fingerprint, parts_root_of, prepare_output, OutputPlan, ShardOutput, ShardedStage,
};
use anyhow::{bail, ensure, Context, Result};
use arrow_array::builder::{Float32Builder, ListBuilder, UInt32Builder};
use arrow_array::{RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use llm4dsr_comm::Comm;
use llm4dsr_data::manifest::sha256_file;
use llm4dsr_data::noise::{detection_metrics, DetectionMetrics};
use llm4dsr_data::shard::shard_of;
use llm4dsr_data::windows::SPLITS;
use llm4dsr_data::{read_split, Catalog, Manifest, NoiseScorer, Windows};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct ScoreArgs {
    /// Prepared dataset directory (the output of `llm4dsr prepare`).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Output directory (scores/<split>.parquet + manifest.json). Part files of an unfinished
    /// run live beside it in <out>.parts/ and are reused by the next run.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Noise detector.
    #[arg(long, value_enum, default_value_t = Method::Popularity)]
    pub method: Method,
    /// Splits to score, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "train,valid,test")]
    pub splits: Vec<String>,
    /// Number of user shards. Fixed by the config, independent of the number of ranks (the
    /// output depends on it only through row order); more shards = finer resume.
    #[arg(long, default_value_t = 16)]
    pub num_shards: u32,
    /// Replace an output directory that holds something else. Without it, a directory
    /// holding this same run's output (same fingerprint: config, inputs, model, tool version)
    /// with every file intact is left alone (nothing to do), a damaged one is rebuilt, and
    /// anything else is refused.
    #[arg(long)]
    pub overwrite: bool,
    /// LLM detectors: HF model directory or .gguf file (default: the SmolLM2-135M-Instruct asset).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the LLM runs: auto = this rank's GPU in a build with candle's CUDA backend
    /// (jobs/build-cuda.sh), else the CPU; cpu; cuda (an error when it cannot).
    #[arg(long, value_enum, default_value_t = llm4dsr_llm::DeviceChoice::Auto)]
    pub device: llm4dsr_llm::DeviceChoice,
    /// LLM detectors: windows per forward batch (default 8 on the CPU, 64 on a GPU, where
    /// larger batches run much faster: docs/llm.md). Part of the output's fingerprint, since a
    /// window's scores may move in the last bits with its batch-mates.
    #[arg(long)]
    pub windows_per_batch: Option<usize>,
}

/// The noise detectors `score` can run.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Least popular item in the training data scores highest.
    Popularity,
    /// Item least co-occurring (in training sequences) with the rest of the window scores highest.
    Cooccurrence,
    /// The LLM's log-probability of naming the item's first title token as the noise item.
    LlmFirstToken,
    /// The LLM's log-likelihood of the item's whole title (and closing quote) as the noise item.
    LlmFullTitle,
    /// `llm-full-title` divided by the number of title tokens.
    LlmFullTitleMean,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Popularity => "popularity",
            Method::Cooccurrence => "cooccurrence",
            Method::LlmFirstToken => "llm-first-token",
            Method::LlmFullTitle => "llm-full-title",
            Method::LlmFullTitleMean => "llm-full-title-mean",
        }
    }
}

/// Schema of `scores/<split>.parquet`.
pub fn scores_schema() -> SchemaRef {
    let list = |t: DataType| DataType::List(Arc::new(Field::new("item", t, true)));
    Arc::new(Schema::new(vec![
        Field::new("user", DataType::UInt32, false),
        Field::new("pos", DataType::UInt32, false),
        Field::new("method", DataType::Utf8, false),
        Field::new("items", list(DataType::UInt32), false),
        Field::new("scores", list(DataType::Float32), false),
    ]))
}

/// (user, pos, scores) rows of a `scores/<split>.parquet` file, checked against
/// [`scores_schema`] (errors name the file and the column).
pub fn read_scores(path: &Path) -> Result<Vec<(u32, u32, Vec<f32>)>> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float32Type, UInt32Type};
    use llm4dsr_data::parquet_io::{read_columns, ColumnSpec};
    let schema = scores_schema();
    let ty = |name: &str| {
        schema
            .field_with_name(name)
            .expect("scores schema")
            .data_type()
            .clone()
    };
    let (user_t, pos_t, scores_t) = (ty("user"), ty("pos"), ty("scores"));
    let batches = read_columns(
        path,
        &[
            ColumnSpec {
                name: "user",
                accepts: std::slice::from_ref(&user_t),
            },
            ColumnSpec {
                name: "pos",
                accepts: std::slice::from_ref(&pos_t),
            },
            ColumnSpec {
                name: "scores",
                accepts: std::slice::from_ref(&scores_t),
            },
        ],
    )?;
    let mut out = Vec::new();
    for b in &batches {
        let user = b.column(0).as_primitive::<UInt32Type>();
        let pos = b.column(1).as_primitive::<UInt32Type>();
        let scores = b.column(2).as_list::<i32>();
        for r in 0..b.num_rows() {
            let v = scores.value(r);
            out.push((
                user.value(r),
                pos.value(r),
                v.as_primitive::<Float32Type>().values().to_vec(),
            ));
        }
    }
    Ok(out)
}

/// Are the items of this split's windows scored whole (train) or only their history?
pub fn scores_whole_window(split: &str) -> bool {
    split == "train"
}

pub fn run(args: ScoreArgs, _config: &ConfigFile, comm: &dyn Comm) -> Result<()> {
    let Some(dataset) = args.dataset.clone() else {
        bail!("--dataset is required (or `dataset` in [score] of the config)");
    };
    let Some(out) = args.out.clone() else {
        bail!("--out is required (or `out` in [score] of the config)");
    };
    ensure!(args.num_shards > 0, "--num-shards must be at least 1");
    let mut splits: Vec<&str> = Vec::new();
    for s in &args.splits {
        let Some(known) = SPLITS.iter().find(|k| **k == s.as_str()) else {
            bail!(
                "--splits: unknown split `{s}` (expected some of {})",
                SPLITS.join(", ")
            );
        };
        if !splits.contains(known) {
            splits.push(known);
        }
    }

    let catalog_path = dataset.join("catalog.parquet");
    let catalog = Catalog::read_parquet(&catalog_path)
        .with_context(|| format!("reading the catalogue of {}", dataset.display()))?;
    let train_path = split_path(&dataset, "train");
    let train = read_split(&dataset, "train")?;
    train.validate_ids(catalog.num_items(), &train_path)?;
    let llm_mode = args.method.llm_mode();
    if args.windows_per_batch == Some(0) {
        bail!("--windows-per-batch must be at least 1");
    }
    let mut windows_per_batch = None;
    let mut model_file = None;
    let (llm, model_sha) = match llm_mode {
        None => (None, String::new()),
        Some(_) => {
            let model = match &args.model {
                Some(p) => p.clone(),
                None => llm4dsr_data::assets::require(crate::cmd::model::SMOLLM2_GGUF)?,
            };
            let input = crate::cmd::model::model_input(&model)?;
            let sha = input.sha256.clone();
            model_file = Some(input);
            let device = llm4dsr_llm::llm_device(args.device)?;
            let llm = llm4dsr_llm::Llm::load(&model, &device)?;
            // Scores in f32 on the CPU and bf16 on a GPU differ: never mix them in one output.
            let sha = format!(
                "{sha}/{}",
                llm4dsr_llm::load::run_tag(&device, llm.decoder.dtype())
            );
            windows_per_batch =
                Some(
                    args.windows_per_batch
                        .unwrap_or(if device.is_cpu() { 8 } else { 64 }),
                );
            (Some(llm), sha)
        }
    };
    let positioned = windows_positioned(&dataset);
    let mut scorer = build_scorer(
        args.method,
        &train,
        &train_path,
        positioned,
        &catalog,
        llm.as_ref(),
        windows_per_batch.unwrap_or(1),
    )?;

    // Everything the output depends on, hashed into each part's fingerprint.
    let catalog_sha = sha256_file(&catalog_path)?.0;
    let train_sha = sha256_file(&train_path)?.0;
    let mut manifest = Manifest::new("score", 0, serde_json::to_value(&args)?);
    manifest.add_input(&catalog_path)?;
    manifest.add_input(&train_path)?;
    manifest.inputs.extend(model_file);
    manifest.notes.push(format!(
        "method {}: scores are higher for items more likely to be noise; train windows are \
         scored whole, valid/test windows on their history (the target is never scored)",
        scorer.name()
    ));
    if !positioned && llm_mode.is_none() {
        manifest.notes.push(
            "the training windows were imported as they are (movie-csv: no sequence positions): \
             the training statistics count each window as a sequence of its own, so an \
             interaction shared by overlapping windows of a user counts once per window"
                .into(),
        );
    }
    manifest.count("shards", args.num_shards as u64);
    if let Some(w) = windows_per_batch {
        manifest.count("windows_per_batch", w as u64);
    }

    let mut split_fps = Vec::new();
    for split in &splits {
        let path = split_path(&dataset, split);
        if *split != "train" {
            manifest.add_input(&path)?;
        }
        let split_sha = sha256_file(&path)?.0;
        split_fps.push(fingerprint(&serde_json::json!({
            "stage": "score",
            "tool_version": env!("CARGO_PKG_VERSION"),
            "split": split,
            "method": args.method,
            "num_shards": args.num_shards,
            "catalog": catalog_sha,
            "train": train_sha,
            "input": split_sha,
            "model": model_sha,
            "windows_per_batch": windows_per_batch,
        }))?);
    }
    manifest.fingerprint =
        fingerprint(&serde_json::json!({ "splits": splits, "parts": split_fps }))?;
    let staging = match prepare_output(comm, &out, args.overwrite, "score", &manifest.fingerprint)?
    {
        OutputPlan::UpToDate => return Ok(()),
        OutputPlan::Build(staging) => staging,
    };
    let parts_root = parts_root_of(&out);
    let mut stages = Vec::new();
    let mut detection: Vec<(String, DetectionMetrics)> = Vec::new();
    for (split, fp) in splits.iter().zip(split_fps) {
        let path = split_path(&dataset, split);
        let windows = if *split == "train" {
            train.clone()
        } else {
            let w = read_split(&dataset, split)?;
            w.validate_ids(catalog.num_items(), &path)?;
            w
        };
        let stage = ShardedStage {
            name: format!("score/{split}"),
            parts_dir: parts_root.join(split),
            num_shards: args.num_shards,
            schema: scores_schema(),
            fingerprint: fp,
            comm,
        };
        let shard_ids: Vec<u32> = windows
            .user
            .iter()
            .map(|&u| shard_of(u, args.num_shards))
            .collect();
        let dest = staging
            .as_ref()
            .map(|s| s.path().join("scores").join(format!("{split}.parquet")));
        let whole = scores_whole_window(split);
        let summary = stage.run(dest.as_deref(), windows.len() as u64, |shard| {
            score_shard(&windows, &shard_ids, shard, whole, scorer.as_mut())
                .with_context(|| path.display().to_string())
        })?;
        tracing::info!(
            "score/{split}: {} windows in {} shards ({} written now, {} reused)",
            summary.rows,
            summary.shards,
            summary.parts_written,
            summary.parts_reused
        );
        manifest.count(&format!("{split}.windows"), windows.len() as u64);
        manifest.count(&format!("{split}.windows_scored"), summary.rows);
        manifest.count(
            &format!("{split}.positions_scored"),
            scored_positions(&windows, whole),
        );
        // Where the windows carry noise (injected, or the reference data's own), how well the
        // detector finds it: recorded and shown, so that any dataset gets its baseline.
        if let Some(dest) = &dest {
            let m = detection_of(&windows, dest)?;
            if m.noisy_positions > 0 {
                let key = |k: &str| format!("{split}.detection_top1.{k}");
                manifest.count(&key("flagged"), m.flagged);
                manifest.count(&key("true_positives"), m.true_positives);
                manifest.count(&key("noisy_positions"), m.noisy_positions);
                manifest.count(&key("max_true_positives"), m.max_true_positives);
                detection.push((split.to_string(), m));
            }
        }
        stages.push(stage);
    }
    if !detection.is_empty() {
        println!(
            "{} against the windows' noise masks (top-1 flag per window; ceiling: a perfect \
             detector's precision)",
            scorer.name()
        );
        println!(
            "{:<6} {:>8} {:>9} {:>9} {:>9} {:>7} {:>8}",
            "split", "windows", "noisy", "precision", "recall", "random", "ceiling"
        );
        for (split, m) in &detection {
            println!(
                "{:<6} {:>8} {:>9} {:>9.3} {:>9.3} {:>7.3} {:>8.3}",
                split,
                m.sequences,
                m.noisy_positions,
                m.precision,
                m.recall,
                m.random_precision,
                m.precision_ceiling
            );
        }
    }

    if let Some(staging) = staging {
        manifest.add_outputs_under(staging.path())?;
        manifest.write(staging.path())?;
        let dest = staging.commit()?;
        for s in &stages {
            s.remove_parts()?;
        }
        std::fs::remove_dir(&parts_root).ok();
        tracing::info!("wrote {}", dest.display());
    }
    // No rank returns (and exits) before rank 0 has committed the output.
    comm.barrier()?;
    Ok(())
}

/// Top-1 detection precision / recall of the scores in `scores_file` against the noise masks of
/// `windows` (rows matched by (user, pos): the stage writes them in shard order): each window's
/// highest-scoring position is flagged (ties: the earliest).
pub fn detection_of(windows: &Windows, scores_file: &Path) -> Result<DetectionMetrics> {
    let scores = read_scores(scores_file)?;
    let mut by_key = std::collections::HashMap::with_capacity(scores.len());
    for (i, (u, p, _)) in scores.iter().enumerate() {
        by_key.insert((*u, *p), i);
    }
    let (mut flat_scores, mut flat_mask, mut offsets) = (Vec::new(), Vec::new(), vec![0u32]);
    for w in windows.iter() {
        let missing = || {
            format!(
                "{}: no scores for user {} pos {} of the windows",
                scores_file.display(),
                w.user,
                w.pos
            )
        };
        let &i = by_key.get(&(w.user, w.pos)).with_context(missing)?;
        let sc = &scores[i].2;
        let mask = w.mask.get(..sc.len()).with_context(|| {
            format!(
                "{}: {} scores for the {}-item window of user {} pos {}",
                scores_file.display(),
                sc.len(),
                w.items.len(),
                w.user,
                w.pos
            )
        })?;
        flat_scores.extend_from_slice(sc);
        flat_mask.extend_from_slice(mask);
        offsets.push(flat_scores.len() as u32);
    }
    Ok(detection_metrics(&flat_scores, &flat_mask, &offsets, 1))
}

fn split_path(dataset: &Path, split: &str) -> PathBuf {
    dataset.join("windows").join(format!("{split}.parquet"))
}

fn scope(items: &[u32], whole: bool) -> &[u32] {
    if whole {
        items
    } else {
        &items[..items.len() - 1]
    }
}

fn scored_positions(w: &Windows, whole: bool) -> u64 {
    w.iter().map(|x| scope(x.items, whole).len() as u64).sum()
}

/// Score the windows of one shard (in input order) and build its rows.
fn score_shard(
    windows: &Windows,
    shard_ids: &[u32],
    shard: u32,
    whole: bool,
    scorer: &mut dyn NoiseScorer,
) -> Result<ShardOutput> {
    let rows: Vec<usize> = (0..windows.len())
        .filter(|&i| shard_ids[i] == shard)
        .collect();
    let mut items = Vec::new();
    let mut offsets = vec![0u32];
    for &i in &rows {
        items.extend_from_slice(scope(windows.get(i).items, whole));
        offsets.push(items.len() as u32);
    }
    let scores = scorer.score(&items, &offsets).map_err(|e| {
        // Name the window a too-long prompt comes from.
        let at = e
            .downcast_ref::<llm4dsr_llm::score::SequenceTooLong>()
            .map(|t| windows.get(rows[t.sequence]));
        match at {
            Some(w) => e.context(format!("user {} window pos {}", w.user, w.pos)),
            None => e,
        }
    })?;
    ensure!(
        scores.len() == items.len(),
        "detector {} returned {} scores for {} items",
        scorer.name(),
        scores.len(),
        items.len()
    );
    if let Some(k) = scores.iter().position(|s| !s.is_finite()) {
        let r = offsets.partition_point(|&o| o as usize <= k) - 1;
        let w = windows.get(rows[r]);
        bail!(
            "detector {} gave a non-finite score ({}) to user {} window pos {}",
            scorer.name(),
            scores[k],
            w.user,
            w.pos
        );
    }

    let mut item_lists = ListBuilder::new(UInt32Builder::with_capacity(items.len()));
    let mut score_lists = ListBuilder::new(Float32Builder::with_capacity(items.len()));
    for r in 0..rows.len() {
        let (a, b) = (offsets[r] as usize, offsets[r + 1] as usize);
        item_lists.values().append_slice(&items[a..b]);
        item_lists.append(true);
        score_lists.values().append_slice(&scores[a..b]);
        score_lists.append(true);
    }
    let batch = RecordBatch::try_new(
        scores_schema(),
        vec![
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|&i| windows.user[i]),
            )),
            Arc::new(UInt32Array::from_iter_values(
                rows.iter().map(|&i| windows.pos[i]),
            )),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                scorer.name(),
                rows.len(),
            ))),
            Arc::new(item_lists.finish()),
            Arc::new(score_lists.finish()),
        ],
    )?;
    Ok(ShardOutput {
        batches: vec![batch],
        input_rows: rows.len() as u64,
    })
}

impl Method {
    /// The LLM scoring mode of an LLM detector.
    pub fn llm_mode(self) -> Option<llm4dsr_llm::ScoreMode> {
        use llm4dsr_llm::ScoreMode;
        match self {
            Method::Popularity | Method::Cooccurrence => None,
            Method::LlmFirstToken => Some(ScoreMode::FirstToken),
            Method::LlmFullTitle => Some(ScoreMode::FullTitle),
            Method::LlmFullTitleMean => Some(ScoreMode::FullTitleMean),
        }
    }
}

/// The detector for `method`: the heuristics from the training windows, the LLM detectors
/// from `llm` (required for them), forwarding `windows_per_batch` windows at a time.
pub fn build_scorer<'a>(
    method: Method,
    train: &Windows,
    train_path: &Path,
    positioned: bool,
    catalog: &'a Catalog,
    llm: Option<&'a llm4dsr_llm::Llm>,
    windows_per_batch: usize,
) -> Result<Box<dyn NoiseScorer + 'a>> {
    if let Some(mode) = method.llm_mode() {
        let llm = llm.context("an LLM detector needs a model")?;
        let mut scorer = llm4dsr_llm::LlmNoiseScorer::new(llm, catalog, mode)?;
        scorer.progress = false;
        scorer.windows_per_batch = windows_per_batch.max(1);
        return Ok(Box::new(scorer));
    }
    let stats = TrainStats::from_windows(train, train_path, catalog.num_items(), positioned)?;
    Ok(match method {
        Method::Popularity => Box::new(Popularity::new(&stats)),
        Method::Cooccurrence => Box::new(Cooccurrence::new(&stats)),
        _ => unreachable!("LLM detectors return above"),
    })
}

/// The training interactions, recovered from the overlapping training windows: each
/// (user, position in the user's sequence) once, whatever the number of windows covering it.
/// Windows imported as they are (movie-csv) carry no sequence positions (`pos` is the window's
/// ordinal among its user's): each window then counts as a sequence of its own, so an
/// interaction shared by two overlapping windows of a user counts twice.
pub struct TrainStats {
    /// Interactions per item id (index 0 unused).
    pub item_count: Vec<u64>,
    /// Distinct training interactions.
    pub interactions: u64,
    /// Per user, the training interactions in sequence order: (position, item).
    pub sequences: Vec<Vec<(u32, u32)>>,
    /// Longest window: co-occurrence counts pairs closer than this.
    pub span: u32,
    /// Whether the windows' `pos` placed them in their users' sequences (false: movie-csv).
    pub positioned: bool,
}

/// Whether the windows of `dataset` carry sequence positions: all but those imported as they
/// are (the dataset manifest's `source.format` is `movie-csv`). A dataset without a readable
/// manifest is taken to have them (and `TrainStats` checks every window).
pub fn windows_positioned(dataset: &Path) -> bool {
    Manifest::read(dataset).map_or(true, |m| {
        m.config.pointer("/source/format").and_then(|f| f.as_str()) != Some("movie-csv")
    })
}

impl TrainStats {
    pub fn from_windows(
        train: &Windows,
        source: &Path,
        num_items: u32,
        positioned: bool,
    ) -> Result<TrainStats> {
        if !positioned {
            let mut item_count = vec![0u64; num_items as usize + 1];
            let mut sequences = Vec::with_capacity(train.len());
            let mut span = 1u32;
            for w in train.iter() {
                span = span.max(w.items.len() as u32);
                for &item in w.items {
                    item_count[item as usize] += 1;
                }
                sequences.push(
                    w.items
                        .iter()
                        .enumerate()
                        .map(|(k, &i)| (k as u32, i))
                        .collect(),
                );
            }
            return Ok(TrainStats {
                interactions: item_count.iter().sum(),
                item_count,
                sequences,
                span,
                positioned,
            });
        }
        let mut order: Vec<usize> = (0..train.len()).collect();
        order.sort_by_key(|&i| (train.user[i], train.pos[i]));
        let mut item_count = vec![0u64; num_items as usize + 1];
        let mut sequences: Vec<Vec<(u32, u32)>> = Vec::new();
        let mut span = 1u32;
        let mut current_user = None;
        for i in order {
            let w = train.get(i);
            let len = w.items.len() as u32;
            span = span.max(len);
            let Some(start) = w.pos.checked_sub(len - 1) else {
                bail!(
                    "{}: window of user {} at pos {} holds {len} items, more than pos + 1 (its \
                     dataset's manifest does not say its windows were imported as they are)",
                    source.display(),
                    w.user,
                    w.pos
                );
            };
            if current_user != Some(w.user) {
                current_user = Some(w.user);
                sequences.push(Vec::new());
            }
            let seq = sequences.last_mut().unwrap();
            for (k, &item) in w.items.iter().enumerate() {
                let p = start + k as u32;
                if seq.last().is_none_or(|&(last, _)| p > last) {
                    seq.push((p, item));
                    item_count[item as usize] += 1;
                }
            }
        }
        let interactions = item_count.iter().sum();
        Ok(TrainStats {
            item_count,
            interactions,
            sequences,
            span,
            positioned,
        })
    }
}

/// `popularity`: the smoothed surprisal of the item's training frequency.
pub struct Popularity {
    surprisal: Vec<f32>,
}

impl Popularity {
    pub fn new(stats: &TrainStats) -> Self {
        let items = (stats.item_count.len() - 1) as f64;
        let denom = stats.interactions as f64 + items;
        let surprisal = stats
            .item_count
            .iter()
            .map(|&c| -((c as f64 + 1.0) / denom).ln() as f32)
            .collect();
        Self { surprisal }
    }
}

impl NoiseScorer for Popularity {
    fn name(&self) -> &str {
        "popularity"
    }
    fn score(&mut self, items: &[u32], _offsets: &[u32]) -> Result<Vec<f32>> {
        items
            .iter()
            .map(|&x| {
                self.surprisal
                    .get(x as usize)
                    .copied()
                    .with_context(|| format!("item id {x} is outside the catalogue"))
            })
            .collect()
    }
}

/// `cooccurrence`: low affinity of an item to the rest of its window.
pub struct Cooccurrence {
    /// Compressed rows: the items co-occurring with item a are
    /// `neighbours[row[a]..row[a + 1]]` (sorted), with `counts` alongside.
    row: Vec<u64>,
    neighbours: Vec<u32>,
    counts: Vec<u32>,
    item_count: Vec<u64>,
}

impl Cooccurrence {
    /// Count every pair of distinct items within `span - 1` positions in a training sequence.
    /// Memory: 8 bytes per pair occurrence while sorting (~20 per interaction, both orders),
    /// then 8 bytes per distinct (item, neighbour).
    pub fn new(stats: &TrainStats) -> Self {
        let mut pairs = Vec::new();
        for seq in &stats.sequences {
            for (i, &(pi, a)) in seq.iter().enumerate() {
                for &(pj, b) in &seq[i + 1..] {
                    if pj - pi >= stats.span {
                        break;
                    }
                    if a != b {
                        pairs.push(((a as u64) << 32) | b as u64);
                        pairs.push(((b as u64) << 32) | a as u64);
                    }
                }
            }
        }
        pairs.sort_unstable();
        let num_items = stats.item_count.len();
        let (mut neighbours, mut counts) = (Vec::new(), Vec::new());
        let mut row = vec![0u64; num_items + 1];
        let mut last = None;
        for k in pairs {
            if last == Some(k) {
                *counts.last_mut().unwrap() += 1;
            } else {
                last = Some(k);
                row[(k >> 32) as usize + 1] += 1;
                neighbours.push(k as u32);
                counts.push(1u32);
            }
        }
        for a in 1..=num_items {
            row[a] += row[a - 1];
        }
        Self {
            row,
            neighbours,
            counts,
            item_count: stats.item_count.clone(),
        }
    }

    /// Training co-occurrences of a and b (an item with itself: its own count).
    pub fn count(&self, a: u32, b: u32) -> u64 {
        if a == b {
            return self.item_count.get(a as usize).copied().unwrap_or(0);
        }
        let Some(&lo) = self.row.get(a as usize) else {
            return 0;
        };
        let (lo, hi) = (lo as usize, self.row[a as usize + 1] as usize);
        match self.neighbours[lo..hi].binary_search(&b) {
            Ok(i) => self.counts[lo + i] as u64,
            Err(_) => 0,
        }
    }
}

impl NoiseScorer for Cooccurrence {
    fn name(&self) -> &str {
        "cooccurrence"
    }
    fn score(&mut self, items: &[u32], offsets: &[u32]) -> Result<Vec<f32>> {
        let mut out = vec![0f32; items.len()];
        let mut pair = Vec::new();
        for s in offsets.windows(2) {
            let seq = &items[s[0] as usize..s[1] as usize];
            let m = seq.len();
            if m < 2 {
                continue;
            }
            // Each pair looked up once; summed in a fixed order, so scores do not depend on
            // how windows are batched.
            pair.clear();
            pair.resize(m * m, 0f64);
            for i in 0..m {
                for j in i + 1..m {
                    let v = (1.0 + self.count(seq[i], seq[j]) as f64).ln();
                    pair[i * m + j] = v;
                    pair[j * m + i] = v;
                }
            }
            for k in 0..m {
                let sum: f64 = (0..m).filter(|&j| j != k).map(|j| pair[k * m + j]).sum();
                out[s[0] as usize + k] = -(sum / (m - 1) as f64) as f32;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two users; user 1's windows overlap (stride 1), so items recur across windows.
    fn train() -> Windows {
        let mut w = Windows::new();
        // user 1 sequence: 1 2 3 1 (positions 0..3); windows of span 3.
        w.push(1, 2, &[1, 2, 3], &[0; 3], &[1, 2, 3], 10);
        w.push(1, 3, &[2, 3, 1], &[0; 3], &[2, 3, 1], 11);
        // user 2 sequence: 1 2 4
        w.push(2, 2, &[1, 2, 4], &[0; 3], &[1, 2, 4], 12);
        w
    }

    #[test]
    fn overlapping_windows_count_each_interaction_once() {
        let s = TrainStats::from_windows(&train(), Path::new("t"), 5, true).unwrap();
        assert_eq!(s.interactions, 7);
        assert_eq!(s.item_count, vec![0, 3, 2, 1, 1, 0]);
        assert_eq!(s.sequences[0], vec![(0, 1), (1, 2), (2, 3), (3, 1)]);
        assert_eq!(s.span, 3);
    }

    #[test]
    fn popularity_is_smoothed_surprisal() {
        let s = TrainStats::from_windows(&train(), Path::new("t"), 5, true).unwrap();
        let mut p = Popularity::new(&s);
        let got = p.score(&[1, 5], &[0, 2]).unwrap();
        // (3 + 1) / (7 + 5) and (0 + 1) / 12.
        assert!((got[0] - -(4f64 / 12.0).ln() as f32).abs() < 1e-6);
        assert!((got[1] - (12f64).ln() as f32).abs() < 1e-6);
        assert!(p.score(&[6], &[0, 1]).is_err());
    }

    #[test]
    fn cooccurrence_counts_pairs_within_the_span() {
        let s = TrainStats::from_windows(&train(), Path::new("t"), 5, true).unwrap();
        let mut c = Cooccurrence::new(&s);
        // user 1: (1,2) (1,3) (2,3) (2,1) (3,1); user 2: (1,2) (1,4) (2,4).
        assert_eq!(c.count(1, 2), 3);
        assert_eq!(c.count(2, 1), 3);
        assert_eq!(c.count(1, 3), 2);
        assert_eq!(c.count(3, 4), 0);
        assert_eq!(c.count(1, 1), 3);
        // Window [1, 2, 5]: item 5 never co-occurs, so it is the most suspicious.
        let got = c.score(&[1, 2, 5, 7], &[0, 3, 4]).unwrap();
        assert!(got[2] > got[0] && got[2] > got[1], "{got:?}");
        assert_eq!(got[2], 0.0);
        assert_eq!(got[3], 0.0, "a single item has nothing to co-occur with");
        let want0 = -((1f64 + 3.0).ln() + 1f64.ln()) / 2.0;
        assert!((got[0] as f64 - want0).abs() < 1e-6);
    }

    #[test]
    fn bad_window_position_names_the_file() {
        let mut w = Windows::new();
        w.push(3, 1, &[1, 2, 3], &[0; 3], &[1, 2, 3], 10);
        let e = TrainStats::from_windows(&w, Path::new("x/train.parquet"), 5, true)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("x/train.parquet") && e.contains("user 3"), "{e}");
        // The same windows imported as they are (movie-csv): each is a sequence of its own.
        w.push(3, 2, &[2, 3, 4], &[0; 3], &[2, 3, 4], 11);
        let s = TrainStats::from_windows(&w, Path::new("x/train.parquet"), 5, false).unwrap();
        assert!(!s.positioned);
        assert_eq!(s.interactions, 6);
        assert_eq!(s.item_count, vec![0, 1, 2, 2, 1, 0]);
        assert_eq!(
            s.sequences,
            vec![vec![(0, 1), (1, 2), (2, 3)], vec![(0, 2), (1, 3), (2, 4)]]
        );
        assert_eq!(s.span, 3);
        let mut c = Cooccurrence::new(&s);
        assert_eq!((c.count(2, 3), c.count(1, 4)), (2, 0));
        let got = c.score(&[1, 2, 4], &[0, 3]).unwrap();
        assert!(got.iter().all(|x| x.is_finite()), "{got:?}");
    }
}
