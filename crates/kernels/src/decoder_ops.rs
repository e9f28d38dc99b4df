//! The decoder's layout and element-wise ops as single kernels (`kernels/decoder_ops.cu` on
//! candle's CUDA stream in a `candle-cuda` build; plain loops on the CPU), each replacing a
//! chain of candle ops whose generic strided kernels were a quarter of a SmolLM2 forward's GPU
//! time on an H200 (docs/llm.md):
//!
//! - [`gather_heads_first`]: rows of a token-major `[P, heads, hd]` tensor, laid out
//!   `[b, heads, n, hd]` for the batched attention products (was index_select + transpose +
//!   contiguous);
//! - [`gather_token_major`]: the inverse, `[b, heads, n, hd]` back to `[t, heads, hd]` rows in
//!   packed order (was transpose + reshape + index_select);
//! - [`swiglu`]: `silu(gate) * up` in one pass (was silu, then mul);
//! - [`add_rms_norm`]: the residual add and the next RMSNorm in one pass (was add, then
//!   candle-nn's rms_norm: two launches, three passes over the rows).
//!
//! Each has a plain reference in the tests (`tests/kernels.rs`: candle's own ops).
//!
//! The kernels serve every device by default (H200, 2026-11-27: exact gathers, SwiGLU equal to
//! the CPU's, the SmolLM2 forward 1.31x faster than with candle's ops; docs/kernels.md 8d;
//! `add_rms_norm` was written after that run and has not run on a GPU yet).
//! `LLM4DSR_DECODER_OPS=candle` gives a CUDA tensor candle's own ops instead
//! ([`Impl::CandleOps`], the chain the kernels replace), for comparison.
//! `benches/scoring_e2e.rs` checks the kernels against the CPU before timing.

use anyhow::{ensure, Result};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use half::{bf16, f16};

/// Which implementation serves a decoder op.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Impl {
    /// One custom op: a loop on the CPU, the `kernels/decoder_ops.cu` kernel on CUDA.
    Kernel,
    /// candle's own ops (index_select, transpose, contiguous, silu, mul).
    CandleOps,
}

impl Impl {
    /// The default for tensors on `dev`: the kernel; on CUDA candle's ops with
    /// `LLM4DSR_DECODER_OPS=candle`.
    pub fn for_device(dev: &candle_core::Device) -> Self {
        static ON_GPU: std::sync::OnceLock<Impl> = std::sync::OnceLock::new();
        if dev.is_cpu() {
            return Impl::Kernel;
        }
        *ON_GPU.get_or_init(|| match std::env::var("LLM4DSR_DECODER_OPS").as_deref() {
            Ok("candle") => Impl::CandleOps,
            _ => Impl::Kernel,
        })
    }
}

/// The CUDA kernels move 32-bit words: a 16-bit tensor whose first value or count is odd (never
/// made by the decoder, but a caller's view could be) takes candle's ops instead.
fn words_ok(t: &Tensor, values_per_row: usize) -> bool {
    let per_word = 4 / t.dtype().size_in_bytes().clamp(1, 4);
    t.device().is_cpu()
        || (t.layout().start_offset().is_multiple_of(per_word)
            && values_per_row.is_multiple_of(per_word)
            && t.elem_count().is_multiple_of(per_word))
}

/// `out[bi, h, j, :] = src[rows[bi * n + j], h, :]`: `src` `[P, heads, hd]`, `rows` u32
/// `[b * n]` (each < P). Returns `[b, heads, n, hd]` in `src`'s dtype.
pub fn gather_heads_first(src: &Tensor, rows: &Tensor, b: usize, n: usize) -> Result<Tensor> {
    gather_heads_first_with(src, rows, b, n, Impl::for_device(src.device()))
}

