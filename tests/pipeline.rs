//! The main job (`llm4dsr run`) end to end on a tiny generated RecBole dataset: every step
//! runs, the report holds its tables, and a re-run skips the completed steps.

use std::path::Path;
use std::process::Command;

fn write_fixture(dir: &Path) -> std::path::PathBuf {
    let mut items = vec!["item_id:token\tmovie_title:token_seq\trelease_year:token".to_string()];
    for i in 1..=40 {
        items.push(format!("{i}\tFilm number {i}\t{}", 1960 + i));
    }
    let mut inter = vec!["user_id:token\titem_id:token\trating:float\ttimestamp:float".to_string()];
    let mut t = 1_000_000;
    for k in 0..18 {
        for u in 1..=30 {
            t += 11;
            // Each user walks the catalogue with its own stride: learnable sequences.
            let item = 1 + (u * 3 + k * (1 + u % 4)) % 40;
            inter.push(format!("u{u}\t{item}\t4\t{t}"));
        }
    }
    std::fs::write(dir.join("tiny.inter"), inter.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("tiny.item"), items.join("\n") + "\n").unwrap();
    let config = dir.join("tiny.toml");
    std::fs::write(
        &config,
        format!(
            "[prepare]\nformat = \"recbole\"\ninter = \"{0}/tiny.inter\"\nitem = \"{0}/tiny.item\"\nk_core = 2\n\n\
             [train]\ndim = 16\nbatch_size = 64\n\n[score]\nnum_shards = 4\n",
            dir.display()
        ),
    )
    .unwrap();
    config
}

#[test]
fn main_job_runs_end_to_end_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_fixture(dir.path());
    let work = dir.path().join("work");
    let run_epochs = |epochs: &str| {
        Command::new(env!("CARGO_BIN_EXE_llm4dsr"))
            .args([
                "run",
                "--config",
                config.to_str().unwrap(),
                "--workdir",
                work.to_str().unwrap(),
            ])
            .args([
                "--backbones",
                "sasrec,gru4rec",
                "--epochs",
                epochs,
                "--patience",
                "1",
                "--llm-windows",
                "0",
            ])
            .env("LLM4DSR_CACHE", dir.path().join("no-cache"))
            .output()
            .expect("running llm4dsr")
    };
    let run = || run_epochs("2");
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "llm4dsr run failed:\n{err}");
    let report = std::fs::read_to_string(work.join("report.md")).unwrap();
    for needle in [
        "## Datasets",
        "| popularity | test |",
        "| cooccurrence | valid |",
        "| sasrec | clean |",
        "| gru4rec | noisy p=0.1 |",
    ] {
        assert!(
            report.contains(needle),
            "report lacks `{needle}`:\n{report}"
        );
    }
    // The score stage records each split's detection, as the report shows it.
    let sm = llm4dsr_data::Manifest::read(&work.join("scores-popularity")).unwrap();
    for split in ["valid", "test"] {
        let c = |k: &str| sm.counts[&format!("{split}.detection_top1.{k}")];
        assert!(c("flagged") > 0 && c("true_positives") <= c("max_true_positives"));
        let tp = c("true_positives") as f64 / c("flagged") as f64;
        assert!(
            report.contains(&format!(
                "| popularity | {split} | {} | {} | {tp:.3} |",
                c("flagged"),
                c("noisy_positions")
            )),
            "{split}: {tp}\n{report}"
        );
    }
    // What a reader needs: the protocol, the noise in interactions, a perfect detector.
    for needle in [
        "Windows of 11 items (10 of history + 1 target), stride 1, all windows ordered",
        "| noised interactions |",
        "| precision ceiling |",
    ] {
        assert!(
            report.contains(needle),
            "report lacks `{needle}`:\n{report}"
        );
    }
    assert!(std::fs::read_to_string(work.join("ndcg10.svg"))
        .unwrap()
        .starts_with("<svg"));
    let csv = std::fs::read_to_string(work.join("results.csv")).unwrap();
    assert_eq!(
        csv.lines().count(),
        1 + 4,
        "one header + 4 training runs:\n{csv}"
    );

    // Second run: everything is complete, so nothing is trained again and the CSV is unchanged.
    let o2 = run();
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    let err2 = String::from_utf8_lossy(&o2.stderr);
    assert!(
        !err2.contains("step 5/5: train"),
        "re-run trained again:\n{err2}"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("results.csv")).unwrap(),
        csv
    );
    assert_eq!(err2.matches("up to date in").count(), 4, "{err2}");

    // A damaged checkpoint (one byte flipped): that run, and only that one, is trained again.
    let ckpt = work.join("train/gru4rec-clean/best/model.safetensors");
    let mut bytes = std::fs::read(&ckpt).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&ckpt, bytes).unwrap();
    let o = run();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("retraining: damaged").count(), 1, "{err}");
    assert!(err.contains("gru4rec-clean: retraining: damaged"), "{err}");
    assert_eq!(err.matches("up to date in").count(), 3, "{err}");
    let csv = std::fs::read_to_string(work.join("results.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 5, "{csv}");

    // Another epoch budget: the finished runs are not this job's any more, so all four are
    // trained again (said so), and the report shows the new budget.
    let o3 = run_epochs("3");
    let err3 = String::from_utf8_lossy(&o3.stderr);
    assert!(o3.status.success(), "{err3}");
    assert_eq!(
        err3.matches("retraining: trained with another config")
            .count(),
        4,
        "{err3}"
    );
    assert_eq!(
        std::fs::read_to_string(work.join("results.csv"))
            .unwrap()
            .lines()
            .count(),
        1 + 9
    );
    let report = std::fs::read_to_string(work.join("report.md")).unwrap();
    assert!(report.contains("at most 3 epochs"), "{report}");
}

/// `run` injects its own noise: on windows that carry theirs (movie-csv) it refuses before
/// preparing anything, where it used to label the reference's noisy windows "clean".
#[test]
fn main_job_refuses_windows_with_their_own_noise() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    let o = Command::new(env!("CARGO_BIN_EXE_llm4dsr"))
        .args(["run", "--config", "configs/movie.toml", "--workdir"])
        .arg(&work)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("LLM4DSR_CACHE", dir.path().join("no-cache"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("configs/movie.toml: `run` prepares a clean and a noisy dataset"),
        "{err}"
    );
    assert!(!work.join("clean").exists());
}
