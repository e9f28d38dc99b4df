//! The `prepare` stage: an imported log becomes a dataset directory (see the crate docs).
//!
//! The protocol (method.md, the reference code's):
//! 1. Title filter: items whose title has `<= min_title_chars` characters are dropped with their
//!    interactions.
//! 2. Iterative k-core: users and items with fewer than `k_core` interactions are removed until
//!    none is left (each round's removals are counted).
//! 3. Dense 1-based ids (0 = padding) for users and items in order of first appearance in the
//!    time-ordered log (ties keep file order).
//! 4. Synthetic noise (probability `noise_p`), per user with a generator keyed by (seed, user),
//!    before windowing: a replaced interaction gets a uniformly random *different* item, mask 1.
//! 5. Windows of `window` items (history + target), stride 1; a user with fewer items gives one
//!    window of all of them.
//! 6. Split: all windows sorted by target timestamp (ties: user, position) and cut 80/10/10
//!    (`time`), or per user the last window to test and the one before to valid
//!    (`leave-one-out`). Test targets are restored to the clean item.
//! 7. SFT instances from the training windows (see [`crate::sft`]).
//!
//! Counts in = counts out + counts reported: `manifest.json` holds every step's counts.
//!
//! Cost: a few linear passes and two sorts (interactions by time, windows by target time);
//! ML-1M (1M interactions, 0.94M windows) runs in about a second, most of it Parquet encoding.

use crate::catalog::Catalog;
use crate::interactions::{Interactions, RawLog};
use crate::manifest::Manifest;
use crate::rng::{KeyedRng, Purpose};
use crate::sft::SftInstances;
use crate::windows::{Windows, MASK_CLEAN, MASK_NOISE};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How windows are split into train / valid / test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitProtocol {
    /// All windows sorted by target timestamp, cut by fractions (the reference protocol).
    Time,
    /// Per user: last window -> test, the one before -> valid, the rest -> train.
    LeaveOneOut,
}

impl std::str::FromStr for SplitProtocol {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "time" => Ok(Self::Time),
            "leave-one-out" | "loo" => Ok(Self::LeaveOneOut),
            _ => bail!("unknown split protocol `{s}` (expected `time` or `leave-one-out`)"),
        }
    }
}

/// The protocol's parameters (the source-independent part of the configuration).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Protocol {
    pub seed: u64,
    /// Iterative k-core threshold for users and items (0 or 1: no filtering).
    pub k_core: u32,
    /// Items whose title has at most this many characters are dropped.
    pub min_title_chars: usize,
    /// Window length: history + 1 target.
    pub window: usize,
    pub split: SplitProtocol,
    pub train_frac: f64,
    pub valid_frac: f64,
    /// Probability that an interaction is replaced by synthetic noise.
    pub noise_p: f64,
    /// Number of SFT instances to sample from the training windows (0: one per window).
    pub sft_windows: usize,
}

impl Default for Protocol {
    fn default() -> Self {
        Self {
            seed: 42,
            k_core: 5,
            min_title_chars: 1,
            window: 11,
            split: SplitProtocol::Time,
            train_frac: 0.8,
            valid_frac: 0.1,
            noise_p: 0.0,
            sft_windows: 0,
        }
    }
}

impl Protocol {
    /// Check the parameters; `origin` says where they came from (the config file or flags).
    pub fn validate(&self, origin: &str) -> Result<()> {
        if !(0.0..=1.0).contains(&self.noise_p) || self.noise_p.is_nan() {
            bail!(
                "{origin}: field `noise_p` is {}, must be within [0, 1]",
                self.noise_p
            );
        }
        if self.window < 2 {
            bail!(
                "{origin}: field `window` is {}, must be >= 2 (history + target)",
                self.window
            );
        }
        for (name, v) in [
            ("train_frac", self.train_frac),
            ("valid_frac", self.valid_frac),
        ] {
            if !(0.0..=1.0).contains(&v) || v.is_nan() {
                bail!("{origin}: field `{name}` is {v}, must be within [0, 1]");
            }
        }
        if self.train_frac + self.valid_frac > 1.0 + 1e-12 {
            bail!(
                "{origin}: fields `train_frac` + `valid_frac` = {} exceed 1",
                self.train_frac + self.valid_frac
            );
        }
        Ok(())
    }
}

