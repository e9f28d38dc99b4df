//! Seconds per epoch of the backbones on ML-100K under RecBole's protocol: leave-one-out per
//! user (last item test, the one before valid), every prefix of the training part an
//! instance (97,171 of them), histories of at most 10 items, batch 256, full-softmax CE,
//! evaluation by full ranking. The comparison figure in the issue (RecBole SASRec on a 2-core
//! machine: 40-80 s per epoch, test HR@10 ~0.13, NDCG@10 ~0.06) uses the same protocol.
//!
//! Run:  RAYON_NUM_THREADS=2 cargo bench --bench rec -- [--epochs N] [--models sasrec,gru4rec,caser]
//!       [--max-windows N] [--engine auto|fused|candle] [--patience N]
//! `--patience N` (default 0 = run every epoch) stops after N epochs without a better valid
//! NDCG@10 and reports the test metrics of the best epoch (a convergence run).
//! Needs ml-100k.inter in the asset cache ($LLM4DSR_CACHE or ~/.cache/llm4dsr; fetch with
//! `llm4dsr assets fetch`); without it, prints SKIP and times a synthetic set of the same shape.

use llm4dsr_comm::Local;
use llm4dsr_data::Windows;
use llm4dsr_rec::synthetic::{windows, SyntheticSpec};
use llm4dsr_rec::{evaluate, Engine, EvalOptions, ModelConfig, ModelKind, TrainConfig};
use std::collections::HashMap;
use std::path::PathBuf;

/// Asset cache root (private stand-in until llm4dsr_data::assets lands).
fn cache_dir() -> PathBuf {
    std::env::var_os("LLM4DSR_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/llm4dsr")
        })
}

/// ML-100K split leave-one-out into stride-1 windows of up to 11 items.
fn ml100k_leave_one_out() -> Option<(Windows, Windows, Windows, u32, u32)> {
    let path = cache_dir().join("ml-100k/ml-100k.inter");
    let text = std::fs::read_to_string(&path).ok()?;
    let mut per_user: HashMap<String, Vec<(i64, usize, String)>> = HashMap::new();
    for (row, line) in text.lines().skip(1).enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let ts: f64 = f[3].trim().parse().ok()?;
        per_user
            .entry(f[0].to_string())
            .or_default()
            .push((ts as i64, row, f[1].to_string()));
    }
    let mut users: Vec<String> = per_user.keys().cloned().collect();
    users.sort_by_key(|u| u.parse::<u64>().unwrap_or(0));
    let mut item_ids: HashMap<String, u32> = HashMap::new();
    let (mut tr, mut va, mut te) = (Windows::new(), Windows::new(), Windows::new());
    for (ui, u) in users.iter().enumerate() {
        let mut ev = per_user[u].clone();
        ev.sort(); // by time, then file order
        let seq: Vec<u32> = ev
            .iter()
            .map(|(_, _, it)| {
                let n = item_ids.len() as u32 + 1;
                *item_ids.entry(it.clone()).or_insert(n)
            })
            .collect();
        let user = ui as u32 + 1;
        let n = seq.len();
        let push = |w: &mut Windows, end: usize| {
            let s = &seq[end.saturating_sub(11)..end];
            w.push(user, end as u32 - 1, s, &vec![0; s.len()], s, ev[end - 1].0);
        };
        push(&mut te, n);
        push(&mut va, n - 1);
        for end in 11.min(n - 2)..=n - 2 {
            push(&mut tr, end);
        }
    }
    Some((tr, va, te, item_ids.len() as u32, users.len() as u32))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let epochs: usize = get("--epochs").map(|s| s.parse().unwrap()).unwrap_or(2);
    let models = get("--models").unwrap_or_else(|| "sasrec,gru4rec,caser".into());
    let patience: usize = get("--patience").map(|s| s.parse().unwrap()).unwrap_or(0);
    let engine = match get("--engine").as_deref() {
        None | Some("auto") => Engine::Auto,
        Some("fused") => Engine::Fused,
        Some("candle") => Engine::Candle,
        Some(other) => panic!("unknown engine {other} (auto, fused, candle)"),
    };
    let (tr, va, te, items, users, source) = match ml100k_leave_one_out() {
        Some((a, b, c, i, u)) => (a, b, c, i, u, "ML-100K"),
        None => {
            eprintln!("SKIP: ml-100k.inter not in {} (run `llm4dsr assets fetch`); timing a synthetic set of the same shape", cache_dir().display());
            let spec = SyntheticSpec {
                users: 943,
                items: 1682,
                seq_len: 106,
                jump: 0.5,
                seed: 1,
            };
            let (a, b, c) = windows(spec);
            (a, b, c, spec.items, spec.users, "synthetic")
        }
    };
    // --max-windows N: time on the first N training windows only (quick profiling).
    let tr = match get("--max-windows") {
        Some(n) => {
            let n: usize = n.parse().unwrap();
            tr.select(|i, _| i < n)
        }
        None => tr,
    };
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into());
    println!("dataset {source}: {items} items, {users} users, {} train windows; threads {threads}; {epochs} epochs", tr.len());
    println!(
        "| model | engine | instances | s/epoch (wall) | CPU s/epoch | epochs (best) | valid NDCG@10 (best) | test HR@10 | test NDCG@10 |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for name in models.split(',') {
        let kind = match name {
            "sasrec" => ModelKind::Sasrec,
            "gru4rec" => ModelKind::Gru4rec,
            "caser" => ModelKind::Caser,
            other => panic!("unknown model {other}"),
        };
        let mut m = ModelConfig::defaults(kind);
        if kind == ModelKind::Sasrec {
            // RecBole's SASRec shape: 2 heads, inner 256, GELU, dropout 0.5.
            m.heads = 2;
            m.inner = 256;
            m.act = "gelu".into();
        }
        let mut cfg = TrainConfig::new(m);
        cfg.epochs = epochs;
        cfg.patience = patience;
        cfg.engine = engine;
        let engine_used = match (engine, kind) {
            (Engine::Candle, _) => "candle",
            _ => "fused",
        };
        let out = llm4dsr_rec::train(&tr, &va, items, users, &cfg, &Local, None).unwrap();
        // `out.model` holds the best epoch's weights (on valid).
        let t = evaluate(&out.model, &te, EvalOptions::default(), &Local).unwrap();
        println!(
            "| {kind} | {engine_used} | {} | {:.2} | {:.2} | {} ({}) | {:.4} | {:.4} | {:.4} |",
            out.instances,
            out.seconds_per_epoch(),
            out.cpu_seconds_per_epoch(),
            out.state.epochs_done,
            out.state.best_epoch,
            out.state.best_ndcg10,
            t.get("HR@10"),
            t.get("NDCG@10")
        );
    }
}
