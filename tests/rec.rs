//! Backbones end to end: each model learns a learnable synthetic pattern, evaluation equals a
//! naive per-user loop, training is deterministic, resumable and rank-count independent, and
//! the `train`/`evaluate` commands fail cleanly on bad input.

use llm4dsr_comm::{Comm, Local};
use llm4dsr_rec::batch::{eval_instances, SeqBatch, Targets};
use llm4dsr_rec::synthetic::{windows, write_dataset, SyntheticSpec};
use llm4dsr_rec::train::CheckpointPlan;
use llm4dsr_rec::{
    evaluate, Engine, EvalOptions, LossKind, ModelConfig, ModelKind, Recommender, TrainConfig,
};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};

const SPEC: SyntheticSpec = SyntheticSpec {
    users: 24,
    items: 40,
    seq_len: 16,
    jump: 0.0,
    seed: 5,
};

fn tiny(kind: ModelKind) -> TrainConfig {
    let mut m = ModelConfig::defaults(kind);
    m.dim = 16;
    m.inner = 16;
    m.gru_hidden = 24;
    m.nh = 4;
    m.nv = 2;
    m.dropout = 0.1;
    m.attn_dropout = 0.1;
    let mut c = TrainConfig::new(m);
    c.batch_size = 32;
    c.adam.lr = 1e-2;
    c.epochs = 12;
    c.patience = 0;
    c
}

fn overfits(kind: ModelKind, loss: LossKind, epochs: usize) {
    let (tr, va, te) = windows(SPEC);
    let mut cfg = tiny(kind);
    cfg.loss = loss;
    cfg.epochs = epochs;
    let out = llm4dsr_rec::train(&tr, &va, SPEC.items, SPEC.users, &cfg, &Local, None).unwrap();
    let h = &out.state.history;
    assert!(
        h.last().unwrap().loss < 0.5 * h[0].loss,
        "{kind:?}: loss did not fall: {h:?}"
    );
    let m = evaluate(&out.model, &te, EvalOptions::default(), &Local).unwrap();
    assert!(
        m.get("HR@10") >= 0.95,
        "{kind:?} {loss:?}: test HR@10 {} ({h:?})",
        m.get("HR@10")
    );
}

#[test]
fn sasrec_overfits_with_ce_and_bce() {
    overfits(ModelKind::Sasrec, LossKind::Ce, 12);
    overfits(ModelKind::Sasrec, LossKind::Bce, 25);
}

#[test]
fn gru4rec_overfits() {
    overfits(ModelKind::Gru4rec, LossKind::Ce, 15);
}

#[test]
fn caser_overfits() {
    overfits(ModelKind::Caser, LossKind::Ce, 15);
}

/// Rank by a full sort (ties broken against the target), one user at a time.
fn naive_metrics(model: &Recommender, w: &llm4dsr_data::Windows) -> Vec<(f64, f64)> {
    let insts = eval_instances(w);
    let mut sums = vec![(0.0, 0.0); llm4dsr_rec::KS.len()];
    for (i, inst) in insts.iter().enumerate() {
        let b =
            SeqBatch::build(w, &[*inst], &[i as u64], Targets::Last, model.cfg.max_len).unwrap();
        let s = model
            .score_all(&b)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let t = b.targets[0] as usize;
        let mut order: Vec<usize> = (1..s.len()).collect();
        order.sort_by(|&a, &c| {
            s[c].partial_cmp(&s[a])
                .unwrap()
                .then(((a == t) as u8).cmp(&((c == t) as u8)))
        });
        let rank = order.iter().position(|&j| j == t).unwrap();
        for (k, &kk) in llm4dsr_rec::KS.iter().enumerate() {
            if rank < kk {
                sums[k].0 += 1.0;
                sums[k].1 += 1.0 / ((rank + 2) as f64).log2();
            }
        }
    }
    sums.iter()
        .map(|(h, n)| (h / insts.len() as f64, n / insts.len() as f64))
        .collect()
}

