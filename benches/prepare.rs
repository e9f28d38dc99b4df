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
        "{:<8} {:>12} {:>9} {:>9} {:>9} {:>9} {:>9} {:>11}",
        "dataset",
        "interactions",
        "windows",
        "import_s",
        "protocol_s",
        "write_s",
        "total_s",
        "M_inter/s"
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
        let (mut imp, mut proto, mut write, mut total) = (vec![], vec![], vec![], vec![]);
        let (mut n, mut windows) = (0u64, 0u64);
        for rep in 0..reps {
            // Phases, measured separately.
            let t = Instant::now();
            let fields = llm4dsr_data::import::recbole::RecboleFields {
                title: src.title_field.clone(),
                year: (!src.year_field.is_empty()).then(|| src.year_field.clone()),
                ..Default::default()
            };
            let log = llm4dsr_data::import::recbole::read(
                src.inter.as_ref().unwrap(),
                src.item.as_ref().unwrap(),
                &fields,
            )
            .unwrap();
            imp.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let prepared = prepare::prepare_log(&log, &p).unwrap();
            proto.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            let m = prepare::new_manifest(serde_json::json!({}), p.seed, &src.inputs().unwrap())
                .unwrap();
            prepare::write_dataset(&prepared, &dir.path().join(format!("w{rep}")), m).unwrap();
            write.push(t.elapsed().as_secs_f64());
            n = log.len() as u64;
            windows = prepared.count("07_windows.total").unwrap();
            drop((log, prepared));
            // End to end, as the command runs it (input hashing included).
            let t = Instant::now();
            prepare::run(
                &src,
                &p,
                serde_json::json!({ "rep": rep }),
                &dir.path().join(format!("e{rep}")),
                false,
                "bench",
            )
            .unwrap();
            total.push(t.elapsed().as_secs_f64());
        }
        let tot = median(total);
        println!(
            "{:<8} {:>12} {:>9} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>11.2}",
            name,
            n,
            windows,
            median(imp),
            median(proto),
            median(write),
            tot,
            n as f64 / tot / 1e6
        );
    }
}
