//! [`Llm`]: a loaded causal LM (decoder + tokenizer) from an HF directory or a GGUF file. This
//! is what the scoring, generation, embedding and fine-tuning code holds.

use crate::config::ModelConfig;
use crate::decoder::Decoder;
use crate::tokenizer::{check_against_model, check_prompt_markers, load_tokenizer_json};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// A causal LM ready to run.
pub struct Llm {
    pub decoder: Decoder,
    pub tokenizer: Tokenizer,
    /// Where it was loaded from (recorded in manifests).
    pub source: PathBuf,
}

/// Where the LLM forward runs (`--device` of the LLM stages).
#[derive(
    clap::ValueEnum,
    Clone,
    Copy,
    Debug,
    Default,
    serde::Serialize,
    serde::Deserialize,
    PartialEq,
    Eq,
)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceChoice {
    /// This rank's GPU when the binary has candle's CUDA backend (jobs/build-cuda.sh) and the
    /// GPU opens; otherwise the CPU (logged).
    #[default]
    Auto,
    Cpu,
    /// This rank's GPU, or an error saying why not.
    Cuda,
}

/// The device for `choice`. The GPU is this process's (`llm4dsr_kernels::backend::
/// device_ordinal`, set from the local rank), the same one the fused kernels use.
pub fn llm_device(choice: DeviceChoice) -> Result<Device> {
    let ordinal = llm4dsr_kernels::backend::device_ordinal();
    let built = candle_core::utils::cuda_is_available();
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda if !built => bail!(
            "--device cuda: this binary was built without candle's CUDA backend (build it with \
             jobs/build-cuda.sh)"
        ),
        DeviceChoice::Cuda => Device::new_cuda(ordinal)
            .with_context(|| format!("--device cuda: opening GPU {ordinal} for the LLM")),
        DeviceChoice::Auto if !built => {
            tracing::debug!("LLM on the CPU (built without candle's CUDA backend)");
            Ok(Device::Cpu)
        }
        DeviceChoice::Auto => match Device::new_cuda(ordinal) {
            Ok(d) => {
                tracing::info!("LLM on GPU {ordinal} (candle CUDA backend, bf16)");
                Ok(d)
            }
            Err(e) => {
                tracing::warn!("LLM on the CPU: GPU {ordinal} did not open ({e})");
                Ok(Device::Cpu)
            }
        },
    }
}

/// "cpu" or "cuda" (never the ordinal: ranks use different GPUs): part of the fingerprint of
/// a stage's parts, since results differ between the two (the LLM runs in f32 on the CPU and
/// bf16 on a GPU), so that a resumed run or a job whose ranks landed on different kinds of
/// device never mixes them (the merge refuses parts of another fingerprint).
pub fn device_tag(device: &Device) -> &'static str {
    if device.is_cpu() {
        "cpu"
    } else {
        "cuda"
    }
}

/// The runtime dtype for a device: f32 on CPU (bf16 is 1.4-5x slower there), bf16 on GPU.
pub fn default_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

/// The environment variable that overrides [`default_dtype`] (`f32`, `bf16` or `f16`): e.g.
/// f32 on a GPU, to compare its scores with the CPU's value for value.
pub const DTYPE_ENV: &str = "LLM4DSR_LLM_DTYPE";

/// The dtype [`Llm::load`] uses on `device`: `LLM4DSR_LLM_DTYPE` when set, else
/// [`default_dtype`]. An unknown value is an error naming the variable.
pub fn runtime_dtype(device: &Device) -> Result<DType> {
    match std::env::var(DTYPE_ENV) {
        Err(std::env::VarError::NotPresent) => Ok(default_dtype(device)),
        Err(e) => bail!("{DTYPE_ENV}: {e}"),
        Ok(v) => dtype_setting(&v, device),
    }
}

/// The dtype a `LLM4DSR_LLM_DTYPE` value names (empty: the device's default).
pub fn dtype_setting(value: &str, device: &Device) -> Result<DType> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" => Ok(default_dtype(device)),
        "f32" => Ok(DType::F32),
        "bf16" => Ok(DType::BF16),
        "f16" => Ok(DType::F16),
        other => bail!("{DTYPE_ENV}={other:?}: expected f32, bf16 or f16"),
    }
}

/// What a stage's fingerprint records of where its LLM ran: the device (`cpu`, `cuda`), and the
/// dtype when it is not that device's default (scores in f32 and bf16 differ, so outputs of the
/// two are never mixed).
pub fn run_tag(device: &Device, dtype: DType) -> String {
    if dtype == default_dtype(device) {
        device_tag(device).to_string()
    } else {
        format!("{}/{}", device_tag(device), dtype.as_str())
    }
}