/// Everything a prepared dataset holds, in memory.
#[derive(Clone, Debug, Default)]
pub struct Prepared {
    pub catalog: Catalog,
    /// Source id of dense user `i + 1`.
    pub users: Vec<String>,
    /// `None` when the source had no per-interaction log (the reference CSV windows).
    pub interactions: Option<Interactions>,
    /// train, valid, test.
    pub splits: [Windows; 3],
    pub sft: SftInstances,
    /// Ordered (key, count) pairs for the manifest.
    pub counts: Vec<(String, u64)>,
    pub notes: Vec<String>,
}

impl Prepared {
    pub fn count(&self, key: &str) -> Option<u64> {
        self.counts.iter().find(|(k, _)| k == key).map(|&(_, v)| v)
    }
}

/// Run the protocol on an imported log.
pub fn prepare_log(log: &RawLog, p: &Protocol) -> Result<Prepared> {
    p.validate("prepare")?;
    let n = log.len();
    let n_src_items = log.catalog.source_ids.len();
    let n_src_users = log.user_source_ids.len();
    let mut counts: Vec<(String, u64)> = Vec::new();
    let mut c = |k: &str, v: u64| counts.push((k.to_string(), v));
    if n == 0 {
        bail!("{}: no interactions (file is empty)", log.path.display());
    }
    c("01_read.interactions", n as u64);
    c("01_read.users", n_src_users as u64);
    c("01_read.catalog_items", n_src_items as u64);

    // Time order (stable: ties keep file order).
    // (timestamp, row) pairs are unique, so an unstable sort gives the stable order, and
    // sorting the pairs themselves avoids a random access per comparison.
    let mut keyed: Vec<(i64, u32)> = log
        .timestamp
        .iter()
        .enumerate()
        .map(|(r, &t)| (t, r as u32))
        .collect();
    keyed.sort_unstable();
    let by_time: Vec<u32> = keyed.into_iter().map(|(_, r)| r).collect();

    // Group by source user, time-ordered within a user (counting sort keeps by_time's order).
    let mut ustart = vec![0u32; n_src_users + 1];
    for &u in &log.user {
        ustart[u as usize + 1] += 1;
    }
    for i in 0..n_src_users {
        ustart[i + 1] += ustart[i];
    }
    let mut fill = ustart.clone();
    let mut by_user = vec![0u32; n];
    for &r in &by_time {
        let u = log.user[r as usize] as usize;
        by_user[fill[u] as usize] = r;
        fill[u] += 1;
    }
    drop(fill);

    // Duplicate (user, item, timestamp) rows: kept, counted.
    let mut rated = vec![false; n_src_items];
    for &i in &log.item {
        rated[i as usize] = true;
    }
    let items_rated = rated.iter().filter(|&&x| x).count() as u64;
    c("01_read.items_rated", items_rated);
    // catalog_items = items_rated + items_unrated (unrated items never enter the dataset).
    c("01_read.items_unrated", n_src_items as u64 - items_rated);
    let duplicates = count_duplicates(log, &ustart, &by_user);
    c("02_duplicates.rows_kept", duplicates);

    // Title filter.
    let title_ok: Vec<bool> = log
        .catalog
        .titles
        .iter()
        .map(|t| t.trim().chars().count() > p.min_title_chars)
        .collect();
    let mut alive: Vec<bool> = log.item.iter().map(|&i| title_ok[i as usize]).collect();
    let title_removed = alive.iter().filter(|&&a| !a).count() as u64;
    c(
        "03_title_filter.items_removed",
        (0..n_src_items)
            .filter(|&i| rated[i] && !title_ok[i])
            .count() as u64,
    );
    c("03_title_filter.interactions_removed", title_removed);

    // Users and items with an interaction left after the title filter (for the k-core's
    // removal counts: rated = title-filtered + k-core-removed + kept, for items and users).
    let (users_before_kcore, items_before_kcore) = {
        let (mut us, mut is) = (vec![false; n_src_users], vec![false; n_src_items]);
        for r in (0..n).filter(|&r| alive[r]) {
            us[log.user[r] as usize] = true;
            is[log.item[r] as usize] = true;
        }
        let count = |v: Vec<bool>| v.into_iter().filter(|&x| x).count() as u64;
        (count(us), count(is))
    };
    c(
        "03_title_filter.users_removed",
        n_src_users as u64 - users_before_kcore,
    );

    // Iterative k-core.
    let mut kcore_removed = 0u64;
    let mut rounds = 0u32;
    if p.k_core > 1 {
        let mut udeg = vec![0u32; n_src_users];
        let mut ideg = vec![0u32; n_src_items];
        loop {
            udeg.iter_mut().for_each(|d| *d = 0);
            ideg.iter_mut().for_each(|d| *d = 0);
            for r in 0..n {
                if alive[r] {
                    udeg[log.user[r] as usize] += 1;
                    ideg[log.item[r] as usize] += 1;
                }
            }
            let mut removed = 0u64;
            for r in 0..n {
                if alive[r]
                    && (udeg[log.user[r] as usize] < p.k_core
                        || ideg[log.item[r] as usize] < p.k_core)
                {
                    alive[r] = false;
                    removed += 1;
                }
            }
            if removed == 0 {
                break;
            }
            rounds += 1;
            kcore_removed += removed;
            c(&format!("04_kcore.round_{rounds:02}.removed"), removed);
        }
    }
    c("04_kcore.k", p.k_core as u64);
    c("04_kcore.rounds", rounds as u64);
    c("04_kcore.interactions_removed", kcore_removed);
    let kept = n as u64 - title_removed - kcore_removed;
    if kept == 0 {
        bail!(
            "{}: fields `{}`/`{}`: the title filter and {}-core filtering removed every interaction ({n} read)",
            log.path.display(),
            log.user_field,
            log.item_field,
            p.k_core
        );
    }

    // Dense ids in order of first appearance in time order.
    let mut user_dense = vec![0u32; n_src_users];
    let mut item_dense = vec![0u32; n_src_items];
    let mut dense_users: Vec<u32> = Vec::new(); // dense - 1 -> source user index
    let mut catalog = Catalog::new();
    for &r in &by_time {
        let r = r as usize;
        if !alive[r] {
            continue;
        }
        let (u, i) = (log.user[r] as usize, log.item[r] as usize);
        if user_dense[u] == 0 {
            dense_users.push(u as u32);
            user_dense[u] = dense_users.len() as u32;
        }
        if item_dense[i] == 0 {
            item_dense[i] = catalog.push(
                log.catalog.titles[i].clone(),
                log.catalog.source_ids[i].clone(),
            );
        }
    }
    let num_items = catalog.num_items();
    c(
        "04_kcore.users_removed",
        users_before_kcore - dense_users.len() as u64,
    );
    c(
        "04_kcore.items_removed",
        items_before_kcore - num_items as u64,
    );
    c("05_kept.interactions", kept);
    c("05_kept.users", dense_users.len() as u64);
    c("05_kept.items", num_items as u64);

    // Per-user sequences in dense-user order.
    let mut seq = Interactions::default();
    seq.user.reserve(kept as usize);
    seq.item.reserve(kept as usize);
    seq.timestamp.reserve(kept as usize);
    let mut offsets: Vec<usize> = Vec::with_capacity(dense_users.len() + 1);
    offsets.push(0);
    for (d, &u) in dense_users.iter().enumerate() {
        let rows = &by_user[ustart[u as usize] as usize..ustart[u as usize + 1] as usize];
        for &r in rows {
            let r = r as usize;
            if alive[r] {
                seq.user.push(d as u32 + 1);
                seq.item.push(item_dense[log.item[r] as usize]);
                seq.timestamp.push(log.timestamp[r]);
            }
        }
        let len = seq.user.len() - offsets[d];
        if len < 2 {
            bail!(
                "{}: field `{}`: user `{}` has only {len} interaction after filtering; a window needs a history and a target (use k_core >= 2)",
                log.path.display(),
                log.user_field,
                log.user_source_ids[u as usize]
            );
        }
        offsets.push(seq.user.len());
    }
    seq.original = seq.item.clone();
    seq.noise = vec![MASK_CLEAN; seq.item.len()];

    // Synthetic noise, keyed by (seed, dense user).
    let mut noised = 0u64;
    if p.noise_p > 0.0 {
        if num_items < 2 {
            bail!("noise_p > 0 needs at least 2 items in the catalogue, found {num_items}");
        }
        for d in 0..dense_users.len() {
            let mut rng = KeyedRng::new(p.seed, Purpose::Noise, d as u64 + 1);
            for k in offsets[d]..offsets[d + 1] {
                if rng.next_f64() < p.noise_p {
                    let orig = seq.original[k];
                    let mut r = 1 + rng.below(num_items as u64 - 1) as u32;
                    if r >= orig {
                        r += 1;
                    }
                    seq.item[k] = r;
                    seq.noise[k] = MASK_NOISE;
                    noised += 1;
                }
            }
        }
    }
    c("06_noise.interactions_noised", noised);

    let splits = window_and_split(&seq, &offsets, p, &mut c)?;

    let mut prepared = Prepared {
        catalog,
        users: dense_users
            .iter()
            .map(|&u| log.user_source_ids[u as usize].clone())
            .collect(),
        interactions: Some(seq),
        splits,
        ..Default::default()
    };
    prepared.counts = counts;
    finish(&mut prepared, p)?;
    prepared.notes.push(format!(
        "split protocol: {:?}; windows of {} (history {} + target), stride 1; test targets restored to the clean item",
        p.split,
        p.window,
        p.window - 1
    ));
    prepared.notes.push(
        "noise replaces an interaction with a uniformly random item different from the original"
            .into(),
    );
    Ok(prepared)
}

