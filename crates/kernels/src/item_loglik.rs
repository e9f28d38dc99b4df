//! Item likelihood: for N title-token positions with hidden states `h` [N, d], the LM head
//! `w` [V, d], target ids `t` [N] and item segments `offsets` (item j covers positions
//! offsets[j]..offsets[j+1]), compute per token `log softmax(h_i w^T)[t_i]` and per item the
//! sum over its tokens.
//!
//! [`item_loglik`] dispatches: with feature `cuda` and a GPU at run time it runs the fused
//! NVRTC kernel (`kernels/item_loglik_fused.cu`, never storing N x V logits); otherwise, or if
//! the GPU path fails, the chunked CPU path [`item_loglik_cpu`], which holds one
//! [`CPU_CHUNK_ROWS`] x V block of f32 logits at a time (64 x 128,256 x 4 B = 33 MB for
//! Llama-3) instead of N x V. Cost on either path: 2 N V d FLOPs; memory O(N + V d).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

/// Per-token and per-item log-probabilities.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemLogLik {
    /// [N] log p(t_i | prefix), f32.
    pub per_token: Vec<f32>,
    /// [items] sum of `per_token` over each item's segment.
    pub per_item: Vec<f32>,
}

/// Rows of logits materialised at once on the CPU path (rows x V x 4 bytes).
pub const CPU_CHUNK_ROWS: usize = 64;

/// Compute item log-likelihoods. `hidden` [N, d], `lm_head` [V, d] on the same device, any
/// float dtype. Uses the CUDA kernel when available (see [`crate::backend`]), else the CPU path.
pub fn item_loglik(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &[u32],
    offsets: &[u32],
) -> Result<ItemLogLik> {
    let (_n, _, _) = check_args(hidden, lm_head, targets, offsets)?;
    #[cfg(feature = "cuda")]
    if _n > 0 {
        if let Some(gpu) = crate::cuda::kernels() {
            match gpu.item_loglik(hidden, lm_head, targets, offsets) {
                Ok(r) => return Ok(r),
                Err(e) => {
                    tracing::warn!("item_loglik: CUDA kernel failed ({e:#}); using the CPU path")
                }
            }
        }
    }
    item_loglik_cpu(hidden, lm_head, targets, offsets)
}

/// Shapes and ids checked once for every path; returns (n, v, d).
pub fn check_args(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &[u32],
    offsets: &[u32],
) -> Result<(usize, usize, usize)> {
    let (n, d) = hidden
        .dims2()
        .context("item_loglik: hidden must be [N, d]")?;
    let (v, d2) = lm_head
        .dims2()
        .context("item_loglik: lm_head must be [V, d]")?;
    if d != d2 {
        bail!("item_loglik: hidden dim {d} != lm_head dim {d2}");
    }
    if targets.len() != n {
        bail!("item_loglik: {} targets for {n} hidden rows", targets.len());
    }
    validate_offsets(offsets, n)?;
    if let Some(&bad) = targets.iter().find(|&&t| t as usize >= v) {
        bail!("item_loglik: target id {bad} outside the vocabulary ({v})");
    }
    Ok((n, v, d))
}

/// The CPU path: chunks of [`CPU_CHUNK_ROWS`] rows; per chunk one f32 matmul (candle/gemm,
/// multi-threaded) into a [rows, V] buffer, then per row max and sum-exp (f64 sum) read
/// straight from that buffer, so a single chunk of logits is alive at any time.
pub fn item_loglik_cpu(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &[u32],
    offsets: &[u32],
) -> Result<ItemLogLik> {
    let (n, v, _d) = check_args(hidden, lm_head, targets, offsets)?;
    let w = lm_head.to_dtype(DType::F32)?;
    let wt = w.t()?;
    let mut per_token = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = CPU_CHUNK_ROWS.min(n - start);
        let h = hidden.narrow(0, start, len)?.to_dtype(DType::F32)?;
        let logits = h.matmul(&wt)?.contiguous()?; // [len, V], the only N x V-shaped buffer
        with_cpu_f32(&logits, |x| {
            for (r, row) in x.chunks_exact(v).enumerate() {
                per_token.push((row[targets[start + r] as usize] as f64 - log_sum_exp(row)) as f32);
            }
        })?;
        start += len;
    }
    let per_item = segment_sum(&per_token, offsets);
    Ok(ItemLogLik {
        per_token,
        per_item,
    })
}