/// The `.safetensors` files of an HF directory: the shards of `model.safetensors.index.json`,
/// else `model.safetensors`, else every `*.safetensors`.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&index)
                .with_context(|| format!("reading {}", index.display()))?,
        )
        .with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: field `weight_map` missing", index.display()))?;
        let mut files: Vec<PathBuf> = map
            .values()
            .filter_map(|f| f.as_str())
            .map(|f| dir.join(f))
            .collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !f.exists() {
                bail!("{}: shard {} is missing", index.display(), f.display());
            }
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no *.safetensors weights", dir.display());
    }
    Ok(files)
}

/// The layer index of a tensor named `...<key>.<index>...` (`model.layers.3.mlp...` with key
/// `layers`, `encoder.layer.3...` with `layer`, `blk.3...` with `blk`).
pub fn layer_index(name: &str, key: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts
        .windows(2)
        .find(|w| w[0] == key)
        .and_then(|w| w[1].parse().ok())
}

/// Refuse weights that hold layers beyond the `layers` the config declares (`field` names the
/// config file and field): loading would silently ignore them and run a truncated model.
/// Fewer layers than declared are refused by the loader (missing tensor). Reads only the
/// safetensors headers.
pub fn check_layer_count(files: &[PathBuf], key: &str, layers: usize, field: &str) -> Result<()> {
    for f in files {
        // SAFETY: a read-only memory map; only the header (tensor names) is read.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }
            .with_context(|| format!("reading {}", f.display()))?;
        let deepest = st
            .tensors()
            .into_iter()
            .filter_map(|(name, _)| layer_index(&name, key).map(|i| (i, name)))
            .max_by_key(|(i, _)| *i);
        if let Some((i, name)) = deepest {
            if i >= layers {
                bail!(
                    "{}: the weights hold {} layers (tensor `{name}`) but {field} is {layers}; \
                     the config and the weights do not belong together",
                    f.display(),
                    i + 1
                );
            }
        }
    }
    Ok(())
}

/// Refuse weights holding tensors the decoder would not read for `cfg` (`config` names the
/// config file): an MLP bias (`mlp_bias`), a Qwen3 q/k norm under a Qwen2 config, and the like
/// would otherwise be dropped without a word and another model run. Left alone: RoPE's
/// `inv_freq` buffers (recomputed) and `lm_head.weight` beside tied embeddings (some
/// checkpoints save both). Reads only the safetensors headers.
pub fn check_unused_tensors(files: &[PathBuf], cfg: &ModelConfig, config: &str) -> Result<()> {
    let used: std::collections::HashSet<String> = crate::decoder::weight_shapes(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    for f in files {
        // SAFETY: a read-only memory map; only the header (tensor names) is read.
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(f) }
            .with_context(|| format!("reading {}", f.display()))?;
        let mut unused: Vec<String> = st
            .tensors()
            .into_iter()
            .map(|(n, _)| n)
            .filter(|n| {
                let left_alone = n.ends_with("rotary_emb.inv_freq")
                    || (cfg.tie_word_embeddings && n == "lm_head.weight");
                !(used.contains(n) || left_alone)
            })
            .collect();
        if !unused.is_empty() {
            unused.sort();
            let more = unused.len().saturating_sub(3);
            unused.truncate(3);
            bail!(
                "{}: tensor {}{} is not part of the model {config} describes (an unimplemented \
                 feature, e.g. `mlp_bias`, or another architecture); loading it would run \
                 another model",
                f.display(),
                unused
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
                if more > 0 {
                    format!(" (and {more} more)")
                } else {
                    String::new()
                }
            );
        }
    }
    Ok(())
}

/// Read and parse `<dir>/config.json`.
pub fn read_hf_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    if !path.exists() {
        bail!(
            "{}: no config.json (expected an HF model directory with config.json, *.safetensors and tokenizer.json, or a .gguf file)",
            dir.display()
        );
    }
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    crate::models::parse_config_json(&text, &path)
}