/// Rows that repeat an earlier (user, item, timestamp).
fn count_duplicates(log: &RawLog, ustart: &[u32], by_user: &[u32]) -> u64 {
    let mut dups = 0u64;
    let mut run: Vec<u32> = Vec::new();
    for u in 0..ustart.len() - 1 {
        let rows = &by_user[ustart[u] as usize..ustart[u + 1] as usize];
        let mut i = 0;
        while i < rows.len() {
            let ts = log.timestamp[rows[i] as usize];
            let mut j = i + 1;
            while j < rows.len() && log.timestamp[rows[j] as usize] == ts {
                j += 1;
            }
            if j - i > 1 {
                run.clear();
                run.extend(rows[i..j].iter().map(|&r| log.item[r as usize]));
                run.sort_unstable();
                dups += run.windows(2).filter(|w| w[0] == w[1]).count() as u64;
            }
            i = j;
        }
    }
    dups
}

/// A window before materialisation: (target timestamp, dense user, target index).
type WindowKey = (i64, u32, u32);

fn window_and_split(
    seq: &Interactions,
    offsets: &[usize],
    p: &Protocol,
    c: &mut impl FnMut(&str, u64),
) -> Result<[Windows; 3]> {
    let users = offsets.len() - 1;
    let w = p.window;
    let mut keys: [Vec<WindowKey>; 3] = Default::default();
    let mut loo_no_train = 0u64;
    let mut loo_no_valid = 0u64;
    for d in 0..users {
        let (a, len) = (offsets[d], offsets[d + 1] - offsets[d]);
        let key = |t: usize| (seq.timestamp[a + t], d as u32 + 1, t as u32);
        match p.split {
            SplitProtocol::Time => {
                let first = if len < w { len - 1 } else { w - 1 };
                keys[0].extend((first..len).map(key));
            }
            SplitProtocol::LeaveOneOut => {
                keys[2].push(key(len - 1));
                if len >= 3 {
                    keys[1].push(key(len - 2));
                } else {
                    loo_no_valid += 1;
                }
                if len >= 4 {
                    let last = len - 3;
                    let first = if last < w - 1 { last } else { w - 1 };
                    keys[0].extend((first..=last).map(key));
                } else {
                    loo_no_train += 1;
                }
            }
        }
    }
    if p.split == SplitProtocol::Time {
        let mut all = std::mem::take(&mut keys[0]);
        all.sort_unstable();
        let total = all.len();
        let n_train = (total as f64 * p.train_frac).floor() as usize;
        let n_valid = ((total as f64 * (p.train_frac + p.valid_frac)).floor() as usize)
            .max(n_train)
            - n_train;
        keys[2] = all.split_off(n_train + n_valid);
        keys[1] = all.split_off(n_train);
        keys[0] = all;
    } else {
        for k in keys.iter_mut() {
            k.sort_unstable();
        }
        c("07_windows.loo_users_without_train", loo_no_train);
        c("07_windows.loo_users_without_valid", loo_no_valid);
    }
    c(
        "07_windows.total",
        keys.iter().map(|k| k.len() as u64).sum(),
    );
    let mut out: [Windows; 3] = Default::default();
    for (s, ks) in keys.iter().enumerate() {
        let mut win = Windows::new();
        let npos: usize = ks.iter().map(|&(_, _, t)| (t as usize + 1).min(w)).sum();
        win.items.reserve(npos);
        win.mask.reserve(npos);
        win.original.reserve(npos);
        for &(ts, d, t) in ks {
            let base = offsets[d as usize - 1];
            let end = base + t as usize + 1;
            let start = end - (t as usize + 1).min(w);
            win.push(
                d,
                t,
                &seq.item[start..end],
                &seq.noise[start..end],
                &seq.original[start..end],
                ts,
            );
        }
        out[s] = win;
    }
    Ok(out)
}

