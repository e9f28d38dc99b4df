//! Title embeddings for grounding generated titles in the catalogue.
//!
//! - [`last_token_embeddings`] (the reference): the base LLM's last-layer hidden state (after
//!   the final norm) at the last token of each title, batched as packed sequences. Cost: one
//!   forward over all title tokens; a whole catalogue is a few thousand short sequences.
//! - [`MiniLm`]: sentence embeddings from all-MiniLM-L6-v2 (candle-transformers' BERT), mean
//!   pooled over real tokens and L2-normalised like the sentence-transformers pipeline
//!   (Transformer -> Pooling(mean) -> Normalize). Cheaper and made for similarity.

use crate::decoder::PackedBatch;
use crate::load::Llm;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config as BertConfig};
use std::path::Path;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

/// Embeddings of `texts`, row-major `[texts, hidden]` in f32, `batch` texts per forward.
pub fn last_token_embeddings(llm: &Llm, texts: &[&str], batch: usize) -> Result<Vec<f32>> {
    let d = llm.decoder.hidden_size();
    let mut out = Vec::with_capacity(texts.len() * d);
    for chunk in texts.chunks(batch.max(1)) {
        let ids = chunk
            .iter()
            .map(|t| llm.encode_prompt(t))
            .collect::<Result<Vec<_>>>()?;
        if let Some(i) = ids.iter().position(|s| s.is_empty()) {
            bail!("text {:?} tokenises to nothing", chunk[i]);
        }
        let b = PackedBatch::new(&ids);
        let f = llm.decoder.forward_packed(&b, &[], false)?;
        let last = llm.decoder.rows(&f.hidden, &b.last_positions())?;
        out.extend(last.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Refuse a `tokenizer.json` that does not belong to the BERT encoder of `cfg` (e.g. SmolLM2's
/// byte-level BPE, whose ids run past MiniLM's 30522 embeddings and fail deep in the forward):
/// its ids must fit the config's `vocab_size`, and it must wrap a text in `[CLS] ... [SEP]` as
/// the sentence-transformers pipeline the embeddings are made for does.
fn check_bert_tokenizer(
    tok: &Tokenizer,
    cfg: &BertConfig,
    tok_path: &Path,
    cfg_path: &Path,
) -> Result<()> {
    crate::tokenizer::check_against_model(
        tok,
        cfg.vocab_size,
        &format!(
            "{} (against {} `vocab_size`)",
            tok_path.display(),
            cfg_path.display()
        ),
    )?;
    let enc = tok
        .encode("a", true)
        .map_err(|e| anyhow!("{}: tokenising: {e}", tok_path.display()))?;
    // The real tokens (a tokenizer.json may pad to a fixed length).
    let ids: Vec<u32> = enc
        .get_ids()
        .iter()
        .zip(enc.get_attention_mask())
        .filter(|(_, &m)| m == 1)
        .map(|(&i, _)| i)
        .collect();
    for (marker, at) in [("[CLS]", ids.first()), ("[SEP]", ids.last())] {
        let want = tok.token_to_id(marker);
        if want.is_none() || want != at.copied() || ids.len() < 3 {
            bail!(
                "{}: a BERT encoder's tokenizer must wrap every text in [CLS] ... [SEP], but \
                 {marker} is {} and \"a\" encodes to {:?}; not the tokenizer of {}",
                tok_path.display(),
                want.map_or("not a token".to_string(), |id| format!("id {id}")),
                ids.iter()
                    .map(|&i| tok.id_to_token(i).unwrap_or_default())
                    .collect::<Vec<_>>(),
                cfg_path.display()
            );
        }
    }
    Ok(())
}

/// all-MiniLM-L6-v2 (or any BERT sentence encoder in an HF directory).
pub struct MiniLm {
    model: BertModel,
    tokenizer: Tokenizer,
    pub hidden: usize,
    device: Device,
}

impl MiniLm {
    /// Load `<dir>/{config.json, model.safetensors, tokenizer.json}`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        if !cfg_path.exists() {
            bail!("{}: no config.json", dir.display());
        }
        let cfg: BertConfig = serde_json::from_str(
            &std::fs::read_to_string(&cfg_path)
                .with_context(|| format!("reading {}", cfg_path.display()))?,
        )
        .with_context(|| format!("{}: not a BERT config", cfg_path.display()))?;
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = crate::tokenizer::load_tokenizer_json(&tok_path)?;
        check_bert_tokenizer(&tokenizer, &cfg, &tok_path, &cfg_path)?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: 256,
                ..Default::default()
            }))
            .map_err(|e| anyhow!("{e}"))?;
        let weights = crate::load::safetensors_files(dir)?;
        crate::load::check_layer_count(
            &weights,
            "layer",
            cfg.num_hidden_layers,
            &format!("{} `num_hidden_layers`", cfg_path.display()),
        )?;
        // SAFETY: read-only memory map of files nothing here writes.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&weights, DType::F32, device) }?;
        let model = BertModel::load(vb, &cfg)
            .with_context(|| format!("loading BERT weights from {}", dir.display()))?;
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path)?)?;
        let hidden = v["hidden_size"].as_u64().unwrap_or(384) as usize;
        Ok(Self {
            model,
            tokenizer,
            hidden,
            device: device.clone(),
        })
    }

    /// Mean-pooled, L2-normalised embeddings `[texts, hidden]`, `batch` texts per forward.
    pub fn embed(&self, texts: &[&str], batch: usize) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(texts.len() * self.hidden);
        for chunk in texts.chunks(batch.max(1)) {
            let enc = self
                .tokenizer
                .encode_batch(chunk.to_vec(), true)
                .map_err(|e| anyhow!("tokenising: {e}"))?;
            let l = enc[0].get_ids().len();
            let b = enc.len();
            let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
            let mask: Vec<u32> = enc
                .iter()
                .flat_map(|e| e.get_attention_mask().to_vec())
                .collect();
            let ids = Tensor::from_vec(ids, (b, l), &self.device)?;
            let mask = Tensor::from_vec(mask, (b, l), &self.device)?;
            let types = ids.zeros_like()?;
            let h = self.model.forward(&ids, &types, Some(&mask))?; // [b, l, d]
            let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let sum = h.broadcast_mul(&m)?.sum(1)?;
            let cnt = m.sum(1)?.clamp(1e-9, f64::MAX)?;
            let mean = sum.broadcast_div(&cnt)?;
            let norm = mean.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
            out.extend(mean.broadcast_div(&norm)?.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}
