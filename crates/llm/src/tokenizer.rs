//! Tokenizers: loading `tokenizer.json`, rebuilding a byte-level BPE tokenizer from GGUF
//! metadata (llama.cpp stores vocab, merges and token types, not `tokenizer.json`), checking a
//! tokenizer against the model it drives, and the per-catalogue cache of title tokens.

use crate::config::ModelConfig;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// Load `tokenizer.json`.
pub fn load_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path)
        .map_err(|e| anyhow!("{}: cannot read tokenizer: {e}", path.display()))
}

/// Refuse a tokenizer that can emit ids the model has no embedding for. (A model may have
/// more rows than the tokenizer has tokens: vocabularies are often padded.)
pub fn check_against_model(tok: &Tokenizer, vocab_size: usize, what: &str) -> Result<()> {
    let n = tok.get_vocab_size(true);
    let max_id = tok.get_vocab(true).values().copied().max().unwrap_or(0) as usize;
    if n > vocab_size || max_id >= vocab_size {
        bail!(
            "{what}: the tokenizer has {n} tokens (largest id {max_id}) but the model's vocabulary \
             has {vocab_size} rows; tokenizer and model do not belong together"
        );
    }
    Ok(())
}

/// Refuse a tokenizer that does not belong to the causal LM whose config declares `cfg`'s
/// special ids (e.g. a BERT WordPiece `tokenizer.json` next to SmolLM2 weights, which loads
/// and scores garbage). Checked, cheaply, at load:
/// - every BOS/EOS id of the config is a token of the tokenizer and a special one (an added
///   special token, or a `<...>` marker such as `</s>`);
/// - the closing quote the scorer appends to every title and generation stops at encodes to
///   one id that is not an unknown-token placeholder;
/// - the tokenizer adds nothing after a prompt's text (a BERT post-processor appends `[SEP]`,
///   which would then be the position the scores are read from), and at most the config's BOS
///   before it.
///
/// `tok_what` names the tokenizer's file; `bos_field` / `eos_field` name where the config's
/// ids come from (file and field).
pub fn check_prompt_markers(
    tok: &Tokenizer,
    cfg: &ModelConfig,
    tok_what: &str,
    bos_field: &str,
    eos_field: &str,
) -> Result<()> {
    let added = tok.get_added_tokens_decoder();
    let is_special = |id: u32, t: &str| {
        added.get(&id).is_some_and(|a| a.special)
            || (t.len() > 2 && t.starts_with('<') && t.ends_with('>'))
    };
    let ids = cfg
        .bos_token_id
        .iter()
        .map(|&id| (bos_field, id))
        .chain(cfg.eos_token_ids.iter().map(|&id| (eos_field, id)));
    for (field, id) in ids {
        let Some(t) = tok.id_to_token(id) else {
            bail!(
                "{tok_what}: {field} = {id} is not a token of this tokenizer ({} tokens); \
                 the tokenizer and the model config do not belong together",
                tok.get_vocab_size(true)
            );
        };
        if !is_special(id, &t) {
            bail!(
                "{tok_what}: {field} = {id} is {t:?} in this tokenizer, not a special token (an \
                 added special token or a <...> marker); the tokenizer and the model config do \
                 not belong together"
            );
        }
    }
    let quote = tok
        .encode(crate::prompt::CLOSE_QUOTE, false)
        .map_err(|e| anyhow!("{tok_what}: tokenising the closing quote: {e}"))?;
    let unknown = |id: u32| {
        let t = tok.id_to_token(id).unwrap_or_default();
        added.get(&id).is_some_and(|a| a.special) || t.to_ascii_lowercase().contains("unk")
    };
    match quote.get_ids() {
        [id] if !unknown(*id) => {}
        ids => {
            bail!(
            "{tok_what}: the prompt marker {:?} (closing quote of every title) encodes to {ids:?} \
             ({:?}), not to one known token id; the tokenizer does not fit the prompt template",
            crate::prompt::CLOSE_QUOTE,
            ids.iter().map(|&i| tok.id_to_token(i).unwrap_or_default()).collect::<Vec<_>>()
        )
        }
    }
    let text = crate::prompt::scoring_prefix(&["x"]);
    let plain = tok
        .encode(text.as_str(), false)
        .map_err(|e| anyhow!("{tok_what}: tokenising the prompt template: {e}"))?;
    let full = tok
        .encode(text.as_str(), true)
        .map_err(|e| anyhow!("{tok_what}: tokenising the prompt template: {e}"))?;
    let (plain, full) = (plain.get_ids(), full.get_ids());
    let names = |ids: &[u32]| {
        ids.iter()
            .map(|&i| tok.id_to_token(i).unwrap_or_default())
            .collect::<Vec<_>>()
    };
    let Some(start) = (0..=full.len().saturating_sub(plain.len()))
        .rev()
        .find(|&s| full[s..].starts_with(plain))
    else {
        bail!(
            "{tok_what}: with its special tokens the prompt template encodes to {} ids, not to \
             its {} text ids (truncated or rewritten by the tokenizer's post-processor); the \
             tokenizer does not fit a causal LM prompt",
            full.len(),
            plain.len()
        );
    };
    let after = &full[start + plain.len()..];
    if !after.is_empty() {
        bail!(
            "{tok_what}: the tokenizer appends {:?} (ids {after:?}) after every prompt's text \
             (a BERT-style post-processor); a causal LM's prompt must end with its own last \
             token; the tokenizer and the model config do not belong together",
            names(after)
        );
    }
    let before = &full[..start];
    if !before.is_empty() && before != cfg.bos_token_id.as_slice() {
        bail!(
            "{tok_what}: the tokenizer prepends {:?} (ids {before:?}) to every prompt but {bos_field} \
             is {:?}; the tokenizer and the model config do not belong together",
            names(before),
            cfg.bos_token_id
        );
    }
    Ok(())
}

