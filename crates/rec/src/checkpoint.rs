//! Checkpoints: a directory with `model.safetensors` (named parameters) and `config.json`
//! (architecture, catalogue size, how it was trained), plus, for the resumable `last/`
//! checkpoint, `optimizer.safetensors` (Adam's m and v as flat vectors) and `state.json`
//! (epoch, early-stopping state, history). Every checkpoint directory is written into a
//! staging directory and renamed into place, so a crash never leaves a half-written one.

use crate::adam::Adam;
use crate::model::{ModelConfig, Recommender};
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use llm4dsr_data::atomic::StagingDir;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "llm4dsr-rec-checkpoint/1";

/// `config.json` of a checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointConfig {
    pub format: String,
    pub model: ModelConfig,
    pub num_items: u32,
    pub num_users: u32,
    /// The training configuration (free-form: `TrainConfig` as JSON).
    pub train: serde_json::Value,
    /// Epoch (1-based) whose weights these are.
    pub epoch: usize,
}

/// Write `model` (and optionally optimizer + state) to `dir` atomically.
pub fn save(
    dir: &Path,
    model: &Recommender,
    train: &serde_json::Value,
    epoch: usize,
    optimizer: Option<(&Adam, &serde_json::Value)>,
) -> Result<()> {
    let stage = StagingDir::new(dir, true)?;
    let p = stage.path();
    candle_core::safetensors::save(&model.params.named_tensors(), p.join("model.safetensors"))
        .with_context(|| format!("writing {}", p.join("model.safetensors").display()))?;
    let cfg = CheckpointConfig {
        format: FORMAT.into(),
        model: model.cfg.clone(),
        num_items: model.num_items,
        num_users: model.num_users,
        train: train.clone(),
        epoch,
    };
    std::fs::write(
        p.join("config.json"),
        serde_json::to_string_pretty(&cfg)? + "\n",
    )?;
    if let Some((adam, state)) = optimizer {
        let n = adam.m.len();
        let mut t = HashMap::new();
        t.insert(
            "adam.m".to_string(),
            Tensor::from_slice(&adam.m, n, &Device::Cpu)?,
        );
        t.insert(
            "adam.v".to_string(),
            Tensor::from_slice(&adam.v, n, &Device::Cpu)?,
        );
        candle_core::safetensors::save(&t, p.join("optimizer.safetensors"))?;
        let mut st = state.clone();
        st["adam_steps"] = serde_json::json!(adam.t);
        std::fs::write(
            p.join("state.json"),
            serde_json::to_string_pretty(&st)? + "\n",
        )?;
    }
    stage.commit()?;
    Ok(())
}

/// Read a checkpoint's `config.json`.
pub fn read_config(dir: &Path) -> Result<CheckpointConfig> {
    let p = dir.join("config.json");
    if !p.exists() {
        bail!("{}: not a checkpoint (no config.json)", dir.display());
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let c: CheckpointConfig = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a valid checkpoint config", p.display()))?;
    if c.format != FORMAT {
        bail!(
            "{}: field `format` is `{}`, expected `{FORMAT}`",
            p.display(),
            c.format
        );
    }
    Ok(c)
}

/// Load a checkpoint's model.
pub fn load(dir: &Path) -> Result<(Recommender, CheckpointConfig)> {
    let cfg = read_config(dir)?;
    let model = Recommender::new(cfg.model.clone(), cfg.num_items, cfg.num_users, 0)?;
    let p = dir.join("model.safetensors");
    let tensors = candle_core::safetensors::load(&p, &Device::Cpu)
        .with_context(|| format!("reading {}", p.display()))?;
    model.params.load_named(&tensors, &p)?;
    Ok((model, cfg))
}

/// Load the optimizer state and `state.json` of a resumable checkpoint into `adam`.
pub fn load_optimizer(dir: &Path, adam: &mut Adam) -> Result<serde_json::Value> {
    let p = dir.join("optimizer.safetensors");
    let t = candle_core::safetensors::load(&p, &Device::Cpu)
        .with_context(|| format!("reading {}", p.display()))?;
    for (name, dst) in [("adam.m", &mut adam.m), ("adam.v", &mut adam.v)] {
        let v = t
            .get(name)
            .with_context(|| format!("{}: tensor `{name}` missing", p.display()))?
            .to_vec1::<f32>()?;
        if v.len() != dst.len() {
            bail!(
                "{}: `{name}` has {} values, the model {}",
                p.display(),
                v.len(),
                dst.len()
            );
        }
        *dst = v;
    }
    let sp = dir.join("state.json");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&sp).with_context(|| format!("reading {}", sp.display()))?,
    )
    .with_context(|| format!("parsing {}", sp.display()))?;
    adam.t = state["adam_steps"]
        .as_u64()
        .with_context(|| format!("{}: field `adam_steps` missing", sp.display()))?;
    Ok(state)
}