/// Shared tail of every source: restore test targets, count noise, make SFT instances.
pub fn finish(prepared: &mut Prepared, p: &Protocol) -> Result<()> {
    let mut restored = 0u64;
    {
        let test = &mut prepared.splits[2];
        for i in 0..test.len() {
            let last = test.offsets[i + 1] as usize - 1;
            if test.mask[last] != MASK_CLEAN {
                test.items[last] = test.original[last];
                test.mask[last] = MASK_CLEAN;
                restored += 1;
            }
        }
    }
    let names = ["train", "valid", "test"];
    let mut c = |k: String, v: u64| prepared.counts.push((k, v));
    for (s, w) in prepared.splits.iter().enumerate() {
        c(format!("07_windows.{}", names[s]), w.len() as u64);
    }
    let (mut pos, mut noisy, mut hist, mut noisy_hist, mut noisy_targets) = (0u64, 0, 0, 0, 0);
    for (s, w) in prepared.splits.iter().enumerate() {
        let mut split_noisy = 0u64;
        for i in 0..w.len() {
            let (a, b) = (w.offsets[i] as usize, w.offsets[i + 1] as usize);
            let m = &w.mask[a..b];
            let k = m.iter().filter(|&&x| x == MASK_NOISE).count() as u64;
            split_noisy += k;
            noisy += k;
            pos += m.len() as u64;
            hist += m.len() as u64 - 1;
            let t = (m[m.len() - 1] == MASK_NOISE) as u64;
            noisy_hist += k - t;
            if s == 2 {
                noisy_targets += t;
            }
        }
        c(
            format!("08_noise.noisy_positions.{}", names[s]),
            split_noisy,
        );
    }
    c("08_noise.positions".into(), pos);
    c("08_noise.noisy_positions".into(), noisy);
    c("08_noise.history_positions".into(), hist);
    c("08_noise.noisy_history_positions".into(), noisy_hist);
    c("08_noise.test_targets_restored".into(), restored);
    c("08_noise.noisy_test_targets".into(), noisy_targets);
    if noisy_targets != 0 {
        bail!("internal error: {noisy_targets} test targets still noisy after restoration");
    }
    let train_windows = prepared.splits[0].len();
    c("09_sft.windows_requested".into(), p.sft_windows as u64);
    if p.sft_windows > train_windows {
        prepared.notes.push(format!(
            "sft_windows {} is more than the {train_windows} training windows: one SFT \
             instance per training window",
            p.sft_windows
        ));
    }
    let chosen = crate::sft::sample_windows(&prepared.splits[0], p.seed, p.sft_windows);
    prepared.sft = crate::sft::make_instances(
        &prepared.splits[0],
        &chosen,
        prepared.catalog.num_items(),
        p.seed,
    )?;
    c("09_sft.instances".into(), prepared.sft.len() as u64);
    Ok(())
}

