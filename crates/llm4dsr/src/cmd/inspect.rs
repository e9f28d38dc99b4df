//! `llm4dsr inspect-scores`: a readable table of the LLM's noise scores (first-token, full-title
//! sum and length-normalised) of every item of a few real windows of a prepared dataset, with
//! each item's noise mask, so a person can see what the detector sees. A diagnostic, not a
//! stage: it writes nothing.

use anyhow::{bail, Result};
use llm4dsr_data::{read_split, Catalog};
use llm4dsr_llm::{Llm, LlmNoiseScorer, ScoreMode};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct InspectArgs {
    /// Prepared dataset directory (catalog.parquet + windows/<split>.parquet; or `dataset`
    /// in [inspect-scores] of the config).
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Model: HF directory or .gguf file (default: the SmolLM2-135M-Instruct asset).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Split to read windows from (train, valid, test).
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Number of windows to show.
    #[arg(long, default_value_t = 3)]
    pub windows: usize,
    /// Index of the first window shown.
    #[arg(long, default_value_t = 0)]
    pub start: usize,
    /// Show every k-th window from --start (neighbouring windows of a split are often one
    /// user's, a step apart, and nearly the same).
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
    /// Score the whole window (target included) instead of the history only. The history is
    /// what the denoiser scores on valid/test; train windows are scored whole.
    #[arg(long)]
    pub whole_window: bool,
    /// Where the LLM runs: auto = this rank's GPU in a build with candle's CUDA backend
    /// (jobs/build-cuda.sh), else the CPU; cpu; cuda (an error when it cannot).
    #[arg(long, value_enum, default_value_t = llm4dsr_llm::DeviceChoice::Auto)]
    pub device: llm4dsr_llm::DeviceChoice,
}

pub fn run(args: InspectArgs) -> Result<()> {
    let Some(dataset) = args.dataset.clone() else {
        bail!("--dataset is required (or `dataset` in [inspect-scores] of the config)");
    };
    let catalog = Catalog::read_dataset(&dataset)?;
    let windows = read_split(&dataset, &args.split)?;
    if args.start >= windows.len() {
        bail!(
            "--start {} but the {} split has {} windows",
            args.start,
            args.split,
            windows.len()
        );
    }
    let model = match &args.model {
        Some(p) => p.clone(),
        None => llm4dsr_data::assets::require(crate::cmd::model::SMOLLM2_GGUF)?,
    };
    let llm = Llm::load(&model, &llm4dsr_llm::llm_device(args.device)?)?;
    let scorer = LlmNoiseScorer::new(&llm, &catalog, ScoreMode::FullTitle)?;
    if args.stride == 0 {
        bail!("--stride must be at least 1");
    }
    let shown: Vec<usize> = (args.start..windows.len())
        .step_by(args.stride)
        .take(args.windows)
        .collect();
    let whole = args.whole_window || args.split == "train";
    let views: Vec<_> = shown.iter().map(|&i| windows.get(i)).collect();
    let seqs: Vec<&[u32]> = views
        .iter()
        .map(|w| if whole { w.items } else { w.history() })
        .collect();
    let split_file = dataset
        .join("windows")
        .join(format!("{}.parquet", args.split));
    let name = |k: usize| {
        format!(
            "{}: window {} (user {}, pos {})",
            split_file.display(),
            shown[k],
            views[k].user,
            views[k].pos
        )
    };
    // Token counts against the model's context before any forward (fails fast on a window
    // too long to score, naming it).
    let mut prompt_lens = Vec::with_capacity(seqs.len());
    for (k, seq) in seqs.iter().enumerate() {
        let prompt = scorer.prompt_tokens(seq)?;
        if let Err(e) = scorer.check_fits(k, &prompt, seq, true) {
            bail!(
                "{}: the scoring prompt of its {} items is {} tokens (+{} for the longest title) \
                 but the context of {} is {} tokens (max_position_embeddings)",
                name(k),
                e.items,
                e.prompt_tokens,
                e.title_tokens,
                model.display(),
                e.context
            );
        }
        prompt_lens.push(prompt.len());
    }
    let scores = scorer.score_all(&seqs)?;
    // Refused like `score` refuses them, before anything is printed.
    for (k, s) in scores.iter().enumerate() {
        if let Some(j) = s
            .iter()
            .position(|x| !x.first.is_finite() || !x.sum.is_finite())
        {
            bail!(
                "{}: the model gave a non-finite score (first-token {}, full-title {}) to item {} \
                 at position {j}; are the weights of {} broken?",
                name(k),
                s[j].first,
                s[j].sum,
                seqs[k][j],
                model.display()
            );
        }
    }
    println!(
        "model {}  dataset {}  split {}  scored: {}",
        model.display(),
        dataset.display(),
        args.split,
        if whole { "whole window" } else { "history" }
    );
    println!("mask: 0 clean, 1 synthetic noise, 2 SFT swap. Scores are log-probs of naming the item as noise (higher = more suspect); [n] = rank by that score.");
    for (k, (w, s)) in views.iter().zip(&scores).enumerate() {
        let seq = seqs[k];
        let prompt_len = prompt_lens[k];
        println!();
        println!(
            "window {} (user {}, pos {}), {} items scored, prompt {} tokens, target: {}",
            shown[k],
            w.user,
            w.pos,
            seq.len(),
            prompt_len,
            catalog.title(w.target())
        );
        let rank = |v: &[f32]| -> Vec<usize> {
            let mut idx: Vec<usize> = (0..v.len()).collect();
            idx.sort_by(|a, b| v[*b].total_cmp(&v[*a]));
            let mut r = vec![0; v.len()];
            for (pos, &i) in idx.iter().enumerate() {
                r[i] = pos + 1;
            }
            r
        };
        let first: Vec<f32> = s.iter().map(|x| x.first).collect();
        let sum: Vec<f32> = s.iter().map(|x| x.sum).collect();
        let mean: Vec<f32> = s.iter().map(|x| x.mean()).collect();
        let (rf, rs, rm) = (rank(&first), rank(&sum), rank(&mean));
        println!(
            "{:>3} {:>6} {:>4} {:>13} {:>13} {:>13} {:>4}  title",
            "pos", "item", "mask", "first-token", "full-title", "full-mean", "tok"
        );
        for (j, &item) in seq.iter().enumerate() {
            println!(
                "{:>3} {:>6} {:>4} {:>8.3} [{:>2}] {:>8.3} [{:>2}] {:>8.3} [{:>2}] {:>4}  {}",
                j,
                item,
                w.mask[j],
                first[j],
                rf[j],
                sum[j],
                rs[j],
                mean[j],
                rm[j],
                s[j].tokens,
                catalog.title(item)
            );
        }
    }
    Ok(())
}
