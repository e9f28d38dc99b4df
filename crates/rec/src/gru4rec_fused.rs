//! GRU4Rec's training step with a hand-written forward pass and backpropagation through time
//! on flat f32 buffers: the fused CPU engine for GRU4Rec. `gru4rec.rs` (candle, autograd) is
//! the reference it is tested against (loss, every parameter's gradient and the hidden states,
//! with dropout, both losses, every target mode).
//!
//! Per chunk of instances: the input projection of every slot is one GEMM ([n, d] x [d, 3H]);
//! each time step is one [R, H] x [H, 3H] GEMM plus the gate loop, which keeps r, z, n, the
//! hidden-to-hidden n-part and the state before the step for the backward pass. A padding
//! step leaves a row's state unchanged, exactly as the candle model's masked update.
//!
//! Cost per instance: L (3 d H + 3 H^2) multiply-adds forward, about 3x that with the
//! backward pass, plus the output layer (see `fused::output_loss`).

use crate::batch::{Dropout, SeqBatch};

use crate::fused::{
    add_bias, add_col_sums, apply_mask, axpy, check_step, masks, matmul, output_loss, param_offset,
    sized, zeroed, ChunkWork, FusedLoss, Span,
};
use crate::model::{ModelConfig, ModelKind};
use crate::params::ParamStore;
use anyhow::{bail, Result};

/// The model's shape and where each parameter sits in the flat vector.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    d: usize,
    hd: usize,
    len: usize,
    rows: usize,
    dropout: f32,
    item_emb: usize,
    wih: usize,
    bih: usize,
    whh: usize,
    bhh: usize,
    wd: usize,
    bd: usize,
    numel: usize,
}

/// The layout of this model's parameters in the flat vector.
impl Layout {
    pub(crate) fn new(cfg: &ModelConfig, num_items: u32, params: &ParamStore) -> Result<Layout> {
        if cfg.kind != ModelKind::Gru4rec {
            bail!("the fused GRU4Rec engine cannot run {}", cfg.kind);
        }
        cfg.validate()?;
        let (d, hd) = (cfg.dim, cfg.gru_hidden);
        let rows = num_items as usize + 1;
        let at = |name: &str, shape: &[usize]| param_offset(params, "fused GRU4Rec", name, shape);
        let lay = Layout {
            d,
            hd,
            len: cfg.max_len,
            rows,
            dropout: cfg.dropout,
            item_emb: at("item_emb", &[rows, d])?,
            wih: at("gru.ih.weight", &[d, 3 * hd])?,
            bih: at("gru.ih.bias", &[3 * hd])?,
            whh: at("gru.hh.weight", &[hd, 3 * hd])?,
            bhh: at("gru.hh.bias", &[3 * hd])?,
            wd: at("dense.weight", &[hd, d])?,
            bd: at("dense.bias", &[d])?,
            numel: params.numel(),
        };
        Ok(lay)
    }
}

/// One chunk's buffers (reused from step to step).
#[derive(Default)]
pub(crate) struct Chunk {
    real: Vec<f32>,
    m0: Vec<f32>,
    /// Embeddings after dropout [n, d] and their input projections [n, 3H].
    e: Vec<f32>,
    xi: Vec<f32>,
    /// States: hs[t] is the state before step t ([L + 1][R][H]).
    hs: Vec<f32>,
    /// Per step [L][R][H]: reset and update gates, candidate, hidden-to-hidden n-part.
    r: Vec<f32>,
    z: Vec<f32>,
    n: Vec<f32>,
    ghn: Vec<f32>,
    /// Whether step t ran (some row has a real item there).
    active: Vec<bool>,
    gh: Vec<f32>,
    /// Target rows: (state index, instance row) and the states there [nt, H].
    tstate: Vec<(usize, usize)>,
    s: Vec<f32>,
    hid: Vec<f32>,
    logits: Vec<f32>,
    dhid: Vec<f32>,
    ds: Vec<f32>,
    dst: Vec<f32>,
    dh: Vec<f32>,
    dgh: Vec<f32>,
    dxi: Vec<f32>,
    de: Vec<f32>,
}

