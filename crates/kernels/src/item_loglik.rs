//! Item likelihood: for N title-token positions with hidden states `h` [N, d], the LM head
//! `w` [V, d], target ids `t` [N] and item segments `offsets` (item j covers positions
//! offsets[j]..offsets[j+1]), compute per token `log softmax(h_i w^T)[t_i]` and per item the
//! sum over its tokens.

use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

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

/// Compute item log-likelihoods. `hidden` [N, d], `lm_head` [V, d] on the same device.
/// CPU: chunked matmul + log-softmax (at most CPU_CHUNK_ROWS x V logits live).
pub fn item_loglik(
    hidden: &Tensor,
    lm_head: &Tensor,
    targets: &[u32],
    offsets: &[u32],
) -> Result<ItemLogLik> {
    let (n, d) = hidden.dims2()?;
    let (v, d2) = lm_head.dims2()?;
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
    let w = lm_head.to_dtype(DType::F32)?;
    let mut per_token = Vec::with_capacity(n);
    let mut start = 0;
    while start < n {
        let len = CPU_CHUNK_ROWS.min(n - start);
        let h = hidden.narrow(0, start, len)?.to_dtype(DType::F32)?;
        let logits = h.matmul(&w.t()?)?; // [len, V]
        let lse = log_sum_exp(&logits)?; // [len]
        let ids = Tensor::from_slice(&targets[start..start + len], len, hidden.device())?;
        let tgt = logits.gather(&ids.unsqueeze(1)?, 1)?.squeeze(1)?;
        per_token.extend((tgt - lse)?.to_vec1::<f32>()?);
        start += len;
    }
    let per_item = segment_sum(&per_token, offsets);
    Ok(ItemLogLik {
        per_token,
        per_item,
    })
}

fn log_sum_exp(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?;
    let s = x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok((s + m)?.squeeze(D::Minus1)?)
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
