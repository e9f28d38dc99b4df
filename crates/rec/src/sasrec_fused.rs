//! SASRec's training step with a hand-written forward and backward pass on flat f32 buffers:
//! the fast CPU engine. `sasrec.rs` (candle, autograd) is the reference it is tested against
//! (`tests/rec.rs`: losses and every parameter's gradient agree to float tolerance, for both
//! shapes, both losses and every target mode, with dropout on).
//!
//! Why a second implementation: candle allocates a fresh tensor for every op and runs
//! element-wise work through its generic strided kernels, so for SASRec's small matrices
//! (rows of 64 values, 10-slot attention) the framework costs more than the arithmetic (a
//! profile: element-wise/broadcast/copy ~30%, fresh-buffer memsets 5%, gemm only 25%). Here
//! every matrix product is one call of the `gemm` crate (candle's own CPU GEMM) on
//! preallocated buffers, layer norm, attention, activation and dropout are single loops
//! that keep what the backward pass needs, and nothing is allocated after the first step.
//!
//! Parallelism: a batch is cut into fixed chunks of [`crate::fused::CHUNK`] instances; chunks run on the
//! rayon pool, each with its own activations and gradient buffer, and the chunk gradients
//! are summed in chunk order. The result is therefore the same for any number of threads.
//! Dropout masks come from the same keyed draws as the candle model's
//! ([`Dropout::fill_row`]), so the two engines compute the same function.
//!
//! Cost per instance (RecBole shape d 64, inner 256, 2 blocks, 10 slots, the last block
//! reduced to the target slot): ~1.3 MFLOP forward, ~3x that with the backward pass, plus
//! 6 d V FLOPs for the full-softmax output layer over V items.

use crate::batch::{Dropout, SeqBatch};

use crate::fused::{
    apply_mask, axpy, check_step, dot, linear, linear_backward_params, masks, matmul, output_loss,
    param_offset, sized, zeroed, ChunkWork, FusedLoss, Span, NEG_BIAS,
};
use crate::model::{ModelConfig, ModelKind};
use crate::params::ParamStore;
use anyhow::{bail, Result};

const SITE_EMB: u64 = 0;

/// Offsets of one block's parameters in the flat vector.
#[derive(Clone, Debug)]
struct BlockAt {
    ln1_g: usize,
    ln1_b: usize,
    wq: usize,
    bq: usize,
    wk: usize,
    bk: usize,
    wv: usize,
    bv: usize,
    wo: usize,
    bo: usize,
    ln2_g: usize,
    ln2_b: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
}

/// The model's shape and where each parameter sits in the flat vector.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    d: usize,
    heads: usize,
    inner: usize,
    len: usize,
    /// Rows of the item table (items + 1, row 0 = padding).
    rows: usize,
    gelu: bool,
    dropout: f32,
    attn_dropout: f32,
    eps: f32,
    item_emb: usize,
    pos_emb: usize,
    blocks: Vec<BlockAt>,
    lnf_g: usize,
    lnf_b: usize,
    numel: usize,
}

