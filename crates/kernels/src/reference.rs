//! f64 CPU references of the kernels, with the same signatures as the fast paths: the ground
//! truth every other implementation (chunked CPU path, CUDA kernels) is tested against.
//! Plain loops, no tiling, no tricks: O(N x V x d) and O(B x I x d) in f64, for test sizes only.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

use crate::item_loglik::{validate_offsets, ItemLogLik};
use crate::nearest::{check_nearest_args, effective_k, Nearest};

/// Item log-likelihoods in f64 (rounded to f32 only at the end); per-item sums in f64.
pub fn item_loglik(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &[u32],
    offsets: &[u32],
) -> Result<ItemLogLik> {
    let (n, d) = hidden.dims2()?;
    let (v, d2) = lm_head.dims2()?;
    if d != d2 {
        bail!("reference item_loglik: hidden dim {d} != lm_head dim {d2}");
    }
    if targets.len() != n {
        bail!(
            "reference item_loglik: {} targets for {n} hidden rows",
            targets.len()
        );
    }
    validate_offsets(offsets, n)?;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("reference item_loglik: target id {bad} outside the vocabulary ({v})");
    }
    let h: Vec<f64> = hidden
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let w: Vec<f64> = lm_head
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let mut per_token64 = Vec::with_capacity(n);
    let mut logits = vec![0f64; v];
    for (i, &t) in targets.iter().enumerate() {
        let hi = &h[i * d..(i + 1) * d];
        for (j, l) in logits.iter_mut().enumerate() {
            *l = hi
                .iter()
                .zip(&w[j * d..(j + 1) * d])
                .map(|(a, b)| a * b)
                .sum();
        }
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = logits.iter().map(|x| (x - m).exp()).sum();
        per_token64.push(logits[t as usize] - (m + s.ln()));
    }
    let per_item = offsets
        .windows(2)
        .map(|w| {
            per_token64[w[0] as usize..w[1] as usize]
                .iter()
                .sum::<f64>() as f32
        })
        .collect();
    Ok(ItemLogLik {
        per_token: per_token64.iter().map(|&x| x as f32).collect(),
        per_item,
    })
}

/// Exact top-k nearest catalogue rows by squared L2 distance computed in f64 as sum((q - c)^2)
/// (not the norm expansion), ties toward the lower index, excluded rows never returned.
pub fn nearest_items(
    queries: &[f32],
    catalog: &[f32],
    d: usize,
    k: usize,
    exclude: &[u32],
) -> Result<Nearest> {
    check_nearest_args(queries, catalog, d)?;
    let n = catalog.len() / d;
    let k = effective_k(k, n, exclude);
    let mut index = Vec::new();
    let mut dist2 = Vec::new();
    for q in queries.chunks_exact(d) {
        let mut all: Vec<(f64, u32)> = catalog
            .chunks_exact(d)
            .enumerate()
            .filter(|(j, _)| !exclude.contains(&(*j as u32)))
            .map(|(j, c)| {
                let dd: f64 = q
                    .iter()
                    .zip(c)
                    .map(|(&a, &b)| (a as f64 - b as f64).powi(2))
                    .sum();
                (dd, j as u32)
            })
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for &(dd, j) in all.iter().take(k) {
            index.push(j);
            dist2.push(dd as f32);
        }
    }
    Ok(Nearest { k, index, dist2 })
}
