//! SASRec (Kang & McAuley 2018) as in the LLM4DSR reference code: item embeddings scaled by
//! sqrt(d) plus learned absolute position embeddings (one per input slot; inputs are
//! left-padded so the newest item always sits in the last slot), pre-LN causal self-attention
//! blocks with a point-wise feed-forward, dropout, a final layer norm, and the item embedding
//! table reused as the output layer. Padding never serves as a key and its outputs are zeroed.
//!
//! Cost per instance: O(blocks * (L * d^2 + L^2 * d + L * d * inner)); the output product
//! against the catalogue (done by the loss or the evaluator) dominates for large catalogues.

use crate::batch::{Dropout, SeqBatch};
use crate::layers::{embed, softmax_last, LayerNorm, Linear};
use crate::model::{Backbone, ModelConfig};
use crate::params::{Init, ParamStore};
use anyhow::Result;
use candle_core::{Device, Tensor};

struct Block {
    ln_attn: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln_ffn: LayerNorm,
    ff1: Linear,
    ff2: Linear,
}

pub struct Sasrec {
    cfg: ModelConfig,
    item_emb: Tensor,
    pos_emb: Tensor,
    blocks: Vec<Block>,
    ln_final: LayerNorm,
}

// Dropout sites (key the masks): 0 embedding; per block 1 + 5b .. 5 + 5b.
const SITE_EMB: u64 = 0;

impl Sasrec {
    pub fn new(cfg: &ModelConfig, num_items: u32, store: &mut ParamStore) -> Result<Self> {
        let d = cfg.dim;
        let init = Init::Normal(0.02);
        let item_emb = store.add_embedding("item_emb", num_items as usize + 1, d, init)?;
        let pos_emb = store.add("pos_emb", &[cfg.max_len, d], init)?;
        let mut blocks = Vec::new();
        for b in 0..cfg.blocks {
            let p = format!("block{b}");
            blocks.push(Block {
                ln_attn: LayerNorm::new(store, &format!("{p}.ln_attn"), d, 1e-8)?,
                q: Linear::new(store, &format!("{p}.q"), d, d, init, true)?,
                k: Linear::new(store, &format!("{p}.k"), d, d, init, true)?,
                v: Linear::new(store, &format!("{p}.v"), d, d, init, true)?,
                o: Linear::new(store, &format!("{p}.o"), d, d, init, true)?,
                ln_ffn: LayerNorm::new(store, &format!("{p}.ln_ffn"), d, 1e-8)?,
                ff1: Linear::new(store, &format!("{p}.ff1"), d, cfg.inner, init, true)?,
                ff2: Linear::new(store, &format!("{p}.ff2"), cfg.inner, d, init, true)?,
            });
        }
        let ln_final = LayerNorm::new(store, "ln_final", d, 1e-8)?;
        Ok(Self {
            cfg: cfg.clone(),
            item_emb,
            pos_emb,
            blocks,
            ln_final,
        })
    }

    /// Additive attention bias [b, 1, L, L]: 0 where key j <= query i and j is a real item,
    /// -1e9 elsewhere (a finite value keeps all-padding rows free of NaN).
    fn attn_bias(batch: &SeqBatch) -> Result<Tensor> {
        let (b, l) = (batch.b, batch.len);
        let mut v = vec![-1e9f32; b * l * l];
        for r in 0..b {
            for i in 0..l {
                for j in 0..=i {
                    if batch.real[r * l + j] > 0.0 {
                        v[(r * l + i) * l + j] = 0.0;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(v, (b, 1, l, l), &Device::Cpu)?)
    }

    fn drop(
        &self,
        x: &Tensor,
        site: u64,
        rate: f32,
        dropout: Option<&Dropout>,
        ids: &[u64],
    ) -> Result<Tensor> {
        match dropout {
            Some(dr) if rate > 0.0 => Dropout { rate, ..*dr }.apply(x, site, ids),
            _ => Ok(x.clone()),
        }
    }
}

impl Backbone for Sasrec {
    fn hidden(&self, batch: &SeqBatch, dropout: Option<&Dropout>) -> Result<Tensor> {
        let (b, l, d) = (batch.b, batch.len, self.cfg.dim);
        let h = self.cfg.heads;
        let dh = d / h;
        let ids = &batch.instance_ids;
        let p = self.cfg.dropout;
        let real = batch.real_mask(&[b, l, 1])?;
        let bias = Self::attn_bias(batch)?;
        let x = (embed(&self.item_emb, &batch.ids)? * (d as f64).sqrt())?;
        let x = x.broadcast_add(&self.pos_emb)?;
        let x = self.drop(&x, SITE_EMB, p, dropout, ids)?;
        let mut x = x.broadcast_mul(&real)?;
        let scale = 1.0 / (dh as f64).sqrt();
        // With one target per row at the last slot (every-prefix / last), the last block only
        // needs the last slot's query: keys and values still span all slots, but its query
        // projection, attention output and feed-forward shrink by a factor L.
        let last_only = batch.last_slot_only();
        let split = |t: Tensor, q: usize| -> Result<Tensor> {
            Ok(if h == 1 {
                t.reshape((b, 1, q, d))?
            } else {
                t.reshape((b, q, h, dh))?.transpose(1, 2)?.contiguous()?
            })
        };
        let merge = |t: Tensor, q: usize| -> Result<Tensor> {
            Ok(if h == 1 {
                t.reshape((b, q, d))?
            } else {
                t.transpose(1, 2)?.contiguous()?.reshape((b, q, d))?
            })
        };
        let n_blocks = self.blocks.len();
        for (bi, blk) in self.blocks.iter().enumerate() {
            let site = 1 + 5 * bi as u64;
            let hn = blk.ln_attn.forward(&x)?;
            let k = split(blk.k.forward(&hn)?, l)?;
            let v = split(blk.v.forward(&hn)?, l)?;
            let (nq, hq, xq, bias_q, real_q) = if last_only && bi + 1 == n_blocks {
                (
                    1,
                    hn.narrow(1, l - 1, 1)?,
                    x.narrow(1, l - 1, 1)?,
                    bias.narrow(2, l - 1, 1)?,
                    real.narrow(1, l - 1, 1)?,
                )
            } else {
                (l, hn, x.clone(), bias.clone(), real.clone())
            };
            let q = split(blk.q.forward(&hq)?, nq)?;
            let s = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias_q)?;
            let a = softmax_last(&s)?;
            let a = self.drop(&a, site, self.cfg.attn_dropout, dropout, ids)?;
            let o = merge(a.matmul(&v)?, nq)?;
            let o = self.drop(&blk.o.forward(&o)?, site + 1, p, dropout, ids)?;
            let y = (xq + o)?;
            let hn = blk.ln_ffn.forward(&y)?;
            let f = blk.ff1.forward(&hn)?;
            let f = if self.cfg.act == "gelu" {
                f.gelu_erf()?
            } else {
                f.relu()?
            };
            let f = self.drop(&f, site + 2, p, dropout, ids)?;
            let f = self.drop(&blk.ff2.forward(&f)?, site + 3, p, dropout, ids)?;
            x = (y + f)?.broadcast_mul(&real_q)?;
        }
        let rows = x.dim(1)?;
        if rows == 1 {
            // Already one row per target, in target order.
            return self.ln_final.forward(&x.reshape((b, d))?);
        }
        // Layer norm is per row: gather the target slots first.
        let x = x
            .reshape((b * l, d))?
            .index_select(&batch.target_slots, 0)?;
        self.ln_final.forward(&x)
    }

    fn item_table(&self) -> &Tensor {
        &self.item_emb
    }
}