/// The layout of this model's parameters in the flat vector.
impl Layout {
    pub(crate) fn new(cfg: &ModelConfig, num_items: u32, params: &ParamStore) -> Result<Layout> {
        if cfg.kind != ModelKind::Sasrec {
            bail!("the fused SASRec engine cannot run {}", cfg.kind);
        }
        cfg.validate()?;
        let (d, inner, l) = (cfg.dim, cfg.inner, cfg.max_len);
        let rows = num_items as usize + 1;
        let at = |name: &str, shape: &[usize]| param_offset(params, "fused SASRec", name, shape);
        let mut blocks = Vec::new();
        for b in 0..cfg.blocks {
            let p = format!("block{b}");
            let n = |s: &str| format!("{p}.{s}");
            blocks.push(BlockAt {
                ln1_g: at(&n("ln_attn.weight"), &[d])?,
                ln1_b: at(&n("ln_attn.bias"), &[d])?,
                wq: at(&n("q.weight"), &[d, d])?,
                bq: at(&n("q.bias"), &[d])?,
                wk: at(&n("k.weight"), &[d, d])?,
                bk: at(&n("k.bias"), &[d])?,
                wv: at(&n("v.weight"), &[d, d])?,
                bv: at(&n("v.bias"), &[d])?,
                wo: at(&n("o.weight"), &[d, d])?,
                bo: at(&n("o.bias"), &[d])?,
                ln2_g: at(&n("ln_ffn.weight"), &[d])?,
                ln2_b: at(&n("ln_ffn.bias"), &[d])?,
                w1: at(&n("ff1.weight"), &[d, inner])?,
                b1: at(&n("ff1.bias"), &[inner])?,
                w2: at(&n("ff2.weight"), &[inner, d])?,
                b2: at(&n("ff2.bias"), &[d])?,
            });
        }
        let lay = Layout {
            d,
            heads: cfg.heads,
            inner,
            len: l,
            rows,
            gelu: cfg.act == "gelu",
            dropout: cfg.dropout,
            attn_dropout: cfg.attn_dropout,
            eps: 1e-8,
            item_emb: at("item_emb", &[rows, d])?,
            pos_emb: at("pos_emb", &[l, d])?,
            blocks,
            lnf_g: at("ln_final.weight", &[d])?,
            lnf_b: at("ln_final.bias", &[d])?,
            numel: params.numel(),
        };
        Ok(lay)
    }
}

/// What one block keeps from its forward pass for the backward pass.
#[derive(Default)]
struct BlockActs {
    /// Queries per instance: `len`, or 1 when only the last slot is needed.
    nqp: usize,
    xhat1: Vec<f32>,
    rstd1: Vec<f32>,
    hn: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    hq: Vec<f32>,
    q: Vec<f32>,
    /// Softmax probabilities [R][H][nqp][L] (before dropout), and the dropout mask.
    a: Vec<f32>,
    ma: Vec<f32>,
    o: Vec<f32>,
    mo: Vec<f32>,
    xhat2: Vec<f32>,
    rstd2: Vec<f32>,
    hn2: Vec<f32>,
    f1: Vec<f32>,
    /// GELU only: Phi(f1), the normal CDF (the backward pass reuses it).
    cdf: Vec<f32>,
    actd: Vec<f32>,
    mf: Vec<f32>,
    mf2: Vec<f32>,
}

/// One chunk's buffers (reused from step to step).
#[derive(Default)]
pub(crate) struct Chunk {
    ids: Vec<u32>,
    real: Vec<f32>,
    m0: Vec<f32>,
    blocks: Vec<BlockActs>,
    x: Vec<f32>,
    y: Vec<f32>,
    /// Final rows (gathered at the target slots), their layer norm and output.
    tslot: Vec<usize>,
    xhatf: Vec<f32>,
    rstdf: Vec<f32>,
    hf: Vec<f32>,
    logits: Vec<f32>,
    // Backward scratch.
    dx: Vec<f32>,
    dy: Vec<f32>,
    dh: Vec<f32>,
    dt: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    dhf: Vec<f32>,
}

impl ChunkWork for Chunk {
    type Layout = Layout;

    fn check(
        lay: &Layout,
        flat: &[f32],
        grad_len: usize,
        batch: &SeqBatch,
        loss: FusedLoss,
    ) -> Result<()> {
        check_step(
            "fused SASRec",
            lay.numel,
            flat,
            grad_len,
            batch,
            lay.len,
            lay.rows,
            loss,
        )
    }

    fn hidden(&self) -> &[f32] {
        &self.hf
    }

