//! Cluster execution end to end, through the `llm4dsr` binary: the sharded `score` stage on
//! one process and under `mpirun` with 1-3 ranks, a rank killed mid-stage and the job resumed,
//! the communicator's self-check, and launcher/binary mismatches.
//!
//! The MPI tests need a binary built with `--features mpi` and OpenMPI's `mpirun` on PATH;
//! without them they print "SKIP: ..." and pass. Under MPI they assert the world size, since a
//! binary started by the wrong launcher runs as N one-rank jobs and exits 0.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, UInt32Type};
use llm4dsr_data::{Catalog, Windows};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_llm4dsr");
const NUM_ITEMS: u32 = 60;

/// Deterministic user sequences: 40 users, lengths 5..=24, items 1..=NUM_ITEMS with a
/// per-user "taste" so that co-occurrence is not uniform.
fn sequences() -> Vec<(u32, Vec<u32>)> {
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (1..=40u32)
        .map(|u| {
            let len = 5 + (next() % 20) as usize;
            let base = (next() % NUM_ITEMS as u64) as u32;
            let seq = (0..len)
                .map(|_| {
                    let off = if next() % 5 == 0 {
                        next() % NUM_ITEMS as u64
                    } else {
                        next() % 8
                    };
                    1 + ((base as u64 + off) % NUM_ITEMS as u64) as u32
                })
                .collect();
            (u, seq)
        })
        .collect()
}

/// A prepared dataset: sliding windows of up to 11 items (stride 1); per user, the window
/// ending at the last item is test, the one before valid, the rest train.
fn write_dataset(dir: &Path) -> HashMap<&'static str, Windows> {
    let mut splits: HashMap<&str, Windows> = ["train", "valid", "test"]
        .into_iter()
        .map(|s| (s, Windows::new()))
        .collect();
    for (u, seq) in sequences() {
        for t in 1..seq.len() {
            let from = t.saturating_sub(10);
            let items = &seq[from..=t];
            let split = if t == seq.len() - 1 {
                "test"
            } else if t == seq.len() - 2 {
                "valid"
            } else {
                "train"
            };
            splits.get_mut(split).unwrap().push(
                u,
                t as u32,
                items,
                &vec![0; items.len()],
                items,
                1_000 * u as i64 + t as i64,
            );
        }
    }
    let mut catalog = Catalog::new();
    for i in 1..=NUM_ITEMS {
        catalog.push(format!("Movie {i} (19{i:02})"), format!("m{i}"));
    }
    catalog.write_parquet(&dir.join("catalog.parquet")).unwrap();
    for (s, w) in &splits {
        w.write_parquet(&dir.join("windows").join(format!("{s}.parquet")))
            .unwrap();
    }
    splits
}

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(BIN);
    c.args(args).env_remove("LLM4DSR_TEST_ABORT_AFTER_SHARDS");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running llm4dsr")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn score_args<'a>(dataset: &'a str, out: &'a str, method: &'a str) -> Vec<&'a str> {
    vec![
        "score",
        "--dataset",
        dataset,
        "--out",
        out,
        "--method",
        method,
        "--num-shards",
        "7",
    ]
}

/// (user, pos) -> (items, scores) of a scores file.
fn read_scores(p: &Path) -> HashMap<(u32, u32), (Vec<u32>, Vec<f32>)> {
    let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(p).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut out = HashMap::new();
    for b in r {
        let b = b.unwrap();
        let user = b.column(0).as_primitive::<UInt32Type>();
        let pos = b.column(1).as_primitive::<UInt32Type>();
        let method = b.column(2).as_string::<i32>();
        let items = b.column(3).as_list::<i32>();
        let scores = b.column(4).as_list::<i32>();
        for r in 0..b.num_rows() {
            assert!(!method.value(r).is_empty());
            let it = items
                .value(r)
                .as_primitive::<UInt32Type>()
                .values()
                .to_vec();
            let sc = scores
                .value(r)
                .as_primitive::<Float32Type>()
                .values()
                .to_vec();
            assert!(
                out.insert((user.value(r), pos.value(r)), (it, sc))
                    .is_none(),
                "duplicate row"
            );
        }
    }
    out
}

fn file_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ["train", "valid", "test"]
        .iter()
        .map(|s| {
            let p = dir.join("scores").join(format!("{s}.parquet"));
            (
                s.to_string(),
                std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
            )
        })
        .collect()
}

