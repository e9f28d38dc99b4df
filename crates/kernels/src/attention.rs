//! Masked, scaled softmax of attention scores, fused: `softmax(scale * att + mask)` over the
//! last dimension in one pass, the mask shared by every head of a batch entry.
//!
//! The decoder's attention (crates/llm/src/decoder.rs) runs its groups as padded batches with
//! an additive 0 / -inf mask `[batches or 1, n, s]`. With candle's ops that is a scale, a 5-d
//! broadcast add and a softmax; on an H200 the broadcast add alone took half of a SmolLM2
//! forward's GPU time (docs/llm.md). [`masked_softmax`] is one candle custom op: on the CPU a
//! row-parallel loop, on candle's CUDA device (feature `candle-cuda`) the NVRTC kernel of
//! `kernels/attention_softmax.cu`, launched on candle's own stream (no copy, no hand-over).
//! [`masked_softmax_reference`] is the f64 reference both are tested against.

use crate::decoder_ops::contiguous;
use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

/// `softmax(scale * att + mask)` over the last dimension. `att` is `[b, ..., n, s]` (any float
/// dtype; the result has its dtype and shape), `mask` is f32 `[1 or b, n, s]`: row `r` of the
/// flattened scores (query `r % n` of batch entry `r / (rows / b)`) adds mask row
/// `(batch or 0) * n + r % n`. Computed in f32. A row whose every cell is masked gives zeros.
pub fn masked_softmax(att: &Tensor, mask: &Tensor, scale: f64) -> Result<Tensor> {
    let dims = att.dims();
    ensure!(
        dims.len() >= 3,
        "masked_softmax: scores must be [b, .., n, s], got {dims:?}"
    );
    let (b, n, s) = (dims[0], dims[dims.len() - 2], dims[dims.len() - 1]);
    let (mb, mn, ms) = mask.dims3()?;
    ensure!(
        (mb == 1 || mb == b) && mn == n && ms == s,
        "masked_softmax: mask {:?} does not fit scores {dims:?} (want [1 or {b}, {n}, {s}])",
        mask.dims()
    );
    ensure!(
        mask.dtype() == DType::F32,
        "masked_softmax: the mask must be f32"
    );
    let op = MaskedSoftmax {
        scale: scale as f32,
        n,
        s,
        rows_per_batch: att.elem_count() / s.max(1) / b.max(1),
        mask_batches: mb,
    };
    Ok(att
        .contiguous()?
        .apply_op2_no_bwd(&mask.contiguous()?, &op)?)
}

/// The f64 reference of [`masked_softmax`] on host values: `att` `[rows, s]` row-major,
/// `mask` `[mask_batches * n, s]`, `rows_per_batch` rows per batch entry.
pub fn masked_softmax_reference(
    att: &[f32],
    mask: &[f32],
    s: usize,
    n: usize,
    rows_per_batch: usize,
    mask_batches: usize,
    scale: f64,
) -> Vec<f64> {
    let rows = att.len() / s;
    let mut out = vec![0f64; att.len()];
    for r in 0..rows {
        let b = if mask_batches == 1 {
            0
        } else {
            r / rows_per_batch
        };
        let mk = &mask[(b * n + r % n) * s..(b * n + r % n + 1) * s];
        let v: Vec<f64> = (0..s)
            .map(|c| att[r * s + c] as f64 * scale + mk[c] as f64)
            .collect();
        let m = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if m == f64::NEG_INFINITY {
            continue;
        }
        let sum: f64 = v.iter().map(|x| (x - m).exp()).sum();
        for c in 0..s {
            out[r * s + c] = (v[c] - m).exp() / sum;
        }
    }
    out
}

struct MaskedSoftmax {
    scale: f32,
    n: usize,
    s: usize,
    rows_per_batch: usize,
    mask_batches: usize,
}

impl MaskedSoftmax {
    fn mask_row(&self, row: usize) -> usize {
        let b = if self.mask_batches == 1 {
            0
        } else {
            row / self.rows_per_batch
        };
        b * self.n + row % self.n
    }

    /// One row on the CPU, in f32 (`buf` holds the row's shifted values).
    fn row_cpu(&self, x: impl Fn(usize) -> f32, mk: &[f32], buf: &mut [f32]) -> f32 {
        for ((c, v), &k) in buf.iter_mut().enumerate().zip(mk) {
            *v = x(c) * self.scale + k;
        }
        let m = crate::cpu_math::max(buf);
        if m == f32::NEG_INFINITY {
            buf.fill(0.0);
            return 0.0;
        }
        // Vectorised exp over the whole row (masked cells: e^-inf = exactly 0): cheaper than
        // skipping them with a scalar libm exp() per live cell.
        for v in buf.iter_mut() {
            *v -= m;
        }
        crate::cpu_math::exp_in_place(buf);
        1.0 / crate::cpu_math::sum(buf)
    }