    fn step(
        &mut self,
        lay: &Layout,
        w: &[f32],
        batch: &SeqBatch,
        span: &Span,
        dropout: Option<&Dropout>,
        loss: FusedLoss,
        grad: Option<&mut [f32]>,
    ) -> f64 {
        let last_only = batch.last_slot_only();
        let (d, l, h) = (lay.d, lay.len, lay.heads);
        let dh = d / h;
        let r = span.r1 - span.r0;
        let n = r * l;
        let inst = &batch.instance_ids[span.r0..span.r1];
        self.ids.clear();
        self.ids
            .extend_from_slice(&batch.ids_host[span.r0 * l..span.r1 * l]);
        self.real.clear();
        self.real
            .extend_from_slice(&batch.real[span.r0 * l..span.r1 * l]);

        // ---- embedding: x = drop(E[id] * sqrt(d) + P[slot]) * real
        let s = (d as f64).sqrt() as f32;
        sized(&mut self.x, n * d);
        for i in 0..n {
            let id = self.ids[i] as usize;
            let e = &w[lay.item_emb + id * d..lay.item_emb + (id + 1) * d];
            let p = &w[lay.pos_emb + (i % l) * d..lay.pos_emb + (i % l + 1) * d];
            for c in 0..d {
                self.x[i * d + c] = e[c] * s + p[c];
            }
        }
        masks(&mut self.m0, dropout, lay.dropout, SITE_EMB, inst, l * d);
        apply_mask(&mut self.x, &self.m0);
        for i in 0..n {
            let re = self.real[i];
            self.x[i * d..(i + 1) * d].iter_mut().for_each(|v| *v *= re);
        }

        // ---- blocks
        let nb = lay.blocks.len();
        if self.blocks.len() < nb {
            self.blocks.resize_with(nb, BlockActs::default);
        }
        let scale = 1.0 / (dh as f32).sqrt();
        for (bi, at) in lay.blocks.iter().enumerate() {
            let site = 1 + 5 * bi as u64;
            let ba = &mut self.blocks[bi];
            let nqp = if last_only && bi + 1 == nb { 1 } else { l };
            ba.nqp = nqp;
            let nq = r * nqp;
            // Full row of query row qr.
            let qrow = |qr: usize| -> usize {
                if nqp == 1 {
                    qr * l + l - 1
                } else {
                    qr
                }
            };
            sized(&mut ba.xhat1, n * d);
            sized(&mut ba.rstd1, n);
            sized(&mut ba.hn, n * d);
            ln_forward(
                &self.x,
                &w[at.ln1_g..at.ln1_g + d],
                &w[at.ln1_b..at.ln1_b + d],
                lay.eps,
                d,
                &mut ba.xhat1,
                &mut ba.rstd1,
                &mut ba.hn,
            );
            sized(&mut ba.k, n * d);
            sized(&mut ba.v, n * d);
            linear(&mut ba.k, &ba.hn, w, at.wk, at.bk, n, d, d);
            linear(&mut ba.v, &ba.hn, w, at.wv, at.bv, n, d, d);
            sized(&mut ba.hq, nq * d);
            for qr in 0..nq {
                let f = qrow(qr);
                ba.hq[qr * d..(qr + 1) * d].copy_from_slice(&ba.hn[f * d..(f + 1) * d]);
            }
            sized(&mut ba.q, nq * d);
            linear(&mut ba.q, &ba.hq, w, at.wq, at.bq, nq, d, d);
            // attention
            sized(&mut ba.a, r * h * nqp * l);
            masks(
                &mut ba.ma,
                dropout,
                lay.attn_dropout,
                site,
                inst,
                h * nqp * l,
            );
            zeroed(&mut ba.o, nq * d);
            for ri in 0..r {
                for hh in 0..h {
                    for qi in 0..nqp {
                        let slot = if nqp == 1 { l - 1 } else { qi };
                        let qr = ri * nqp + qi;
                        let qv = &ba.q[qr * d + hh * dh..qr * d + (hh + 1) * dh];
                        let ao = ((ri * h + hh) * nqp + qi) * l;
                        let arow = &mut ba.a[ao..ao + l];
                        let mut mx = f32::NEG_INFINITY;
                        for (j, av) in arow.iter_mut().enumerate() {
                            let kr = ri * l + j;
                            let kv = &ba.k[kr * d + hh * dh..kr * d + (hh + 1) * dh];
                            let bias = if j <= slot && self.real[kr] > 0.0 {
                                0.0
                            } else {
                                NEG_BIAS
                            };
                            *av = dot(qv, kv) * scale + bias;
                            mx = mx.max(*av);
                        }
                        let mut sum = 0.0;
                        for av in arow.iter_mut() {
                            *av = (*av - mx).exp();
                            sum += *av;
                        }
                        for av in arow.iter_mut() {
                            *av /= sum;
                        }
                        let orow = &mut ba.o[qr * d + hh * dh..qr * d + (hh + 1) * dh];
                        for (j, &a) in arow.iter().enumerate() {
                            let mut p = a;
                            if !ba.ma.is_empty() {
                                p *= ba.ma[ao + j];
                            }
                            if p != 0.0 {
                                let kr = ri * l + j;
                                axpy(p, &ba.v[kr * d + hh * dh..kr * d + (hh + 1) * dh], orow);
                            }
                        }
                    }
                }
            }
            // y = x_q + drop(O Wo + bo)
            sized(&mut self.y, nq * d);
            linear(&mut self.y, &ba.o, w, at.wo, at.bo, nq, d, d);
            masks(&mut ba.mo, dropout, lay.dropout, site + 1, inst, nqp * d);
            apply_mask(&mut self.y, &ba.mo);
            for qr in 0..nq {
                let f = qrow(qr);
                for c in 0..d {
                    self.y[qr * d + c] += self.x[f * d + c];
                }
            }
            // feed-forward
            sized(&mut ba.xhat2, nq * d);
            sized(&mut ba.rstd2, nq);
            sized(&mut ba.hn2, nq * d);
            ln_forward(
                &self.y,
                &w[at.ln2_g..at.ln2_g + d],
                &w[at.ln2_b..at.ln2_b + d],
                lay.eps,
                d,
                &mut ba.xhat2,
                &mut ba.rstd2,
                &mut ba.hn2,
            );
            let inner = lay.inner;
            sized(&mut ba.f1, nq * inner);
            linear(&mut ba.f1, &ba.hn2, w, at.w1, at.b1, nq, d, inner);
            sized(&mut ba.actd, nq * inner);
            if lay.gelu {
                // Keep Phi(x) for the backward pass (one erf per value instead of two).
                sized(&mut ba.cdf, nq * inner);
                for ((a, c), &f) in ba.actd.iter_mut().zip(ba.cdf.iter_mut()).zip(&ba.f1) {
                    *c = gelu_cdf(f);
                    *a = *c * f;
                }
            } else {
                for (a, &f) in ba.actd.iter_mut().zip(&ba.f1) {
                    *a = f.max(0.0);
                }
            }
            masks(
                &mut ba.mf,
                dropout,
                lay.dropout,
                site + 2,
                inst,
                nqp * inner,
            );
            apply_mask(&mut ba.actd, &ba.mf);
            // x_out = (y + drop(actd W2 + b2)) * real_q   (reuses x as the output buffer)
            let mut f2 = std::mem::take(&mut self.dt);
            sized(&mut f2, nq * d);
            linear(&mut f2, &ba.actd, w, at.w2, at.b2, nq, inner, d);
            masks(&mut ba.mf2, dropout, lay.dropout, site + 3, inst, nqp * d);
            apply_mask(&mut f2, &ba.mf2);
            sized(&mut self.x, nq * d);
            for qr in 0..nq {
                let re = self.real[qrow(qr)];
                for c in 0..d {
                    self.x[qr * d + c] = (self.y[qr * d + c] + f2[qr * d + c]) * re;
                }
            }
            self.x.truncate(nq * d);
            self.dt = f2;
        }

        // ---- final layer norm at the target slots
        let nt = span.t1 - span.t0;
        let rows_out = self.x.len() / d;
        self.tslot.clear();
        for t in span.t0..span.t1 {
            let local = batch.target_slots_host[t] as usize - span.r0 * l;
            self.tslot
                .push(if rows_out == r { local / l } else { local });
        }
        let mut xf = std::mem::take(&mut self.dy);
        sized(&mut xf, nt * d);
        for (t, &sl) in self.tslot.iter().enumerate() {
            xf[t * d..(t + 1) * d].copy_from_slice(&self.x[sl * d..(sl + 1) * d]);
        }
        sized(&mut self.xhatf, nt * d);
        sized(&mut self.rstdf, nt);
        sized(&mut self.hf, nt * d);
        ln_forward(
            &xf,
            &w[lay.lnf_g..lay.lnf_g + d],
            &w[lay.lnf_b..lay.lnf_b + d],
            lay.eps,
            d,
            &mut self.xhatf,
            &mut self.rstdf,
            &mut self.hf,
        );
        self.dy = xf;
        let Some(g) = grad else {
            return 0.0;
        };

        // ---- loss and its gradient w.r.t. the final hidden states
        let v = lay.rows;
        let total = output_loss(
            loss,
            span,
            &batch.targets[span.t0..span.t1],
            &w[lay.item_emb..lay.item_emb + v * d],
            v,
            d,
            &self.hf,
            &mut self.logits,
            &mut self.dhf,
            &mut g[lay.item_emb..lay.item_emb + v * d],
        );

        // ---- final layer norm backward, scattered to the last block's output rows
        zeroed(&mut self.dx, rows_out * d);
        let mut dxf = std::mem::take(&mut self.dq);
        zeroed(&mut dxf, nt * d);
        let (rs, xh) = (&self.rstdf, &self.xhatf);
        ln_backward(&self.dhf, xh, rs, w, g, lay.lnf_g, lay.lnf_b, d, &mut dxf);
        for (t, &sl) in self.tslot.iter().enumerate() {
            axpy(
                1.0,
                &dxf[t * d..(t + 1) * d],
                &mut self.dx[sl * d..(sl + 1) * d],
            );
        }
        self.dq = dxf;

        // ---- blocks, last to first. self.dx holds d(block output) [nq, d].
        for bi in (0..nb).rev() {
            let at = &lay.blocks[bi];
            let ba = &self.blocks[bi];
            let nqp = ba.nqp;
            let nq = r * nqp;
            let qrow = |qr: usize| -> usize {
                if nqp == 1 {
                    qr * l + l - 1
                } else {
                    qr
                }
            };
            let inner = lay.inner;
            // x_out = (y + f2d) * real_q
            for qr in 0..nq {
                let re = self.real[qrow(qr)];
                self.dx[qr * d..(qr + 1) * d]
                    .iter_mut()
                    .for_each(|v| *v *= re);
            }
            // dy starts as the residual; df2 = dx * mf2
            let mut dy = std::mem::take(&mut self.dy);
            dy.clear();
            dy.extend_from_slice(&self.dx);
            let mut df2 = std::mem::take(&mut self.dt);
            df2.clear();
            df2.extend_from_slice(&self.dx);
            apply_mask(&mut df2, &ba.mf2);
            // ff2: dW2 += actd^T df2, db2 += sum df2, dactd = df2 W2^T
            linear_backward_params(g, at.w2, at.b2, &ba.actd, &df2, nq, inner, d);
            let mut dact = std::mem::take(&mut self.dh);
            sized(&mut dact, nq * inner);
            matmul(
                &mut dact,
                &df2,
                false,
                &w[at.w2..at.w2 + inner * d],
                true,
                nq,
                inner,
                d,
                false,
            );
            apply_mask(&mut dact, &ba.mf);
            if lay.gelu {
                for ((a, &f), &c) in dact.iter_mut().zip(&ba.f1).zip(&ba.cdf) {
                    *a *= c + GELU_PDF0 * (-0.5 * f * f).exp() * f;
                }
            } else {
                for (a, &f) in dact.iter_mut().zip(&ba.f1) {
                    if f < 0.0 {
                        *a = 0.0;
                    }
                }
            }
            // ff1: dW1 += hn2^T df1, dhn2 = df1 W1^T
            linear_backward_params(g, at.w1, at.b1, &ba.hn2, &dact, nq, d, inner);
            sized(&mut df2, nq * d); // reuse as dhn2
            matmul(
                &mut df2,
                &dact,
                false,
                &w[at.w1..at.w1 + d * inner],
                true,
                nq,
                d,
                inner,
                false,
            );
            ln_backward(
                &df2, &ba.xhat2, &ba.rstd2, w, g, at.ln2_g, at.ln2_b, d, &mut dy,
            );
            // y = x_q + drop(O Wo + bo): d(x_q) = dy; dO2 = dy * mo
            let mut dxin = std::mem::take(&mut self.dk);
            zeroed(&mut dxin, n * d);
            for qr in 0..nq {
                let f = qrow(qr);
                dxin[f * d..(f + 1) * d].copy_from_slice(&dy[qr * d..(qr + 1) * d]);
            }
            apply_mask(&mut dy, &ba.mo);
            linear_backward_params(g, at.wo, at.bo, &ba.o, &dy, nq, d, d);
            let mut do_ = df2; // dO [nq, d]
            matmul(
                &mut do_,
                &dy,
                false,
                &w[at.wo..at.wo + d * d],
                true,
                nq,
                d,
                d,
                false,
            );
            // attention backward
            let mut dq = std::mem::take(&mut self.dq);
            zeroed(&mut dq, nq * d);
            let mut dk = std::mem::take(&mut self.dv);
            zeroed(&mut dk, n * d);
            let mut dv = dact; // reuse
            zeroed(&mut dv, n * d);
            let mut da = [0f32; 64];
            let mut da_v: Vec<f32>;
            let dabuf: &mut [f32] = if l <= 64 {
                &mut da[..l]
            } else {
                da_v = vec![0f32; l];
                &mut da_v
            };
            for ri in 0..r {
                for qi in 0..nqp {
                    let qr = ri * nqp + qi;
                    if self.real[qrow(qr)] == 0.0 {
                        continue; // a padding query's output is zeroed: no gradient flows
                    }
                    for hh in 0..h {
                        let ao = ((ri * h + hh) * nqp + qi) * l;
                        let arow = &ba.a[ao..ao + l];
                        let dorow = &do_[qr * d + hh * dh..qr * d + (hh + 1) * dh];
                        let mut sum = 0f32;
                        for j in 0..l {
                            if arow[j] == 0.0 {
                                dabuf[j] = 0.0;
                                continue;
                            }
                            let kr = ri * l + j;
                            let m = if ba.ma.is_empty() { 1.0 } else { ba.ma[ao + j] };
                            let vrow = kr * d + hh * dh;
                            // dAd_j = dO . V_j ; dV_j += Ad_j dO
                            let dad = dot(dorow, &ba.v[vrow..vrow + dh]);
                            if m != 0.0 {
                                axpy(arow[j] * m, dorow, &mut dv[vrow..vrow + dh]);
                            }
                            dabuf[j] = dad * m;
                            sum += arow[j] * dabuf[j];
                        }
                        let qv = qr * d + hh * dh;
                        for j in 0..l {
                            if arow[j] == 0.0 {
                                continue;
                            }
                            let ds = arow[j] * (dabuf[j] - sum) * scale;
                            let kr = ri * l + j;
                            let krow = kr * d + hh * dh;
                            axpy(ds, &ba.k[krow..krow + dh], &mut dq[qv..qv + dh]);
                            axpy(ds, &ba.q[qv..qv + dh], &mut dk[krow..krow + dh]);
                        }
                    }
                }
            }
            // projections back to the layer-normed input
            linear_backward_params(g, at.wq, at.bq, &ba.hq, &dq, nq, d, d);
            linear_backward_params(g, at.wk, at.bk, &ba.hn, &dk, n, d, d);
            linear_backward_params(g, at.wv, at.bv, &ba.hn, &dv, n, d, d);
            let mut dhn = do_;
            sized(&mut dhn, n * d);
            matmul(
                &mut dhn,
                &dk,
                false,
                &w[at.wk..at.wk + d * d],
                true,
                n,
                d,
                d,
                false,
            );
            matmul(
                &mut dhn,
                &dv,
                false,
                &w[at.wv..at.wv + d * d],
                true,
                n,
                d,
                d,
                true,
            );
            // dhq: rows of dhn at the query rows
            let mut dhq = dk; // reuse [nq, d]
            sized(&mut dhq, nq * d);
            matmul(
                &mut dhq,
                &dq,
                false,
                &w[at.wq..at.wq + d * d],
                true,
                nq,
                d,
                d,
                false,
            );
            for qr in 0..nq {
                let f = qrow(qr);
                axpy(
                    1.0,
                    &dhq[qr * d..(qr + 1) * d],
                    &mut dhn[f * d..(f + 1) * d],
                );
            }
            ln_backward(
                &dhn, &ba.xhat1, &ba.rstd1, w, g, at.ln1_g, at.ln1_b, d, &mut dxin,
            );
            // Hand the block input's gradient on; park the scratch buffers.
            std::mem::swap(&mut self.dx, &mut dxin);
            self.dk = dhq;
            self.dv = dxin;
            self.dq = dq;
            self.dh = dv;
            self.dt = dhn;
            self.dy = dy;
        }

        // ---- embedding backward: x = (E[id] s + P[slot]) * m0 * real
        apply_mask(&mut self.dx, &self.m0);
        for i in 0..n {
            let re = self.real[i];
            if re == 0.0 {
                continue;
            }
            let slot = i % l;
            let id = self.ids[i] as usize;
            let dxi = &self.dx[i * d..(i + 1) * d];
            axpy(
                re,
                dxi,
                &mut g[lay.pos_emb + slot * d..lay.pos_emb + (slot + 1) * d],
            );
            axpy(
                re * s,
                dxi,
                &mut g[lay.item_emb + id * d..lay.item_emb + (id + 1) * d],
            );
        }
        total
    }
}