// The pre-tokenizer regexes of the BPE families llama.cpp names in `tokenizer.ggml.pre`.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn md<'a>(c: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    c.metadata
        .get(key)
        .ok_or_else(|| anyhow!("GGUF metadata `{key}` is missing"))
}

/// Rebuild the HF tokenizer of a GGUF file from `tokenizer.ggml.*`: BPE from tokens + merges,
/// the pre-tokenizer named by `tokenizer.ggml.pre`, byte-level decoding, control tokens
/// (token_type 3) as special tokens, and BOS prepended when `add_bos_token` says so.
pub fn tokenizer_from_gguf(c: &gguf_file::Content) -> Result<Tokenizer> {
    let model = md(c, "tokenizer.ggml.model")?.to_string()?.clone();
    if model != "gpt2" {
        bail!("GGUF `tokenizer.ggml.model` is {model:?}: only byte-level BPE (\"gpt2\") is implemented");
    }
    let tokens: Vec<String> = md(c, "tokenizer.ggml.tokens")?
        .to_vec()?
        .iter()
        .map(|v| v.to_string().cloned())
        .collect::<candle_core::Result<_>>()
        .context("GGUF `tokenizer.ggml.tokens`")?;
    let merges: Vec<(String, String)> = md(c, "tokenizer.ggml.merges")?
        .to_vec()?
        .iter()
        .map(|v| {
            let s = v.to_string()?;
            s.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| candle_core::Error::Msg(format!("merge {s:?} has no space")))
        })
        .collect::<candle_core::Result<_>>()
        .context("GGUF `tokenizer.ggml.merges`")?;
    let types: Vec<i32> = match c.metadata.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()?
            .iter()
            .map(|x| x.to_i32())
            .collect::<candle_core::Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("building BPE from GGUF vocab: {e}"))?;
    let pre = c
        .metadata
        .get("tokenizer.ggml.pre")
        .map(|v| v.to_string().cloned())
        .transpose()?
        .unwrap_or_else(|| "default".into());
    let byte_level = ByteLevel::new(false, true, true);
    let pre_tok: PreTokenizerWrapper = match pre.as_str() {
        // SmolLM / StarCoder: digits split one by one, then GPT-2 byte level.
        "smollm" | "starcoder" | "refact" => Sequence::new(vec![
            Digits::new(true).into(),
            byte_level.into(),
        ])
        .into(),
        "default" | "gpt2" | "gpt-2" => byte_level.into(),
        "qwen2" | "llama-bpe" | "llama3" => {
            let re = if pre == "qwen2" {
                QWEN2_SPLIT
            } else {
                LLAMA3_SPLIT
            };
            let split = Split::new(
                SplitPattern::Regex(re.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, false, false).into()]).into()
        }
        other => bail!(
            "GGUF `tokenizer.ggml.pre` = {other:?} is not implemented (smollm, starcoder, gpt2, qwen2, llama-bpe)"
        ),
    };
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(pre_tok));
    tok.with_decoder(Some(byte_level));
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types.iter().chain(std::iter::repeat(&1)))
        .filter(|(_, &ty)| ty == 3)
        .map(|(t, _)| AddedToken::from(t.clone(), true))
        .collect();
    tok.add_special_tokens(special)
        .map_err(|e| anyhow!("adding special tokens: {e}"))?;
    let add_bos = c
        .metadata
        .get("tokenizer.ggml.add_bos_token")
        .map(|v| v.to_bool())
        .transpose()?
        .unwrap_or(false);
    if add_bos {
        let bos = md(c, "tokenizer.ggml.bos_token_id")?.to_u32()?;
        let name = tokens
            .get(bos as usize)
            .ok_or_else(|| anyhow!("GGUF bos_token_id {bos} outside the vocabulary"))?
            .clone();
        let post = TemplateProcessing::builder()
            .try_single(format!("{name}:0 $A:0"))
            .map_err(|e| anyhow!("{e}"))?
            .special_tokens(vec![(name, bos)])
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        tok.with_post_processor(Some(post));
    }
    Ok(tok)
}

/// Token ids of every catalogue title, computed once per catalogue and model: `tokens` packed,
/// title of item `id` at `offsets[id]..offsets[id+1]` (id 0, padding, is empty). Titles are
/// tokenised on their own, without special tokens, the way a continuation of a prompt that
/// ends with an opening quote is scored.
#[derive(Clone, Debug, Default)]
pub struct TitleTokens {
    pub tokens: Vec<u32>,
    pub offsets: Vec<u32>,
}

impl TitleTokens {
    /// Tokenise `titles` (indexed by item id) in one batch call.
    pub fn build(tok: &Tokenizer, titles: &[String]) -> Result<Self> {
        let enc = tok
            .encode_batch(titles.iter().map(|s| s.as_str()).collect::<Vec<_>>(), false)
            .map_err(|e| anyhow!("tokenising catalogue titles: {e}"))?;
        let mut t = Self {
            tokens: Vec::new(),
            offsets: vec![0],
        };
        for (id, e) in enc.iter().enumerate() {
            if id > 0 && e.get_ids().is_empty() {
                bail!("item {id}: title {:?} tokenises to nothing", titles[id]);
            }
            t.tokens.extend_from_slice(e.get_ids());
            t.offsets.push(t.tokens.len() as u32);
        }
        Ok(t)
    }

    pub fn get(&self, id: u32) -> &[u32] {
        &self.tokens[self.offsets[id as usize] as usize..self.offsets[id as usize + 1] as usize]
    }

    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
