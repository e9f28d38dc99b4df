//! One file per architecture family: how its `config.json` (and GGUF metadata) maps onto the
//! shared [`crate::decoder::Decoder`].

pub mod llama;
pub mod qwen2;

use crate::config::{Arch, ModelConfig};
use anyhow::{bail, Context, Result};
use std::path::Path;

/// Parse an HF `config.json`, dispatching on `model_type` (or `architectures`).
pub fn parse_config_json(text: &str, path: &Path) -> Result<ModelConfig> {
    let v: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{}: invalid JSON", path.display()))?;
    let arch = arch_of(&v).with_context(|| format!("{}", path.display()))?;
    let cfg = match arch {
        Arch::Llama => serde_json::from_value::<llama::LlamaConfigJson>(v)
            .map_err(anyhow::Error::from)
            .and_then(|c| c.into_config()),
        Arch::Qwen2 => serde_json::from_value::<qwen2::Qwen2ConfigJson>(v)
            .map_err(anyhow::Error::from)
            .and_then(|c| c.into_config()),
    };
    cfg.with_context(|| format!("{}: not a valid {} config", path.display(), arch.name()))
}

fn arch_of(v: &serde_json::Value) -> Result<Arch> {
    let model_type = v.get("model_type").and_then(|m| m.as_str());
    let archs: Vec<&str> = v
        .get("architectures")
        .and_then(|a| a.as_array())
        .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
        .unwrap_or_default();
    match model_type {
        Some("llama") => Ok(Arch::Llama),
        Some("qwen2") => Ok(Arch::Qwen2),
        Some(other) => bail!("field `model_type`: {other:?} is not implemented (llama, qwen2)"),
        None if archs.contains(&"LlamaForCausalLM") => Ok(Arch::Llama),
        None if archs.contains(&"Qwen2ForCausalLM") => Ok(Arch::Qwen2),
        None => bail!("field `model_type` is missing and `architectures` names no known model"),
    }
}

/// The HF `config.json` for `cfg`.
pub fn to_config_json(cfg: &ModelConfig) -> serde_json::Value {
    match cfg.arch {
        Arch::Llama => llama::to_config_json(cfg),
        Arch::Qwen2 => qwen2::to_config_json(cfg),
    }
}
