//! Full-ranking evaluation: each instance's history is encoded, scored against the whole
//! catalogue with one [B, d] x [d, items + 1] product per batch, and the target's exact rank
//! counted (see `metrics`). Padding (column 0) is never ranked. Masking of history items is a
//! policy flag, off by default as in RecBole and the reference code.
//!
//! Distributed: rank r takes a contiguous slice of the instances; the targets' ranks are
//! all-gathered (4 bytes an instance) and every rank sums them in instance order, so any number
//! of ranks gives bit-identical metrics.

use crate::batch::{eval_instances, SeqBatch, Targets};
use crate::fused::FusedEngine;
use crate::metrics::{rank_of_target, MetricSums, Metrics};
use crate::model::Recommender;
use crate::train::Engine;
use anyhow::Result;
use candle_core::{Device, Tensor};
use llm4dsr_comm::Comm;
use llm4dsr_data::Windows;

#[derive(Clone, Copy, Debug)]
pub struct EvalOptions {
    pub batch_size: usize,
    /// Exclude the instance's history items from the ranking (never the target).
    pub mask_history: bool,
    /// Forward-pass implementation (`Auto`: the model's fused engine where it has one).
    pub engine: Engine,
}

impl Default for EvalOptions {
    fn default() -> Self {
        Self {
            batch_size: 1024,
            mask_history: false,
            engine: Engine::Auto,
        }
    }
}

/// The slice [lo, hi) of `n` items that rank `rank` of `size` owns.
pub fn rank_slice(n: usize, rank: usize, size: usize) -> (usize, usize) {
    (n * rank / size, n * (rank + 1) / size)
}

/// Metrics of `model` on `windows` (each window's last item is the target).
pub fn evaluate(
    model: &Recommender,
    windows: &Windows,
    opts: EvalOptions,
    comm: &dyn Comm,
) -> Result<Metrics> {
    let insts = eval_instances(windows);
    let (lo, hi) = rank_slice(insts.len(), comm.rank(), comm.size());
    // Each rank keeps the target's rank per instance; the sums are formed after gathering, in
    // instance order, so the metrics are bit-identical for any number of ranks.
    let mut target_ranks: Vec<u8> = Vec::with_capacity((hi - lo) * 4);
    let l = model.cfg.max_len;
    // The forward pass through the model's fused engine (tested equal to candle's) unless
    // the candle engine is asked for; the catalogue product is one candle matmul either way.
    let mut fused = match opts.engine {
        Engine::Candle => None,
        _ => FusedEngine::for_model(&model.cfg, model.num_items, model.num_users, &model.params)?
            .map(|f| Ok::<_, anyhow::Error>((f, model.params.flat_values()?)))
            .transpose()?,
    };
    for start in (lo..hi).step_by(opts.batch_size.max(1)) {
        let end = (start + opts.batch_size.max(1)).min(hi);
        let ids: Vec<u64> = (start as u64..end as u64).collect();
        let batch = SeqBatch::build(windows, &insts[start..end], &ids, Targets::Last, l)?;
        let scores = match fused.as_mut() {
            Some((f, flat)) => {
                let h = f.hidden(flat, &batch)?;
                let h = Tensor::from_vec(h, (batch.targets.len(), model.cfg.dim), &Device::Cpu)?;
                h.matmul(&model.net.item_table().t()?)?
            }
            None => model.score_all(&batch)?,
        };
        let v = scores.dim(1)?;
        let flat = scores.flatten_all()?.to_vec1::<f32>()?;
        for (r, &t) in batch.targets.iter().enumerate() {
            let row = &flat[r * v..(r + 1) * v];
            let excluded: &[u32] = if opts.mask_history {
                &batch.ids_host[r * l..(r + 1) * l]
            } else {
                &[]
            };
            let mut excl: Vec<u32> = excluded.to_vec();
            excl.sort_unstable();
            excl.dedup();
            let r = rank_of_target(row, t as usize, &excl)? as u32;
            target_ranks.extend_from_slice(&r.to_le_bytes());
        }
    }
    let mut sums = MetricSums::default();
    for part in comm.all_gather_bytes(&target_ranks)? {
        for r in part.chunks_exact(4) {
            sums.add_rank(u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize);
        }
    }
    Ok(sums.finish())
}
