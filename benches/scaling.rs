//! Data-parallel scaling of backbone training: SASRec seconds per epoch on ML-1M with 1 and 2
//! ranks (same global batch), the bytes all-reduced per step, the measured all-reduce time for
//! that many bytes, and docs/scaling.md's model prediction for 2 ranks checked against the
//! measurement.
//!
//! ```sh
//! cargo bench --bench scaling --features mpi           # release profile
//! cargo test --bench scaling --features llm4dsr/mpi    # test profile (dependencies opt-level 3)
//! ```
//!
//! Environment: LLM4DSR_BENCH_DATASET (a prepared ML-1M directory; default: prepared here from
//! the asset cache with configs/ml-1m.toml), LLM4DSR_BENCH_EPOCHS (default 1),
//! LLM4DSR_BENCH_THREADS (threads per rank, default 1: each rank stands for one node of equal
//! compute), LLM4DSR_BIN (the binary; default the one cargo built with this bench).
//! Prints "SKIP: ..." when the binary has no MPI, mpirun is missing, or ML-1M is not fetched.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    if let Err(e) = run() {
        eprintln!("scaling bench failed: {e}");
        std::process::exit(1);
    }
}

fn env_or(key: &str, default: &str) -> String {
    std::env::var(key).unwrap_or_else(|_| default.to_string())
}

fn bin() -> PathBuf {
    std::env::var_os("LLM4DSR_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_llm4dsr")))
}

fn mpirun() -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--bind-to", "none"]);
    c
}

fn cache_dir() -> PathBuf {
    // The agreed cache layout (llm4dsr_data's asset cache): $LLM4DSR_CACHE or ~/.cache/llm4dsr.
    std::env::var_os("LLM4DSR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/llm4dsr")
        })
}