/// Write a prepared dataset to `out` atomically (staging directory, renamed at the end),
/// replacing what is there: call [`check_existing`] first.
pub fn write_dataset(prepared: &Prepared, out: &Path, mut manifest: Manifest) -> Result<Manifest> {
    for (k, v) in &prepared.counts {
        manifest.count(k, *v);
    }
    manifest.notes.extend(prepared.notes.iter().cloned());
    let staging = crate::atomic::StagingDir::new(out, true)?;
    let dir = staging.path().to_path_buf();
    std::fs::create_dir_all(dir.join("windows"))?;
    // Independent files: encode them on separate threads (zstd dominates).
    std::thread::scope(|s| -> Result<()> {
        let mut jobs = Vec::new();
        let d = &dir;
        jobs.push(s.spawn(move || prepared.catalog.write_parquet(&d.join("catalog.parquet"))));
        jobs.push(s.spawn(move || {
            crate::interactions::write_users(&d.join("users.parquet"), &prepared.users)
        }));
        if let Some(x) = &prepared.interactions {
            jobs.push(s.spawn(move || x.write_parquet(&d.join("interactions.parquet"))));
        }
        for (i, name) in crate::windows::SPLITS.iter().enumerate() {
            let w = &prepared.splits[i];
            jobs.push(s.spawn(move || {
                w.write_parquet(&d.join("windows").join(format!("{name}.parquet")))
            }));
        }
        jobs.push(s.spawn(move || prepared.sft.write_parquet(&d.join("sft.parquet"))));
        for j in jobs {
            j.join().expect("writer thread panicked")?;
        }
        Ok(())
    })?;
    manifest.add_outputs_under(&dir)?;
    manifest.write(&dir)?;
    staging.commit()?;
    Ok(manifest)
}

