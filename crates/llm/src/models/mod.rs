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

#[cfg(test)]
mod tests {
    use super::*;

    fn base(model_type: &str) -> serde_json::Value {
        serde_json::json!({
            "model_type": model_type,
            "hidden_size": 64, "intermediate_size": 96, "vocab_size": 160,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
        })
    }

    fn parse(v: &serde_json::Value) -> Result<ModelConfig> {
        parse_config_json(&v.to_string(), Path::new("m/config.json"))
    }

    fn err(v: &serde_json::Value) -> String {
        format!("{:#}", parse(v).unwrap_err())
    }

    #[test]
    fn rope_from_either_config_format() {
        for mt in ["llama", "qwen2"] {
            // No theta anywhere: HF's default, 10,000, for both families.
            assert_eq!(parse(&base(mt)).unwrap().rope_theta, 10_000.0, "{mt}");
            // transformers < 5 and >= 5 (`rope_parameters` only) give the same RoPE.
            let mut old = base(mt);
            old["rope_theta"] = 500_000.0.into();
            old["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64});
            let mut new = base(mt);
            new["rope_parameters"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500_000.0});
            let (a, b) = (parse(&old).unwrap(), parse(&new).unwrap());
            assert_eq!(a, b, "{mt}");
            assert_eq!((b.rope_theta, b.rope_scaling.is_some()), (500_000.0, true));
            // SmolLM2 as transformers 5 writes it: theta in `rope_parameters`, default type.
            let mut smol = base(mt);
            smol["rope_parameters"] =
                serde_json::json!({"rope_theta": 100_000.0, "rope_type": "default"});
            let c = parse(&smol).unwrap();
            assert_eq!((c.rope_theta, c.rope_scaling), (100_000.0, None));
            // Both formats present and disagreeing, or a scaling not implemented: refused.
            smol["rope_theta"] = 10_000.0.into();
            let e = err(&smol);
            assert!(e.contains("m/config.json") && e.contains("disagree"), "{e}");
            let mut yarn = base(mt);
            yarn["rope_scaling"] = serde_json::json!({"type": "yarn", "factor": 4.0});
            let e = err(&yarn);
            assert!(
                e.contains("`rope_scaling.rope_type`: \"yarn\""),
                "{mt}: {e}"
            );
            let mut yarn = base(mt);
            yarn["rope_parameters"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
            let e = err(&yarn);
            assert!(
                e.contains("`rope_parameters.rope_type`: \"yarn\""),
                "{mt}: {e}"
            );
        }
    }

    #[test]
    fn fields_that_change_the_math_are_read_or_refused() {
        let mut v = base("llama");
        v["mlp_bias"] = true.into();
        let e = err(&v);
        assert!(e.contains("`mlp_bias`"), "{e}");
        // Qwen2's head_dim is honoured (it used to be hidden / heads whatever the config said).
        let mut q = base("qwen2");
        q["head_dim"] = 32.into();
        assert_eq!(parse(&q).unwrap().head_dim, 32);
    }
}
