//! Caser's training step with a hand-written forward and backward pass on flat f32 buffers:
//! the fused CPU engine for Caser. `caser.rs` (candle, autograd) is the reference it is tested
//! against (loss, every parameter's gradient and the hidden states, with dropout, both
//! losses).
//!
//! The horizontal convolution of height h reads, for window position p, the h consecutive
//! embedding rows p..p+h of an instance: one contiguous h*d run of the [L, d] matrix, so the
//! unfold is a copy of runs, and each height is one GEMM ([R (L-h+1), h d] x [h d, nh]).
//! Max-pooling over positions sends the gradient to every position equal to the maximum
//! (candle's rule). The vertical filters (nv x L weights over the rows) are small loops.
//!
//! Cost per instance: sum over h of (L-h+1) h d nh multiply-adds for the horizontal filters,
//! nv L d for the vertical ones, (nv d + nh L) d + 2 d^2 for the dense layers; about 3x with
//! the backward pass, plus the output layer (`fused::output_loss`).

use crate::batch::{Dropout, SeqBatch};

use crate::fused::{
    add_bias, add_col_sums, apply_mask, axpy, check_step, linear, linear_backward_params, masks,
    matmul, output_loss, param_offset, sized, zeroed, ChunkWork, FusedLoss, Span,
};
use crate::model::{ModelConfig, ModelKind};
use crate::params::ParamStore;
use anyhow::{bail, Result};

#[derive(Clone, Debug)]
pub(crate) struct Layout {
    d: usize,
    len: usize,
    nv: usize,
    nh: usize,
    rows: usize,
    users: usize,
    dropout: f32,
    item_emb: usize,
    user_emb: usize,
    wv: usize,
    bv: usize,
    /// conv_h{h}.weight for h = 1..=len.
    wh: Vec<usize>,
    bh: usize,
    w1: usize,
    b1: usize,
    w2: usize,
    b2: usize,
    numel: usize,
}

impl Layout {
    /// Width of the feature vector: nv d vertical values, nh per height.
    fn feats(&self) -> usize {
        self.nv * self.d + self.nh * self.len
    }
}

/// The layout of this model's parameters in the flat vector.
impl Layout {
    pub(crate) fn new(
        cfg: &ModelConfig,
        num_items: u32,
        num_users: u32,
        params: &ParamStore,
    ) -> Result<Layout> {
        if cfg.kind != ModelKind::Caser {
            bail!("the fused Caser engine cannot run {}", cfg.kind);
        }
        cfg.validate()?;
        let (d, l, nv, nh) = (cfg.dim, cfg.max_len, cfg.nv, cfg.nh);
        let rows = num_items as usize + 1;
        let users = num_users as usize + 1;
        let at = |name: &str, shape: &[usize]| param_offset(params, "fused Caser", name, shape);
        let wh = (1..=l)
            .map(|h| at(&format!("conv_h{h}.weight"), &[h * d, nh]))
            .collect::<Result<Vec<_>>>()?;
        let feats = nv * d + nh * l;
        let lay = Layout {
            d,
            len: l,
            nv,
            nh,
            rows,
            users,
            dropout: cfg.dropout,
            item_emb: at("item_emb", &[rows, d])?,
            user_emb: at("user_emb", &[users, d])?,
            wv: at("conv_v.weight", &[nv, l])?,
            bv: at("conv_v.bias", &[nv, 1])?,
            wh,
            bh: at("conv_h.bias", &[l, nh])?,
            w1: at("fc1.weight", &[feats, d])?,
            b1: at("fc1.bias", &[d])?,
            w2: at("fc2.weight", &[2 * d, d])?,
            b2: at("fc2.bias", &[d])?,
            numel: params.numel(),
        };
        Ok(lay)
    }
}

