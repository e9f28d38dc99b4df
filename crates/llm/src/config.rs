//! The one description of a decoder-only model that every architecture file fills in: sizes,
//! RoPE parameters, which projections carry a bias, special token ids. Llama and Qwen2
//! `config.json` files (and GGUF metadata) are parsed into this by `models::{llama,qwen2}`.

use serde::{Deserialize, Serialize};

/// The architecture families this runtime implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// Llama 2/3, TinyLlama, SmolLM2: no projection biases, optional Llama-3 RoPE scaling.
    Llama,
    /// Qwen2 / Qwen2.5: biases on the q, k and v projections.
    Qwen2,
}

impl Arch {
    /// The `model_type` string of HF `config.json` and `general.architecture` of GGUF.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// Llama-3 style RoPE frequency scaling (`rope_scaling` with `rope_type: "llama3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// Everything the shared decoder needs to build and run a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    /// The context length: positions at or beyond it are an error, not silently wrapped.
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama with `attention_bias`).
    pub o_bias: bool,
    pub bos_token_id: Option<u32>,
    /// All ids that end generation.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    /// Check the sizes are consistent before any tensor is allocated.
    pub fn validate(&self) -> anyhow::Result<()> {
        let c = self;
        anyhow::ensure!(
            c.vocab_size > 0 && c.hidden_size > 0 && c.num_hidden_layers > 0,
            "model config: vocab_size, hidden_size and num_hidden_layers must be positive"
        );
        anyhow::ensure!(
            c.num_attention_heads > 0
                && c.num_key_value_heads > 0
                && c.num_attention_heads.is_multiple_of(c.num_key_value_heads),
            "model config: num_attention_heads ({}) must be a positive multiple of num_key_value_heads ({})",
            c.num_attention_heads,
            c.num_key_value_heads
        );
        anyhow::ensure!(
            c.head_dim.is_multiple_of(2) && c.head_dim > 0,
            "model config: head_dim ({}) must be even",
            c.head_dim
        );
        anyhow::ensure!(
            c.max_position_embeddings > 0,
            "model config: max_position_embeddings must be positive"
        );
        Ok(())
    }
}
