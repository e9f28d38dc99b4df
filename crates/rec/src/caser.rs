//! Caser (Tang & Wang 2018) in RecBole's form: the L x d embedding matrix of the recent items
//! goes through `nv` vertical filters (L x 1: weighted sums of the rows) and `nh` horizontal
//! filters of every height 1..=L (each max-pooled over time), then dropout, a dense layer to
//! d, concatenation with a user embedding, and a second dense layer; ReLU throughout.
//!
//! The horizontal convolutions are computed as ONE product of the embeddings with all filter
//! slices ([b*L, d] x [d, nh * L(L+1)/2]) followed by shifted sums: cheaper than L separate
//! convolutions at these sizes and built from ops that have a backward pass.
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
    /// All horizontal filter slices [d, nh * L(L+1)/2]: height h, row k at column block
    /// h(h-1)/2 + k.
    conv_h: Tensor,
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
        let slices = l * (l + 1) / 2;
        let conv_h = store.add(
            "conv_h.weight",
            &[d, cfg.nh * slices],
            Init::Uniform(1.0 / (d as f32).sqrt()),
        )?;
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
            let p = e.reshape((b * l, d))?.matmul(&self.conv_h)?.reshape((
                b,
                l,
                self.conv_h.dim(1)?,
            ))?;
            for hgt in 1..=l {
                let n_out = l - hgt + 1;
                let mut acc: Option<Tensor> = None;
                for k in 0..hgt {
                    let col = (hgt * (hgt - 1) / 2 + k) * nh;
                    let s = p.narrow(1, k, n_out)?.narrow(2, col, nh)?;
                    acc = Some(match acc {
                        None => s,
                        Some(a) => (a + s)?,
                    });
                }
                let bias = self.conv_h_bias.narrow(0, hgt - 1, 1)?; // [1, nh]
                let c = acc.unwrap().broadcast_add(&bias)?.relu()?;
                feats.push(c.max(D::Minus2)?); // [b, nh]
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