#[inline]
fn sigmoid(x: f32) -> f32 {
    // candle_nn::ops::sigmoid's expression.
    ((-x).exp() + 1.0).recip()
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
            "fused GRU4Rec",
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
        &self.hid
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
        let (d, hd, l) = (lay.d, lay.hd, lay.len);
        let h3 = 3 * hd;
        let r = span.r1 - span.r0;
        let n = r * l;
        let inst = &batch.instance_ids[span.r0..span.r1];
        let ids = &batch.ids_host[span.r0 * l..span.r1 * l];
        self.real.clear();
        self.real
            .extend_from_slice(&batch.real[span.r0 * l..span.r1 * l]);

        // ---- embedding (dropout), input projection of every slot
        sized(&mut self.e, n * d);
        for (i, &id) in ids.iter().enumerate() {
            let id = id as usize;
            self.e[i * d..(i + 1) * d]
                .copy_from_slice(&w[lay.item_emb + id * d..lay.item_emb + (id + 1) * d]);
        }
        masks(&mut self.m0, dropout, lay.dropout, 0, inst, l * d);
        apply_mask(&mut self.e, &self.m0);
        sized(&mut self.xi, n * h3);
        matmul(
            &mut self.xi,
            &self.e,
            false,
            &w[lay.wih..lay.wih + d * h3],
            false,
            n,
            h3,
            d,
            false,
        );
        add_bias(&mut self.xi, &w[lay.bih..lay.bih + h3]);

        // ---- the recurrence
        let rh = r * hd;
        zeroed(&mut self.hs, (l + 1) * rh);
        sized(&mut self.r, l * rh);
        sized(&mut self.z, l * rh);
        sized(&mut self.n, l * rh);
        sized(&mut self.ghn, l * rh);
        self.active.clear();
        sized(&mut self.gh, r * h3);
        let whh = &w[lay.whh..lay.whh + hd * h3];
        let bhh = &w[lay.bhh..lay.bhh + h3];
        for t in 0..l {
            let (before, after) = self.hs.split_at_mut((t + 1) * rh);
            let h = &before[t * rh..];
            let hn = &mut after[..rh];
            let active = (0..r).any(|ri| self.real[ri * l + t] > 0.0);
            self.active.push(active);
            if !active {
                hn.copy_from_slice(h);
                continue;
            }
            matmul(&mut self.gh, h, false, whh, false, r, h3, hd, false);
            for ri in 0..r {
                let m = self.real[ri * l + t];
                let x = &self.xi[(ri * l + t) * h3..(ri * l + t + 1) * h3];
                let g = &self.gh[ri * h3..(ri + 1) * h3];
                let o = t * rh + ri * hd;
                for j in 0..hd {
                    let rr = sigmoid(x[j] + (g[j] + bhh[j]));
                    let zz = sigmoid(x[hd + j] + (g[hd + j] + bhh[hd + j]));
                    let gn = g[2 * hd + j] + bhh[2 * hd + j];
                    let nn = (x[2 * hd + j] + rr * gn).tanh();
                    let hp = h[ri * hd + j];
                    let hnew = nn + zz * (hp - nn);
                    hn[ri * hd + j] = hp + (hnew - hp) * m;
                    self.r[o + j] = rr;
                    self.z[o + j] = zz;
                    self.n[o + j] = nn;
                    self.ghn[o + j] = gn;
                }
            }
        }

        // ---- the states at the target slots, projected back to the embedding size
        let nt = span.t1 - span.t0;
        self.tstate.clear();
        for t in span.t0..span.t1 {
            let local = batch.target_slots_host[t] as usize - span.r0 * l;
            self.tstate.push((local % l + 1, local / l));
        }
        sized(&mut self.s, nt * hd);
        for (t, &(si, ri)) in self.tstate.iter().enumerate() {
            let o = si * rh + ri * hd;
            self.s[t * hd..(t + 1) * hd].copy_from_slice(&self.hs[o..o + hd]);
        }
        sized(&mut self.hid, nt * d);
        matmul(
            &mut self.hid,
            &self.s,
            false,
            &w[lay.wd..lay.wd + hd * d],
            false,
            nt,
            d,
            hd,
            false,
        );
        add_bias(&mut self.hid, &w[lay.bd..lay.bd + d]);
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
            &self.hid,
            &mut self.logits,
            &mut self.dhid,
            &mut g[lay.item_emb..lay.item_emb + v * d],
        );

        // ---- dense layer
        matmul(
            &mut g[lay.wd..lay.wd + hd * d],
            &self.s,
            true,
            &self.dhid,
            false,
            hd,
            d,
            nt,
            true,
        );
        add_col_sums(&mut g[lay.bd..lay.bd + d], &self.dhid);
        sized(&mut self.ds, nt * hd);
        matmul(
            &mut self.ds,
            &self.dhid,
            false,
            &w[lay.wd..lay.wd + hd * d],
            true,
            nt,
            hd,
            d,
            false,
        );
        zeroed(&mut self.dst, (l + 1) * rh);
        for (t, &(si, ri)) in self.tstate.iter().enumerate() {
            let o = si * rh + ri * hd;
            axpy(
                1.0,
                &self.ds[t * hd..(t + 1) * hd],
                &mut self.dst[o..o + hd],
            );
        }

        // ---- backpropagation through time
        self.dh.clear();
        self.dh.extend_from_slice(&self.dst[l * rh..(l + 1) * rh]);
        zeroed(&mut self.dxi, n * h3);
        sized(&mut self.dgh, r * h3);
        for t in (0..l).rev() {
            if self.active[t] {
                for ri in 0..r {
                    let m = self.real[ri * l + t];
                    let o = t * rh + ri * hd;
                    let hp = &self.hs[o..o + hd]; // state before step t
                    let dx = &mut self.dxi[(ri * l + t) * h3..(ri * l + t + 1) * h3];
                    let dg = &mut self.dgh[ri * h3..(ri + 1) * h3];
                    for j in 0..hd {
                        let dh = self.dh[ri * hd + j];
                        // h' = h + (h_new - h) m ; h_new = n + z (h - n)
                        let dhnew = dh * m;
                        let (rr, zz, nn, gn) =
                            (self.r[o + j], self.z[o + j], self.n[o + j], self.ghn[o + j]);
                        let dnn = dhnew * (1.0 - zz);
                        let dzz = dhnew * (hp[j] - nn);
                        let dan = dnn * (1.0 - nn * nn);
                        let dar = dan * gn * rr * (1.0 - rr);
                        let daz = dzz * zz * (1.0 - zz);
                        dx[j] = dar;
                        dx[hd + j] = daz;
                        dx[2 * hd + j] = dan;
                        dg[j] = dar;
                        dg[hd + j] = daz;
                        dg[2 * hd + j] = dan * rr;
                        // what reaches the previous state directly
                        self.dh[ri * hd + j] = dh * (1.0 - m) + dhnew * zz;
                    }
                }
                let h = &self.hs[t * rh..(t + 1) * rh];
                matmul(
                    &mut g[lay.whh..lay.whh + hd * h3],
                    h,
                    true,
                    &self.dgh,
                    false,
                    hd,
                    h3,
                    r,
                    true,
                );
                add_col_sums(&mut g[lay.bhh..lay.bhh + h3], &self.dgh);
                matmul(&mut self.dh, &self.dgh, false, whh, true, r, hd, h3, true);
            }
            // The state before step t is the state after step t - 1: its targets' gradient.
            let o = t * rh;
            axpy(1.0, &self.dst[o..o + rh], &mut self.dh);
        }

        // ---- input projection and embedding
        matmul(
            &mut g[lay.wih..lay.wih + d * h3],
            &self.e,
            true,
            &self.dxi,
            false,
            d,
            h3,
            n,
            true,
        );
        add_col_sums(&mut g[lay.bih..lay.bih + h3], &self.dxi);
        sized(&mut self.de, n * d);
        matmul(
            &mut self.de,
            &self.dxi,
            false,
            &w[lay.wih..lay.wih + d * h3],
            true,
            n,
            d,
            h3,
            false,
        );
        apply_mask(&mut self.de, &self.m0);
        for (i, &id) in ids.iter().enumerate() {
            if self.real[i] == 0.0 {
                continue; // a padding slot's input never reaches the state: zero gradient
            }
            let id = id as usize;
            axpy(
                1.0,
                &self.de[i * d..(i + 1) * d],
                &mut g[lay.item_emb + id * d..lay.item_emb + (id + 1) * d],
            );
        }
        total
    }
}
