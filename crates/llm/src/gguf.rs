//! GGUF files (llama.cpp): read the model config from metadata, dequantise every tensor to the
//! runtime dtype under its HF name (undoing llama.cpp's row permutation of Llama q/k), rebuild
//! the tokenizer, and write a GGUF model out as an HF directory (`llm4dsr model convert`).
//!
//! Cost: the whole model is dequantised into memory once (SmolLM2-135M: ~0.55 GB in f32);
//! quantised matmuls are ~5x slower than f32 on CPU, so the runtime never keeps them.

use crate::config::{Arch, ModelConfig};
use crate::decoder::weight_shapes;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// A GGUF file read into memory: config, HF-named f32 tensors (CPU), tokenizer.
pub struct GgufModel {
    pub config: ModelConfig,
    pub tensors: HashMap<String, Tensor>,
    pub tokenizer: tokenizers::Tokenizer,
}

fn meta<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| anyhow!("metadata `{key}` is missing"))
}

fn meta_usize(c: &gguf_file::Content, key: &str) -> Result<usize> {
    let v = meta(c, key)?;
    Ok(v.to_u64()
        .or_else(|_| v.to_u32().map(|x| x as u64))
        .or_else(|_| v.to_i32().map(|x| x as u64))
        .with_context(|| format!("metadata `{key}` is not an integer"))? as usize)
}

fn meta_f64(c: &gguf_file::Content, key: &str) -> Result<Option<f64>> {
    match c.metadata.get(key) {
        None => Ok(None),
        Some(v) => Ok(Some(
            // f32 -> shortest decimal -> f64, so 1e-6 stays 1e-6 (not 9.99999997e-7).
            v.to_f32()
                .map(|x| x.to_string().parse::<f64>().unwrap_or(x as f64))
                .or_else(|_| v.to_f64())
                .with_context(|| format!("metadata `{key}` is not a float"))?,
        )),
    }
}