/// [`gather_heads_first`] with an explicit implementation.
pub fn gather_heads_first_with(
    src: &Tensor,
    rows: &Tensor,
    b: usize,
    n: usize,
    imp: Impl,
) -> Result<Tensor> {
    let (p, heads, hd) = src.dims3()?;
    ensure!(
        rows.dims() == [b * n] && rows.dtype() == DType::U32,
        "gather_heads_first: rows must be u32 [{}], got {:?} {:?}",
        b * n,
        rows.dtype(),
        rows.dims()
    );
    if imp == Impl::CandleOps || !words_ok(src, hd) {
        return Ok(src
            .index_select(rows, 0)?
            .reshape((b, n, heads, hd))?
            .transpose(1, 2)?
            .contiguous()?);
    }
    let op = Gather {
        dir: Direction::HeadsFirst,
        b,
        heads,
        n,
        hd,
        src_rows: p,
    };
    Ok(src.contiguous()?.apply_op2_no_bwd(rows, &op)?)
}

/// `out[t, h, :] = src[rows[t] / n, h, rows[t] % n, :]`: `src` `[b, heads, n, hd]`, `rows` u32
/// `[t]` (each < b * n). Returns `[t, heads, hd]`.
pub fn gather_token_major(src: &Tensor, rows: &Tensor) -> Result<Tensor> {
    gather_token_major_with(src, rows, Impl::for_device(src.device()))
}

/// [`gather_token_major`] with an explicit implementation.
pub fn gather_token_major_with(src: &Tensor, rows: &Tensor, imp: Impl) -> Result<Tensor> {
    let (b, heads, n, hd) = src.dims4()?;
    ensure!(
        rows.rank() == 1 && rows.dtype() == DType::U32,
        "gather_token_major: rows must be u32 [t], got {:?} {:?}",
        rows.dtype(),
        rows.dims()
    );
    if imp == Impl::CandleOps || !words_ok(src, hd) {
        return Ok(src
            .transpose(1, 2)?
            .reshape((b * n, heads, hd))?
            .index_select(rows, 0)?);
    }
    let op = Gather {
        dir: Direction::TokenMajor,
        b,
        heads,
        n,
        hd,
        src_rows: b * n,
    };
    Ok(src.contiguous()?.apply_op2_no_bwd(rows, &op)?)
}

/// `silu(gate) * up`, element-wise, same shape and dtype (computed in f32).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    swiglu_with(gate, up, Impl::for_device(gate.device()))
}

/// [`swiglu`] with an explicit implementation.
pub fn swiglu_with(gate: &Tensor, up: &Tensor, imp: Impl) -> Result<Tensor> {
    ensure!(
        gate.dims() == up.dims() && gate.dtype() == up.dtype(),
        "swiglu: gate {:?} {:?} and up {:?} {:?} differ",
        gate.dtype(),
        gate.dims(),
        up.dtype(),
        up.dims()
    );
    if imp == Impl::CandleOps || !words_ok(gate, 2) || !words_ok(up, 2) {
        return Ok((gate.silu()? * up)?);
    }
    Ok(gate
        .contiguous()?
        .apply_op2_no_bwd(&up.contiguous()?, &Swiglu)?)
}

/// The residual add and the RMSNorm after it, in one pass over the rows: `s = x + delta` (in
/// the dtype, as candle's add) and `n = s / sqrt(mean(s^2) + eps) * weight` over the last dim.
/// Returns `(s, n)`, each shaped like `x` (views of one `[2, ..]` buffer). `weight` is `[d]`.
/// On the CPU in f32 the values are bit for bit those of `x + delta` followed by candle-nn's
/// `rms_norm` (same expressions, same order); the CUDA kernel computes in f32 with one rounding
/// (as candle's rmsnorm kernel does), summing in another order.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    let d = x.dim(D::Minus1)?;
    ensure!(
        x.dims() == delta.dims() && x.dtype() == delta.dtype() && x.dtype() == weight.dtype(),
        "add_rms_norm: x {:?} {:?}, delta {:?} {:?} and weight {:?} must share dtype (and x, delta the shape)",
        x.dtype(),
        x.dims(),
        delta.dtype(),
        delta.dims(),
        weight.dtype()
    );
    ensure!(
        weight.dims() == [d],
        "add_rms_norm: weight {:?} for rows of {d}",
        weight.dims()
    );
    if !words_ok(x, d) || !words_ok(delta, d) || !words_ok(weight, d) {
        // A 16-bit view the word kernels cannot take (never made by the decoder): core ops.
        let s = (x + delta)?;
        let s32 = s.to_dtype(DType::F32)?;
        let ms = (s32.sqr()?.mean_keepdim(D::Minus1)? + eps as f64)?.sqrt()?;
        let n = s32
            .broadcast_div(&ms)?
            .broadcast_mul(&weight.to_dtype(DType::F32)?)?
            .to_dtype(x.dtype())?;
        return Ok((s, n));
    }
    let out = x.contiguous()?.apply_op3_no_bwd(
        &delta.contiguous()?,
        &weight.contiguous()?,
        &AddRmsNorm { d, eps },
    )?;
    Ok((out.get(0)?, out.get(1)?))
}

