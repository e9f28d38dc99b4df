//! `llm4dsr prepare` and `llm4dsr assets` end to end, through the real binary: the real
//! datasets (skipped with a visible message when not fetched), determinism, and every kind of
//! bad input the stage must refuse with an error naming the file and the field, a non-zero
//! exit and no partial output.

use llm4dsr_data::interactions::Interactions;
use llm4dsr_data::sft::SftInstances;
use llm4dsr_data::{Catalog, Manifest, Windows};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_llm4dsr"));
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c.env("RUST_LOG", "warn");
    c
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("running llm4dsr")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// A small RecBole dataset: 12 users x 16 interactions over 30 items, distinct timestamps.
struct Fixture {
    dir: tempfile::TempDir,
    inter_lines: Vec<String>,
    item_lines: Vec<String>,
}

impl Fixture {
    fn new() -> Self {
        let mut item_lines =
            vec!["item_id:token\tmovie_title:token_seq\trelease_year:token".into()];
        for i in 1..=30 {
            item_lines.push(format!("{i}\tMovie number {i}\t{}", 1970 + i));
        }
        let mut inter_lines =
            vec!["user_id:token\titem_id:token\trating:float\ttimestamp:float".to_string()];
        let mut t = 1_000_000;
        for k in 0..16 {
            for u in 1..=12 {
                t += 7;
                let item = 1 + (u * 7 + k * 3) % 30;
                inter_lines.push(format!("u{u}\t{item}\t4\t{t}"));
            }
        }
        Self {
            dir: tempfile::tempdir().unwrap(),
            inter_lines,
            item_lines,
        }
    }

