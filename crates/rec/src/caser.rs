//! Caser (Tang & Wang 2018) in RecBole's form: the L x d embedding matrix of the recent items
//! goes through `nv` vertical filters (L x 1: weighted sums of the rows) and `nh` horizontal
//! filters of every height 1..=L (each max-pooled over time), then dropout, a dense layer to
//! d, concatenation with a user embedding, and a second dense layer; ReLU throughout.
//!
//! A horizontal convolution of height h is an unfold (the h shifted views of the embedding
//! matrix side by side: [b, L-h+1, h*d]) times its filters [h*d, nh]: one product per height,
//! built from ops that have a backward pass, and cheaper than slicing one big product (whose
//! slices each cost a full-size zero-padded gradient in the backward pass).
//! Caser encodes a whole window, so it predicts only the item after the last slot.

use crate::batch::{Dropout, SeqBatch};
use crate::layers::{embed, Linear};
use crate::model::{Backbone, ModelConfig};
use crate::params::{Init, ParamStore};
use anyhow::{bail, Result};
use candle_core::{Tensor, D};

pub struct Caser {
    cfg: ModelConfig,
    item_emb: Tensor,
    user_emb: Tensor,
    /// Vertical filters [nv, L] and bias [nv, 1].
    conv_v: Tensor,
    conv_v_bias: Tensor,
    /// Horizontal filters of height h = index + 1: [h*d, nh] (row block k = slot offset k).
    conv_h: Vec<Tensor>,
    /// Horizontal biases [L, nh] (one row per height).
    conv_h_bias: Tensor,
    fc1: Linear,
    fc2: Linear,
}

impl Caser {
    pub fn new(
        cfg: &ModelConfig,
        num_items: u32,
        num_users: u32,
        store: &mut ParamStore,
    ) -> Result<Self> {
        let (d, l) = (cfg.dim, cfg.max_len);
        let emb_init = Init::Normal(1.0 / d as f32);
        let item_emb = store.add_embedding("item_emb", num_items as usize + 1, d, emb_init)?;
        let user_emb = store.add_embedding("user_emb", num_users as usize + 1, d, emb_init)?;
        let conv_v = store.add(
            "conv_v.weight",
            &[cfg.nv, l],
            Init::Uniform(1.0 / (l as f32).sqrt()),
        )?;
        let conv_v_bias = store.add("conv_v.bias", &[cfg.nv, 1], Init::Zeros)?;
        let mut conv_h = Vec::with_capacity(l);
        for h in 1..=l {
            let bound = 1.0 / ((h * d) as f32).sqrt();
            conv_h.push(store.add(
                &format!("conv_h{h}.weight"),
                &[h * d, cfg.nh],
                Init::Uniform(bound),
            )?);
        }
        let conv_h_bias = store.add("conv_h.bias", &[l, cfg.nh], Init::Zeros)?;
        let fc1_in = cfg.nv * d + cfg.nh * l;
        let fc1 = Linear::new(store, "fc1", fc1_in, d, Init::Normal(0.01), true)?;
        let fc2 = Linear::new(store, "fc2", 2 * d, d, Init::Normal(0.01), true)?;
        Ok(Self {
            cfg: cfg.clone(),
            item_emb,
            user_emb,
            conv_v,
            conv_v_bias,
            conv_h,
            conv_h_bias,
            fc1,
            fc2,
        })
    }
}

impl Backbone for Caser {
    fn hidden(&self, batch: &SeqBatch, dropout: Option<&Dropout>) -> Result<Tensor> {
        if !batch.last_slot_only() {
            bail!("Caser encodes a whole window and predicts only the next item: use targets `every-prefix` or `last`");
        }
        let (b, l, d) = (batch.b, batch.len, self.cfg.dim);
        let (nv, nh) = (self.cfg.nv, self.cfg.nh);
        let real = batch.real_mask(&[b, l, 1])?;
        let e = embed(&self.item_emb, &batch.ids)?.broadcast_mul(&real)?; // [b, l, d]
        let mut feats = Vec::with_capacity(l + 1);
        if nv > 0 {
            let v = self
                .conv_v
                .broadcast_matmul(&e)?
                .broadcast_add(&self.conv_v_bias)?; // [b, nv, d]
            feats.push(v.reshape((b, nv * d))?);
        }
        if nh > 0 {
            for hgt in 1..=l {
                let n_out = l - hgt + 1;
                let views: Vec<Tensor> = (0..hgt)
                    .map(|k| e.narrow(1, k, n_out))
                    .collect::<candle_core::Result<_>>()?;
                let unfolded = if hgt == 1 {
                    views[0].clone()
                } else {
                    Tensor::cat(&views, 2)?
                }; // [b, n_out, h*d]
                let c = unfolded
                    .reshape((b * n_out, hgt * d))?
                    .matmul(&self.conv_h[hgt - 1])?
                    .reshape((b, n_out, nh))?;
                let bias = self.conv_h_bias.narrow(0, hgt - 1, 1)?; // [1, nh]
                let c = c.broadcast_add(&bias)?.relu()?;
                // Max-pool over time as argmax + gather, so that the gradient goes to the
                // first maximal position only (PyTorch's max_pool1d); candle's `max` sends it
                // to every position equal to the maximum, and equal windows are common here
                // (left padding, repeated items).
                let at = c.argmax_keepdim(D::Minus2)?; // [b, 1, nh], the first maximum
                feats.push(c.gather(&at, D::Minus2)?.squeeze(D::Minus2)?); // [b, nh]
            }
        }
        let out = Tensor::cat(&feats, 1)?;
        let out = match dropout {
            Some(dr) if self.cfg.dropout > 0.0 => Dropout {
                rate: self.cfg.dropout,
                ..*dr
            }
            .apply(&out, 0, &batch.instance_ids)?,
            _ => out,
        };
        let z = self.fc1.forward(&out)?.relu()?;
        let u = embed(&self.user_emb, &batch.users)?;
        self.fc2
            .forward(&Tensor::cat(&[z, u], 1)?)?
            .relu()
            .map_err(Into::into)
    }

    fn item_table(&self) -> &Tensor {
        &self.item_emb
    }
}