struct AddRmsNorm {
    d: usize,
    eps: f32,
}

impl AddRmsNorm {
    fn cpu<T: Copy + Send + Sync>(
        &self,
        x: &[T],
        delta: &[T],
        w: &[T],
        load: impl Fn(T) -> f32 + Sync,
        store: impl Fn(f32) -> T + Sync,
        zero: T,
    ) -> Vec<T> {
        use rayon::prelude::*;
        let d = self.d;
        let mut out = vec![zero; 2 * x.len()];
        let (sums, norms) = out.split_at_mut(x.len());
        sums.par_chunks_mut(d)
            .zip(norms.par_chunks_mut(d))
            .zip(x.par_chunks(d).zip(delta.par_chunks(d)))
            .for_each(|((so, no), (xr, dr))| {
                // candle-nn's CPU rms_norm, expression for expression: a left-to-right f32
                // sum of squares, m = sqrt(sum / d + eps), s / m * w.
                let mut sum2 = 0f32;
                for ((o, &a), &b) in so.iter_mut().zip(xr).zip(dr) {
                    *o = store(load(a) + load(b));
                    let v = load(*o);
                    sum2 += v * v;
                }
                let m = (sum2 / d as f32 + self.eps).sqrt();
                for ((o, &s), &a) in no.iter_mut().zip(so.iter()).zip(w) {
                    *o = store(load(s) / m * load(a));
                }
            });
        out
    }
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "llm4dsr-add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(w)) => {
                CpuStorage::F32(self.cpu(
                    contiguous(x, l1)?,
                    contiguous(y, l2)?,
                    contiguous(w, l3)?,
                    |v| v,
                    |v| v,
                    0f32,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(w)) => {
                // In f64 throughout (tests and references).
                let (x, y, w) = (contiguous(x, l1)?, contiguous(y, l2)?, contiguous(w, l3)?);
                let d = self.d;
                let s: Vec<f64> = x.iter().zip(y).map(|(a, b)| a + b).collect();
                let mut out = s.clone();
                for r in s.chunks(d) {
                    let m =
                        (r.iter().map(|v| v * v).sum::<f64>() / d as f64 + self.eps as f64).sqrt();
                    out.extend(r.iter().zip(w).map(|(v, a)| v / m * a));
                }
                CpuStorage::F64(out)
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(y), CpuStorage::BF16(w)) => {
                CpuStorage::BF16(self.cpu(
                    contiguous(x, l1)?,
                    contiguous(y, l2)?,
                    contiguous(w, l3)?,
                    bf16::to_f32,
                    bf16::from_f32,
                    bf16::ZERO,
                ))
            }
            (CpuStorage::F16(x), CpuStorage::F16(y), CpuStorage::F16(w)) => {
                CpuStorage::F16(self.cpu(
                    contiguous(x, l1)?,
                    contiguous(y, l2)?,
                    contiguous(w, l3)?,
                    f16::to_f32,
                    f16::from_f32,
                    f16::ZERO,
                ))
            }
            _ => candle_core::bail!("add_rms_norm: x, delta and weight must share a float dtype"),
        };
        Ok((out, two_of(l1.shape())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::add_rms_norm(self.d, self.eps, s1, l1, s2, l2, s3, l3)
    }
}

/// `[2, dims..]`: the two results of [`add_rms_norm`] in one buffer.
fn two_of(shape: &Shape) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(shape.dims());
    dims.into()
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum Direction {
    HeadsFirst,
    TokenMajor,
}

struct Gather {
    dir: Direction,
    b: usize,
    heads: usize,
    n: usize,
    hd: usize,
    /// Rows of the source a row index may name.
    src_rows: usize,
}

impl Gather {
    fn out_shape(&self, t: usize) -> Shape {
        match self.dir {
            Direction::HeadsFirst => (self.b, self.heads, self.n, self.hd).into(),
            Direction::TokenMajor => (t, self.heads, self.hd).into(),
        }
    }