impl Llm {
    /// Load `path`: a directory (HF layout) or a `.gguf` file, in [`runtime_dtype`] (the
    /// device's default unless `LLM4DSR_LLM_DTYPE` says otherwise).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Self::load_with_dtype(path, device, runtime_dtype(device)?)
    }

    pub fn load_with_dtype(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let t0 = std::time::Instant::now();
        let llm = if !path.exists() {
            bail!("model {} does not exist", path.display());
        } else if path.is_dir() {
            Self::load_hf_dir(path, device, dtype)?
        } else if path.extension().is_some_and(|x| x == "gguf") {
            Self::load_gguf(path, device, dtype)?
        } else {
            bail!(
                "model {}: expected an HF model directory or a .gguf file",
                path.display()
            );
        };
        tracing::info!(
            model = %path.display(),
            arch = llm.decoder.cfg.arch.name(),
            layers = llm.decoder.cfg.num_hidden_layers,
            hidden = llm.decoder.cfg.hidden_size,
            ?dtype,
            secs = t0.elapsed().as_secs_f32(),
            "loaded model"
        );
        Ok(llm)
    }

    fn load_hf_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let cfg = read_hf_config(dir)?;
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.exists() {
            bail!("{}: no tokenizer.json", dir.display());
        }
        let tokenizer = load_tokenizer_json(&tok_path)?;
        let tok_what = tok_path.display().to_string();
        check_against_model(&tokenizer, cfg.vocab_size, &tok_what)?;
        let cfg_path = dir.join("config.json");
        check_prompt_markers(
            &tokenizer,
            &cfg,
            &tok_what,
            &format!("{} `bos_token_id`", cfg_path.display()),
            &format!("{} `eos_token_id`", cfg_path.display()),
        )?;
        let files = safetensors_files(dir)?;
        check_layer_count(
            &files,
            "layers",
            cfg.num_hidden_layers,
            &format!("{} `num_hidden_layers`", cfg_path.display()),
        )?;
        check_unused_tensors(&files, &cfg, &cfg_path.display().to_string())?;
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        // SAFETY: the files are memory-mapped read-only; nothing here writes them while the
        // model is loaded (the usual candle caveat: another process truncating them would fault).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, device) }
            .with_context(|| format!("reading {}", names.join(", ")))?;
        let decoder = Decoder::load(vb, &cfg).with_context(|| {
            format!(
                "loading {} with the shapes {} gives (hidden_size {}, intermediate_size {}, \
                 num_attention_heads {}, num_key_value_heads {}, head_dim {}, vocab_size {})",
                names.join(", "),
                cfg_path.display(),
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.num_key_value_heads,
                cfg.head_dim,
                cfg.vocab_size
            )
        })?;
        Ok(Self {
            decoder,
            tokenizer,
            source: dir.to_path_buf(),
        })
    }

    fn load_gguf(path: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let m = crate::gguf::read_gguf(path)?;
        let vb = VarBuilder::from_tensors(m.tensors, dtype, device);
        let decoder = Decoder::load(vb, &m.config)
            .with_context(|| format!("loading weights of {}", path.display()))?;
        Ok(Self {
            decoder,
            tokenizer: m.tokenizer,
            source: path.to_path_buf(),
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.decoder.cfg
    }

    pub fn device(&self) -> &Device {
        self.decoder.device()
    }

    /// Token ids of a prompt, with the tokenizer's special tokens (BOS where the model wants it).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, true)
            .map_err(|e| anyhow!("tokenising prompt: {e}"))?
            .get_ids()
            .to_vec())
    }

    /// Token ids of a piece of text to be appended to something (no special tokens).
    pub fn encode_piece(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .tokenizer
            .encode(text, false)
            .map_err(|e| anyhow!("tokenising text: {e}"))?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding tokens: {e}"))
    }

    /// Ids that end generation: the config's EOS ids, plus the end-of-turn and end-of-text
    /// tokens of ChatML, Llama-3 and Llama-2 where the tokenizer has them (a GGUF or config may
    /// name only one of a model's EOS tokens).
    pub fn eos_ids(&self) -> Vec<u32> {
        let mut ids = self.decoder.cfg.eos_token_ids.clone();
        for t in [
            "<|im_end|>",
            "<|endoftext|>",
            "<|eot_id|>",
            "<|end_of_text|>",
            "<|eom_id|>",
            "</s>",
        ] {
            if let Some(id) = self.tokenizer.token_to_id(t) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Pad id for padded batches: the tokenizer's padding token, else EOS, else 0.
    pub fn pad_id(&self) -> u32 {
        self.tokenizer
            .get_padding()
            .map(|p| p.pad_id)
            .or_else(|| self.decoder.cfg.eos_token_ids.first().copied())
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_setting_and_run_tag() {
        let cpu = Device::Cpu;
        assert_eq!(dtype_setting("", &cpu).unwrap(), DType::F32);
        assert_eq!(dtype_setting(" BF16 ", &cpu).unwrap(), DType::BF16);
        assert_eq!(dtype_setting("f16", &cpu).unwrap(), DType::F16);
        let e = dtype_setting("f8", &cpu).unwrap_err().to_string();
        assert!(e.contains(DTYPE_ENV) && e.contains("f8"), "{e}");
        // The default dtype leaves the tag (and so existing fingerprints) as it was.
        assert_eq!(run_tag(&cpu, DType::F32), "cpu");
        assert_eq!(run_tag(&cpu, DType::BF16), "cpu/bf16");
    }
}
