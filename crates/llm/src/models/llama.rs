//! Llama family (Llama 2/3, TinyLlama, SmolLM2): the `config.json` schema and its mapping onto
//! the shared decoder. Llama has no projection biases unless `attention_bias` is set, and may
//! scale RoPE frequencies the Llama-3 way. Weight names are the HF ones the decoder loads.

use crate::config::{Arch, Llama3RopeScaling, ModelConfig};
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// `eos_token_id` is an int or a list of ints in HF configs.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(x) => vec![*x],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// `rope_scaling` (transformers < 5) or `rope_parameters` (transformers >= 5, which also holds
/// `rope_theta` and writes `rope_type` "default" for plain RoPE).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RopeScalingJson {
    #[serde(alias = "type", default = "default_rope_type")]
    pub rope_type: String,
    #[serde(default)]
    pub rope_theta: Option<f64>,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

fn default_rope_type() -> String {
    "default".into()
}

/// The fields of a Llama `config.json` this runtime reads (unknown fields are ignored; those
/// that change the computation and are not implemented are read to be refused).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LlamaConfigJson {
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
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub hidden_act: Option<String>,
}

/// HF's default `rope_theta` (LlamaConfig, Qwen2Config) and llama.cpp's `rope.freq_base`.
pub(crate) const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// RoPE's theta and scaling from either config format: transformers < 5 writes `rope_theta`
/// and `rope_scaling`, transformers >= 5 only `rope_parameters` (theta inside). Reading only
/// the old fields would run a new-format SmolLM2 (theta 100,000) or Llama-3 (500,000 + llama3
/// scaling) at theta 10,000, silently; both present and disagreeing is refused.
pub(crate) fn rope(
    theta: Option<f64>,
    scaling: &Option<RopeScalingJson>,
    parameters: &Option<RopeScalingJson>,
) -> Result<(f64, Option<Llama3RopeScaling>)> {
    let Some(p) = parameters else {
        let s = rope_scaling(scaling, "rope_scaling")?;
        return Ok((theta.unwrap_or(DEFAULT_ROPE_THETA), s));
    };
    if let (Some(a), Some(b)) = (theta, p.rope_theta) {
        if a != b {
            bail!("fields `rope_theta` ({a}) and `rope_parameters.rope_theta` ({b}) disagree");
        }
    }
    let from_parameters = rope_scaling(&Some(p.clone()), "rope_parameters")?;
    if scaling.is_some() && rope_scaling(scaling, "rope_scaling")? != from_parameters {
        bail!("fields `rope_scaling` and `rope_parameters` disagree");
    }
    Ok((
        p.rope_theta.or(theta).unwrap_or(DEFAULT_ROPE_THETA),
        from_parameters,
    ))
}

pub(crate) fn check_act(act: &Option<String>) -> Result<()> {
    match act.as_deref() {
        None | Some("silu") | Some("swish") => Ok(()),
        Some(other) => bail!("field `hidden_act`: only silu is implemented, found {other:?}"),
    }
}

/// The scaling `r` describes; `field` (`rope_scaling` or `rope_parameters`) goes into errors.
pub(crate) fn rope_scaling(
    r: &Option<RopeScalingJson>,
    field: &str,
) -> Result<Option<Llama3RopeScaling>> {
    let Some(r) = r else { return Ok(None) };
    match r.rope_type.as_str() {
        "default" => Ok(None),
        "llama3" => {
            let need = |x: Option<f64>, n: &str| {
                x.ok_or_else(|| anyhow::anyhow!("field `{field}.{n}` missing for llama3"))
            };
            Ok(Some(Llama3RopeScaling {
                factor: need(r.factor, "factor")?,
                low_freq_factor: need(r.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(r.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: r.original_max_position_embeddings.ok_or_else(
                    || anyhow::anyhow!("field `{field}.original_max_position_embeddings` missing"),
                )?,
            }))
        }
        other => {
            bail!("field `{field}.rope_type`: {other:?} is not implemented (default, llama3)")
        }
    }
}

impl LlamaConfigJson {
    pub fn into_config(self) -> Result<ModelConfig> {
        check_act(&self.hidden_act)?;
        if self.mlp_bias {
            bail!("field `mlp_bias`: biases on the MLP projections are not implemented");
        }
        let (rope_theta, rope_scaling) =
            rope(self.rope_theta, &self.rope_scaling, &self.rope_parameters)?;
        let c = ModelConfig {
            arch: Arch::Llama,
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
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
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
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": cfg.qkv_bias,
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
    if let Some(r) = &cfg.rope_scaling {
        v["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3",
            "factor": r.factor,
            "low_freq_factor": r.low_freq_factor,
            "high_freq_factor": r.high_freq_factor,
            "original_max_position_embeddings": r.original_max_position_embeddings,
        });
    }
    v
}