    fn cpu<T: Copy + Send + Sync>(
        &self,
        att: &[T],
        mask: &[f32],
        load: impl Fn(T) -> f32 + Sync,
        store: impl Fn(f32) -> T + Sync,
        zero: T,
    ) -> Vec<T> {
        use rayon::prelude::*;
        let s = self.s;
        let mut out = vec![zero; att.len()];
        out.par_chunks_mut(s)
            .zip(att.par_chunks(s))
            .enumerate()
            .for_each_init(
                || vec![0f32; s],
                |buf, (r, (y, x))| {
                    let mr = self.mask_row(r);
                    let inv = self.row_cpu(|c| load(x[c]), &mask[mr * s..(mr + 1) * s], buf);
                    for (o, v) in y.iter_mut().zip(buf.iter()) {
                        *o = store(v * inv);
                    }
                },
            );
        out
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "llm4dsr-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(mask) = s2 else {
            candle_core::bail!("masked_softmax: the mask must be f32")
        };
        let mask = contiguous(mask, l2)?;
        let out = match s1 {
            CpuStorage::F32(a) => {
                CpuStorage::F32(self.cpu(contiguous(a, l1)?, mask, |x| x, |x| x, 0f32))
            }
            CpuStorage::F64(a) => CpuStorage::F64(self.cpu(
                contiguous(a, l1)?,
                mask,
                |x| x as f32,
                |x| x as f64,
                0f64,
            )),
            CpuStorage::BF16(a) => CpuStorage::BF16(self.cpu(
                contiguous(a, l1)?,
                mask,
                bf16::to_f32,
                bf16::from_f32,
                bf16::ZERO,
            )),
            CpuStorage::F16(a) => CpuStorage::F16(self.cpu(
                contiguous(a, l1)?,
                mask,
                f16::to_f32,
                f16::from_f32,
                f16::ZERO,
            )),
            other => candle_core::bail!(
                "masked_softmax: scores of dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::forward(self, s1, l1, s2, l2)
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    use super::MaskedSoftmax;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Shape};
    use half::{bf16, f16};

    /// Rows a block: ATTN_ROWS_PER_BLOCK of kernels/attention_softmax.cu (its default, 8).
    const ROWS_PER_BLOCK: u32 = 8;

    fn launch<T: CudaDType + cudarc::driver::DeviceRepr>(
        op: &MaskedSoftmax,
        name: &str,
        s1: &CudaStorage,
        l1: &Layout,
        mask: &cudarc::driver::CudaView<'_, f32>,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s1.device();
        let (a, b) = l1.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("masked_softmax: scores not contiguous".into())
        })?;
        let src = T::as_cuda_slice(s1)?.slice(a..b);
        let el = b - a;
        let rows = (el / op.s) as u64;
        let func = crate::candle_cuda::func(
            dev,
            "attention_softmax.cu",
            crate::sources::ATTENTION_SOFTMAX_CU,
            name,
        )?;
        // SAFETY: every element is written by the kernel (each row's lanes cover 0..s).
        let dst = unsafe { dev.alloc::<T>(el)? };
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(ROWS_PER_BLOCK as u64) as u32, 1, 1),
            block_dim: (ROWS_PER_BLOCK * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (s, n, rpb, mb) = (
            op.s as i32,
            op.n as i32,
            op.rows_per_batch as u64,
            op.mask_batches as i32,
        );
        let stream = dev.cuda_stream();
        let mut builder = stream.launch_builder(&func);
        builder.arg(&src);
        builder.arg(mask);
        builder.arg(&dst);
        builder.arg(&rows);
        builder.arg(&s);
        builder.arg(&n);
        builder.arg(&rpb);
        builder.arg(&mb);
        builder.arg(&op.scale);
        // SAFETY: argument list matches kernels/attention_softmax.cu's signature.
        unsafe { builder.launch(cfg) }.w()?;
        Ok(T::wrap_cuda_slice(dst, dev.clone()))
    }

    pub(super) fn forward(
        op: &MaskedSoftmax,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (a, b) = l2
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("masked_softmax: mask not contiguous".into()))?;
        let mask = s2.as_cuda_slice::<f32>()?.slice(a..b);
        let out = match s1.dtype() {
            DType::BF16 => launch::<bf16>(op, "attn_softmax_bf16", s1, l1, &mask)?,
            DType::F16 => launch::<f16>(op, "attn_softmax_f16", s1, l1, &mask)?,
            DType::F32 => launch::<f32>(op, "attn_softmax_f32", s1, l1, &mask)?,
            other => candle_core::bail!("masked_softmax: scores of dtype {other:?} on CUDA"),
        };
        Ok((out, l1.shape().clone()))
    }
}