/// What to do about an existing output directory: `Ok(Some(manifest))` when it already holds
/// this exact dataset (same stage, config, seed and input hashes) with every output intact,
/// `Ok(None)` when the path is free, holds this dataset damaged (rebuilt), or `overwrite` is
/// set, an error otherwise ([`crate::manifest::reuse_existing`]).
pub fn check_existing(out: &Path, overwrite: bool, wanted: &Manifest) -> Result<Option<Manifest>> {
    crate::manifest::reuse_existing(out, overwrite, |m| {
        m.stage == wanted.stage
            && m.config == wanted.config
            && m.seed == wanted.seed
            && same_inputs(m, wanted)
    })
}

fn same_inputs(a: &Manifest, b: &Manifest) -> bool {
    a.inputs.len() == b.inputs.len()
        && a.inputs
            .iter()
            .zip(&b.inputs)
            .all(|(x, y)| x.sha256 == y.sha256)
}

/// A manifest for `prepare` with the config and the inputs' digests filled in.
pub fn new_manifest(config: serde_json::Value, seed: u64, inputs: &[PathBuf]) -> Result<Manifest> {
    let mut m = Manifest::new("prepare", seed, config);
    for p in inputs {
        m.add_input(p)
            .with_context(|| format!("{}: cannot hash input", p.display()))?;
    }
    Ok(m)
}

/// The source data's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceFormat {
    /// RecBole atomic files: `inter` (`.inter`) and `item` (`.item`).
    Recbole,
    /// Parquet: `inter` (user, item, timestamp columns) and `item` (item id, title columns).
    Parquet,
    /// The reference code's window CSVs: `windows_dir` with train/valid/test CSVs + id2name4Rec.json.
    MovieCsv,
}

impl std::str::FromStr for SourceFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "recbole" => Ok(Self::Recbole),
            "parquet" => Ok(Self::Parquet),
            "movie-csv" => Ok(Self::MovieCsv),
            _ => bail!("unknown format `{s}` (expected `recbole`, `parquet` or `movie-csv`)"),
        }
    }
}

/// Where the data comes from, with paths already resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Source {
    pub format: SourceFormat,
    /// Interactions file (recbole, parquet).
    pub inter: Option<PathBuf>,
    /// Catalogue file (recbole, parquet).
    pub item: Option<PathBuf>,
    /// Field (column) names.
    pub user_field: String,
    pub item_field: String,
    pub timestamp_field: String,
    pub title_field: String,
    /// Appended to the title as `Title (year)`; empty: none.
    pub year_field: String,
    /// movie-csv: directory of the CSVs and the file names of each split.
    pub windows_dir: Option<PathBuf>,
    pub train_file: String,
    pub valid_file: String,
    pub test_file: String,
    pub catalog_file: String,
}