#[test]
fn evaluation_equals_a_naive_per_user_loop() {
    let spec = SyntheticSpec { jump: 0.3, ..SPEC };
    let (tr, va, te) = windows(spec);
    for kind in [ModelKind::Sasrec, ModelKind::Gru4rec, ModelKind::Caser] {
        let mut cfg = tiny(kind);
        cfg.epochs = 2;
        let out = llm4dsr_rec::train(&tr, &va, spec.items, spec.users, &cfg, &Local, None).unwrap();
        let m = evaluate(
            &out.model,
            &te,
            EvalOptions {
                batch_size: 7,
                mask_history: false,
                ..Default::default()
            },
            &Local,
        )
        .unwrap();
        let naive = naive_metrics(&out.model, &te);
        for (k, &kk) in llm4dsr_rec::KS.iter().enumerate() {
            assert!(
                (m.get(&format!("HR@{kk}")) - naive[k].0).abs() < 1e-9,
                "{kind:?} HR@{kk}"
            );
            assert!(
                (m.get(&format!("NDCG@{kk}")) - naive[k].1).abs() < 1e-9,
                "{kind:?} NDCG@{kk}"
            );
        }
        assert_eq!(m.count as usize, te.len());
    }
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let (tr, va, _) = windows(SPEC);
    let mut cfg = tiny(ModelKind::Sasrec);
    cfg.epochs = 2;
    let a = llm4dsr_rec::train(&tr, &va, SPEC.items, SPEC.users, &cfg, &Local, None).unwrap();
    let b = llm4dsr_rec::train(&tr, &va, SPEC.items, SPEC.users, &cfg, &Local, None).unwrap();
    assert_eq!(
        a.model.params.flat_values().unwrap(),
        b.model.params.flat_values().unwrap()
    );
    cfg.seed += 1;
    let c = llm4dsr_rec::train(&tr, &va, SPEC.items, SPEC.users, &cfg, &Local, None).unwrap();
    assert_ne!(
        a.model.params.flat_values().unwrap(),
        c.model.params.flat_values().unwrap()
    );
}

/// An in-process communicator over threads: the collectives' semantics without MPI.
struct ThreadComm {
    rank: usize,
    size: usize,
    barrier: Arc<Barrier>,
    slots: Arc<Mutex<Vec<Vec<f64>>>>,
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl ThreadComm {
    fn group(size: usize) -> Vec<ThreadComm> {
        let barrier = Arc::new(Barrier::new(size));
        let slots = Arc::new(Mutex::new(vec![Vec::new(); size]));
        let bytes = Arc::new(Mutex::new(Vec::new()));
        (0..size)
            .map(|rank| ThreadComm {
                rank,
                size,
                barrier: barrier.clone(),
                slots: slots.clone(),
                bytes: bytes.clone(),
            })
            .collect()
    }
    fn reduce(&self, mine: Vec<f64>) -> Vec<f64> {
        self.slots.lock().unwrap()[self.rank] = mine;
        self.barrier.wait();
        let all = self.slots.lock().unwrap().clone();
        self.barrier.wait();
        let mut out = vec![0.0; all[0].len()];
        for v in &all {
            for (o, x) in out.iter_mut().zip(v) {
                *o += x;
            }
        }
        out
    }
}

impl Comm for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.rank
    }
    fn barrier(&self) -> anyhow::Result<()> {
        self.barrier.wait();
        Ok(())
    }
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> anyhow::Result<()> {
        if self.rank == root {
            *self.bytes.lock().unwrap() = buf.clone();
        }
        self.barrier.wait();
        *buf = self.bytes.lock().unwrap().clone();
        self.barrier.wait();
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
        self.slots.lock().unwrap()[self.rank] = mine.iter().map(|&b| b as f64).collect();
        self.barrier.wait();
        let all = self.slots.lock().unwrap().clone();
        self.barrier.wait();
        Ok(all
            .into_iter()
            .map(|v| v.into_iter().map(|x| x as u8).collect())
            .collect())
    }
    fn all_gather_f32(&self, _mine: &[f32]) -> anyhow::Result<Vec<f32>> {
        unimplemented!()
    }
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> anyhow::Result<()> {
        let r = self.reduce(buf.iter().map(|&x| x as f64).collect());
        buf.iter_mut().zip(r).for_each(|(b, x)| *b = x as f32);
        Ok(())
    }
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> anyhow::Result<()> {
        let r = self.reduce(buf.to_vec());
        buf.copy_from_slice(&r);
        Ok(())
    }
}

