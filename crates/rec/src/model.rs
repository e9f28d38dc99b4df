//! What a backbone is to the rest of the crate: a function from a [`SeqBatch`] to one hidden
//! vector per target slot, scored against the (shared) item embedding table. The three
//! architectures live in `sasrec.rs`, `gru4rec.rs` and `caser.rs`; [`Recommender`] owns the
//! parameters and the chosen architecture, and is what training, evaluation and checkpoints
//! handle.

use crate::batch::{Dropout, SeqBatch};
use crate::params::ParamStore;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};

/// The backbone architecture.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// Self-attentive (Transformer) next-item model (Kang & McAuley 2018).
    Sasrec,
    /// GRU over the item sequence (Hidasi et al. 2016).
    Gru4rec,
    /// Horizontal and vertical convolutions over the sequence's embedding matrix (Tang & Wang
    /// 2018).
    Caser,
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ModelKind::Sasrec => "sasrec",
            ModelKind::Gru4rec => "gru4rec",
            ModelKind::Caser => "caser",
        })
    }
}

/// Every shape and rate of a backbone (fields another kind ignores keep their defaults).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// Item embedding size (= the hidden size of SASRec and the output size of all three).
    pub dim: usize,
    /// Input slots: the most recent `max_len` history items are used.
    pub max_len: usize,
    /// Dropout rate (embeddings and hidden layers).
    pub dropout: f32,
    /// SASRec: attention-probability dropout.
    pub attn_dropout: f32,
    /// SASRec: transformer blocks.
    pub blocks: usize,
    /// SASRec: attention heads (dim must be divisible).
    pub heads: usize,
    /// SASRec: point-wise feed-forward inner size.
    pub inner: usize,
    /// SASRec: feed-forward activation, "relu" or "gelu".
    pub act: String,
    /// GRU4Rec: GRU hidden size.
    pub gru_hidden: usize,
    /// Caser: vertical filters.
    pub nv: usize,
    /// Caser: horizontal filters per height (heights 1..=max_len).
    pub nh: usize,
}

impl ModelConfig {
    /// Defaults: SASRec as the LLM4DSR reference (64, 2 blocks, 1 head, dropout 0.5, ReLU
    /// feed-forward of width 64); GRU4Rec and Caser as RecBole's defaults.
    pub fn defaults(kind: ModelKind) -> Self {
        let base = ModelConfig {
            kind,
            dim: 64,
            max_len: 10,
            dropout: 0.5,
            attn_dropout: 0.5,
            blocks: 2,
            heads: 1,
            inner: 64,
            act: "relu".into(),
            gru_hidden: 128,
            nv: 4,
            nh: 16,
        };
        match kind {
            ModelKind::Sasrec => base,
            ModelKind::Gru4rec => ModelConfig {
                dropout: 0.3,
                ..base
            },
            ModelKind::Caser => ModelConfig {
                dropout: 0.4,
                ..base
            },
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.dim == 0 || self.max_len == 0 {
            bail!("model: dim and max_len must be positive");
        }
        if !(0.0..1.0).contains(&self.dropout) || !(0.0..1.0).contains(&self.attn_dropout) {
            bail!("model: dropout rates must be in [0, 1)");
        }
        if self.kind == ModelKind::Sasrec
            && (self.heads == 0 || !self.dim.is_multiple_of(self.heads))
        {
            bail!(
                "model: dim {} is not divisible by heads {}",
                self.dim,
                self.heads
            );
        }
        if self.act != "relu" && self.act != "gelu" {
            bail!("model: act must be `relu` or `gelu`, not `{}`", self.act);
        }
        Ok(())
    }
}

/// A sequence encoder: hidden states at the batch's target slots.
pub trait Backbone: Send + Sync {
    /// [n_targets, dim]. `dropout` is Some in training.
    fn hidden(&self, batch: &SeqBatch, dropout: Option<&Dropout>) -> Result<Tensor>;
    /// The item embedding table [num_items + 1, dim] that hidden states are scored against.
    fn item_table(&self) -> &Tensor;
}

/// A backbone with its parameters and the catalogue size it was built for.
pub struct Recommender {
    pub cfg: ModelConfig,
    pub num_items: u32,
    pub num_users: u32,
    pub params: ParamStore,
    pub net: Box<dyn Backbone>,
}

impl Recommender {
    /// Build with fresh, seed-determined weights.
    pub fn new(cfg: ModelConfig, num_items: u32, num_users: u32, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let mut params = ParamStore::new(seed);
        let net: Box<dyn Backbone> = match cfg.kind {
            ModelKind::Sasrec => {
                Box::new(crate::sasrec::Sasrec::new(&cfg, num_items, &mut params)?)
            }
            ModelKind::Gru4rec => {
                Box::new(crate::gru4rec::Gru4rec::new(&cfg, num_items, &mut params)?)
            }
            ModelKind::Caser => Box::new(crate::caser::Caser::new(
                &cfg,
                num_items,
                num_users,
                &mut params,
            )?),
        };
        Ok(Self {
            cfg,
            num_items,
            num_users,
            params,
            net,
        })
    }

    /// Scores of every item (column 0 = padding, left as computed) for each target slot:
    /// one [n, d] x [d, items + 1] product.
    pub fn score_all(&self, batch: &SeqBatch) -> Result<Tensor> {
        let h = self.net.hidden(batch, None)?;
        Ok(h.matmul(&self.net.item_table().t()?)?)
    }
}