/// Two disjoint d-long parameter gradient slices (layer-norm gamma and beta).
fn two(g: &mut [f32], a: usize, b: usize, d: usize) -> (&mut [f32], &mut [f32]) {
    assert!(a + d <= b, "layer-norm weight must precede its bias");
    let (lo, hi) = g.split_at_mut(b);
    (&mut lo[a..a + d], &mut hi[..d])
}

/// 1 / sqrt(2 pi): phi(x) = GELU_PDF0 exp(-x^2 / 2).
const GELU_PDF0: f32 = 0.398_942_3;

/// Phi(x) = (1 + erf(x / sqrt 2)) / 2, with candle's erf (so gelu(x) = x Phi(x) equals
/// candle's `gelu_erf`: the same operations in the same order).
#[inline]
fn gelu_cdf(x: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5
}

#[cfg(test)]
fn gelu(x: f32) -> f32 {
    (candle_core::cpu::erf::erf_f32(x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * x
}

/// d/dx x Phi(x) = Phi(x) + x phi(x).
#[cfg(test)]
fn gelu_grad(x: f32) -> f32 {
    gelu_cdf(x) + GELU_PDF0 * (-0.5 * x * x).exp() * x
}

/// Layer norm over rows of `d` values, keeping x-hat and 1/std for the backward pass.
#[allow(clippy::too_many_arguments)]
fn ln_forward(
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
    d: usize,
    xhat: &mut [f32],
    rstd: &mut [f32],
    out: &mut [f32],
) {
    let inv_d = 1.0 / d as f32;
    for (i, row) in x.chunks_exact(d).enumerate() {
        let mean = row.iter().sum::<f32>() * inv_d;
        let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() * inv_d;
        let rs = 1.0 / (var + eps).sqrt();
        rstd[i] = rs;
        let xh = &mut xhat[i * d..(i + 1) * d];
        let o = &mut out[i * d..(i + 1) * d];
        for c in 0..d {
            xh[c] = (row[c] - mean) * rs;
            o[c] = xh[c] * gamma[c] + beta[c];
        }
    }
}

/// Layer-norm backward for the norm whose gamma and beta sit at offsets `og`, `ob` of the
/// flat vector: accumulates their gradients into `g` and the input's gradient into `dx`.
#[allow(clippy::too_many_arguments)]
fn ln_backward(
    dy: &[f32],
    xhat: &[f32],
    rstd: &[f32],
    w: &[f32],
    g: &mut [f32],
    og: usize,
    ob: usize,
    d: usize,
    dx: &mut [f32],
) {
    let gamma = &w[og..og + d];
    let (dgamma, dbeta) = two(g, og, ob, d);
    let inv_d = 1.0 / d as f32;
    for (i, dyr) in dy.chunks_exact(d).enumerate() {
        let xh = &xhat[i * d..(i + 1) * d];
        let mut m1 = 0f32;
        let mut m2 = 0f32;
        for c in 0..d {
            let g = dyr[c] * gamma[c];
            m1 += g;
            m2 += g * xh[c];
            dgamma[c] += dyr[c] * xh[c];
            dbeta[c] += dyr[c];
        }
        m1 *= inv_d;
        m2 *= inv_d;
        let rs = rstd[i];
        let o = &mut dx[i * d..(i + 1) * d];
        for c in 0..d {
            o[c] += rs * (dyr[c] * gamma[c] - m1 - xh[c] * m2);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_norm_backward_matches_finite_differences() {
        let d = 6;
        let x: Vec<f32> = (0..d).map(|i| (i as f32 * 0.7).sin() * 2.0).collect();
        let gamma: Vec<f32> = (0..d).map(|i| 1.0 + 0.1 * i as f32).collect();
        let beta = vec![0.3f32; d];
        let up: Vec<f32> = (0..d).map(|i| (i as f32 * 1.3).cos()).collect();
        let f = |x: &[f32]| -> f64 {
            let (mut xh, mut rs, mut o) = (vec![0.0; d], vec![0.0; 1], vec![0.0; d]);
            ln_forward(x, &gamma, &beta, 1e-8, d, &mut xh, &mut rs, &mut o);
            o.iter()
                .zip(&up)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum()
        };
        let (mut xh, mut rs, mut o) = (vec![0.0; d], vec![0.0; 1], vec![0.0; d]);
        ln_forward(&x, &gamma, &beta, 1e-8, d, &mut xh, &mut rs, &mut o);
        // Flat layout [gamma | beta]; dx accumulates onto 0.5.
        let w: Vec<f32> = gamma.iter().chain(&beta).copied().collect();
        let mut g = vec![0f32; 2 * d];
        let mut dx = vec![0.5f32; d];
        ln_backward(&up, &xh, &rs, &w, &mut g, 0, d, d, &mut dx);
        dx.iter_mut().for_each(|v| *v -= 0.5);
        for c in 0..d {
            let mut xp = x.clone();
            xp[c] += 1e-3;
            let mut xm = x.clone();
            xm[c] -= 1e-3;
            let num = (f(&xp) - f(&xm)) / 2e-3;
            assert!((num - dx[c] as f64).abs() < 2e-3, "{c}: {num} vs {}", dx[c]);
        }
    }

    #[test]
    fn gelu_grad_matches_finite_differences() {
        for &x in &[-3.0f32, -1.0, -0.2, 0.0, 0.4, 1.5, 4.0] {
            let num = (gelu(x + 1e-3) as f64 - gelu(x - 1e-3) as f64) / 2e-3;
            assert!((num - gelu_grad(x) as f64).abs() < 1e-3, "{x}");
        }
    }
}