#[test]
fn two_ranks_take_the_steps_of_one() {
    let (tr, va, te) = windows(SPEC);
    for kind in [ModelKind::Sasrec, ModelKind::Caser] {
        let mut cfg = tiny(kind);
        // Adam divides by sqrt(v): at a high learning rate it turns float reassociation noise
        // in near-zero gradients into visible steps, so compare at a moderate one.
        cfg.adam.lr = 1e-3;
        cfg.epochs = 2;
        let one = llm4dsr_rec::train(&tr, &va, SPEC.items, SPEC.users, &cfg, &Local, None).unwrap();
        let one_w = one.model.params.flat_values().unwrap();
        let one_m = evaluate(&one.model, &te, EvalOptions::default(), &Local).unwrap();
        let results: Vec<_> = std::thread::scope(|s| {
            let hs: Vec<_> = ThreadComm::group(2)
                .into_iter()
                .map(|c| {
                    let (tr, va, te, cfg) = (&tr, &va, &te, &cfg);
                    s.spawn(move || {
                        let o = llm4dsr_rec::train(tr, va, SPEC.items, SPEC.users, cfg, &c, None)
                            .unwrap();
                        let m = evaluate(
                            &o.model,
                            te,
                            EvalOptions {
                                batch_size: 5,
                                mask_history: false,
                                ..Default::default()
                            },
                            &c,
                        )
                        .unwrap();
                        (
                            o.model.params.flat_values().unwrap(),
                            m,
                            o.allreduce_bytes_per_step,
                        )
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results[0].0, results[1].0, "ranks diverged");
        let max_diff = one_w
            .iter()
            .zip(&results[0].0)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!("{kind:?}: max |w_2ranks - w_1rank| = {max_diff}");
        assert!(
            max_diff < 1e-4,
            "{kind:?}: 2 ranks differ from 1 by {max_diff}"
        );
        assert!((results[0].1.get("NDCG@10") - one_m.get("NDCG@10")).abs() < 1e-3);
        assert_eq!(results[0].2, (one_w.len() + 1) * 4);
    }
}

#[test]
fn resume_continues_exactly() {
    let (tr, va, _) = windows(SPEC);
    let d = tempfile::tempdir().unwrap();
    let mut cfg = tiny(ModelKind::Gru4rec);
    cfg.epochs = 3;
    let full = llm4dsr_rec::train(&tr, &va, SPEC.items, SPEC.users, &cfg, &Local, None).unwrap();
    let plan = CheckpointPlan {
        dir: d.path().join("run"),
        resume: false,
        data: "data-a".into(),
    };
    cfg.epochs = 1;
    llm4dsr_rec::train(&tr, &va, SPEC.items, SPEC.users, &cfg, &Local, Some(&plan)).unwrap();
    cfg.epochs = 3;
    let plan = CheckpointPlan {
        resume: true,
        ..plan
    };
    let resumed =
        llm4dsr_rec::train(&tr, &va, SPEC.items, SPEC.users, &cfg, &Local, Some(&plan)).unwrap();
    let key = |h: &[llm4dsr_rec::train::EpochLog]| -> Vec<(usize, f64, f64)> {
        h.iter()
            .map(|e| (e.epoch, e.loss, e.select_ndcg10))
            .collect()
    };
    assert_eq!(key(&full.state.history), key(&resumed.state.history));
    assert_eq!(
        full.model.params.flat_values().unwrap(),
        resumed.model.params.flat_values().unwrap()
    );

    // A resume with another seed or learning rate, or on other data, is refused by name;
    // a longer budget is not.
    let mut other = cfg.clone();
    other.seed += 1;
    let e = llm4dsr_rec::train(
        &tr,
        &va,
        SPEC.items,
        SPEC.users,
        &other,
        &Local,
        Some(&plan),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("cannot resume: `seed`"), "{e}");
    let mut other = cfg.clone();
    other.adam.lr *= 2.0;
    let e = llm4dsr_rec::train(
        &tr,
        &va,
        SPEC.items,
        SPEC.users,
        &other,
        &Local,
        Some(&plan),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("cannot resume: `adam`"), "{e}");
    let elsewhere = CheckpointPlan {
        dir: plan.dir.clone(),
        resume: true,
        data: "data-b".into(),
    };
    let e = llm4dsr_rec::train(
        &tr,
        &va,
        SPEC.items,
        SPEC.users,
        &cfg,
        &Local,
        Some(&elsewhere),
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(e.contains("other data"), "{e}");
    let mut longer = cfg.clone();
    longer.epochs = 4;
    llm4dsr_rec::train(
        &tr,
        &va,
        SPEC.items,
        SPEC.users,
        &longer,
        &Local,
        Some(&plan),
    )
    .unwrap();
}

fn llm4dsr(args: &[&str]) -> (bool, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_llm4dsr"))
        .args(args)
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cli_trains_evaluates_and_rejects_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let ds = d.path().join("ds");
    write_dataset(&ds, SPEC).unwrap();
    let run = d.path().join("run");
    let csv = d.path().join("results.csv");
    let common = [
        "--dim",
        "16",
        "--inner",
        "16",
        "--batch-size",
        "32",
        "--lr",
        "0.01",
        "--dropout",
        "0.1",
    ];
    let mut a = vec![
        "train",
        "--dataset",
        s(&ds),
        "--out",
        s(&run),
        "--epochs",
        "3",
        "--results-csv",
        s(&csv),
        "--label",
        "clean",
    ];
    a.extend(common);
    let (ok, out, err) = llm4dsr(&a);
    assert!(ok, "{err}");
    assert!(out.contains("test HR@10"), "{out}");
    for f in [
        "best/model.safetensors",
        "best/config.json",
        "last/optimizer.safetensors",
        "last/state.json",
        "metrics.json",
        "manifest.json",
    ] {
        assert!(run.join(f).exists(), "{f} missing");
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("metrics.json")).unwrap()).unwrap();
    assert!(metrics["test"]["values"]["HR@10"].as_f64().unwrap() > 0.0);
    // evaluate reproduces the test metrics of train.
    let ev = d.path().join("ev.json");
    let (ok, _, err) = llm4dsr(&[
        "evaluate",
        "--checkpoint",
        s(&run),
        "--dataset",
        s(&ds),
        "--out",
        s(&ev),
        "--results-csv",
        s(&csv),
    ]);
    assert!(ok, "{err}");
    let e: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ev).unwrap()).unwrap();
    assert_eq!(e["metrics"]["values"], metrics["test"]["values"]);
    let test_windows = llm4dsr_data::Windows::read_parquet(&ds.join("windows/test.parquet"))
        .unwrap()
        .len() as u64;
    assert_eq!(e["windows"], test_windows);
    assert_eq!(
        e["windows_ranked"].as_u64().unwrap() + e["windows_without_history"].as_u64().unwrap(),
        test_windows
    );
    assert_eq!(std::fs::read_to_string(&csv).unwrap().lines().count(), 3);

    // An existing run directory is not overwritten silently.
    let (ok, _, err) = llm4dsr(&a);
    assert!(!ok && err.contains("run directory exists"), "{err}");
    // A directory with no checkpoint (a run killed before its first epoch ended): the way out
    // is --overwrite, not --resume.
    let bare = d.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    let (ok, _, err) = llm4dsr(&["train", "--dataset", s(&ds), "--out", s(&bare)]);
    assert!(
        !ok && err.contains("no checkpoint to resume") && err.contains("--overwrite"),
        "{err}"
    );

    // A dataset directory without windows.
    let empty = d.path().join("nowindows");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(ds.join("catalog.parquet"), empty.join("catalog.parquet")).unwrap();
    let run2 = d.path().join("run2");
    let (ok, _, err) = llm4dsr(&["train", "--dataset", s(&empty), "--out", s(&run2)]);
    assert!(
        !ok && err.contains("train.parquet") && err.contains("prepared dataset"),
        "{err}"
    );
    assert!(!run2.exists(), "partial output left behind");

    // An empty split.
    let ds_empty = d.path().join("emptysplit");
    write_dataset(&ds_empty, SPEC).unwrap();
    llm4dsr_data::Windows::new()
        .write_parquet(&ds_empty.join("windows/valid.parquet"))
        .unwrap();
    let (ok, _, err) = llm4dsr(&["train", "--dataset", s(&ds_empty), "--out", s(&run2)]);
    assert!(
        !ok && err.contains("valid.parquet") && err.contains("no windows"),
        "{err}"
    );
    assert!(!run2.exists());

    // A checkpoint from another catalogue size.
    let other = d.path().join("other");
    write_dataset(&other, SyntheticSpec { items: 41, ..SPEC }).unwrap();
    let (ok, _, err) = llm4dsr(&["evaluate", "--checkpoint", s(&run), "--dataset", s(&other)]);
    assert!(
        !ok && err.contains("catalogue of 40 items") && err.contains("41"),
        "{err}"
    );

    // A dataset with a catalogue of the same size but other titles: refused, named.
    let renamed = d.path().join("renamed");
    write_dataset(&renamed, SPEC).unwrap();
    let cp = renamed.join("catalog.parquet");
    let cat = llm4dsr_data::Catalog::read_parquet(&cp).unwrap();
    let mut other_cat = llm4dsr_data::Catalog::new();
    for i in 1..=cat.num_items() {
        other_cat.push(format!("{} (renamed)", cat.title(i)), format!("x{i}"));
    }
    other_cat.write_parquet(&cp).unwrap();
    let (ok, _, err) = llm4dsr(&[
        "evaluate",
        "--checkpoint",
        s(&run),
        "--dataset",
        s(&renamed),
    ]);
    assert!(
        !ok && err.contains("another one") && err.contains("catalog.parquet"),
        "{err}"
    );

    // A config with an unknown key.
    let cfgp = d.path().join("bad.toml");
    std::fs::write(&cfgp, "[train]\nepochz = 3\n").unwrap();
    let (ok, _, err) = llm4dsr(&[
        "--config",
        s(&cfgp),
        "train",
        "--dataset",
        s(&ds),
        "--out",
        s(&run2),
    ]);
    assert!(!ok && err.contains("unknown key `epochz`"), "{err}");
    assert!(!run2.exists());

    // Values no run can use are named, and leave no run directory.
    for (flag, v) in [("--lr", "-1"), ("--epochs", "0"), ("--batch-size", "0")] {
        let arg = format!("{flag}={v}");
        let (ok, _, err) = llm4dsr(&["train", "--dataset", s(&ds), "--out", s(&run2), &arg]);
        let key = flag.trim_start_matches("--").replace('-', "_");
        assert!(!ok && err.contains(&key), "{flag} {v}: {err}");
        assert!(!run2.exists(), "{flag} {v}: run directory left");
    }

    // Windows whose `pos` is not a sequence index (imported as they are, e.g. movie-csv)
    // cannot give every-prefix targets: refused, naming the file and the way out.
    let ordinal = d.path().join("ordinal");
    write_dataset(&ordinal, SPEC).unwrap();
    let tp = ordinal.join("windows/train.parquet");
    let w = llm4dsr_data::Windows::read_parquet(&tp).unwrap();
    let mut renum = llm4dsr_data::Windows::new();
    for (i, win) in w.iter().enumerate() {
        renum.push(
            win.user,
            (i % 3) as u32,
            win.items,
            win.mask,
            win.original,
            win.target_timestamp,
        );
    }
    renum.write_parquet(&tp).unwrap();
    let (ok, _, err) = llm4dsr(&["train", "--dataset", s(&ordinal), "--out", s(&run2)]);
    assert!(
        !ok && err.contains("train.parquet")
            && err.contains("every-prefix")
            && err.contains("`last`"),
        "{err}"
    );
    assert!(!run2.exists());
    let (ok, _, err) = llm4dsr(&[
        "train",
        "--dataset",
        s(&ordinal),
        "--out",
        s(&run2),
        "--targets",
        "last",
        "--epochs",
        "1",
        "--dim",
        "16",
        "--inner",
        "16",
    ]);
    assert!(ok, "{err}");
}

/// The fused engines train to the weights the candle (autograd) engine reaches: two epochs
/// with dropout (SASRec with both losses, GRU4Rec, Caser) agree to float tolerance, and so do
/// the validation metrics.
#[test]
fn fused_and_candle_engines_train_alike() {
    let (train, valid, _) = windows(SPEC);
    for (kind, loss) in [
        (ModelKind::Sasrec, LossKind::Ce),
        (ModelKind::Sasrec, LossKind::Bce),
        (ModelKind::Gru4rec, LossKind::Ce),
        (ModelKind::Caser, LossKind::Ce),
    ] {
        let mut cfg = tiny(kind);
        cfg.epochs = 2;
        cfg.loss = loss;
        let mut run = |engine| {
            cfg.engine = engine;
            llm4dsr_rec::train(&train, &valid, SPEC.items, SPEC.users, &cfg, &Local, None).unwrap()
        };
        let a = run(Engine::Fused);
        let b = run(Engine::Candle);
        let (wa, wb) = (
            a.model.params.flat_values().unwrap(),
            b.model.params.flat_values().unwrap(),
        );
        let max_diff = wa
            .iter()
            .zip(&wb)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        // Adam normalises each step, so float noise in a near-zero gradient moves a weight by
        // up to lr (1e-2 here): a tenth of one step is the bound (observed 1.4e-4).
        assert!(
            max_diff < 1e-3,
            "{kind} {loss:?}: weights differ by {max_diff}"
        );
        for (ea, eb) in a.state.history.iter().zip(&b.state.history) {
            assert!(
                (ea.loss - eb.loss).abs() < 1e-5 * eb.loss,
                "{kind} {loss:?}: {ea:?} vs {eb:?}"
            );
            assert!((ea.select_ndcg10 - eb.select_ndcg10).abs() < 1e-3);
        }
    }
}