    fn check_rows(&self, rows: &[u32]) -> candle_core::Result<()> {
        if let Some(r) = rows.iter().find(|&&r| r as usize >= self.src_rows) {
            candle_core::bail!(
                "gather: row {r} out of range (the source has {} rows)",
                self.src_rows
            );
        }
        Ok(())
    }

    fn cpu<T: Copy + Send + Sync + Default>(&self, src: &[T], rows: &[u32]) -> Vec<T> {
        use rayon::prelude::*;
        let (h, n, hd) = (self.heads, self.n, self.hd);
        match self.dir {
            Direction::HeadsFirst => {
                let mut out = vec![T::default(); self.b * h * n * hd];
                // One [n, hd] block per (batch entry, head).
                out.par_chunks_mut(n * hd)
                    .enumerate()
                    .for_each(|(bh, blk)| {
                        let (bi, hi) = (bh / h, bh % h);
                        for j in 0..n {
                            let r = rows[bi * n + j] as usize;
                            blk[j * hd..(j + 1) * hd]
                                .copy_from_slice(&src[(r * h + hi) * hd..(r * h + hi + 1) * hd]);
                        }
                    });
                out
            }
            Direction::TokenMajor => {
                let mut out = vec![T::default(); rows.len() * h * hd];
                out.par_chunks_mut(h * hd).enumerate().for_each(|(t, row)| {
                    let r = rows[t] as usize;
                    let (bi, j) = (r / n, r % n);
                    for hi in 0..h {
                        let at = ((bi * h + hi) * n + j) * hd;
                        row[hi * hd..(hi + 1) * hd].copy_from_slice(&src[at..at + hd]);
                    }
                });
                out
            }
        }
    }
}

/// The values a contiguous layout covers (the CPU side of the custom ops).
pub(crate) fn contiguous<'a, T>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("custom op: input not contiguous"),
    }
}

impl CustomOp2 for Gather {
    fn name(&self) -> &'static str {
        match self.dir {
            Direction::HeadsFirst => "llm4dsr-gather-heads-first",
            Direction::TokenMajor => "llm4dsr-gather-token-major",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::U32(rows) = s2 else {
            candle_core::bail!("gather: rows must be u32")
        };
        let rows = contiguous(rows, l2)?;
        self.check_rows(rows)?;
        let out = match s1 {
            CpuStorage::F32(v) => CpuStorage::F32(self.cpu(contiguous(v, l1)?, rows)),
            CpuStorage::F64(v) => CpuStorage::F64(self.cpu(contiguous(v, l1)?, rows)),
            CpuStorage::BF16(v) => CpuStorage::BF16(self.cpu(contiguous(v, l1)?, rows)),
            CpuStorage::F16(v) => CpuStorage::F16(self.cpu(contiguous(v, l1)?, rows)),
            CpuStorage::U32(v) => CpuStorage::U32(self.cpu(contiguous(v, l1)?, rows)),
            other => candle_core::bail!(
                "gather: dtype {:?}",
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        Ok((out, self.out_shape(l2.shape().elem_count())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::gather(self, s1, l1, s2, l2)
    }
}

struct Swiglu;

fn swiglu_cpu<T: Copy + Send + Sync + Default>(
    g: &[T],
    u: &[T],
    load: impl Fn(T) -> f32 + Sync,
    store: impl Fn(f32) -> T + Sync,
) -> Vec<T> {
    use rayon::prelude::*;
    // In chunks, so that e^-g runs through the vectorised exp (crate::cpu_math).
    const CHUNK: usize = 4096;
    let mut out = vec![T::default(); g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)))
        .for_each_init(
            || vec![0f32; CHUNK],
            |buf, (o, (g, u))| {
                let e = &mut buf[..g.len()];
                for (e, &g) in e.iter_mut().zip(g) {
                    *e = -load(g);
                }
                crate::cpu_math::exp_in_place(e);
                for ((o, &e), (&g, &u)) in o.iter_mut().zip(e.iter()).zip(g.iter().zip(u)) {
                    *o = store(load(g) / (1.0 + e) * load(u));
                }
            },
        );
    out
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "llm4dsr-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => CpuStorage::F32(swiglu_cpu(
                contiguous(g, l1)?,
                contiguous(u, l2)?,
                |x| x,
                |x| x,
            )),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => {
                let (g, u) = (contiguous(g, l1)?, contiguous(u, l2)?);
                CpuStorage::F64(
                    g.iter()
                        .zip(u)
                        .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                        .collect(),
                )
            }
            (CpuStorage::BF16(g), CpuStorage::BF16(u)) => CpuStorage::BF16(swiglu_cpu(
                contiguous(g, l1)?,
                contiguous(u, l2)?,
                bf16::to_f32,
                bf16::from_f32,
            )),
            (CpuStorage::F16(g), CpuStorage::F16(u)) => CpuStorage::F16(swiglu_cpu(
                contiguous(g, l1)?,
                contiguous(u, l2)?,
                f16::to_f32,
                f16::from_f32,
            )),
            _ => candle_core::bail!("swiglu: gate and up must be the same float dtype"),
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
        cuda::swiglu(s1, l1, s2, l2)
    }
}