/// The naive path the fused kernels replace: materialise all N x V logits, candle
/// log_softmax, gather. Kept for benchmarks and tests (memory O(N x V)).
pub fn item_loglik_materialised(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &[u32],
    offsets: &[u32],
) -> Result<ItemLogLik> {
    let (n, _, _) = check_args(hidden, lm_head, targets, offsets)?;
    let h = hidden.to_dtype(DType::F32)?;
    let w = lm_head.to_dtype(DType::F32)?;
    let logits = h.matmul(&w.t()?)?; // [N, V]
    let lp = candle_nn_free_log_softmax(&logits)?;
    let ids = Tensor::from_slice(targets, (n, 1), hidden.device())?;
    let per_token = lp.gather(&ids, 1)?.squeeze(1)?.to_vec1::<f32>()?;
    let per_item = segment_sum(&per_token, offsets);
    Ok(ItemLogLik {
        per_token,
        per_item,
    })
}

/// log_softmax over the last dim with candle-core ops only (x - max - log sum exp(x - max)).
fn candle_nn_free_log_softmax(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(1)?;
    let z = x.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(1)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}

/// log sum_j exp(x_j): max in f32, sum of exp(x - max) in f64.
fn log_sum_exp(x: &[f32]) -> f64 {
    let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY || m.is_nan() {
        return m as f64;
    }
    let s: f64 = x.iter().map(|&xi| ((xi - m) as f64).exp()).sum();
    m as f64 + s.ln()
}

/// Run `f` on the f32 data of a contiguous CPU tensor without copying it.
fn with_cpu_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let (a, b) = layout
        .contiguous_offsets()
        .context("item_loglik: logits chunk is not contiguous")?;
    match &*storage {
        candle_core::Storage::Cpu(cpu) => Ok(f(&cpu.as_slice::<f32>()?[a..b])),
        _ => bail!("item_loglik: CPU path got a tensor on {:?}", t.device()),
    }
}

pub fn validate_offsets(offsets: &[u32], n: usize) -> Result<()> {
    if offsets.is_empty() || offsets[0] != 0 || *offsets.last().unwrap() as usize != n {
        bail!("item offsets must start at 0 and end at N={n}");
    }
    if offsets.windows(2).any(|w| w[1] < w[0]) {
        bail!("item offsets must be non-decreasing");
    }
    Ok(())
}

pub fn segment_sum(per_token: &[f32], offsets: &[u32]) -> Vec<f32> {
    offsets
        .windows(2)
        .map(|w| {
            per_token[w[0] as usize..w[1] as usize]
                .iter()
                .map(|&x| x as f64)
                .sum::<f64>() as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn lcg(seed: u64, len: usize, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    #[test]
    fn chunked_matches_reference_across_chunk_boundary() {
        let (n, v, d) = (CPU_CHUNK_ROWS + 3, 37, 8);
        let h = Tensor::from_vec(lcg(1, n * d, 1.0), (n, d), &Device::Cpu).unwrap();
        let w = Tensor::from_vec(lcg(2, v * d, 1.0), (v, d), &Device::Cpu).unwrap();
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let off = [0u32, 1, 1, 30, n as u32];
        let got = item_loglik_cpu(&h, &w, &t, &off).unwrap();
        let want = crate::reference::item_loglik(&h, &w, &t, &off).unwrap();
        assert_eq!(got.per_item.len(), 4);
        assert_eq!(got.per_item[1], 0.0);
        for (a, b) in got.per_token.iter().zip(&want.per_token) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "{a} vs {b}");
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        let h = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(item_loglik_cpu(&h, &w, &[0, 5], &[0, 2]).is_err()); // id outside vocab
        assert!(item_loglik_cpu(&h, &w, &[0], &[0, 2]).is_err()); // too few targets
        assert!(item_loglik_cpu(&h, &w, &[0, 1], &[0, 1]).is_err()); // offsets end early
        assert!(item_loglik_cpu(&h, &w, &[0, 1], &[0, 2, 1, 2]).is_err()); // decreasing
        let w3 = Tensor::zeros((5, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(item_loglik_cpu(&h, &w3, &[0, 1], &[0, 2]).is_err());
        // Uniform logits: log(1/5) for each token.
        let r = item_loglik_cpu(&h, &w, &[0, 4], &[0, 2]).unwrap();
        assert!((r.per_token[0] + (5f32).ln()).abs() < 1e-6);
    }
}