fn manifest_outputs(dir: &Path) -> serde_json::Value {
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    serde_json::json!({"outputs": m["outputs"], "counts": m["counts"]})
}

#[test]
fn popularity_scores_match_training_frequencies() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let splits = write_dataset(&data);
    let out = tmp.path().join("scores");
    let o = run(
        &score_args(data.to_str().unwrap(), out.to_str().unwrap(), "popularity"),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    // Expected, from the sequences themselves: training interactions are all but the last two.
    let mut count = vec![0u64; NUM_ITEMS as usize + 1];
    let mut total = 0u64;
    for (_, seq) in sequences() {
        for &i in &seq[..seq.len() - 2] {
            count[i as usize] += 1;
            total += 1;
        }
    }
    let expect =
        |i: u32| -((count[i as usize] as f64 + 1.0) / (total + NUM_ITEMS as u64) as f64).ln();

    for (split, windows) in &splits {
        let got = read_scores(&out.join("scores").join(format!("{split}.parquet")));
        assert_eq!(got.len(), windows.len(), "{split}: one row per window");
        for w in windows.iter() {
            let (items, scores) = &got[&(w.user, w.pos)];
            let scope = if *split == "train" {
                w.items
            } else {
                w.history()
            };
            assert_eq!(items.as_slice(), scope, "{split}: scored items");
            for (&i, &s) in items.iter().zip(scores) {
                assert!(
                    (s as f64 - expect(i)).abs() < 1e-5,
                    "{split}: item {i}: {s}"
                );
            }
        }
    }
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["stage"], "score");
    assert_eq!(m["counts"]["train.windows"], splits["train"].len() as u64);
    assert_eq!(
        m["counts"]["test.windows_scored"],
        splits["test"].len() as u64
    );
    assert_eq!(m["outputs"].as_array().unwrap().len(), 3);
    assert!(
        !tmp.path().join("scores.parts").exists(),
        "parts removed after commit"
    );

    // The same run again: up to date, nothing rewritten; the parts directory a run killed
    // between its commit and its clean-up would leave is removed.
    let (d, o_) = (data.to_str().unwrap(), out.to_str().unwrap());
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let reference = file_bytes(&out);
    let leftover = tmp.path().join("scores.parts").join("train");
    std::fs::create_dir_all(&leftover).unwrap();
    let o = run(&score_args(d, o_, "popularity"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("up to date"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    assert!(!tmp.path().join("scores.parts").exists());

    // Another method into the same directory: refused, the scores untouched.
    let o = run(&score_args(d, o_, "cooccurrence"), &[]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(o_) && e.contains("another run") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);

    // A damaged output of the same run: rebuilt to the same bytes, the file named.
    let test = out.join("scores/test.parquet");
    let len = std::fs::metadata(&test).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&test)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let o = run(&score_args(d, o_, "popularity"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(
        e.contains("rebuilding") && e.contains("test.parquet"),
        "{e}"
    );
    assert_eq!(file_bytes(&out), reference);
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
}

#[test]
fn killed_single_process_resumes_to_identical_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let d = data.to_str().unwrap();
    let reference = tmp.path().join("reference");
    let o = run(
        &score_args(d, reference.to_str().unwrap(), "cooccurrence"),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));

    let out = tmp.path().join("resumed");
    let o = run(
        &score_args(d, out.to_str().unwrap(), "cooccurrence"),
        &[("LLM4DSR_TEST_ABORT_AFTER_SHARDS", "0:9")],
    );
    assert!(!o.status.success(), "the hook must kill the run");
    assert!(
        stderr(&o).contains("rank 0 aborts after writing 9 part file(s)"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists(), "no output from a killed run");
    // 7 train parts + 2 valid parts were complete when it died.
    let parts = tmp.path().join("resumed.parts");
    assert!(parts.join("train/part-00006-of-00007.json").exists());
    assert!(parts.join("valid/part-00001-of-00007.json").exists());
    assert!(!parts.join("valid/part-00002-of-00007.json").exists());

    let o = run(&score_args(d, out.to_str().unwrap(), "cooccurrence"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("(0 written now, 7 reused)"), "{e}");
    assert!(e.contains("(5 written now, 2 reused)"), "{e}");
    assert_eq!(file_bytes(&out), file_bytes(&reference));
    assert_eq!(manifest_outputs(&out), manifest_outputs(&reference));
    assert!(!parts.exists());
}

#[test]
fn bad_input_is_named_and_leaves_no_output() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut splits = write_dataset(&data);
    let valid = splits.get_mut("valid").unwrap();
    valid.push(99, 3, &[1, 2, NUM_ITEMS + 5], &[0; 3], &[1, 2, 3], 5);
    let vpath = data.join("windows/valid.parquet");
    valid.write_parquet(&vpath).unwrap();
    let out = tmp.path().join("o");
    let o = run(
        &score_args(data.to_str().unwrap(), out.to_str().unwrap(), "popularity"),
        &[],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("valid.parquet") && e.contains("field `items`"),
        "{e}"
    );
    assert!(!out.exists());

    let o = run(&["score", "--out", out.to_str().unwrap()], &[]);
    assert!(
        stderr(&o).contains("--dataset is required"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn launcher_without_matching_mpi_is_refused() {
    // What a rank sees when mpirun started 3 copies of a binary that cannot join them.
    let o = run(
        &["comm-check"],
        &[
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ],
    );
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("rank 1 of 3"), "{e}");
    if cfg!(feature = "mpi") {
        // MPI_Init without the launcher's daemon gives a one-rank world: a mismatch.
        assert!(e.contains("MPI reports rank 0 of 1"), "{e}");
    } else {
        assert!(e.contains("built without MPI"), "{e}");
    }
}

// ---------------------------------------------------------------------------------------------
// Under mpirun.

/// `mpirun` with the flags this 2-core, run-as-root machine needs, or None (with a SKIP
/// message) when this build or this machine has no MPI.
fn mpirun(test: &str) -> Option<Command> {
    if !cfg!(feature = "mpi") {
        eprintln!("SKIP: {test}: llm4dsr built without --features mpi");
        return None;
    }
    let ok = Command::new("mpirun")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("SKIP: {test}: no mpirun on PATH (apt-get install openmpi-bin libopenmpi-dev)");
        return None;
    }
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env_remove("LLM4DSR_TEST_ABORT_AFTER_SHARDS")
        .arg("--oversubscribe");
    Some(c)
}

fn mpi_run(test: &str, n: usize, args: &[&str], env: &[(&str, &str)]) -> Option<Output> {
    let mut c = mpirun(test)?;
    c.args(["-n", &n.to_string()]);
    for (k, v) in env {
        c.args(["-x", &format!("{k}={v}")]);
    }
    c.arg(BIN).args(args);
    Some(c.output().expect("running mpirun"))
}

#[test]
fn mpi_comm_check_on_1_2_3_ranks() {
    for n in 1..=3 {
        let Some(o) = mpi_run(
            "mpi_comm_check",
            n,
            &["comm-check", "--expect-size", &n.to_string()],
            &[],
        ) else {
            return;
        };
        assert!(o.status.success(), "{n} ranks: {}", stderr(&o));
        let out = String::from_utf8_lossy(&o.stdout);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines.len(),
            n,
            "one line per rank, printed by rank 0: {out}"
        );
        for (r, l) in lines.iter().enumerate() {
            assert!(
                l.starts_with(&format!("rank {r}/{n} local {r}/{n} ")),
                "world size {n} expected: {l}"
            );
            assert!(
                l.contains("backend mpi") && l.contains("collective checks passed"),
                "{l}"
            );
        }
    }
}

#[test]
fn mpi_score_any_rank_count_kill_and_resume() {
    if mpirun("mpi_score").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let d = data.to_str().unwrap();
    let p = |name: &str| tmp.path().join(name);

    let o = run(
        &score_args(d, p("one").to_str().unwrap(), "cooccurrence"),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let reference = file_bytes(&p("one"));

    for n in [2, 3] {
        let out = p(&format!("n{n}"));
        let o = mpi_run(
            "mpi_score",
            n,
            &score_args(d, out.to_str().unwrap(), "cooccurrence"),
            &[],
        )
        .unwrap();
        assert!(o.status.success(), "{n} ranks: {}", stderr(&o));
        // Every log line of a multi-rank job names its rank; all n ranks took part.
        let e = stderr(&o);
        for r in 0..n {
            assert!(
                e.contains(&format!("[rank {r}/{n}]")),
                "rank {r} of {n} missing: {e}"
            );
        }
        assert_eq!(file_bytes(&out), reference, "{n} ranks");
        assert_eq!(manifest_outputs(&out), manifest_outputs(&p("one")));
    }

    // Rank 1 of 3 dies after its first part: the job fails, saying so.
    let out = p("killed");
    let o = mpi_run(
        "mpi_score",
        3,
        &score_args(d, out.to_str().unwrap(), "cooccurrence"),
        &[("LLM4DSR_TEST_ABORT_AFTER_SHARDS", "1:1")],
    )
    .unwrap();
    assert!(!o.status.success(), "a killed rank must fail the job");
    let e = stderr(&o);
    eprintln!("--- what the user sees when rank 1 dies ---\n{e}---");
    assert!(
        e.contains("[rank 1/3]") && e.contains("rank 1 aborts after writing 1 part file(s)"),
        "{e}"
    );
    assert!(!out.exists(), "no output from a killed job");
    assert!(p("killed.parts/train/part-00001-of-00007.json").exists());

    // Re-run (with another rank count): completes, reusing parts, same bytes.
    let o = mpi_run(
        "mpi_score",
        2,
        &score_args(d, out.to_str().unwrap(), "cooccurrence"),
        &[],
    )
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("already complete"), "{}", stderr(&o));
    assert_eq!(file_bytes(&out), reference);
    assert!(!p("killed.parts").exists());

    // The finished job again, on 3 ranks: every rank learns it is up to date and exits 0.
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    let o = mpi_run(
        "mpi_score",
        3,
        &score_args(d, out.to_str().unwrap(), "cooccurrence"),
        &[],
    )
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("up to date"), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    assert_eq!(file_bytes(&out), reference);
}

#[test]
fn mpi_pipeline_prepare_on_rank_0_then_score() {
    if mpirun("mpi_pipeline").is_none() {
        return;
    }
    // A RecBole source written from the same sequences (distinct timestamps).
    let tmp = tempfile::tempdir().unwrap();
    let mut inter = vec!["user_id:token\titem_id:token\trating:float\ttimestamp:float".to_string()];
    for (u, seq) in sequences() {
        for (t, i) in seq.iter().enumerate() {
            inter.push(format!("u{u}\t{i}\t4\t{}", 1_000 * t as u64 + u as u64));
        }
    }
    let mut item = vec!["item_id:token\tmovie_title:token_seq\trelease_year:token".to_string()];
    for i in 1..=NUM_ITEMS {
        item.push(format!("{i}\tMovie {i}\t{}", 1950 + i));
    }
    let (fi, fm) = (tmp.path().join("x.inter"), tmp.path().join("x.item"));
    std::fs::write(&fi, inter.join("\n") + "\n").unwrap();
    std::fs::write(&fm, item.join("\n") + "\n").unwrap();
    let prepare = |out: &Path| -> Vec<String> {
        [
            "prepare",
            "--format",
            "recbole",
            "--inter",
            fi.to_str().unwrap(),
            "--item",
            fm.to_str().unwrap(),
            "--k-core",
            "2",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    let single = tmp.path().join("single");
    let args = prepare(&single);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = run(&args, &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Under 3 ranks `prepare` runs on rank 0 only; all ranks succeed, same dataset.
    let multi = tmp.path().join("multi");
    let args = prepare(&multi);
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let o = mpi_run("mpi_pipeline", 3, &args, &[]).unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for s in ["train", "valid", "test"] {
        let f = format!("windows/{s}.parquet");
        assert_eq!(
            std::fs::read(multi.join(&f)).unwrap(),
            std::fs::read(single.join(&f)).unwrap(),
            "{f}"
        );
    }

    // ... and `score` on its output, 3 ranks, equals one process.
    let (s1, s3) = (tmp.path().join("s1"), tmp.path().join("s3"));
    let o = run(
        &score_args(multi.to_str().unwrap(), s1.to_str().unwrap(), "popularity"),
        &[],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = mpi_run(
        "mpi_pipeline",
        3,
        &score_args(multi.to_str().unwrap(), s3.to_str().unwrap(), "popularity"),
        &[],
    )
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(file_bytes(&s3), file_bytes(&s1));

    // A rank-0 failure reaches every rank: the job fails with the reason.
    let args = prepare(&tmp.path().join("bad"));
    let mut args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    args.extend(["--noise-p", "1.5"]);
    let o = mpi_run("mpi_pipeline", 2, &args, &[]).unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("[rank 1/2]") && e.contains("failed on rank 0"),
        "{e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Data-parallel backbones (crates/rec) on the communicator.

/// Tiny SASRec settings: a few seconds per epoch in the test profile.
const TINY_TRAIN: [&str; 8] = [
    "--model",
    "sasrec",
    "--dim",
    "16",
    "--blocks",
    "1",
    "--batch-size",
    "64",
];

fn train_args<'a>(data: &'a str, out: &'a str, epochs: &'a str) -> Vec<&'a str> {
    let mut a = vec![
        "train",
        "--dataset",
        data,
        "--out",
        out,
        "--epochs",
        epochs,
        "--patience",
        "0",
    ];
    a.extend_from_slice(&TINY_TRAIN);
    a
}

fn read_tensors(p: &Path) -> HashMap<String, Vec<f32>> {
    candle_core::safetensors::load(p, &candle_core::Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect()
}

#[test]
fn mpi_evaluate_gives_identical_metrics_on_1_2_3_ranks() {
    if mpirun("mpi_evaluate").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let d = data.to_str().unwrap();
    let run_dir = tmp.path().join("run");
    let o = run(&train_args(d, run_dir.to_str().unwrap(), "1"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    let mut metrics = Vec::new();
    for n in 1..=3 {
        let out = tmp.path().join(format!("m{n}.json"));
        let args = [
            "evaluate",
            "--checkpoint",
            run_dir.to_str().unwrap(),
            "--dataset",
            d,
            "--split",
            "test",
            "--batch-size",
            "7",
            "--out",
            out.to_str().unwrap(),
        ];
        let o = mpi_run("mpi_evaluate", n, &args, &[]).unwrap();
        assert!(o.status.success(), "{n} ranks: {}", stderr(&o));
        if n > 1 {
            let e = stderr(&o);
            assert!(
                e.contains(&format!("[rank {}/{n}]", n - 1)),
                "world size {n}: {e}"
            );
        }
        let m: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        metrics.push(m);
    }
    let show = |m: &serde_json::Value| serde_json::to_string(m).unwrap();
    assert!(
        show(&metrics[0]).contains("NDCG@10"),
        "{}",
        show(&metrics[0])
    );
    assert_eq!(show(&metrics[1]), show(&metrics[0]), "2 ranks vs 1");
    assert_eq!(show(&metrics[2]), show(&metrics[0]), "3 ranks vs 1");
}

/// Two ranks with the same global batch follow one rank's trajectory to within f32 rounding:
/// each step's gradient is the same sum in another order (two half-batch sums, all-reduced).
/// Tolerance after 3 epochs: every weight within 1e-4 (absolute) + 1e-3 (relative), the
/// per-epoch training loss within 1e-4 relative.
#[test]
fn mpi_training_on_2_ranks_matches_1_rank() {
    if mpirun("mpi_train").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let d = data.to_str().unwrap();
    let (r1, r2) = (tmp.path().join("r1"), tmp.path().join("r2"));
    let o = run(&train_args(d, r1.to_str().unwrap(), "3"), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = mpi_run(
        "mpi_train",
        2,
        &train_args(d, r2.to_str().unwrap(), "3"),
        &[],
    )
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    let m1: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r1.join("metrics.json")).unwrap()).unwrap();
    let m2: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r2.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m1["ranks"], 1);
    assert_eq!(m2["ranks"], 2, "world size");
    assert_eq!(
        m1["steps_per_epoch"], m2["steps_per_epoch"],
        "same global batch"
    );
    let (h1, h2) = (
        m1["history"].as_array().unwrap(),
        m2["history"].as_array().unwrap(),
    );
    assert_eq!(h1.len(), 3);
    assert_eq!(h1.len(), h2.len());
    for (a, b) in h1.iter().zip(h2) {
        let (la, lb) = (a["loss"].as_f64().unwrap(), b["loss"].as_f64().unwrap());
        assert!(
            (la - lb).abs() <= 1e-4 * la.abs(),
            "epoch loss {la} vs {lb}"
        );
    }

    let (w1, w2) = (
        read_tensors(&r1.join("last/model.safetensors")),
        read_tensors(&r2.join("last/model.safetensors")),
    );
    assert_eq!(
        w1.keys().collect::<std::collections::BTreeSet<_>>(),
        w2.keys().collect::<std::collections::BTreeSet<_>>()
    );
    let mut worst = 0f32;
    for (k, a) in &w1 {
        let b = &w2[k];
        assert_eq!(a.len(), b.len(), "{k}");
        for (x, y) in a.iter().zip(b) {
            let err = (x - y).abs();
            assert!(err <= 1e-4 + 1e-3 * x.abs(), "{k}: {x} vs {y}");
            worst = worst.max(err);
        }
    }
    // Not trivially equal either: training moved the weights away from initialisation.
    eprintln!("largest weight difference, 2 ranks vs 1 after 3 epochs: {worst:e}");
}

/// The LLM detectors through the sharded `score` stage, with the real SmolLM2 (skipped when
/// the asset is absent): one score per history item, finite, identical across shard counts.
#[test]
fn llm_detectors_score_through_the_sharded_stage() {
    let model =
        llm4dsr_data::assets::asset_path("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.exists() {
        eprintln!("SKIP: llm_detectors_score_through_the_sharded_stage: {} absent (run `llm4dsr assets fetch`)", model.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let titles = [
        "Toy Story (1995)",
        "Aladdin (1992)",
        "The Lion King (1994)",
        "Beauty and the Beast (1991)",
        "Scream (1996)",
        "Halloween (1978)",
        "The Shining (1980)",
        "Alien (1979)",
    ];
    let mut catalog = Catalog::new();
    for (i, t) in titles.iter().enumerate() {
        catalog.push(t.to_string(), format!("m{}", i + 1));
    }
    catalog
        .write_parquet(&data.join("catalog.parquet"))
        .unwrap();
    let mut train = Windows::new();
    let mut test = Windows::new();
    // Two family-film users with one horror intruder each, one horror user.
    for (u, seq) in [
        (1u32, [1u32, 2, 6, 3, 4]),
        (2, [2, 3, 4, 7, 1]),
        (3, [5, 6, 7, 8, 5]),
    ] {
        train.push(u, 1, &seq[..2], &[0, 0], &seq[..2], u as i64);
        test.push(u, 4, &seq, &[0; 5], &seq, 100 + u as i64);
    }
    train
        .write_parquet(&data.join("windows/train.parquet"))
        .unwrap();
    test.write_parquet(&data.join("windows/test.parquet"))
        .unwrap();
    let d = data.to_str().unwrap();
    // (user, window) -> (items, scores) of the first run.
    type Scores = HashMap<(u32, u32), (Vec<u32>, Vec<f32>)>;
    let mut first: Option<Scores> = None;
    for (method, shards, per_batch) in [
        ("llm-first-token", "1", "8"),
        ("llm-first-token", "3", "8"),
        ("llm-first-token", "1", "1"),
        ("llm-full-title", "2", "8"),
    ] {
        let out = dir
            .path()
            .join(format!("scores-{method}-{shards}-{per_batch}"));
        let mut args = vec![
            "score",
            "--dataset",
            d,
            "--out",
            out.to_str().unwrap(),
            "--method",
            method,
            "--splits",
            "test",
            "--num-shards",
            shards,
        ];
        if per_batch != "8" {
            args.extend(["--windows-per-batch", per_batch]);
        }
        let o = run(&args, &[]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        // The batch size in force (8 on the CPU unless given) is recorded.
        let m: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap())
                .unwrap();
        assert_eq!(
            m["counts"]["windows_per_batch"].as_u64(),
            Some(per_batch.parse().unwrap()),
            "{m}"
        );
        let scores = read_scores(&out.join("scores/test.parquet"));
        assert_eq!(scores.len(), 3);
        for w in test.iter() {
            let (items, sc) = &scores[&(w.user, w.pos)];
            assert_eq!(
                items.as_slice(),
                w.history(),
                "{method}: history items scored"
            );
            assert!(
                sc.iter().all(|x| x.is_finite() && *x <= 0.0),
                "{method}: log-probs {sc:?}"
            );
        }
        match (&first, method) {
            (None, _) => first = Some(scores),
            // Another shard count or batch size groups windows into other batches (other GEMM
            // shapes, other attention padding): equal to float tolerance, not bit for bit. Rank
            // counts, by contrast, never change bytes.
            (Some(f), "llm-first-token") => {
                for (k, (items, a)) in f {
                    let (items2, b) = &scores[k];
                    assert_eq!(items, items2);
                    for (x, y) in a.iter().zip(b) {
                        assert!(
                            (x - y).abs() <= 1e-3 * (1.0 + x.abs()),
                            "{k:?}: {a:?} vs {b:?}"
                        );
                    }
                }
            }
            (Some(f), _) => assert_ne!(
                f, &scores,
                "full-title equals first-token on multi-token titles"
            ),
        }
    }
    let out = dir.path().join("scores-zero");
    let o = run(
        &[
            "score",
            "--dataset",
            d,
            "--out",
            out.to_str().unwrap(),
            "--method",
            "llm-first-token",
            "--windows-per-batch",
            "0",
        ],
        &[],
    );
    assert!(!o.status.success() && stderr(&o).contains("--windows-per-batch must be at least 1"));
    assert!(!out.exists(), "no output after a refused flag");

    // A window whose prompt cannot fit the model's context (8,192 tokens): refused before
    // any forward, naming the split's file, the user and the window.
    let long: Vec<u32> = (0..3000).map(|i| 1 + (i % 8) as u32).collect();
    let mut over = test.clone();
    over.push(9, 2999, &long, &vec![0; long.len()], &long, 200);
    over.write_parquet(&data.join("windows/test.parquet"))
        .unwrap();
    let out = dir.path().join("scores-long");
    let o = run(
        &[
            "score",
            "--dataset",
            d,
            "--out",
            out.to_str().unwrap(),
            "--method",
            "llm-first-token",
            "--splits",
            "test",
        ],
        &[],
    );
    let e = stderr(&o);
    assert!(!o.status.success(), "{e}");
    assert!(
        e.contains("test.parquet") && e.contains("user 9 window pos 2999") && e.contains("8192"),
        "{e}"
    );
    assert!(!out.exists(), "no output after an over-long window");
}

/// `ground` (catalogue embeddings with all-MiniLM-L6-v2, then the titles) gives the same bytes
/// in one process and on 2 and 3 MPI ranks. Skipped without MPI or the MiniLM asset.
#[test]
fn mpi_ground_any_rank_count() {
    if mpirun("mpi_ground").is_none() {
        return;
    }
    let minilm = llm4dsr_data::assets::asset_path("all-minilm-l6-v2/model.safetensors");
    if !minilm.exists() {
        eprintln!(
            "SKIP: mpi_ground: {} absent (run `llm4dsr assets fetch`)",
            minilm.display()
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    write_dataset(&data);
    let titles = [
        "Movie 7 (1907)",
        "Movie 12",
        "",
        "movie twelve (1912)",
        "Movie 59 (1959)",
        "A film about the sea",
        "Movie 3 (1903) ",
    ];
    let queries = tmp.path().join("q.parquet");
    {
        use std::sync::Arc;
        let batch = arrow_array::RecordBatch::try_from_iter([
            (
                "query_id",
                Arc::new(arrow_array::UInt64Array::from_iter_values(
                    0..titles.len() as u64,
                )) as arrow_array::ArrayRef,
            ),
            (
                "title",
                Arc::new(arrow_array::StringArray::from(titles.to_vec())) as arrow_array::ArrayRef,
            ),
        ])
        .unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&queries).unwrap(),
            batch.schema(),
            None,
        )
        .unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }
    let args = |out: &Path| -> Vec<String> {
        [
            "ground",
            "--dataset",
            data.to_str().unwrap(),
            "--queries",
            queries.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--embedder",
            "minilm",
            "--k",
            "4",
            "--catalog-shard-items",
            "16",
            "--query-shard-rows",
            "3",
        ]
        .map(String::from)
        .to_vec()
    };
    let bytes = |dir: &Path| -> Vec<Vec<u8>> {
        ["grounded.parquet", "catalog_embeddings.parquet"]
            .iter()
            .map(|f| std::fs::read(dir.join(f)).unwrap())
            .collect()
    };
    let one = tmp.path().join("one");
    let a = args(&one);
    let o = run(&a.iter().map(|s| s.as_str()).collect::<Vec<_>>(), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(one.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["counts"]["queries.exact"], 3, "{}", m["counts"]);
    assert_eq!(m["counts"]["queries.empty"], 1);
    assert_eq!(m["counts"]["queries.nearest"], 3);
    for n in [2, 3] {
        let out = tmp.path().join(format!("n{n}"));
        let a = args(&out);
        let o = mpi_run(
            "mpi_ground",
            n,
            &a.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            &[],
        )
        .unwrap();
        assert!(o.status.success(), "{n} ranks: {}", stderr(&o));
        assert!(stderr(&o).contains(&format!("[rank {}/{n}]", n - 1)));
        assert_eq!(bytes(&out), bytes(&one), "{n} ranks");
    }
}