/// One chunk's buffers (reused from step to step).
#[derive(Default)]
pub(crate) struct Chunk {
    /// Embeddings times the real mask [R, L, d].
    e: Vec<f32>,
    /// Per height: the unfolded rows [R (L-h+1), h d] and the convolution after ReLU.
    unf: Vec<Vec<f32>>,
    conv: Vec<Vec<f32>>,
    /// Pre-activation of each convolution (ReLU's backward reads its sign).
    pre: Vec<Vec<f32>>,
    /// Features [R, feats] (after dropout) and the dropout mask.
    feats: Vec<f32>,
    mf: Vec<f32>,
    /// fc1 pre-activation [R, d]; [z | u] [R, 2d]; fc2 pre-activation and output [R, d].
    y1: Vec<f32>,
    zu: Vec<f32>,
    y2: Vec<f32>,
    out: Vec<f32>,
    logits: Vec<f32>,
    dout: Vec<f32>,
    dzu: Vec<f32>,
    dy1: Vec<f32>,
    dfeats: Vec<f32>,
    dconv: Vec<f32>,
    dunf: Vec<f32>,
    de: Vec<f32>,
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
            "fused Caser",
            lay.numel,
            flat,
            grad_len,
            batch,
            lay.len,
            lay.rows,
            loss,
        )?;
        if !batch.last_slot_only() {
            bail!("Caser encodes a whole window and predicts only the next item: use targets `every-prefix` or `last`");
        }
        if let Some(&u) = batch.users_host.iter().find(|&&u| u as usize >= lay.users) {
            bail!(
                "fused Caser: user id {u} outside the {} users of the model",
                lay.users - 1
            );
        }
        Ok(())
    }

    fn hidden(&self) -> &[f32] {
        &self.out
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
        let (d, l, nv, nh) = (lay.d, lay.len, lay.nv, lay.nh);
        let r = span.r1 - span.r0;
        let nf = lay.feats();
        let inst = &batch.instance_ids[span.r0..span.r1];
        let ids = &batch.ids_host[span.r0 * l..span.r1 * l];
        let real = &batch.real[span.r0 * l..span.r1 * l];
        let users = &batch.users_host[span.r0..span.r1];

        // ---- embeddings (padding rows zeroed by the real mask)
        sized(&mut self.e, r * l * d);
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            let src = &w[lay.item_emb + id * d..lay.item_emb + (id + 1) * d];
            for (o, &v) in self.e[i * d..(i + 1) * d].iter_mut().zip(src) {
                *o = v * real[i];
            }
        }
        // ---- features: vertical filters, then each height's max-pooled convolution
        zeroed(&mut self.feats, r * nf);
        let wv = &w[lay.wv..lay.wv + nv * l];
        for ri in 0..r {
            for f in 0..nv {
                let out = &mut self.feats[ri * nf + f * d..ri * nf + (f + 1) * d];
                out.fill(w[lay.bv + f]);
                for s in 0..l {
                    let e = &self.e[(ri * l + s) * d..(ri * l + s + 1) * d];
                    axpy(wv[f * l + s], e, out);
                }
            }
        }
        self.unf.resize_with(l, Vec::new);
        self.conv.resize_with(l, Vec::new);
        self.pre.resize_with(l, Vec::new);
        for h in 1..=l {
            let n_out = l - h + 1;
            let unf = &mut self.unf[h - 1];
            sized(unf, r * n_out * h * d);
            for ri in 0..r {
                for p in 0..n_out {
                    let src = &self.e[(ri * l + p) * d..(ri * l + p + h) * d];
                    unf[(ri * n_out + p) * h * d..(ri * n_out + p + 1) * h * d]
                        .copy_from_slice(src);
                }
            }
            let pre = &mut self.pre[h - 1];
            sized(pre, r * n_out * nh);
            matmul(
                pre,
                unf,
                false,
                &w[lay.wh[h - 1]..lay.wh[h - 1] + h * d * nh],
                false,
                r * n_out,
                nh,
                h * d,
                false,
            );
            add_bias(pre, &w[lay.bh + (h - 1) * nh..lay.bh + h * nh]);
            let conv = &mut self.conv[h - 1];
            sized(conv, r * n_out * nh);
            for (c, &p) in conv.iter_mut().zip(pre.iter()) {
                *c = p.max(0.0);
            }
            let col = nv * d + (h - 1) * nh;
            for ri in 0..r {
                let pooled = &mut self.feats[ri * nf + col..ri * nf + col + nh];
                pooled.copy_from_slice(&conv[ri * n_out * nh..(ri * n_out + 1) * nh]);
                for p in 1..n_out {
                    let row = &conv[(ri * n_out + p) * nh..(ri * n_out + p + 1) * nh];
                    for (a, &b) in pooled.iter_mut().zip(row) {
                        *a = a.max(b);
                    }
                }
            }
        }
        masks(&mut self.mf, dropout, lay.dropout, 0, inst, nf);
        apply_mask(&mut self.feats, &self.mf);
        // ---- dense layers: z = relu(fc1(feats)); out = relu(fc2([z | u]))
        sized(&mut self.y1, r * d);
        linear(&mut self.y1, &self.feats, w, lay.w1, lay.b1, r, nf, d);
        sized(&mut self.zu, r * 2 * d);
        for (ri, &u) in users.iter().enumerate() {
            let u = u as usize;
            let zu = &mut self.zu[ri * 2 * d..(ri + 1) * 2 * d];
            for (o, &y) in zu[..d].iter_mut().zip(&self.y1[ri * d..(ri + 1) * d]) {
                *o = y.max(0.0);
            }
            zu[d..].copy_from_slice(&w[lay.user_emb + u * d..lay.user_emb + (u + 1) * d]);
        }
        sized(&mut self.y2, r * d);
        linear(&mut self.y2, &self.zu, w, lay.w2, lay.b2, r, 2 * d, d);
        sized(&mut self.out, r * d);
        for (o, &y) in self.out.iter_mut().zip(&self.y2) {
            *o = y.max(0.0);
        }
        let Some(g) = grad else {
            return 0.0;
        };

        // ---- loss
        let v = lay.rows;
        let total = output_loss(
            loss,
            span,
            &batch.targets[span.t0..span.t1],
            &w[lay.item_emb..lay.item_emb + v * d],
            v,
            d,
            &self.out,
            &mut self.logits,
            &mut self.dout,
            &mut g[lay.item_emb..lay.item_emb + v * d],
        );
        // ---- fc2 and the user embedding (ReLU passes where the pre-activation is >= 0)
        for (dv, &y) in self.dout.iter_mut().zip(&self.y2) {
            if y < 0.0 {
                *dv = 0.0;
            }
        }
        linear_backward_params(g, lay.w2, lay.b2, &self.zu, &self.dout, r, 2 * d, d);
        sized(&mut self.dzu, r * 2 * d);
        matmul(
            &mut self.dzu,
            &self.dout,
            false,
            &w[lay.w2..lay.w2 + 2 * d * d],
            true,
            r,
            2 * d,
            d,
            false,
        );
        sized(&mut self.dy1, r * d);
        for (ri, &u) in users.iter().enumerate() {
            let u = u as usize;
            let dzu = &self.dzu[ri * 2 * d..(ri + 1) * 2 * d];
            axpy(
                1.0,
                &dzu[d..],
                &mut g[lay.user_emb + u * d..lay.user_emb + (u + 1) * d],
            );
            let (y1, dy1) = (
                &self.y1[ri * d..(ri + 1) * d],
                &mut self.dy1[ri * d..(ri + 1) * d],
            );
            for ((o, &y), &dz) in dy1.iter_mut().zip(y1).zip(&dzu[..d]) {
                *o = if y < 0.0 { 0.0 } else { dz };
            }
        }
        // ---- fc1
        linear_backward_params(g, lay.w1, lay.b1, &self.feats, &self.dy1, r, nf, d);
        sized(&mut self.dfeats, r * nf);
        matmul(
            &mut self.dfeats,
            &self.dy1,
            false,
            &w[lay.w1..lay.w1 + nf * d],
            true,
            r,
            nf,
            d,
            false,
        );
        apply_mask(&mut self.dfeats, &self.mf);
        // ---- vertical filters
        zeroed(&mut self.de, r * l * d);
        for ri in 0..r {
            for f in 0..nv {
                let dvf = &self.dfeats[ri * nf + f * d..ri * nf + (f + 1) * d];
                g[lay.bv + f] += dvf.iter().sum::<f32>();
                for s in 0..l {
                    let row = (ri * l + s) * d;
                    let e = &self.e[row..row + d];
                    g[lay.wv + f * l + s] += crate::fused::dot(dvf, e);
                    axpy(w[lay.wv + f * l + s], dvf, &mut self.de[row..row + d]);
                }
            }
        }
        // ---- horizontal filters: pooled -> every maximal position -> ReLU -> GEMM
        for h in 1..=l {
            let n_out = l - h + 1;
            let col = nv * d + (h - 1) * nh;
            let (conv, pre) = (&self.conv[h - 1], &self.pre[h - 1]);
            zeroed(&mut self.dconv, r * n_out * nh);
            for ri in 0..r {
                for f in 0..nh {
                    let dp = self.dfeats[ri * nf + col + f];
                    if dp == 0.0 {
                        continue;
                    }
                    let mut mx = f32::NEG_INFINITY;
                    for p in 0..n_out {
                        mx = mx.max(conv[(ri * n_out + p) * nh + f]);
                    }
                    // The max-pool's gradient goes to its first argmax only, as PyTorch's
                    // max_pool1d (and the candle engine's argmax + gather) route it. Equal
                    // windows are common (left padding, repeated items); sending it to each
                    // would multiply it by their number.
                    let p = (0..n_out)
                        .find(|&p| conv[(ri * n_out + p) * nh + f] == mx)
                        .expect("a maximum among the positions");
                    let k = (ri * n_out + p) * nh + f;
                    if pre[k] >= 0.0 {
                        self.dconv[k] = dp;
                    }
                }
            }
            add_col_sums(&mut g[lay.bh + (h - 1) * nh..lay.bh + h * nh], &self.dconv);
            let wo = lay.wh[h - 1];
            matmul(
                &mut g[wo..wo + h * d * nh],
                &self.unf[h - 1],
                true,
                &self.dconv,
                false,
                h * d,
                nh,
                r * n_out,
                true,
            );
            sized(&mut self.dunf, r * n_out * h * d);
            matmul(
                &mut self.dunf,
                &self.dconv,
                false,
                &w[wo..wo + h * d * nh],
                true,
                r * n_out,
                h * d,
                nh,
                false,
            );
            for ri in 0..r {
                for p in 0..n_out {
                    let src = &self.dunf[(ri * n_out + p) * h * d..(ri * n_out + p + 1) * h * d];
                    axpy(
                        1.0,
                        src,
                        &mut self.de[(ri * l + p) * d..(ri * l + p + h) * d],
                    );
                }
            }
        }
        // ---- embeddings
        for (i, &id) in ids.iter().enumerate() {
            if real[i] == 0.0 {
                continue;
            }
            let id = id as usize;
            axpy(
                real[i],
                &self.de[i * d..(i + 1) * d],
                &mut g[lay.item_emb + id * d..lay.item_emb + (id + 1) * d],
            );
        }
        total
    }
}
