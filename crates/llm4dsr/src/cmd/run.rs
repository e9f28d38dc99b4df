//! `llm4dsr run`: the main job on one dataset, end to end, as far as the pipeline goes today.
//!
//! ```text
//! assets -> prepare (clean, noisy p) -> score (noise detectors vs the injected masks)
//!        -> LLM noise scores of a few windows -> train + evaluate backbones (clean vs noisy)
//!        -> report.md (+ SVG plot)
//! ```
//!
//! Each step writes its own directory under `--workdir` and is skipped when its output is
//! already complete, so a killed job re-run picks up where it stopped. Without `--config`, the
//! embedded default (configs/ml-100k.toml, compiled into the binary) is used.

use crate::cmd;
use crate::config::ConfigFile;
use anyhow::{bail, Context, Result};
use clap::{Args, FromArgMatches};
use llm4dsr_comm::Comm;
use llm4dsr_data::noise::DetectionMetrics;
use llm4dsr_data::{read_split, Manifest};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The embedded default configuration of `llm4dsr run`.
pub const DEFAULT_CONFIG: &str = include_str!("../../../../configs/ml-100k.toml");

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct RunArgs {
    /// Work directory: one sub-directory per step, plus report.md (default: runs/<the
    /// config file's name without .toml>, runs/ml-100k for the embedded default).
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Probability of synthetic noise in the noisy dataset (the paper's noisy sets use 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub noise_p: f64,
    /// Backbones trained on clean and on noisy data, comma-separated (sasrec, gru4rec, caser).
    #[arg(long, value_delimiter = ',', default_value = "sasrec,gru4rec,caser")]
    pub backbones: Vec<String>,
    /// Maximum epochs per backbone (10: the budget of docs/backbones.md's ML-100K table). The
    /// job passes it, --patience and --seed to every training run, over the config's [train]
    /// values; the rest of [train] (model sizes, loss, lr, ...) applies.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Early-stopping patience (epochs without a better valid NDCG@10).
    #[arg(long, default_value_t = 3)]
    pub patience: usize,
    /// Noise detectors run by the `score` step, comma-separated (popularity, cooccurrence).
    #[arg(long, value_delimiter = ',', default_value = "popularity,cooccurrence")]
    pub detectors: Vec<String>,
    /// Windows of the noisy test split whose LLM scores are printed (0 skips the LLM step).
    #[arg(long, default_value_t = 3)]
    pub llm_windows: usize,
    /// Seed of every random draw (prepare, detectors, training), over the config's seeds.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Replace a dataset the work directory holds that was prepared with another config
    /// (without the flag that is refused), and restart every training run from scratch.
    /// Without it, the steps downstream of the datasets follow them: scores and training runs
    /// made from other data or another config are redone, and those of this very run (same
    /// inputs and config, every file intact) are kept, as redoing them gives the same result.
    #[arg(long)]
    pub overwrite: bool,
}

/// Build a stage's arguments as if its flags were given on the command line, with the
/// config's table for that stage filling the rest.
fn stage_args<A>(config: &ConfigFile, section: &str, argv: &[String]) -> Result<A>
where
    A: Args + FromArgMatches + Serialize + DeserializeOwned,
{
    let command = A::augment_args(clap::Command::new("stage").no_binary_name(true));
    let matches = command
        .try_get_matches_from(argv)
        .with_context(|| format!("building `{section}` arguments from {argv:?}"))?;
    config.resolve(section, &matches)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

pub fn run(args: RunArgs, config: &ConfigFile, comm: &dyn Comm) -> Result<()> {
    let embedded;
    let config = if config.table.is_empty() {
        embedded = ConfigFile::from_str(DEFAULT_CONFIG, "<embedded configs/ml-100k.toml>")?;
        &embedded
    } else {
        config
    };
    let workdir = match &args.workdir {
        Some(w) => w.clone(),
        None => {
            let stem = config
                .path
                .as_ref()
                .and_then(|p| p.file_stem())
                .map(|s| s.to_string_lossy().into_owned())
                .filter(|s| !s.starts_with('<'))
                .unwrap_or_else(|| "ml-100k".into());
            PathBuf::from("runs").join(stem)
        }
    };
    let wd = &workdir;
    if comm.is_root() {
        std::fs::create_dir_all(wd).with_context(|| format!("creating {}", wd.display()))?;
    }
    let t0 = std::time::Instant::now();

    // 1. Assets: the dataset of the config (and the LLM when its step runs).
    let prepare_probe: cmd::prepare::PrepareArgs = stage_args(config, "prepare", &[])?;
    // (`format`, not `source()`: that resolves asset paths, which are fetched below.)
    if prepare_probe
        .format
        .parse::<llm4dsr_data::prepare::SourceFormat>()?
        == llm4dsr_data::prepare::SourceFormat::MovieCsv
    {
        // Its clean and noisy datasets come from injecting noise, which movie-csv windows
        // cannot take: the clean one would be the reference's noisy windows under another name.
        bail!(
            "{}: `run` prepares a clean and a noisy dataset by injecting noise, but format \
             movie-csv imports the reference's windows with their own noise; prepare each \
             variant with `llm4dsr prepare --config {0} [--windows-dir ...]` and run the stages \
             on them (docs/data.md)",
            config
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "the config".into())
        );
    }
    let mut wanted: Vec<String> = prepare_probe.asset.iter().cloned().collect();
    if args.llm_windows > 0 {
        wanted.push("smollm2-135m-instruct".into());
    }
    if comm.is_root() && !wanted.is_empty() {
        tracing::info!("step 1/5: assets {}", wanted.join(", "));
        llm4dsr_data::assets::fetch(&llm4dsr_data::assets::cache_dir(), &wanted)?;
    }
    comm.barrier()?;

    // 2. Prepare the clean and the noisy dataset (rank 0; the others wait).
    let clean = wd.join("clean");
    let noisy = wd.join(format!("noisy-p{}", args.noise_p));
    for (dir, p) in [(&clean, 0.0), (&noisy, args.noise_p)] {
        if comm.is_root() {
            tracing::info!("step 2/5: prepare {} (noise p = {p})", dir.display());
            let mut argv = vec![
                "--out".into(),
                s(dir),
                "--noise-p".into(),
                p.to_string(),
                "--seed".into(),
                args.seed.to_string(),
            ];
            if args.overwrite {
                argv.push("--overwrite".into());
            }
            cmd::prepare::run(stage_args(config, "prepare", &argv)?, config)?;
        }
    }
    comm.barrier()?;

    // 3. Noise detectors on the noisy data, judged against the injected masks.
    let mut detection: Vec<(String, String, DetectionMetrics)> = Vec::new();
    for method in &args.detectors {
        let out = wd.join(format!("scores-{method}"));
        tracing::info!("step 3/5: score {} with {method}", noisy.display());
        // Scores up to date with the noisy dataset are left alone (the stage checks its
        // fingerprint and its files); anything else in the job's own directory is redone.
        let argv = vec![
            "--dataset".into(),
            s(&noisy),
            "--out".into(),
            s(&out),
            "--method".into(),
            method.clone(),
            "--overwrite".into(),
        ];
        cmd::score::run(stage_args(config, "score", &argv)?, config, comm)?;
        for split in ["valid", "test"] {
            let m = cmd::score::detection_of(
                &read_split(&noisy, split)?,
                &out.join("scores").join(format!("{split}.parquet")),
            )?;
            detection.push((method.clone(), split.to_string(), m));
        }
    }

    // 4. The LLM's scores of a few windows (untuned SmolLM2: shows the engine, not the method).
    if args.llm_windows > 0 && comm.is_root() {
        tracing::info!(
            "step 4/5: LLM noise scores of {} test windows (the untuned SmolLM2-135M-Instruct, \
             Q4_1 GGUF: they show the engine at work, not the method, which needs the \
             fine-tuned model)",
            args.llm_windows
        );
        // Spread over the split: neighbouring windows are mostly one user's, a step apart.
        let test_windows = read_split(&noisy, "test")?.len();
        let argv = vec![
            "--dataset".into(),
            s(&noisy),
            "--windows".into(),
            args.llm_windows.to_string(),
            "--stride".into(),
            (test_windows / args.llm_windows).max(1).to_string(),
        ];
        cmd::inspect::run(stage_args(config, "inspect-scores", &argv)?)?;
    }
    comm.barrier()?;

    // 5. Backbones on clean and noisy data.
    let results_csv = wd.join("results.csv");
    let mut runs = Vec::new();
    for model in &args.backbones {
        for (label, data) in [("clean", &clean), ("noisy", &noisy)] {
            let out = wd.join("train").join(format!("{model}-{label}"));
            let metrics = out.join("metrics.json");
            let mut argv: Vec<String> = vec![
                "--dataset".into(),
                s(data),
                "--out".into(),
                s(&out),
                "--model".into(),
                model.clone(),
                "--epochs".into(),
                args.epochs.to_string(),
                "--patience".into(),
                args.patience.to_string(),
                "--seed".into(),
                args.seed.to_string(),
                "--results-csv".into(),
                s(&results_csv),
                "--label".into(),
                label.to_string(),
            ];
            let train_cfg =
                stage_args::<cmd::train::TrainArgs>(config, "train", &argv)?.train_config();
            // Rank 0 decides whether the run directory holds this very training run.
            let mut stale = Vec::new();
            if comm.is_root() {
                if let Some(why) = training_staleness(&out, data, &train_cfg)? {
                    stale = why.into_bytes();
                }
            }
            comm.broadcast_bytes(0, &mut stale)?;
            let finished = metrics.exists();
            if args.overwrite || !stale.is_empty() {
                tracing::info!("step 5/5: train {model} on {label} data");
                if finished && !stale.is_empty() {
                    tracing::warn!(
                        "{}: retraining: {}",
                        out.display(),
                        String::from_utf8_lossy(&stale)
                    );
                }
                if !finished && out.join("last").join("state.json").exists() && !args.overwrite {
                    argv.push("--resume".into());
                } else if out.exists() {
                    argv.push("--overwrite".into());
                }
                cmd::train::run_with(stage_args(config, "train", &argv)?, comm)?;
            } else {
                tracing::info!(
                    "step 5/5: {model} on {label} data: up to date in {} (same data, config \
                     and checkpoints), nothing to do",
                    out.display()
                );
            }
            comm.barrier()?;
            runs.push((model.clone(), label.to_string(), metrics));
        }
    }

    if comm.is_root() {
        let report = write_report(
            wd,
            &args,
            &clean,
            &noisy,
            &detection,
            &runs,
            t0.elapsed().as_secs_f64(),
        )?;
        println!("\nreport: {}", report.display());
    }
    Ok(())
}

/// Why the run directory `out` does not hold the training run this job asks for (`None`
/// when it does: a finished run, `metrics.json`, of this very config, trained on the dataset
/// `data` whose files still have the sha256 values its manifest records).
fn training_staleness(
    out: &Path,
    data: &Path,
    cfg: &llm4dsr_rec::TrainConfig,
) -> Result<Option<String>> {
    let metrics = out.join("metrics.json");
    if !metrics.exists() {
        return Ok(Some("not trained yet".into()));
    }
    let text = std::fs::read_to_string(&metrics)
        .with_context(|| format!("reading {}", metrics.display()))?;
    let v: serde_json::Value = match serde_json::from_str(&text) {
        Ok(v) => v,
        Err(e) => return Ok(Some(format!("{}: unreadable ({e})", metrics.display()))),
    };
    if v["dataset"].as_str() != Some(s(data).as_str()) {
        return Ok(Some(format!(
            "trained on {}, this job trains on {}",
            v["dataset"],
            data.display()
        )));
    }
    if v["config"] != serde_json::to_value(cfg)? {
        return Ok(Some(
            "trained with another config (epochs, patience, model or optimiser settings)".into(),
        ));
    }
    let Ok(m) = Manifest::read(out) else {
        return Ok(Some(format!(
            "{}: no readable manifest.json",
            out.display()
        )));
    };
    for i in &m.inputs {
        let same = llm4dsr_data::manifest::sha256_file(Path::new(&i.path))
            .map(|(sha, _)| sha == i.sha256)
            .unwrap_or(false);
        if !same {
            return Ok(Some(format!("{} changed since it was trained on", i.path)));
        }
    }
    // The checkpoints the report's metrics come from, against the sha256 of each.
    if let Some(why) = m.damaged_output(out) {
        return Ok(Some(format!("damaged: {why}")));
    }
    Ok(None)
}

/// The prepare protocol recorded in `dataset`'s manifest.
fn protocol_of(dataset: &Path) -> Result<serde_json::Value> {
    let m = Manifest::read(dataset)?;
    Ok(m.config.get("protocol").cloned().unwrap_or_default())
}

/// Window length (history + target) of `dataset`.
fn window_len(dataset: &Path) -> Result<u64> {
    protocol_of(dataset)?["window"]
        .as_u64()
        .with_context(|| format!("{}: no protocol.window in its manifest", dataset.display()))
}

/// One sentence of the protocol a reader needs to read the tables: windows and split.
fn protocol_line(dataset: &Path) -> Result<String> {
    let p = protocol_of(dataset)?;
    let w = window_len(dataset)?;
    let split = match p["split"].as_str() {
        Some("time") => format!(
            "all windows ordered by their target's time and cut {:.0}% / {:.0}% / {:.0}% into \
             train / valid / test",
            100.0 * p["train_frac"].as_f64().unwrap_or(f64::NAN),
            100.0 * p["valid_frac"].as_f64().unwrap_or(f64::NAN),
            100.0
                * (1.0
                    - p["train_frac"].as_f64().unwrap_or(f64::NAN)
                    - p["valid_frac"].as_f64().unwrap_or(f64::NAN))
        ),
        Some("leave-one-out") => "leave-one-out (each user's last target in test, the one \
                                  before in valid)"
            .to_string(),
        other => format!("split {other:?}"),
    };
    Ok(format!(
        "Windows of {w} items ({} of history + 1 target), stride 1, {split}; \
         test targets are kept clean in the noisy dataset, valid targets are not.",
        w.saturating_sub(1)
    ))
}

fn write_report(
    wd: &Path,
    args: &RunArgs,
    clean: &Path,
    noisy: &Path,
    detection: &[(String, String, DetectionMetrics)],
    runs: &[(String, String, PathBuf)],
    seconds: f64,
) -> Result<PathBuf> {
    let mut r = String::new();
    writeln!(r, "# llm4dsr run report\n")?;
    // Training is most of a first run's time; its cost stays with each run (metrics.json), so
    // a re-run that keeps them still reports it.
    let mut train_seconds = 0.0;
    for (_, _, path) in runs {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?,
        )
        .with_context(|| format!("parsing {}", path.display()))?;
        train_seconds += v["seconds_per_epoch"].as_f64().unwrap_or(0.0)
            * v["epochs_run"].as_f64().unwrap_or(0.0);
    }
    writeln!(
        r,
        "Work directory `{}`; seed {}; noise p = {} in the noisy dataset; backbones trained \
         for at most {} epochs (patience {}). {:.0} s for this invocation (a step whose output \
         was already this run's is not redone); the epochs of the {} training runs took {:.0} s \
         in all when they ran (wall time, the validation ranking after each epoch not \
         included).\n",
        wd.display(),
        args.seed,
        args.noise_p,
        args.epochs,
        args.patience,
        seconds,
        runs.len(),
        train_seconds
    )?;
    writeln!(r, "## Datasets\n")?;
    writeln!(r, "| dataset | users | items | train windows | valid windows | test windows | noised interactions | noisy window-history positions |")?;
    writeln!(r, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for d in [clean, noisy] {
        let m = Manifest::read(d)?;
        let c = |key: &str| {
            m.counts
                .get(key)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "-".into())
        };
        writeln!(
            r,
            "| `{}` | {} | {} | {} | {} | {} | {} | {} |",
            d.file_name().unwrap().to_string_lossy(),
            c("05_kept.users"),
            c("05_kept.items"),
            c("07_windows.train"),
            c("07_windows.valid"),
            c("07_windows.test"),
            c("06_noise.interactions_noised"),
            c("08_noise.noisy_history_positions"),
        )?;
    }
    writeln!(
        r,
        "\n{} Windows overlap (stride 1), so one noised interaction sits in the history of up to \
{} windows: the last column counts window positions, not interactions. Counts at every step \
are in each dataset's `manifest.json`.\n",
        protocol_line(clean)?,
        window_len(clean)?.saturating_sub(1)
    )?;
    writeln!(
        r,
        "## Noise detection on the noisy data (top-1 flag per window history)\n"
    )?;
    writeln!(r, "| detector | split | windows | noisy positions | precision | recall | F1 | random precision | precision ceiling |")?;
    writeln!(r, "|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    for (method, split, m) in detection {
        writeln!(
            r,
            "| {method} | {split} | {} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
            m.sequences,
            m.noisy_positions,
            m.precision,
            m.recall,
            m.f1,
            m.random_precision,
            m.precision_ceiling
        )?;
    }
    writeln!(
        r,
        "\nEach detector flags the highest-scoring position of every window's history (ties \
go to the earliest position). Precision counts every window, also those without any noise, so \
its ceiling (a perfect detector's precision) is the share of windows holding noise; random \
precision is the expected precision of a uniformly random flag. Recall counts window positions: \
an interaction noised once is a positive in every window whose history holds it. The LLM detector (fine-tuned on the SFT instances) is the next \
stage of the roadmap; `llm4dsr inspect-scores` shows the untuned LLM's scores of a few \
windows.\n"
    )?;
    writeln!(
        r,
        "## Backbones: clean vs noisy data (p = {}; each trained and tested on its own \
dataset's windows: the noisy test histories hold noise too; test split, full ranking)\n\n\
Metrics are averaged over the test windows (each window's last item is the target, its history \
the input), ranking the target against the whole catalogue; items scoring the same as the \
target count as ranked above it.\n",
        args.noise_p
    )?;
    writeln!(
        r,
        "| backbone | data | HR@10 | NDCG@10 | HR@20 | NDCG@20 | best epoch | epochs run | s/epoch |"
    )?;
    writeln!(r, "|---|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut bars = Vec::new();
    for (model, label, path) in runs {
        let label = if label == "noisy" {
            format!("noisy p={}", args.noise_p)
        } else {
            label.clone()
        };
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let t = |k: &str| {
            v["test"]["values"][k]
                .as_f64()
                .or_else(|| v["test"][k].as_f64())
                .unwrap_or(f64::NAN)
        };
        writeln!(
            r,
            "| {model} | {label} | {:.4} | {:.4} | {:.4} | {:.4} | {} | {} | {:.2} |",
            t("HR@10"),
            t("NDCG@10"),
            t("HR@20"),
            t("NDCG@20"),
            v["best_epoch"],
            v["epochs_run"],
            v["seconds_per_epoch"].as_f64().unwrap_or(f64::NAN)
        )?;
        bars.push((format!("{model} {label}"), t("NDCG@10")));
    }
    let svg = wd.join("ndcg10.svg");
    llm4dsr_data::atomic::write_file(
        &svg,
        bar_chart_svg(
            &format!(
                "test NDCG@10: clean vs noisy (p = {}) data, at most {} epochs",
                args.noise_p, args.epochs
            ),
            &bars,
        )
        .as_bytes(),
    )?;
    writeln!(
        r,
        "\n![test NDCG@10]({})\n",
        svg.file_name().unwrap().to_string_lossy()
    )?;
    writeln!(
        r,
        "`epochs run` equal to the budget means training stopped at the budget, not by early \
stopping. s/epoch is the wall time of an epoch's training steps (validation excluded) on this \
machine, whatever else ran on it. Rows of every \
training run are also appended to `results.csv`."
    )?;
    let path = wd.join("report.md");
    llm4dsr_data::atomic::write_file(&path, r.as_bytes())?;
    Ok(path)
}

/// A horizontal bar chart as a standalone SVG (no plotting dependency).
pub fn bar_chart_svg(title: &str, bars: &[(String, f64)]) -> String {
    let max = bars
        .iter()
        .map(|b| b.1)
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let (w, row, left, top) = (640.0, 26.0, 160.0, 40.0);
    let h = top + row * bars.len() as f64 + 20.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"22\" font-size=\"14\">{title}</text>\n"
    );
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = top + row * i as f64;
        let bw = if v.is_finite() {
            (w - left - 80.0) * v / max
        } else {
            0.0
        };
        let color = if label.ends_with("clean") {
            "#4c78a8"
        } else {
            "#e45756"
        };
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{label}</text><rect x=\"{left}\" y=\"{}\" width=\"{bw:.1}\" height=\"{}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\">{v:.4}</text>",
            left - 8.0,
            y + 16.0,
            y + 4.0,
            row - 8.0,
            left + bw + 6.0,
            y + 16.0
        );
    }
    s.push_str("</svg>\n");
    s
}
