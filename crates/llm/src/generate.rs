//! Batched greedy generation with a KV cache: all prompts are prefilled in one packed forward,
//! then every step feeds one token per unfinished sequence, each continuing its own cache.
//! A sequence stops at an EOS id, at the closing quote of the answer format (the text is cut
//! before it), or after `max_new_tokens`. Cost per step: one packed forward of `active` tokens
//! plus a cache append (a copy of the cache: O(length) per step, fine for titles).

use crate::decoder::{KvCache, PackedBatch};
use crate::load::Llm;
use crate::score::argmax_rows;
use anyhow::{ensure, Result};

/// Why generation stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An EOS id was produced (not included in the output).
    Eos,
    /// The stop string appeared (the text is cut before it).
    StopString,
    /// `max_new_tokens` reached.
    MaxTokens,
}

/// Options of [`generate_greedy`].
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Stop when the decoded text contains this (the answer format's closing quote).
    pub stop: Option<String>,
    /// Extra stop ids besides the model's EOS ids.
    pub extra_eos: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            stop: Some(crate::prompt::CLOSE_QUOTE.to_string()),
            extra_eos: vec![],
        }
    }
}

/// One generated continuation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generated {
    /// Decoded text, cut before the stop string.
    pub text: String,
    /// The generated ids (EOS excluded).
    pub tokens: Vec<u32>,
    pub stop: StopReason,
}

/// Greedy-decode a continuation of every prompt.
pub fn generate_greedy(
    llm: &Llm,
    prompts: &[Vec<u32>],
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    ensure!(!prompts.is_empty(), "no prompts to generate from");
    let mut eos = llm.eos_ids();
    eos.extend_from_slice(&opts.extra_eos);
    let n = prompts.len();
    let mut out: Vec<Option<Generated>> = vec![None; n];
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
    let batch = PackedBatch::new(prompts);
    let f = llm.decoder.forward_packed(&batch, &[], true)?;
    let last = llm.decoder.rows(&f.hidden, &batch.last_positions())?;
    let mut next = argmax_rows(&llm.decoder.logits(&last)?)?;
    let mut caches: Vec<Option<KvCache>> = f.caches.into_iter().map(Some).collect();
    let mut active: Vec<usize> = (0..n).collect();
    let max_ctx = llm.config().max_position_embeddings;
    loop {
        // Record the token just chosen for every active sequence, retire finished ones.
        let mut still = Vec::with_capacity(active.len());
        for (k, &i) in active.iter().enumerate() {
            let t = next[k];
            if eos.contains(&t) {
                out[i] = Some(finish(llm, &tokens[i], StopReason::Eos, opts)?);
                caches[i] = None;
                continue;
            }
            tokens[i].push(t);
            let text = llm.decode(&tokens[i])?;
            if opts
                .stop
                .as_ref()
                .is_some_and(|s| text.contains(s.as_str()))
            {
                out[i] = Some(finish(llm, &tokens[i], StopReason::StopString, opts)?);
                caches[i] = None;
            } else if tokens[i].len() >= opts.max_new_tokens
                || caches[i].as_ref().unwrap().len + 1 >= max_ctx
            {
                out[i] = Some(finish(llm, &tokens[i], StopReason::MaxTokens, opts)?);
                caches[i] = None;
            } else {
                still.push(i);
            }
        }
        active = still;
        if active.is_empty() {
            break;
        }
        let refs: Vec<&KvCache> = active
            .iter()
            .map(|&i| caches[i].as_ref().unwrap())
            .collect();
        let mut step = PackedBatch::new::<Vec<u32>>(&[]);
        for (k, &i) in active.iter().enumerate() {
            step.push(&[*tokens[i].last().unwrap()], Some(k));
        }
        let f = llm.decoder.forward_packed(&step, &refs, true)?;
        next = argmax_rows(&llm.decoder.logits(&f.hidden)?)?;
        for (&i, c) in active.iter().zip(f.caches) {
            caches[i] = Some(c);
        }
    }
    Ok(out.into_iter().map(|g| g.unwrap()).collect())
}

fn finish(
    llm: &Llm,
    tokens: &[u32],
    stop: StopReason,
    opts: &GenerateOptions,
) -> Result<Generated> {
    let mut text = llm.decode(tokens)?;
    if let Some(s) = &opts.stop {
        if let Some(at) = text.find(s.as_str()) {
            text.truncate(at);
        }
    }
    Ok(Generated {
        text,
        tokens: tokens.to_vec(),
        stop,
    })
}
