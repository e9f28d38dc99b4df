//! Qwen2 / Qwen2.5: the `config.json` schema and its mapping onto the shared decoder. Qwen2
//! differs from Llama by biases on the q, k and v projections (none on o) and by an optional
//! sliding-window attention, which this runtime does not implement (refused when enabled).

use crate::config::{Arch, ModelConfig};
use crate::models::llama::{check_act, rope, RopeScalingJson, TokenIds};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// The fields of a Qwen2 `config.json` this runtime reads (unknown fields are ignored).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Qwen2ConfigJson {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScalingJson>,
    #[serde(default)]
    pub rope_parameters: Option<RopeScalingJson>,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

impl Qwen2ConfigJson {
    pub fn into_config(self) -> Result<ModelConfig> {
        check_act(&self.hidden_act)?;
        if self.use_sliding_window {
            bail!("field `use_sliding_window`: sliding-window attention is not implemented");
        }
        // YaRN and the other scalings are refused here as for Llama (they used to be ignored).
        let (rope_theta, rope_scaling) =
            rope(self.rope_theta, &self.rope_scaling, &self.rope_parameters)?;
        let c = ModelConfig {
            arch: Arch::Qwen2,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self
                .head_dim
                .unwrap_or(self.hidden_size / self.num_attention_heads.max(1)),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            bos_token_id: self.bos_token_id,
            eos_token_ids: self.eos_token_id.map(|e| e.to_vec()).unwrap_or_default(),
        };
        c.validate()?;
        Ok(c)
    }
}

/// The `config.json` that HF transformers (and this runtime) read back for `cfg`.
pub fn to_config_json(cfg: &ModelConfig) -> serde_json::Value {
    let mut v = serde_json::json!({
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": false,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    if let Some(b) = cfg.bos_token_id {
        v["bos_token_id"] = b.into();
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => v["eos_token_id"] = (*one).into(),
        many => v["eos_token_id"] = many.to_vec().into(),
    }
    v
}