    fn write(&self) -> (PathBuf, PathBuf) {
        let inter = self.dir.path().join("x.inter");
        let item = self.dir.path().join("x.item");
        std::fs::write(&inter, self.inter_lines.join("\n") + "\n").unwrap();
        std::fs::write(&item, self.item_lines.join("\n") + "\n").unwrap();
        (inter, item)
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Run prepare on the fixture with extra flags.
    fn prepare(&self, out: &Path, extra: &[&str]) -> Output {
        let (inter, item) = self.write();
        let mut args = vec![
            "prepare",
            "--format",
            "recbole",
            "--inter",
            p(&inter),
            "--item",
            p(&item),
            "--out",
            p(out),
        ];
        if !extra.contains(&"--k-core") {
            args.extend_from_slice(&["--k-core", "2"]);
        }
        args.extend_from_slice(extra);
        run(&args)
    }
}

/// The error contract: non-zero exit, message names `file` and `field`, no output directory
/// and no staging leftovers beside it.
fn assert_refused(o: &Output, out: &Path, file: &str, field: &str) {
    let e = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {e}");
    assert!(
        e.contains(file),
        "error does not name the file `{file}`: {e}"
    );
    assert!(
        e.contains(field),
        "error does not name the field `{field}`: {e}"
    );
    assert!(!out.exists(), "partial output left at {}", out.display());
    let parent = out.parent().unwrap();
    let stem = out.file_name().unwrap().to_string_lossy().into_owned();
    for entry in std::fs::read_dir(parent).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            !(name.starts_with(&format!(".{stem}")) && name.contains(".tmp-")),
            "staging leftover {name}"
        );
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn fixture_prepares_with_consistent_counts_and_files() {
    let f = Fixture::new();
    let out = f.out("ds");
    let o = f.prepare(&out, &["--noise-p", "0.2", "--seed", "7"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.contains("07_windows.train"), "{table}");
    let m = Manifest::read(&out).unwrap();
    let c = |k: &str| *m.counts.get(k).unwrap_or_else(|| panic!("no count {k}"));
    assert_eq!(c("01_read.interactions"), 192);
    assert_eq!(
        c("01_read.interactions"),
        c("03_title_filter.interactions_removed")
            + c("04_kcore.interactions_removed")
            + c("05_kept.interactions")
    );
    // 12 users x (16 - 10) windows.
    assert_eq!(c("07_windows.total"), 72);
    assert_eq!(
        c("07_windows.train") + c("07_windows.valid") + c("07_windows.test"),
        72
    );
    assert_eq!(c("07_windows.train"), 57);
    assert_eq!(c("08_noise.noisy_test_targets"), 0);
    assert_eq!(c("09_sft.instances"), c("07_windows.train"));

    let cat = Catalog::read_dataset(&out).unwrap();
    assert_eq!(cat.num_items() as u64, c("05_kept.items"));
    assert_eq!(cat.title(1), format!("{} ({})", "Movie number 8", 1978));
    let x = Interactions::read_parquet(&out.join("interactions.parquet")).unwrap();
    assert_eq!(x.len() as u64, c("05_kept.interactions"));
    assert_eq!(
        x.noise.iter().filter(|&&n| n == 1).count() as u64,
        c("06_noise.interactions_noised")
    );
    let test = llm4dsr_data::read_split(&out, "test").unwrap();
    test.validate_ids(cat.num_items(), &out).unwrap();
    for w in test.iter() {
        assert_eq!(*w.mask.last().unwrap(), 0);
        assert_eq!(w.target(), *w.original.last().unwrap());
    }
    let train = Windows::read_parquet(&out.join("windows/train.parquet")).unwrap();
    let valid = llm4dsr_data::read_split(&out, "valid").unwrap();
    assert!(
        train.target_timestamp.iter().max() <= valid.target_timestamp.iter().min(),
        "time split out of order"
    );
    let sft = SftInstances::read_parquet(&out.join("sft.parquet")).unwrap();
    assert_eq!(sft.len(), train.len());
    for i in 0..sft.len() {
        let w = sft.windows.get(i);
        assert_eq!(w.mask[sft.swap_pos[i] as usize], 2);
        assert_eq!(w.mask.iter().filter(|&&m| m == 2).count(), 1);
    }
    // Every output is recorded with its hash.
    let rel: Vec<String> = m.outputs.iter().map(|d| d.path.clone()).collect();
    for f in [
        "catalog.parquet",
        "users.parquet",
        "interactions.parquet",
        "sft.parquet",
        "windows/train.parquet",
        "windows/valid.parquet",
        "windows/test.parquet",
    ] {
        assert!(
            rel.contains(&f.to_string()),
            "{f} not in manifest outputs {rel:?}"
        );
    }
    assert_eq!(m.inputs.len(), 2);
}

#[test]
fn same_seed_gives_byte_identical_files_other_seed_differs() {
    let f = Fixture::new();
    let (a, b, c) = (f.out("a"), f.out("b"), f.out("c"));
    for (out, seed) in [(&a, "5"), (&b, "5"), (&c, "6")] {
        let o = f.prepare(out, &["--noise-p", "0.3", "--seed", seed]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let fa = files_under(&a);
    assert_eq!(fa.len(), 8);
    for file in &fa {
        let rel = file.strip_prefix(&a).unwrap();
        if rel == Path::new("manifest.json") {
            continue;
        }
        let x = std::fs::read(file).unwrap();
        let y = std::fs::read(b.join(rel)).unwrap();
        assert!(x == y, "{} differs between two runs", rel.display());
    }
    let ma = Manifest::read(&a).unwrap();
    let mb = Manifest::read(&b).unwrap();
    assert_eq!(ma.outputs, mb.outputs);
    let mc = Manifest::read(&c).unwrap();
    assert_ne!(ma.outputs, mc.outputs, "another seed gave the same noise");
}

#[test]
fn rerun_is_up_to_date_a_damaged_one_rebuilt_and_a_different_dataset_is_refused() {
    let f = Fixture::new();
    let out = f.out("ds");
    // What a killed run on this machine leaves: its staging directory, named after a process
    // that is gone (a pid above the kernel's limit). The next run removes it.
    let killed = {
        let t = llm4dsr_data::atomic::temp_sibling(&out);
        let t = t.to_str().unwrap();
        PathBuf::from(format!("{}-999999999", t.rsplit_once('-').unwrap().0))
    };
    std::fs::create_dir_all(killed.join("windows")).unwrap();
    std::fs::write(killed.join("windows/train.parquet"), b"partial").unwrap();
    assert!(f.prepare(&out, &[]).status.success());
    if Path::new("/proc/self").exists() {
        assert!(!killed.exists(), "a killed run's staging directory is left");
    }
    let before = std::fs::read(out.join("manifest.json")).unwrap();
    // Same config and inputs: left alone, success.
    let o = f.prepare(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    // Different config: refused, the existing dataset untouched.
    let o = f.prepare(&out, &["--noise-p", "0.1"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains(p(&out)) && e.contains("another run") && e.contains("--overwrite"),
        "{e}"
    );
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    // The same dataset, damaged (a file truncated, another removed): rebuilt, named.
    let train = out.join("windows/train.parquet");
    let good = std::fs::read(&train).unwrap();
    let sft = std::fs::read(out.join("sft.parquet")).unwrap();
    std::fs::write(&train, &good[..good.len() / 2]).unwrap();
    std::fs::remove_file(out.join("sft.parquet")).unwrap();
    let o = f.prepare(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("rebuilding") && stderr(&o).contains("train.parquet"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&train).unwrap(), good);
    assert_eq!(std::fs::read(out.join("sft.parquet")).unwrap(), sft);
    assert_eq!(std::fs::read(out.join("manifest.json")).unwrap(), before);
    // With --overwrite: replaced.
    let o = f.prepare(&out, &["--noise-p", "0.1", "--overwrite"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Manifest::read(&out).unwrap();
    assert!(m.counts["06_noise.interactions_noised"] > 0);
}

#[test]
fn missing_file_is_named() {
    let f = Fixture::new();
    let (_, item) = f.write();
    let out = f.out("ds");
    let missing = f.dir.path().join("nope.inter");
    let o = run(&[
        "prepare",
        "--inter",
        p(&missing),
        "--item",
        p(&item),
        "--out",
        p(&out),
    ]);
    assert_refused(&o, &out, "nope.inter", "not found");
}

#[test]
fn missing_and_mistyped_columns_are_named() {
    let mut f = Fixture::new();
    f.inter_lines[0] = "user_id:token\titem_id:token\trating:float\ttime:float".into();
    let out = f.out("ds");
    assert_refused(&f.prepare(&out, &[]), &out, "x.inter", "`timestamp`");

    let mut f = Fixture::new();
    f.inter_lines[0] = "user_id:token\titem_id:token\trating:float\ttimestamp:token_seq".into();
    assert_refused(
        &f.prepare(&out, &[]),
        &out,
        "x.inter",
        "field `timestamp` has type `token_seq`",
    );

    let mut f = Fixture::new();
    f.inter_lines[5] = "u3\t4\t4\tyesterday".into();
    let out = f.out("ds");
    assert_refused(
        &f.prepare(&out, &[]),
        &out,
        "x.inter: line 6",
        "field `timestamp`",
    );

    let mut f = Fixture::new();
    f.inter_lines[7] = "u3\t4".into();
    let out = f.out("ds");
    assert_refused(
        &f.prepare(&out, &[]),
        &out,
        "x.inter: line 8",
        "expected 4 fields",
    );
}

#[test]
fn null_or_empty_title_is_named() {
    let mut f = Fixture::new();
    f.item_lines[3] = "3\t  \t1973".into();
    let out = f.out("ds");
    assert_refused(
        &f.prepare(&out, &[]),
        &out,
        "x.item: line 4",
        "field `movie_title`",
    );
}

#[test]
fn unknown_item_id_is_named() {
    let mut f = Fixture::new();
    f.inter_lines[9] = "u1\t999\t4\t5".into();
    let out = f.out("ds");
    assert_refused(
        &f.prepare(&out, &[]),
        &out,
        "x.inter: line 10",
        "field `item_id`: unknown item id `999`",
    );
}

#[test]
fn duplicate_rows_are_kept_counted_and_reported() {
    let mut f = Fixture::new();
    let dup = f.inter_lines[3].clone();
    f.inter_lines.push(dup.clone());
    f.inter_lines.push(dup);
    let out = f.out("ds");
    let o = f.prepare(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("02_duplicates.rows_kept"));
    let m = Manifest::read(&out).unwrap();
    assert_eq!(m.counts["02_duplicates.rows_kept"], 2);
    assert_eq!(m.counts["01_read.interactions"], 194);
    assert_eq!(m.counts["05_kept.interactions"], 194);
}

#[test]
fn non_utf8_text_is_named() {
    let f = Fixture::new();
    let (inter, item) = f.write();
    let mut bytes = std::fs::read(&item).unwrap();
    let at = bytes
        .windows(14)
        .position(|w| w == b"Movie number 5")
        .unwrap();
    bytes[at + 1] = 0xff;
    std::fs::write(&item, bytes).unwrap();
    let out = f.out("ds");
    let o = run(&[
        "prepare",
        "--inter",
        p(&inter),
        "--item",
        p(&item),
        "--out",
        p(&out),
    ]);
    assert_refused(&o, &out, "x.item: line 6", "field `movie_title`");
}

#[test]
fn a_user_with_one_interaction_is_refused() {
    let mut f = Fixture::new();
    f.inter_lines.push("loner\t3\t4\t5".into());
    let out = f.out("ds");
    assert_refused(
        &f.prepare(&out, &["--k-core", "0"]),
        &out,
        "x.inter",
        "field `user_id`: user `loner` has only 1 interaction",
    );
}

#[test]
fn kcore_that_removes_everything_is_refused() {
    let f = Fixture::new();
    let out = f.out("ds");
    assert_refused(
        &f.prepare(&out, &["--k-core", "500"]),
        &out,
        "x.inter",
        "removed every interaction",
    );
}

#[test]
fn noise_p_outside_unit_interval_is_refused_naming_the_config() {
    let f = Fixture::new();
    let out = f.out("ds");
    assert_refused(
        &f.prepare(&out, &["--noise-p", "1.5"]),
        &out,
        "command line",
        "`noise_p`",
    );
    let (inter, item) = f.write();
    let cfg = f.dir.path().join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "[prepare]\ninter = {:?}\nitem = {:?}\nout = {:?}\nk_core = 2\nnoise_p = -0.1\n",
            p(&inter),
            p(&item),
            p(&out)
        ),
    )
    .unwrap();
    let o = run(&["prepare", "--config", p(&cfg)]);
    assert_refused(&o, &out, "bad.toml", "`noise_p`");
}

#[test]
fn config_file_supplies_every_flag() {
    let f = Fixture::new();
    let (inter, item) = f.write();
    let out = f.out("ds");
    let cfg = f.dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[prepare]\ninter = {:?}\nitem = {:?}\nout = {:?}\nk_core = 2\nnoise_p = 0.25\nseed = 9\nsplit = \"leave-one-out\"\nsft_windows = 5\nwindow = 6\n",
            p(&inter),
            p(&item),
            p(&out)
        ),
    )
    .unwrap();
    let o = run(&["prepare", "--config", p(&cfg)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Manifest::read(&out).unwrap();
    assert_eq!(m.seed, 9);
    assert_eq!(m.config["protocol"]["split"], "leave-one-out");
    assert_eq!(m.counts["07_windows.test"], 12);
    assert_eq!(m.counts["07_windows.valid"], 12);
    assert_eq!(m.counts["09_sft.instances"], 5);
    let test = llm4dsr_data::read_split(&out, "test").unwrap();
    assert!(test.iter().all(|w| w.items.len() == 6 && w.pos == 15));
    // A typo in the config is an error, never a silent default.
    std::fs::write(&cfg, "[prepare]\nnoise_q = 0.1\n").unwrap();
    let o = run(&["prepare", "--config", p(&cfg), "--out", p(&f.out("other"))]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("unknown key `noise_q`"),
        "{}",
        stderr(&o)
    );
}

/// Write one record batch of these named columns to `path` (a Parquet source for `prepare`).
fn write_cols(path: &Path, cols: Vec<(&str, arrow_array::ArrayRef)>) {
    let b = arrow_array::RecordBatch::try_from_iter(cols).unwrap();
    llm4dsr_data::parquet_io::write_batches(path, b.schema(), &[b]).unwrap();
}

#[test]
fn generic_parquet_source_with_custom_columns() {
    use arrow_array::{ArrayRef, Int64Array, StringArray, UInt32Array};
    let write = write_cols;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("catalog_in.parquet");
    write(
        &cat,
        vec![
            (
                "item",
                Arc::new(UInt32Array::from_iter_values(100..130)) as ArrayRef,
            ),
            (
                "name",
                Arc::new(StringArray::from_iter_values(
                    (0..30).map(|i| format!("Book {i}")),
                )),
            ),
        ],
    );
    let (mut u, mut it, mut ts) = (vec![], vec![], vec![]);
    for k in 0..14i64 {
        for user in 0..10i64 {
            u.push(format!("reader-{user}"));
            it.push(100 + ((user * 3 + k * 7) % 30) as u32);
            ts.push(k * 100 + user);
        }
    }
    let log = dir.path().join("log.parquet");
    write(
        &log,
        vec![
            ("who", Arc::new(StringArray::from(u)) as ArrayRef),
            ("item", Arc::new(UInt32Array::from(it))),
            ("when", Arc::new(Int64Array::from(ts))),
        ],
    );
    let out = dir.path().join("ds");
    let args = [
        "prepare",
        "--format",
        "parquet",
        "--inter",
        p(&log),
        "--item",
        p(&cat),
        "--user-field",
        "who",
        "--item-field",
        "item",
        "--timestamp-field",
        "when",
        "--title-field",
        "name",
        "--k-core",
        "2",
        "--out",
        p(&out),
    ];
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let m = Manifest::read(&out).unwrap();
    assert_eq!(m.counts["01_read.interactions"], 140);
    assert_eq!(m.counts["07_windows.total"], 40);
    let users = llm4dsr_data::interactions::read_users(&out.join("users.parquet")).unwrap();
    assert_eq!(users[0], "reader-0");
    let c = Catalog::read_dataset(&out).unwrap();
    assert_eq!(c.source_ids[1], "100");
    assert_eq!(c.title(1), "Book 0");
    // A mistyped column in Parquet is named too.
    let out2 = dir.path().join("ds2");
    let mut bad = args.to_vec();
    let i = bad.iter().position(|a| *a == "--timestamp-field").unwrap();
    bad[i + 1] = "who";
    *bad.last_mut().unwrap() = p(&out2);
    let o = run(&bad);
    assert_refused(&o, &out2, "log.parquet", "column `who` has type Utf8");
}

/// ML-100K, 5-core, p = 0.1 (the acceptance check). Skips when the asset is not fetched.
#[test]
fn ml100k_five_core_noisy_counts() {
    let inter = llm4dsr_data::assets::asset_path("ml-100k/ml-100k.inter");
    if !inter.is_file() {
        eprintln!(
            "SKIP: {} not fetched (run `llm4dsr assets fetch ml-100k`)",
            inter.display()
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ml100k");
    let o = run(&[
        "prepare",
        "--config",
        "configs/ml-100k.toml",
        "--noise-p",
        "0.1",
        "--out",
        p(&out),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    println!("{}", String::from_utf8_lossy(&o.stdout));
    let m = Manifest::read(&out).unwrap();
    let c = |k: &str| m.counts[k];
    assert_eq!(c("01_read.interactions"), 100_000);
    assert_eq!(c("01_read.users"), 943);
    assert_eq!(c("01_read.catalog_items"), 1682);
    assert_eq!(c("05_kept.users"), 943);
    assert_eq!(c("05_kept.items"), 1349);
    assert_eq!(c("05_kept.interactions"), 99_287);
    // Every catalogue item and user is accounted for: unrated, removed by a filter, or kept.
    assert_eq!(
        c("01_read.catalog_items"),
        c("01_read.items_unrated")
            + c("03_title_filter.items_removed")
            + c("04_kcore.items_removed")
            + c("05_kept.items")
    );
    assert_eq!(c("01_read.items_unrated"), 1682 - c("01_read.items_rated"));
    assert!(c("04_kcore.items_removed") > 0);
    assert_eq!(
        c("01_read.users"),
        c("03_title_filter.users_removed") + c("04_kcore.users_removed") + c("05_kept.users")
    );
    assert_eq!(c("07_windows.total"), 89_857);
    assert_eq!(c("07_windows.train"), 71_885);
    assert_eq!(c("07_windows.valid"), 8_986);
    assert_eq!(c("07_windows.test"), 8_986);
    let frac =
        c("08_noise.noisy_history_positions") as f64 / c("08_noise.history_positions") as f64;
    assert!(
        (0.095..0.105).contains(&frac),
        "noisy history fraction {frac}"
    );
    assert_eq!(c("08_noise.noisy_test_targets"), 0);
    assert_eq!(c("09_sft.instances"), 71_885);
}

/// The reference Movie CSVs from ../shared, both variants. Skips when absent.
#[test]
fn movie_csv_counts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/llm4dsr-movie");
    if !root.is_dir() {
        eprintln!("SKIP: {} not present", root.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (variant, noisy) in [
        ("Movie_noise_user0.1", [5549u64, 5585, 5219]),
        ("Movie_noise_user0.0", [0, 0, 0]),
    ] {
        let out = dir.path().join(variant);
        let o = run(&[
            "prepare",
            "--config",
            "configs/movie.toml",
            "--windows-dir",
            p(&root.join(variant)),
            "--out",
            p(&out),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        println!("{variant}\n{}", String::from_utf8_lossy(&o.stdout));
        let m = Manifest::read(&out).unwrap();
        let c = |k: &str| m.counts[k];
        assert_eq!(c("01_read.catalog_items"), 5101);
        assert_eq!(c("07_windows.train"), 5000);
        assert_eq!(c("07_windows.valid"), 5000);
        assert_eq!(c("07_windows.test"), 5000);
        assert_eq!(c("08_noise.noisy_positions.train"), noisy[0]);
        assert_eq!(c("08_noise.noisy_positions.valid"), noisy[1]);
        assert_eq!(c("08_noise.noisy_positions.test"), noisy[2]);
        assert_eq!(c("08_noise.noisy_test_targets"), 0);
        assert_eq!(c("01_read.title_mismatches"), 0);
        assert_eq!(c("09_sft.instances"), 5000);
        assert!(!out.join("interactions.parquet").exists());
        // The windows' noise is their own: a noise_p is refused, not ignored.
        let refused = dir.path().join("refused");
        let o = run(&[
            "prepare",
            "--config",
            "configs/movie.toml",
            "--windows-dir",
            p(&root.join(variant)),
            "--noise-p",
            "0.1",
            "--out",
            p(&refused),
        ]);
        assert!(!o.status.success() && !refused.exists());
        assert!(
            stderr(&o).contains("`noise_p` = 0.1 cannot apply"),
            "{}",
            stderr(&o)
        );
        // The heuristic detectors run on them, each window a sequence of its own.
        let scores = dir.path().join(format!("{variant}-popularity"));
        let o = run(&[
            "score",
            "--dataset",
            p(&out),
            "--out",
            p(&scores),
            "--method",
            "popularity",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let sm = Manifest::read(&scores).unwrap();
        assert!(sm.notes.iter().any(|n| n.contains("imported as they are")));
        // Each split's top-1 detection against the windows' own noise (none in the clean one).
        let tp = sm.counts.get("test.detection_top1.true_positives");
        if noisy[2] > 0 {
            assert_eq!(sm.counts["test.detection_top1.flagged"], 5000);
            assert!(tp.is_some_and(|&t| t > 0 && t < 5000), "{tp:?}");
        } else {
            assert!(tp.is_none());
        }
        let cat = Catalog::read_dataset(&out).unwrap();
        // HTML entities are decoded.
        assert_eq!(cat.title(6), "Avengers '66 - Set 2, Vols. 3 & 4");
        let train = llm4dsr_data::read_split(&out, "train").unwrap();
        for w in train.iter() {
            for k in 0..w.items.len() {
                if w.mask[k] == 0 {
                    assert_eq!(w.items[k], w.original[k]);
                }
            }
        }
    }
}

#[test]
fn assets_fetch_is_idempotent_and_fails_clearly_offline() {
    let cache = tempfile::tempdir().unwrap();
    // Offline: an unreachable index makes pip fail; the error says what could not be fetched.
    let o = bin()
        .args(["assets", "fetch", "ml-100k"])
        .env("LLM4DSR_CACHE", cache.path())
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .env("PIP_CONFIG_FILE", "/dev/null")
        .env("PIP_RETRIES", "0")
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(!o.status.success());
    assert!(e.contains("could not download recbole==1.2.1"), "{e}");
    assert!(!cache.path().join("ml-100k/ml-100k.inter").exists());
    // With the verified wheel already cached, fetch extracts without downloading, then is a no-op.
    let wheel = llm4dsr_data::assets::asset_path("wheels/recbole-1.2.1-py3-none-any.whl");
    if !wheel.is_file() {
        eprintln!(
            "SKIP: {} not fetched: idempotency part skipped",
            wheel.display()
        );
        return;
    }
    std::fs::create_dir_all(cache.path().join("wheels")).unwrap();
    std::fs::copy(
        &wheel,
        cache.path().join("wheels/recbole-1.2.1-py3-none-any.whl"),
    )
    .unwrap();
    for expect in [["ml-100k", "no", "3", "0"], ["ml-100k", "no", "0", "3"]] {
        let o = bin()
            .args(["assets", "fetch", "ml-100k"])
            .env("LLM4DSR_CACHE", cache.path())
            .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let table = String::from_utf8_lossy(&o.stdout);
        let row: Vec<&str> = table
            .lines()
            .find(|l| l.starts_with("ml-100k"))
            .unwrap_or_default()
            .split_whitespace()
            .collect();
        assert_eq!(row, expect, "{table}");
    }
    let inter = cache.path().join("ml-100k/ml-100k.inter");
    let (sha, _) = llm4dsr_data::manifest::sha256_file(&inter).unwrap();
    assert_eq!(
        sha,
        "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
    );

    // A damaged cached file (cut short, as a half-finished copy would be): `list` says so,
    // `prepare --asset` refuses it by name, and `fetch` extracts it again.
    let good = std::fs::read(&inter).unwrap();
    std::fs::write(&inter, &good[..good.len() / 3]).unwrap();
    let o = bin()
        .args(["assets", "list"])
        .env("LLM4DSR_CACHE", cache.path())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ml-100k ") && l.contains("damaged (ml-100k.inter")),
        "{table}"
    );
    let out = cache.path().join("ds");
    let o = bin()
        .args(["prepare", "--asset", "ml-100k", "--out", p(&out)])
        .env("LLM4DSR_CACHE", cache.path())
        .output()
        .unwrap();
    let e = stderr(&o);
    assert!(
        !o.status.success() && e.contains("ml-100k.inter: damaged"),
        "{e}"
    );
    assert!(!out.exists());
    let o = bin()
        .args(["assets", "fetch", "ml-100k"])
        .env("LLM4DSR_CACHE", cache.path())
        .env("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("extracting it again"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&inter).unwrap(), good);
}

#[test]
fn recbole_timestamp_tag_long_rows_and_blank_lines_are_refused() {
    // RecBole types timestamps `float`: a `token` timestamp is refused, naming the tag.
    let mut f = Fixture::new();
    f.inter_lines[0] = "user_id:token\titem_id:token\trating:float\ttimestamp:token".into();
    let out = f.out("ds");
    assert_refused(
        &f.prepare(&out, &[]),
        &out,
        "x.inter",
        "field `timestamp` has type `token`, expected `float`",
    );

    // A row with a field too many is refused like one with a field too few.
    let mut f = Fixture::new();
    f.inter_lines[7] = "u3\t4\t4\t1000007\textra".into();
    assert_refused(
        &f.prepare(&out, &[]),
        &out,
        "x.inter: line 8",
        "expected 4 fields, found 5",
    );
    let mut f = Fixture::new();
    f.item_lines[2] = "2\tMovie number 2\t1972\textra".into();
    assert_refused(
        &f.prepare(&out, &[]),
        &out,
        "x.item: line 3",
        "expected 3 fields, found 4",
    );

    // A blank line is refused with its line, not skipped uncounted.
    let mut f = Fixture::new();
    f.inter_lines.insert(50, String::new());
    assert_refused(
        &f.prepare(&out, &[]),
        &out,
        "x.inter: line 51",
        "blank line",
    );
    let mut f = Fixture::new();
    f.item_lines.insert(4, "\r".into());
    assert_refused(&f.prepare(&out, &[]), &out, "x.item: line 5", "blank line");
}

#[test]
fn parquet_source_refuses_out_of_range_timestamps_and_empty_user_ids() {
    use arrow_array::{ArrayRef, Float64Array, Int64Array, StringArray, UInt64Array};
    let write = write_cols;
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let cat = dir.path().join("catalog_in.parquet");
    write(
        &cat,
        vec![
            (
                "item",
                Arc::new(StringArray::from_iter_values(
                    (0..10).map(|i| format!("b{i}")),
                )) as ArrayRef,
            ),
            (
                "title",
                Arc::new(StringArray::from_iter_values(
                    (0..10).map(|i| format!("Book {i}")),
                )),
            ),
        ],
    );
    let log = dir.path().join("log.parquet");
    let out = dir.path().join("ds");
    let prepare = |users: Vec<&str>, ts: ArrayRef| {
        let items: Vec<String> = (0..users.len()).map(|i| format!("b{}", i % 10)).collect();
        write(
            &log,
            vec![
                ("user_id", Arc::new(StringArray::from(users)) as ArrayRef),
                ("item", Arc::new(StringArray::from(items))),
                ("timestamp", ts),
            ],
        );
        run(&[
            "prepare",
            "--format",
            "parquet",
            "--inter",
            p(&log),
            "--item",
            p(&cat),
            "--item-field",
            "item",
            "--title-field",
            "title",
            "--k-core",
            "2",
            "--out",
            p(&out),
        ])
    };
    let users = || {
        (0..80)
            .map(|i| ["u1", "u2", "u3", "u4"][i % 4])
            .collect::<Vec<_>>()
    };
    let ts: Vec<f64> = (0..80).map(|i| 1e9 + i as f64).collect();
    let o = prepare(users(), Arc::new(Float64Array::from(ts.clone())));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        Manifest::read(&out).unwrap().counts["01_read.interactions"],
        80
    );
    std::fs::remove_dir_all(&out).unwrap();

    // A float timestamp beyond what the RecBole reader takes is refused, not saturated.
    let mut big = ts.clone();
    big[17] = 1e30;
    assert_refused(
        &prepare(users(), Arc::new(Float64Array::from(big))),
        &out,
        "log.parquet: row 17",
        "field `timestamp`: timestamp 1e30 is out of range",
    );
    // A u64 above i64::MAX is named as out of range (not as null or non-finite).
    let mut big: Vec<u64> = (0..80).map(|i| 1_000_000_000 + i).collect();
    big[3] = u64::MAX;
    assert_refused(
        &prepare(users(), Arc::new(UInt64Array::from(big))),
        &out,
        "log.parquet: row 3",
        &format!("field `timestamp`: timestamp {} is out of range", u64::MAX),
    );
    // An empty user id is refused, as the RecBole reader refuses it.
    let mut empty = users();
    empty[5] = "";
    assert_refused(
        &prepare(empty, Arc::new(Int64Array::from_iter_values(0..80))),
        &out,
        "log.parquet: row 5",
        "field `user_id`: empty user id",
    );
}

/// pyarrow names a list's child field `element` (arrow-rs: `item`); windows written that way
/// are read by the stages that read windows (here `inspect-scores`, which reads the split
/// before it needs a model).
#[test]
fn windows_with_pyarrow_list_child_names_are_read() {
    use arrow_array::cast::AsArray;
    use arrow_array::{Array, ArrayRef, ListArray, RecordBatch};
    use std::sync::Arc;
    let f = Fixture::new();
    let out = f.out("ds");
    let o = f.prepare(&out, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let path = out.join("windows/test.parquet");
    let before = llm4dsr_data::read_split(&out, "test").unwrap();
    let file = std::fs::File::open(&path).unwrap();
    let batches: Vec<RecordBatch> =
        parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(file, 1024)
            .unwrap()
            .map(|b| b.unwrap())
            .collect();
    let renamed: Vec<RecordBatch> = batches
        .iter()
        .map(|b| {
            let schema = b.schema();
            let cols = schema.fields().iter().zip(b.columns()).map(|(field, col)| {
                let col: ArrayRef = match col.as_list_opt::<i32>() {
                    Some(list) => {
                        let (child, offsets, values, nulls) = list.clone().into_parts();
                        let child = Arc::new(child.as_ref().clone().with_name("element"));
                        Arc::new(ListArray::new(child, offsets, values, nulls))
                    }
                    None => col.clone(),
                };
                (field.name().clone(), col)
            });
            RecordBatch::try_from_iter(cols).unwrap()
        })
        .collect();
    let items = renamed[0]
        .column_by_name("items")
        .unwrap()
        .data_type()
        .to_string();
    assert!(items.contains("element"), "{items}");
    std::fs::remove_file(&path).unwrap();
    llm4dsr_data::parquet_io::write_batches(&path, renamed[0].schema(), &renamed).unwrap();
    assert_eq!(llm4dsr_data::read_split(&out, "test").unwrap(), before);
    let o = run(&[
        "inspect-scores",
        "--dataset",
        p(&out),
        "--split",
        "test",
        "--start",
        "1000000",
    ]);
    let e = stderr(&o);
    assert!(!e.contains("expected List"), "{e}");
    assert!(
        e.contains(&format!(
            "--start 1000000 but the test split has {} windows",
            before.len()
        )),
        "{e}"
    );
}
