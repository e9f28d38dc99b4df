//! Synthetic datasets for tests and benchmarks: users walk a fixed item-successor function
//! (the next item is a function of the current one, with optional random jumps), windowed
//! like the `prepare` stage (stride 1, up to 11 items) and split leave-one-out (each user's
//! last window is test, the one before valid, the rest train). A learnable pattern, so a
//! correct backbone must reach HR@10 ~ 1 on it when there are no jumps.

use llm4dsr_data::rng::{KeyedRng, Purpose};
use llm4dsr_data::{Catalog, Windows};
use std::path::Path;

/// Shape of a synthetic dataset.
#[derive(Clone, Copy, Debug)]
pub struct SyntheticSpec {
    pub users: u32,
    pub items: u32,
    /// Interactions per user.
    pub seq_len: usize,
    /// Probability that a step jumps to a uniformly random item instead of the successor.
    pub jump: f64,
    pub seed: u64,
}

/// The deterministic successor of item `i` in 1..=n.
pub fn successor(i: u32, n: u32) -> u32 {
    ((i as u64 * 7 + 3) % n as u64) as u32 + 1
}

/// (train, valid, test) windows.
pub fn windows(spec: SyntheticSpec) -> (Windows, Windows, Windows) {
    let (mut tr, mut va, mut te) = (Windows::new(), Windows::new(), Windows::new());
    for u in 1..=spec.users {
        let mut rng = KeyedRng::new(spec.seed, Purpose::Other, u as u64);
        let mut seq = Vec::with_capacity(spec.seq_len);
        let mut cur = 1 + rng.below(spec.items as u64) as u32;
        for _ in 0..spec.seq_len {
            seq.push(cur);
            cur = if rng.next_f64() < spec.jump {
                1 + rng.below(spec.items as u64) as u32
            } else {
                successor(cur, spec.items)
            };
        }
        let mut ws: Vec<(usize, usize)> = Vec::new();
        if seq.len() <= 11 {
            ws.push((0, seq.len()));
        } else {
            for end in 11..=seq.len() {
                ws.push((end - 11, end));
            }
        }
        let nw = ws.len();
        for (k, (a, b)) in ws.into_iter().enumerate() {
            let items = &seq[a..b];
            let z = vec![0u8; items.len()];
            let dst = if k + 1 == nw {
                &mut te
            } else if k + 2 == nw {
                &mut va
            } else {
                &mut tr
            };
            dst.push(
                u,
                (b - 1) as u32,
                items,
                &z,
                items,
                (u as i64) * 1000 + b as i64,
            );
        }
    }
    (tr, va, te)
}

/// Write a dataset directory (`catalog.parquet`, `windows/*.parquet`) as `prepare` would.
pub fn write_dataset(dir: &Path, spec: SyntheticSpec) -> anyhow::Result<()> {
    let (tr, va, te) = windows(spec);
    let mut cat = Catalog::new();
    for i in 1..=spec.items {
        cat.push(format!("Item {i}"), i.to_string());
    }
    cat.write_parquet(&dir.join("catalog.parquet"))?;
    tr.write_parquet(&dir.join("windows/train.parquet"))?;
    va.write_parquet(&dir.join("windows/valid.parquet"))?;
    te.write_parquet(&dir.join("windows/test.parquet"))?;
    Ok(())
}