#[cfg(feature = "candle-cuda")]
mod cuda {
    //! The kernels read and write 32-bit words (16-bit types in pairs): the buffers are passed
    //! as candle's typed slices, which the kernels see as `u32*`.
    use super::{Direction, Gather};
    use crate::candle_cuda::{func, grid_stride};
    use crate::sources::DECODER_OPS_CU;
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Shape};
    use half::{bf16, f16};

    const FILE: &str = "decoder_ops.cu";

    fn offsets(l: &Layout, per_word: usize) -> candle_core::Result<(usize, usize)> {
        let (a, b) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("decoder op: input not contiguous".into()))?;
        if a % per_word != 0 || (b - a) % per_word != 0 {
            candle_core::bail!("decoder op: range not aligned to 32-bit words");
        }
        Ok((a, b))
    }

    fn gather_t<T: CudaDType + DeviceRepr>(
        op: &Gather,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let esize = std::mem::size_of::<T>();
        if (op.hd * esize) % 4 != 0 {
            candle_core::bail!("gather: head_dim x element size must be a multiple of 4 bytes");
        }
        let (a, b) = offsets(l1, 4 / esize.min(4))?;
        let src = T::as_cuda_slice(s1)?.slice(a..b);
        let (ra, rb) = offsets(l2, 1)?;
        let rows = s2.as_cuda_slice::<u32>()?.slice(ra..rb);
        let t = rb - ra;
        let w = (op.hd * esize / 4) as u32;
        let (name, values, outer) = match op.dir {
            Direction::HeadsFirst => (
                "gather_heads_first_w32",
                op.b * op.heads * op.n * op.hd,
                op.b as u32,
            ),
            Direction::TokenMajor => ("gather_token_major_w32", t * op.heads * op.hd, t as u32),
        };
        let total = (values * esize / 4) as u64;
        let f = func(dev, FILE, DECODER_OPS_CU, name)?;
        // SAFETY: the kernel writes every word of the output.
        let dst = unsafe { dev.alloc::<T>(values)? };
        let (heads, n) = (op.heads as u32, op.n as u32);
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&src);
        bld.arg(&rows);
        bld.arg(&dst);
        bld.arg(&outer);
        bld.arg(&heads);
        bld.arg(&n);
        bld.arg(&w);
        // SAFETY: arguments match kernels/decoder_ops.cu.
        unsafe { bld.launch(grid_stride(total)) }.w()?;
        Ok((T::wrap_cuda_slice(dst, dev.clone()), op.out_shape(t)))
    }

    pub(super) fn gather(
        op: &Gather,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => gather_t::<f32>(op, s1, l1, s2, l2),
            DType::BF16 => gather_t::<bf16>(op, s1, l1, s2, l2),
            DType::F16 => gather_t::<f16>(op, s1, l1, s2, l2),
            DType::U32 => gather_t::<u32>(op, s1, l1, s2, l2),
            other => candle_core::bail!("gather: dtype {other:?} on CUDA"),
        }
    }

    fn swiglu_t<T: CudaDType + DeviceRepr>(
        name: &str,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let per_word = 4 / std::mem::size_of::<T>().min(4);
        let (a, b) = offsets(l1, per_word)?;
        let (c, d) = offsets(l2, per_word)?;
        let (g, u) = (
            T::as_cuda_slice(s1)?.slice(a..b),
            T::as_cuda_slice(s2)?.slice(c..d),
        );
        let numel = b - a;
        let count = (numel / per_word) as u64;
        let f = func(dev, FILE, DECODER_OPS_CU, name)?;
        // SAFETY: the kernel writes every word of the output.
        let dst = unsafe { dev.alloc::<T>(numel)? };
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&f);
        bld.arg(&g);
        bld.arg(&u);
        bld.arg(&dst);
        bld.arg(&count);
        // SAFETY: arguments match kernels/decoder_ops.cu.
        unsafe { bld.launch(grid_stride(count)) }.w()?;
        Ok((T::wrap_cuda_slice(dst, dev.clone()), l1.shape().clone()))
    }

    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm_t<T: CudaDType + DeviceRepr>(
        name: &str,
        d: usize,
        eps: f32,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = s1.device();
        let per_word = 4 / std::mem::size_of::<T>().min(4);
        if d % per_word != 0 {
            candle_core::bail!("add_rms_norm: rows of {d} values are not whole 32-bit words");
        }
        let (a, b) = offsets(l1, per_word)?;
        let (c, e) = offsets(l2, per_word)?;
        let (f, g) = offsets(l3, per_word)?;
        let (x, y, w) = (
            T::as_cuda_slice(s1)?.slice(a..b),
            T::as_cuda_slice(s2)?.slice(c..e),
            T::as_cuda_slice(s3)?.slice(f..g),
        );
        let numel = b - a;
        let rows = (numel / d) as u32;
        let func = func(dev, FILE, DECODER_OPS_CU, name)?;
        // SAFETY: the kernel writes every value of both halves of the output.
        let dst = unsafe { dev.alloc::<T>(2 * numel)? };
        let di = d as u32;
        let stream = dev.cuda_stream();
        let mut bld = stream.launch_builder(&func);
        bld.arg(&x);
        bld.arg(&y);
        bld.arg(&w);
        bld.arg(&dst);
        bld.arg(&rows);
        bld.arg(&di);
        bld.arg(&eps);
        let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (rows.div_ceil(8).max(1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: arguments match kernels/decoder_ops.cu (one warp per row, 8 rows a block).
        unsafe { bld.launch(cfg) }.w()?;
        Ok((
            T::wrap_cuda_slice(dst, dev.clone()),
            super::two_of(l1.shape()),
        ))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn add_rms_norm(
        d: usize,
        eps: f32,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => add_rms_norm_t::<f32>("add_rms_norm_f32", d, eps, s1, l1, s2, l2, s3, l3),
            DType::BF16 => {
                add_rms_norm_t::<bf16>("add_rms_norm_bf16", d, eps, s1, l1, s2, l2, s3, l3)
            }
            DType::F16 => add_rms_norm_t::<f16>("add_rms_norm_f16", d, eps, s1, l1, s2, l2, s3, l3),
            other => candle_core::bail!("add_rms_norm: dtype {other:?} on CUDA"),
        }
    }

    pub(super) fn swiglu(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        match s1.dtype() {
            DType::F32 => swiglu_t::<f32>("swiglu_f32", s1, l1, s2, l2),
            DType::BF16 => swiglu_t::<bf16>("swiglu_bf16", s1, l1, s2, l2),
            DType::F16 => swiglu_t::<f16>("swiglu_f16", s1, l1, s2, l2),
            other => candle_core::bail!("swiglu: dtype {other:?} on CUDA"),
        }
    }
}