impl Source {
    fn need<'a>(&self, p: &'a Option<PathBuf>, what: &str) -> Result<&'a Path> {
        p.as_deref().ok_or_else(|| {
            anyhow::anyhow!(
                "format {:?} needs `{what}` (a flag or a key in [prepare])",
                self.format
            )
        })
    }

    /// The input files, in a fixed order (hashed into the manifest).
    pub fn inputs(&self) -> Result<Vec<PathBuf>> {
        Ok(match self.format {
            SourceFormat::Recbole | SourceFormat::Parquet => vec![
                self.need(&self.inter, "inter")?.to_path_buf(),
                self.need(&self.item, "item")?.to_path_buf(),
            ],
            SourceFormat::MovieCsv => {
                let d = self.need(&self.windows_dir, "windows_dir")?;
                [
                    &self.train_file,
                    &self.valid_file,
                    &self.test_file,
                    &self.catalog_file,
                ]
                .iter()
                .map(|f| d.join(f))
                .collect()
            }
        })
    }

    /// Refuse protocol settings this source cannot apply. movie-csv windows are imported as
    /// they are (already filtered, windowed, split and noised by the reference code): a
    /// `noise_p` of 0.1 there used to be ignored without a word, so that the reference's
    /// p = 0.1 windows could be taken for clean ones.
    pub fn check_protocol(&self, p: &Protocol, origin: &str) -> Result<()> {
        if self.format != SourceFormat::MovieCsv {
            return Ok(());
        }
        // Every protocol field but the seed and the SFT sample size, against its default.
        let given = serde_json::to_value(p)?;
        let default = serde_json::to_value(Protocol::default())?;
        let set: Vec<String> = given
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, v)| !["seed", "sft_windows"].contains(&k.as_str()) && default[k] != **v)
            .map(|(k, v)| format!("`{k}` = {v}"))
            .collect();
        if !set.is_empty() {
            bail!(
                "{origin}: format movie-csv imports the reference's windows as they are (already \
                 filtered, windowed, split and noised), so {} cannot apply: leave the \
                 protocol at its defaults. The noise is the windows' own: pick the variant with `windows_dir` \
                 (Movie_noise_user0.1 holds p = 0.1, Movie_noise_user0.0 is clean)",
                set.join(", ")
            );
        }
        Ok(())
    }

    /// Import and run the protocol.
    pub fn prepare(&self, p: &Protocol) -> Result<Prepared> {
        for f in self.inputs()? {
            if !f.is_file() {
                bail!("{}: input file not found", f.display());
            }
        }
        match self.format {
            SourceFormat::Recbole => {
                let fields = crate::import::recbole::RecboleFields {
                    user: self.user_field.clone(),
                    item: self.item_field.clone(),
                    timestamp: self.timestamp_field.clone(),
                    title: self.title_field.clone(),
                    year: (!self.year_field.is_empty()).then(|| self.year_field.clone()),
                };
                let log = crate::import::recbole::read(
                    self.need(&self.inter, "inter")?,
                    self.need(&self.item, "item")?,
                    &fields,
                )?;
                prepare_log(&log, p)
            }
            SourceFormat::Parquet => {
                let cols = crate::import::parquet::ParquetColumns {
                    user: self.user_field.clone(),
                    item: self.item_field.clone(),
                    timestamp: self.timestamp_field.clone(),
                    title: self.title_field.clone(),
                };
                let log = crate::import::parquet::read(
                    self.need(&self.inter, "inter")?,
                    self.need(&self.item, "item")?,
                    &cols,
                )?;
                prepare_log(&log, p)
            }
            SourceFormat::MovieCsv => {
                let ins = self.inputs()?;
                crate::import::movie_csv::prepare(&ins[0], &ins[1], &ins[2], &ins[3], p)
            }
        }
    }
}