/// The model config from GGUF metadata (`general.architecture` and `<arch>.*`).
pub fn config_from_gguf(c: &gguf_file::Content) -> Result<ModelConfig> {
    let arch_name = meta(c, "general.architecture")?.to_string()?.clone();
    let arch = match arch_name.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => bail!("`general.architecture` = {other:?} is not implemented (llama, qwen2)"),
    };
    if c.tensor_infos.contains_key("rope_freqs.weight") {
        bail!("`rope_freqs.weight` (Llama-3.1 RoPE scaling in GGUF) is not implemented; convert the HF model instead");
    }
    let a = arch_name.as_str();
    let k = |s: &str| format!("{a}.{s}");
    // llama.cpp scales RoPE by these keys (linear, YaRN); ignoring them would run the model at
    // other frequencies than it was trained with.
    if let Some(v) = c.metadata.get(&k("rope.scaling.type")) {
        let t = v
            .to_string()
            .with_context(|| format!("metadata `{a}.rope.scaling.type` is not a string"))?;
        if t != "none" {
            bail!(
                "metadata `{a}.rope.scaling.type` = {t:?}: RoPE scaling in GGUF is not \
                 implemented; convert the HF model instead (llama3 scaling is read from its \
                 config.json)"
            );
        }
    }
    let hidden = meta_usize(c, &k("embedding_length"))?;
    let heads = meta_usize(c, &k("attention.head_count"))?;
    let kv_heads = meta_usize(c, &k("attention.head_count_kv")).unwrap_or(heads);
    let embd = c
        .tensor_infos
        .get("token_embd.weight")
        .ok_or_else(|| anyhow!("tensor `token_embd.weight` is missing"))?;
    let vocab = embd.shape.dims()[0];
    let eos: Vec<u32> = match c.metadata.get("tokenizer.ggml.eos_token_id") {
        Some(v) => vec![v.to_u32()?],
        None => vec![],
    };
    let cfg = ModelConfig {
        arch,
        vocab_size: vocab,
        hidden_size: hidden,
        intermediate_size: meta_usize(c, &k("feed_forward_length"))?,
        num_hidden_layers: meta_usize(c, &k("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: meta_usize(c, &k("attention.key_length")).unwrap_or(hidden / heads.max(1)),
        rms_norm_eps: meta_f64(c, &k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5),
        // llama.cpp's default when the key is absent, for every architecture.
        rope_theta: meta_f64(c, &k("rope.freq_base"))?
            .unwrap_or(crate::models::llama::DEFAULT_ROPE_THETA),
        rope_scaling: None,
        max_position_embeddings: meta_usize(c, &k("context_length"))?,
        tie_word_embeddings: !c.tensor_infos.contains_key("output.weight"),
        qkv_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
        o_bias: c.tensor_infos.contains_key("blk.0.attn_output.bias"),
        bos_token_id: c
            .metadata
            .get("tokenizer.ggml.bos_token_id")
            .map(|v| v.to_u32())
            .transpose()?,
        eos_token_ids: eos,
    };
    cfg.validate()?;
    Ok(cfg)
}

/// The GGUF name of an HF tensor name.
fn gguf_name(hf: &str) -> Result<String> {
    let fixed = [
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == hf) {
        return Ok(g.to_string());
    }
    let rest = hf
        .strip_prefix("model.layers.")
        .ok_or_else(|| anyhow!("no GGUF name for {hf}"))?;
    let (layer, part) = rest
        .split_once('.')
        .ok_or_else(|| anyhow!("no GGUF name for {hf}"))?;
    let map = [
        ("input_layernorm.", "attn_norm."),
        ("post_attention_layernorm.", "ffn_norm."),
        ("self_attn.q_proj.", "attn_q."),
        ("self_attn.k_proj.", "attn_k."),
        ("self_attn.v_proj.", "attn_v."),
        ("self_attn.o_proj.", "attn_output."),
        ("mlp.gate_proj.", "ffn_gate."),
        ("mlp.up_proj.", "ffn_up."),
        ("mlp.down_proj.", "ffn_down."),
    ];
    for (h, g) in map {
        if let Some(suffix) = part.strip_prefix(h) {
            return Ok(format!("blk.{layer}.{g}{suffix}"));
        }
    }
    bail!("no GGUF name for {hf}")
}

/// Undo llama.cpp's permutation of Llama q/k rows (HF -> GGUF did
/// `reshape(heads, 2, hd/2, in).swapaxes(1, 2)`): `reshape(heads, hd/2, 2, in).swapaxes(1, 2)`.
fn unpermute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    let inner: usize = dims[1..].iter().product();
    let hd = out / heads;
    Ok(w.reshape((heads, hd / 2, 2, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// Read a GGUF file, dequantise to f32 on the CPU, map to HF names.
pub fn read_gguf(path: &Path) -> Result<GgufModel> {
    let ctx = || format!("{}", path.display());
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let content = gguf_file::Content::read(&mut f)
        .map_err(|e| anyhow!("{}: not a readable GGUF file: {e}", path.display()))?;
    let config = config_from_gguf(&content).with_context(ctx)?;
    let tokenizer = crate::tokenizer::tokenizer_from_gguf(&content).with_context(ctx)?;
    crate::tokenizer::check_against_model(
        &tokenizer,
        config.vocab_size,
        &path.display().to_string(),
    )?;
    crate::tokenizer::check_prompt_markers(
        &tokenizer,
        &config,
        &format!("{} (tokenizer)", path.display()),
        "GGUF `tokenizer.ggml.bos_token_id`",
        "GGUF `tokenizer.ggml.eos_token_id`",
    )?;
    // Tensors of blocks beyond `block_count` would be silently ignored (a truncated model).
    let deepest = content
        .tensor_infos
        .keys()
        .filter_map(|name| crate::load::layer_index(name, "blk").map(|i| (i, name)))
        .max_by_key(|(i, _)| *i);
    if let Some((i, name)) = deepest {
        if i >= config.num_hidden_layers {
            bail!(
                "{}: the file holds tensors of {} blocks (`{name}`) but GGUF `{}.block_count` is \
                 {}; metadata and tensors do not belong together",
                path.display(),
                i + 1,
                config.arch.name(),
                config.num_hidden_layers
            );
        }
    }
    let mut tensors = HashMap::new();
    for (name, shape) in weight_shapes(&config) {
        let g = gguf_name(&name)?;
        let q = content
            .tensor(&mut f, &g, &Device::Cpu)
            .map_err(|e| anyhow!("{}: tensor `{g}` ({name}): {e}", path.display()))?;
        let mut t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
        if t.dims() != shape.as_slice() {
            bail!(
                "{}: tensor `{g}` has shape {:?}, expected {:?} for {name}",
                path.display(),
                t.dims(),
                shape
            );
        }
        if config.arch == Arch::Llama {
            if g.contains(".attn_q.") {
                t = unpermute(&t, config.num_attention_heads)?;
            } else if g.contains(".attn_k.") {
                t = unpermute(&t, config.num_key_value_heads)?;
            }
        }
        tensors.insert(name, t);
    }
    Ok(GgufModel {
        config,
        tensors,
        tokenizer,
    })
}

/// Write a GGUF model as an HF directory (`config.json`, `model.safetensors` in f32,
/// `tokenizer.json`, `manifest.json`) at `out`, atomically.
pub fn convert_to_hf_dir(gguf: &Path, out: &Path, overwrite: bool) -> Result<()> {
    let m = read_gguf(gguf)?;
    let staging = llm4dsr_data::atomic::StagingDir::new(out, overwrite)?;
    let dir = staging.path().to_path_buf();
    let cfg_json = crate::models::to_config_json(&m.config);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&cfg_json)?,
    )?;
    candle_core::safetensors::save(&m.tensors, dir.join("model.safetensors"))?;
    m.tokenizer
        .save(dir.join("tokenizer.json"), false)
        .map_err(|e| anyhow!("writing tokenizer.json: {e}"))?;
    let mut manifest = llm4dsr_data::Manifest::new(
        "model-convert",
        0,
        serde_json::json!({"gguf": gguf.display().to_string(), "dtype": "f32"}),
    );
    manifest.add_input(gguf)?;
    manifest.count("tensors", m.tensors.len() as u64);
    manifest.count(
        "parameters",
        m.tensors.values().map(|t| t.elem_count() as u64).sum(),
    );
    manifest.add_outputs_under(&dir)?;
    manifest.write(&dir)?;
    staging.commit()?;
    Ok(())
}
