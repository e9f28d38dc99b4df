//! GRU4Rec (Hidasi et al. 2016) in RecBole's form: item embedding -> dropout -> one GRU layer
//! (hidden 128) -> dense projection back to the embedding size, scored against the item
//! table. Inputs are left-padded; a padding step leaves the GRU state unchanged, so the
//! result equals running the GRU on the real items only (as RecBole's right-padded gather).
//!
//! Cost per instance: O(L * (3 * d * H + 3 * H^2)), sequential over the L slots.

use crate::batch::{Dropout, SeqBatch};
use crate::layers::{embed, Linear};
use crate::model::{Backbone, ModelConfig};
use crate::params::{Init, ParamStore};
use anyhow::Result;
use candle_core::{Device, Tensor};

pub struct Gru4rec {
    cfg: ModelConfig,
    item_emb: Tensor,
    /// Input-to-hidden, gates in PyTorch order (r, z, n): [d, 3H].
    ih: Linear,
    /// Hidden-to-hidden [H, 3H].
    hh: Linear,
    dense: Linear,
}

impl Gru4rec {
    pub fn new(cfg: &ModelConfig, num_items: u32, store: &mut ParamStore) -> Result<Self> {
        let (d, hd) = (cfg.dim, cfg.gru_hidden);
        let item_emb =
            store.add_embedding("item_emb", num_items as usize + 1, d, Init::XavierNormal)?;
        // RecBole: xavier-uniform GRU weights; bound sqrt(6 / (fan_in + fan_out)).
        let ih = Linear::new(
            store,
            "gru.ih",
            d,
            3 * hd,
            Init::Uniform((6.0 / (d + 3 * hd) as f32).sqrt()),
            true,
        )?;
        let hh = Linear::new(
            store,
            "gru.hh",
            hd,
            3 * hd,
            Init::Uniform((6.0 / (hd + 3 * hd) as f32).sqrt()),
            true,
        )?;
        let dense = Linear::new(store, "dense", hd, d, Init::XavierNormal, true)?;
        Ok(Self {
            cfg: cfg.clone(),
            item_emb,
            ih,
            hh,
            dense,
        })
    }
}

impl Backbone for Gru4rec {
    fn hidden(&self, batch: &SeqBatch, dropout: Option<&Dropout>) -> Result<Tensor> {
        let (b, l, hd) = (batch.b, batch.len, self.cfg.gru_hidden);
        let e = embed(&self.item_emb, &batch.ids)?;
        let e = match dropout {
            Some(dr) if self.cfg.dropout > 0.0 => Dropout {
                rate: self.cfg.dropout,
                ..*dr
            }
            .apply(&e, 0, &batch.instance_ids)?,
            _ => e,
        };
        let xi = self.ih.forward(&e)?; // [b, l, 3H]
        let mut h = Tensor::zeros((b, hd), candle_core::DType::F32, &Device::Cpu)?;
        let last_only = batch.last_slot_only();
        let mut states = Vec::with_capacity(if last_only { 0 } else { l });
        for t in 0..l {
            let m: Vec<f32> = (0..b).map(|r| batch.real[r * l + t]).collect();
            if m.iter().all(|&x| x == 0.0) {
                // All rows are padding here: the state stays (zero) as it is.
                if !last_only {
                    states.push(h.clone());
                }
                continue;
            }
            let xt = xi.narrow(1, t, 1)?.squeeze(1)?;
            let gh = self.hh.forward(&h)?;
            let r = candle_nn::ops::sigmoid(&(xt.narrow(1, 0, hd)? + gh.narrow(1, 0, hd)?)?)?;
            let z = candle_nn::ops::sigmoid(&(xt.narrow(1, hd, hd)? + gh.narrow(1, hd, hd)?)?)?;
            let n = (xt.narrow(1, 2 * hd, hd)? + (r * gh.narrow(1, 2 * hd, hd)?)?)?.tanh()?;
            let h_new = (&n + (z * (&h - &n)?)?)?;
            let mt = Tensor::from_vec(m, (b, 1), &Device::Cpu)?;
            h = (&h + (h_new - &h)?.broadcast_mul(&mt)?)?;
            if !last_only {
                states.push(h.clone());
            }
        }
        if last_only {
            return self.dense.forward(&h);
        }
        let all = Tensor::stack(&states, 1)?.reshape((b * l, hd))?;
        self.dense
            .forward(&all.index_select(&batch.target_slots, 0)?)
    }

    fn item_table(&self) -> &Tensor {
        &self.item_emb
    }
}