/// The whole stage: validate, import, run the protocol, write `out` atomically. `config` is
/// the resolved configuration recorded in the manifest; `origin` names where the parameters
/// came from (for errors). Returns the manifest (the existing one when `out` is up to date).
pub fn run(
    source: &Source,
    protocol: &Protocol,
    config: serde_json::Value,
    out: &Path,
    overwrite: bool,
    origin: &str,
) -> Result<Manifest> {
    protocol.validate(origin)?;
    source.check_protocol(protocol, origin)?;
    let inputs = source.inputs()?;
    for f in &inputs {
        if !f.is_file() {
            bail!("{}: input file not found", f.display());
        }
    }
    let t = std::time::Instant::now();
    let (manifest, prepared) = if out.exists() {
        // The input hashes decide whether the existing dataset is up to date.
        let manifest = new_manifest(config, protocol.seed, &inputs)?;
        if let Some(existing) = check_existing(out, overwrite, &manifest)? {
            tracing::info!(out = %out.display(), "dataset is up to date (same config and inputs)");
            return Ok(existing);
        }
        (manifest, source.prepare(protocol)?)
    } else {
        // Nothing to compare against: hash the inputs while the protocol runs.
        let (manifest, prepared) = std::thread::scope(|s| {
            let h = s.spawn(|| new_manifest(config, protocol.seed, &inputs));
            let prepared = source.prepare(protocol);
            (h.join().expect("hashing thread panicked"), prepared)
        });
        let prepared = prepared?;
        (manifest?, prepared)
    };
    tracing::info!(secs = t.elapsed().as_secs_f64(), "protocol done");
    let m = write_dataset(&prepared, out, manifest)?;
    tracing::info!(out = %out.display(), secs = t.elapsed().as_secs_f64(), "dataset written");
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interactions::SourceCatalog;

    /// 4 users x 12 items over 6 catalogue items, timestamps increasing.
    fn log() -> RawLog {
        let mut l = RawLog {
            catalog: SourceCatalog {
                source_ids: (0..17).map(|i| format!("s{i}")).collect(),
                titles: (0..17)
                    .map(|i| {
                        if i == 16 {
                            "X".into()
                        } else {
                            format!("Title {i}")
                        }
                    })
                    .collect(),
                path: "cat".into(),
            },
            user_source_ids: (0..4).map(|u| format!("u{u}")).collect(),
            path: "log".into(),
            user_field: "user_id".into(),
            item_field: "item_id".into(),
            ..Default::default()
        };
        let mut t = 0;
        for k in 0..12u32 {
            for u in 0..4u32 {
                t += 1;
                l.user.push(u);
                l.item.push((u * 5 + k) % 16);
                l.timestamp.push(t);
            }
        }
        // An item with a one-character title: filtered out.
        l.user.push(0);
        l.item.push(16);
        l.timestamp.push(0);
        l
    }

    #[test]
    fn movie_csv_refuses_protocol_settings_it_cannot_apply() {
        let src = Source {
            format: SourceFormat::MovieCsv,
            inter: None,
            item: None,
            user_field: String::new(),
            item_field: String::new(),
            timestamp_field: String::new(),
            title_field: String::new(),
            year_field: String::new(),
            windows_dir: Some("w".into()),
            train_file: String::new(),
            valid_file: String::new(),
            test_file: String::new(),
            catalog_file: String::new(),
        };
        let ok = Protocol {
            seed: 7,
            sft_windows: 100,
            ..Default::default()
        };
        src.check_protocol(&ok, "here").unwrap();
        let p = Protocol {
            noise_p: 0.1,
            k_core: 10,
            ..Default::default()
        };
        let e = src
            .check_protocol(&p, "x.toml [prepare]")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("x.toml [prepare]: format movie-csv")
                && e.contains("`k_core` = 10, `noise_p` = 0.1 cannot apply"),
            "{e}"
        );
        // Other sources apply them.
        let recbole = Source {
            format: SourceFormat::Recbole,
            ..src
        };
        recbole.check_protocol(&p, "here").unwrap();
    }

    #[test]
    fn counts_add_up_and_windows_are_well_formed() {
        let p = Protocol {
            k_core: 2,
            noise_p: 0.3,
            ..Default::default()
        };
        let out = prepare_log(&log(), &p).unwrap();
        let g = |k: &str| out.count(k).unwrap();
        assert_eq!(g("01_read.interactions"), 49);
        assert_eq!(g("03_title_filter.interactions_removed"), 1);
        assert_eq!(g("05_kept.interactions"), 48);
        assert_eq!(g("05_kept.items"), 16);
        // 4 users x (12 - 10) windows.
        assert_eq!(g("07_windows.total"), 8);
        assert_eq!(
            g("07_windows.train") + g("07_windows.valid") + g("07_windows.test"),
            8
        );
        assert_eq!(g("08_noise.noisy_test_targets"), 0);
        let x = out.interactions.as_ref().unwrap();
        assert_eq!(
            x.noise.iter().filter(|&&m| m == 1).count() as u64,
            g("06_noise.interactions_noised")
        );
        for (i, (&it, &o)) in x.item.iter().zip(&x.original).enumerate() {
            assert_eq!(it != o, x.noise[i] == 1);
        }
        for w in out.splits.iter().flat_map(|s| s.iter()) {
            assert_eq!(w.items.len(), 11);
        }
        // Train targets come before test targets in time.
        let tmax = out.splits[0].target_timestamp.iter().max().unwrap();
        let tmin = out.splits[2].target_timestamp.iter().min().unwrap();
        assert!(tmax <= tmin);
        assert_eq!(out.sft.len(), out.splits[0].len());
    }

    #[test]
    fn leave_one_out_gives_each_user_one_test_and_one_valid_window() {
        let p = Protocol {
            k_core: 2,
            split: SplitProtocol::LeaveOneOut,
            ..Default::default()
        };
        let out = prepare_log(&log(), &p).unwrap();
        assert_eq!(out.splits[2].len(), 4);
        assert_eq!(out.splits[1].len(), 4);
        for w in out.splits[2].iter() {
            assert_eq!(w.pos, 11);
        }
        // Train windows end at 10 .. 9 (len 12: last train target index 9).
        assert_eq!(out.splits[0].len(), 4);
    }

    #[test]
    fn kcore_that_removes_everything_is_an_error() {
        let p = Protocol {
            k_core: 100,
            ..Default::default()
        };
        let e = prepare_log(&log(), &p).unwrap_err().to_string();
        assert!(e.contains("removed every interaction"), "{e}");
    }
}