fn check(o: std::process::Output, what: &str) -> Result<std::process::Output, String> {
    if o.status.success() {
        Ok(o)
    } else {
        Err(format!(
            "{what} failed ({}):\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        ))
    }
}

fn dataset(tmp: &Path) -> Result<Option<PathBuf>, String> {
    if let Ok(d) = std::env::var("LLM4DSR_BENCH_DATASET") {
        return Ok(Some(PathBuf::from(d)));
    }
    if !cache_dir().join("ml-1m/ml-1m.inter").exists() {
        eprintln!(
            "SKIP: scaling bench: ML-1M is not in {} (run `llm4dsr assets fetch`)",
            cache_dir().display()
        );
        return Ok(None);
    }
    let out = tmp.join("ml-1m");
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/ml-1m.toml");
    let o = Command::new(bin())
        .args(["prepare", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .output()
        .map_err(|e| e.to_string())?;
    check(o, "prepare ML-1M")?;
    Ok(Some(out))
}

struct Run {
    seconds_per_epoch: f64,
    steps_per_epoch: f64,
    allreduce_bytes_per_step: f64,
    wall: f64,
}

fn train(
    dataset: &Path,
    out: &Path,
    ranks: usize,
    threads: &str,
    epochs: &str,
) -> Result<Run, String> {
    let mut c = if ranks == 1 {
        Command::new(bin())
    } else {
        let mut c = mpirun();
        c.args(["-n", &ranks.to_string(), "-x", "RAYON_NUM_THREADS"]);
        c.arg(bin());
        c
    };
    c.env("RAYON_NUM_THREADS", threads)
        .args([
            "train",
            "--model",
            "sasrec",
            "--patience",
            "0",
            "--epochs",
            epochs,
        ])
        .arg("--dataset")
        .arg(dataset)
        .arg("--out")
        .arg(out);
    let t = std::time::Instant::now();
    check(
        c.output().map_err(|e| e.to_string())?,
        &format!("train on {ranks} rank(s)"),
    )?;
    let wall = t.elapsed().as_secs_f64();
    let m: serde_json::Value = serde_json::from_slice(
        &std::fs::read(out.join("metrics.json")).map_err(|e| format!("metrics.json: {e}"))?,
    )
    .map_err(|e| e.to_string())?;
    let num = |k: &str| {
        m[k].as_f64()
            .ok_or_else(|| format!("metrics.json has no number `{k}`"))
    };
    if m["ranks"].as_u64() != Some(ranks as u64) {
        return Err(format!(
            "expected {ranks} ranks, metrics.json says {}",
            m["ranks"]
        ));
    }
    Ok(Run {
        seconds_per_epoch: num("seconds_per_epoch")?,
        steps_per_epoch: num("steps_per_epoch")?,
        allreduce_bytes_per_step: num("allreduce_bytes_per_step")?,
        wall,
    })
}

/// Median all-reduce time (s) of `bytes` over 2 ranks, from `llm4dsr comm-check`.
fn all_reduce_seconds(bytes: f64) -> Result<f64, String> {
    let floats = ((bytes / 4.0).round() as usize).max(1).to_string();
    let o = mpirun()
        .args(["-n", "2"])
        .arg(bin())
        .args([
            "comm-check",
            "--expect-size",
            "2",
            "--bench-floats",
            &floats,
            "--bench-iters",
            "50",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    let o = check(o, "comm-check --bench-floats")?;
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("all_reduce_sum_f32"))
        .ok_or_else(|| format!("no all-reduce line in: {text}"))?;
    let ms = line
        .split_whitespace()
        .skip_while(|w| *w != "median_ms")
        .nth(1)
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| format!("no median_ms in: {line}"))?;
    Ok(ms / 1e3)
}

fn run() -> Result<(), String> {
    if !cfg!(feature = "mpi") {
        eprintln!("SKIP: scaling bench: built without --features mpi");
        return Ok(());
    }
    if !Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        eprintln!("SKIP: scaling bench: no mpirun on PATH");
        return Ok(());
    }
    let tmp = tempfile::tempdir().map_err(|e| e.to_string())?;
    let Some(data) = dataset(tmp.path())? else {
        return Ok(());
    };
    let threads = env_or("LLM4DSR_BENCH_THREADS", "1");
    let epochs = env_or("LLM4DSR_BENCH_EPOCHS", "1");

    println!(
        "SASRec on {}, same global batch, {threads} thread(s) per rank, {epochs} epoch(s)",
        data.display()
    );
    println!(
        "{:>5} {:>10} {:>10} {:>14} {:>14} {:>10}",
        "ranks", "s/epoch", "steps", "bytes/step", "allreduce_ms", "wall_s"
    );
    // Two ranks first: the shorter run, so a time-limited machine reports something.
    let two = train(&data, &tmp.path().join("r2"), 2, &threads, &epochs)?;
    let ar = all_reduce_seconds(two.allreduce_bytes_per_step)?;
    println!(
        "{:>5} {:>10.2} {:>10} {:>14} {:>14.3} {:>10.1}",
        2,
        two.seconds_per_epoch,
        two.steps_per_epoch,
        two.allreduce_bytes_per_step,
        ar * 1e3,
        two.wall
    );
    let one = train(&data, &tmp.path().join("r1"), 1, &threads, &epochs)?;
    println!(
        "{:>5} {:>10.2} {:>10} {:>14} {:>14} {:>10.1}",
        1, one.seconds_per_epoch, one.steps_per_epoch, one.allreduce_bytes_per_step, "-", one.wall
    );

    // docs/scaling.md: t_step(N) = t_compute(1) / N + t_allreduce(N, bytes).
    let compute_step = one.seconds_per_epoch / one.steps_per_epoch;
    let predicted = two.steps_per_epoch * (compute_step / 2.0 + ar);
    println!(
        "2-rank s/epoch predicted from the 1-rank run and the all-reduce time: {predicted:.2}"
    );
    println!(
        "speed-up {:.2}x measured, {:.2}x predicted; prediction error {:+.0}%",
        one.seconds_per_epoch / two.seconds_per_epoch,
        one.seconds_per_epoch / predicted,
        100.0 * (predicted - two.seconds_per_epoch) / two.seconds_per_epoch
    );
    Ok(())
}
