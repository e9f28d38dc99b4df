//! Times the `prepare` stage on the real MovieLens logs (ML-100K, ML-1M), phase by phase, and
//! prints a table. Run: `cargo bench --bench prepare` (or, building only the data crate in
//! release, `cargo bench -p llm4dsr-data --bench prepare`). Needs `llm4dsr assets fetch
//! ml-100k ml-1m` first; a missing dataset is skipped with a message. The figure in
//! docs/data.md comes from this table.

use llm4dsr_data::prepare::{self, Protocol, Source, SourceFormat};
use std::time::Instant;

fn source(name: &str) -> Source {
    let title_as_id = name == "ml-1m";
    Source {
        format: SourceFormat::Recbole,
        inter: Some(llm4dsr_data::assets::asset_path(&format!(
            "{name}/{name}.inter"
        ))),
        item: Some(llm4dsr_data::assets::asset_path(&format!(
            "{name}/{name}.item"
        ))),
        user_field: "user_id".into(),
        item_field: "item_id".into(),
        timestamp_field: "timestamp".into(),
        title_field: if title_as_id {
            "item_id"
        } else {
            "movie_title"
        }
        .into(),
        year_field: if title_as_id { "" } else { "release_year" }.into(),
        windows_dir: None,
        train_file: String::new(),
        valid_file: String::new(),
        test_file: String::new(),
        catalog_file: String::new(),
    }
}

/// CPU seconds (user + system) this process has used so far, from /proc (Linux; 0 elsewhere).
/// Reported beside wall time because a shared 2-core machine makes wall time noisy.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')').map_or(0, |i| i + 2)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let reps = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5usize);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "prepare benchmark: median of {reps} runs, 5-core, p = 0.1, time split, {threads} hardware threads"
    );
    println!(
        "{:<8} {:>12} {:>9} {:>13} {:>13} {:>13} {:>13} {:>11}",
        "dataset",
        "interactions",
        "windows",
        "import",
        "protocol",
        "write",
        "end-to-end",
        "M_inter/s"
    );
    println!(
        "{:<8} {:>12} {:>9} {:>13} {:>13} {:>13} {:>13} {:>11}",
        "", "", "", "wall/cpu s", "wall/cpu s", "wall/cpu s", "wall/cpu s", "(wall)"
    );
    for name in ["ml-100k", "ml-1m"] {
        let src = source(name);
        if !src.inter.as_ref().unwrap().is_file() {
            println!("{name:<8} SKIP: not fetched (llm4dsr assets fetch {name})");
            continue;
        }
        let p = Protocol {
            noise_p: 0.1,
            sft_windows: if name == "ml-1m" { 5000 } else { 0 },
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        // Per phase: (wall, cpu) of every repetition.
        let mut phases: [Vec<(f64, f64)>; 4] = Default::default();
        let (mut n, mut windows) = (0u64, 0u64);
        for rep in 0..reps {
            let fields = llm4dsr_data::import::recbole::RecboleFields {
                title: src.title_field.clone(),
                year: (!src.year_field.is_empty()).then(|| src.year_field.clone()),
                ..Default::default()
            };
            let (log, m) = measure(|| {
                llm4dsr_data::import::recbole::read(
                    src.inter.as_ref().unwrap(),
                    src.item.as_ref().unwrap(),
                    &fields,
                )
                .unwrap()
            });
            phases[0].push(m);
            let (prepared, m) = measure(|| prepare::prepare_log(&log, &p).unwrap());
            phases[1].push(m);
            let ((), m) = measure(|| {
                let manifest =
                    prepare::new_manifest(serde_json::json!({}), p.seed, &src.inputs().unwrap())
                        .unwrap();
                prepare::write_dataset(&prepared, &dir.path().join(format!("w{rep}")), manifest)
                    .unwrap();
            });
            phases[2].push(m);
            n = log.len() as u64;
            windows = prepared.count("07_windows.total").unwrap();
            drop((log, prepared));
            // End to end, as the command runs it (input and output hashing included).
            let (_, m) = measure(|| {
                prepare::run(
                    &src,
                    &p,
                    serde_json::json!({ "rep": rep }),
                    &dir.path().join(format!("e{rep}")),
                    false,
                    "bench",
                )
                .unwrap()
            });
            phases[3].push(m);
        }
        let cell = |v: &[(f64, f64)]| {
            format!(
                "{:.3}/{:.2}",
                median(v.iter().map(|x| x.0).collect()),
                median(v.iter().map(|x| x.1).collect())
            )
        };
        let wall = median(phases[3].iter().map(|x| x.0).collect());
        println!(
            "{:<8} {:>12} {:>9} {:>13} {:>13} {:>13} {:>13} {:>11.2}",
            name,
            n,
            windows,
            cell(&phases[0]),
            cell(&phases[1]),
            cell(&phases[2]),
            cell(&phases[3]),
            n as f64 / wall / 1e6
        );
    }
}

/// Run `f`, returning its value and its (wall, cpu) seconds.
fn measure<T>(f: impl FnOnce() -> T) -> (T, (f64, f64)) {
    let t = Instant::now();
    let c = cpu_secs();
    let v = f();
    (v, (t.elapsed().as_secs_f64(), cpu_secs() - c))
}
