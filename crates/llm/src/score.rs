//! Item scoring: how strongly the model names each item of a window as the noise item, given
//! the scoring prompt (`... Noise Items: "`).
//!
//! - [`first_token_scores`] (the reference method): one forward per prompt, log-softmax at
//!   the last position, each item's first title token gathered. Cost: the prompt forward plus
//!   one `[hidden x vocab]` row per window. Titles sharing a first token tie.
//! - [`continuation_scores`] (full-title likelihood): the prompt's KV cache is computed once
//!   and every item's title + closing quote is scored as a continuation of it, all items of
//!   all windows of a batch in one packed forward. Per-item log-probabilities go through
//!   `llm4dsr_kernels::item_loglik`, which never materialises `[tokens x vocab]` for the whole
//!   batch (chunked on CPU, fused on GPU).
//!
//! [`LlmNoiseScorer`] wraps both as a `llm4dsr_data::NoiseScorer` over catalogue item ids.

use crate::decoder::{log_softmax, KvCache, PackedBatch};
use crate::load::Llm;
use crate::prompt;
use crate::tokenizer::TitleTokens;
use anyhow::{bail, ensure, Result};
use candle_core::{Tensor, D};
use llm4dsr_data::{Catalog, NoiseScorer};
use serde::{Deserialize, Serialize};

/// Rows of `[rows x vocab]` logits materialised at once by the first-token path.
pub const FIRST_TOKEN_CHUNK_ROWS: usize = 16;

/// Which score an item gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ScoreMode {
    /// log P(first title token | prompt): the reference method (ties on shared first tokens).
    FirstToken,
    /// Sum of the log-probs of the title's tokens and the closing quote.
    FullTitle,
    /// `FullTitle` divided by the number of scored tokens.
    FullTitleMean,
}

impl ScoreMode {
    pub fn name(self) -> &'static str {
        match self {
            ScoreMode::FirstToken => "llm-first-token",
            ScoreMode::FullTitle => "llm-full-title",
            ScoreMode::FullTitleMean => "llm-full-title-mean",
        }
    }
}

/// Score of one continuation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ContinuationScore {
    /// Sum of token log-probs.
    pub sum: f32,
    /// Number of tokens scored.
    pub tokens: u32,
    /// log-prob of the first token alone (equals the first-token score).
    pub first: f32,
}

impl ContinuationScore {
    pub fn mean(&self) -> f32 {
        self.sum / self.tokens.max(1) as f32
    }
}

/// A token prefix that many prompts start with (the template's preamble and instruction, ~90
/// of a ~230-token scoring prompt), forwarded once; prompts that start with exactly these ids
/// continue its cache instead of recomputing it.
pub struct SharedPrefix {
    pub ids: Vec<u32>,
    pub cache: KvCache,
}

impl SharedPrefix {
    /// Forward `ids` once. Trailing tokens whose merge may depend on what follows are the
    /// caller's concern: a prompt that does not start with `ids` is simply run in full.
    pub fn new(llm: &Llm, ids: Vec<u32>) -> Result<Self> {
        ensure!(!ids.is_empty(), "empty shared prefix");
        let (_, cache) = llm.decoder.prefill(&ids)?;
        Ok(Self { ids, cache })
    }
}

/// Last-position hidden states `[prompts, hidden]` of prompts forwarded as one packed batch
/// (continuing `shared` where a prompt starts with it), plus their full caches when requested.
fn prompt_forward(
    llm: &Llm,
    prompts: &[Vec<u32>],
    shared: Option<&SharedPrefix>,
    want_cache: bool,
) -> Result<(Tensor, Vec<KvCache>)> {
    ensure!(!prompts.is_empty(), "no prompts to score");
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        bail!("prompt {i} is empty");
    }
    let mut batch = PackedBatch::new::<Vec<u32>>(&[]);
    let mut caches: Vec<&KvCache> = Vec::new();
    for p in prompts {
        match shared {
            Some(s) if p.len() > s.ids.len() && p.starts_with(&s.ids) => {
                caches = vec![&s.cache];
                batch.push(&p[s.ids.len()..], Some(0));
            }
            _ => batch.push(p, None),
        }
    }
    let f = llm.decoder.forward_packed(&batch, &caches, want_cache)?;
    let last = llm.decoder.rows(&f.hidden, &batch.last_positions())?;
    Ok((last, f.caches))
}

/// First-token scores: `out[w][j]` = log P(`first_tokens[w][j]` | `prompts[w]`).
pub fn first_token_scores(
    llm: &Llm,
    prompts: &[Vec<u32>],
    first_tokens: &[Vec<u32>],
) -> Result<Vec<Vec<f32>>> {
    first_token_scores_shared(llm, prompts, None, first_tokens)
}

/// [`first_token_scores`], continuing `shared` for prompts that start with it.
pub fn first_token_scores_shared(
    llm: &Llm,
    prompts: &[Vec<u32>],
    shared: Option<&SharedPrefix>,
    first_tokens: &[Vec<u32>],
) -> Result<Vec<Vec<f32>>> {
    ensure!(
        prompts.len() == first_tokens.len(),
        "{} prompts but {} candidate lists",
        prompts.len(),
        first_tokens.len()
    );
    let (last, _) = prompt_forward(llm, prompts, shared, false)?;
    let mut out = Vec::with_capacity(prompts.len());
    let mut start = 0;
    while start < prompts.len() {
        let n = FIRST_TOKEN_CHUNK_ROWS.min(prompts.len() - start);
        let cands = &first_tokens[start..start + n];
        let width = cands.iter().map(Vec::len).max().unwrap_or(0);
        let vocab = llm.config().vocab_size;
        let mut idx = Vec::with_capacity(n * width);
        for c in cands {
            if let Some(&t) = c.iter().find(|&&t| t as usize >= vocab) {
                bail!("candidate token {t} outside the vocabulary");
            }
            idx.extend_from_slice(c);
            idx.extend(std::iter::repeat_n(0, width - c.len()));
        }
        if width == 0 {
            out.extend(cands.iter().map(|_| Vec::new()));
            start += n;
            continue;
        }
        // Gathered where the logits are: only `n x width` values leave the device.
        let logp = log_softmax(&llm.decoder.logits(&last.narrow(0, start, n)?)?)?;
        let idx = Tensor::from_vec(idx, (n, width), logp.device())?;
        let picked: Vec<Vec<f32>> = logp.gather(&idx, 1)?.to_vec2()?;
        for (mut row, c) in picked.into_iter().zip(cands) {
            row.truncate(c.len());
            out.push(row);
        }
        start += n;
    }
    Ok(out)
}

/// Continuation scores: `out[w][j]` scores `continuations[w][j]` (token ids, non-empty) as the
/// text following `prompts[w]`. The prompt's cache is computed once per window and shared by
/// all its continuations.
pub fn continuation_scores(
    llm: &Llm,
    prompts: &[Vec<u32>],
    continuations: &[Vec<Vec<u32>>],
) -> Result<Vec<Vec<ContinuationScore>>> {
    continuation_scores_shared(llm, prompts, None, continuations)
}

/// [`continuation_scores`], continuing `shared` for prompts that start with it.
pub fn continuation_scores_shared(
    llm: &Llm,
    prompts: &[Vec<u32>],
    shared: Option<&SharedPrefix>,
    continuations: &[Vec<Vec<u32>>],
) -> Result<Vec<Vec<ContinuationScore>>> {
    ensure!(
        prompts.len() == continuations.len(),
        "{} prompts but {} continuation lists",
        prompts.len(),
        continuations.len()
    );
    let (last, caches) = prompt_forward(llm, prompts, shared, true)?;
    let cache_refs: Vec<&KvCache> = caches.iter().collect();
    // Token t_k of a continuation is predicted by the hidden state of t_{k-1}, and t_1 by the
    // prompt's last position; so only t_1..t_{n-1} are forwarded.
    let mut batch = PackedBatch::new::<Vec<u32>>(&[]);
    let mut targets = Vec::new();
    let mut offsets = vec![0u32];
    let mut rows = Vec::new(); // into cat([last, continuation hidden])
    let b = prompts.len() as u32;
    for (w, conts) in continuations.iter().enumerate() {
        for (j, c) in conts.iter().enumerate() {
            ensure!(!c.is_empty(), "window {w}: continuation {j} is empty");
            rows.push(w as u32);
            if c.len() > 1 {
                let base = b + batch.tokens.len() as u32;
                batch.push(&c[..c.len() - 1], Some(w));
                rows.extend(base..base + c.len() as u32 - 1);
            }
            targets.extend_from_slice(c);
            offsets.push(targets.len() as u32);
        }
    }
    let hidden = if batch.num_seqs() > 0 {
        let f = llm.decoder.forward_packed(&batch, &cache_refs, false)?;
        Tensor::cat(&[&last, &f.hidden], 0)?
    } else {
        last
    };
    let h = llm.decoder.rows(&hidden, &rows)?;
    let ll = llm4dsr_kernels::item_loglik(&h, &llm.decoder.lm_head, &targets, &offsets)?;
    let mut out = Vec::with_capacity(prompts.len());
    let mut k = 0;
    for conts in continuations {
        let mut v = Vec::with_capacity(conts.len());
        for _ in conts {
            let (a, e) = (offsets[k] as usize, offsets[k + 1] as usize);
            v.push(ContinuationScore {
                sum: ll.per_item[k],
                tokens: (e - a) as u32,
                first: ll.per_token[a],
            });
            k += 1;
        }
        out.push(v);
    }
    Ok(out)
}

/// A sequence whose scoring does not fit the model's context, found from token counts before
/// any forward (a 660-item window would otherwise run for minutes first). `sequence` indexes
/// the sequences of the call that refused it (for [`NoiseScorer::score`]: the sequences of its
/// `offsets`, empty ones included), so that a caller can name the window (user, pos, file):
/// `err.downcast_ref::<SequenceTooLong>()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SequenceTooLong {
    pub sequence: usize,
    pub items: usize,
    /// Tokens of the scoring prompt.
    pub prompt_tokens: usize,
    /// Positions past the prompt the longest scored title needs (0 for first-token scores).
    pub title_tokens: usize,
    /// The model's `max_position_embeddings`.
    pub context: usize,
}

impl std::fmt::Display for SequenceTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "sequence {} ({} items): its scoring prompt is {} tokens",
            self.sequence, self.items, self.prompt_tokens
        )?;
        if self.title_tokens > 0 {
            write!(f, " (+{} for its longest title)", self.title_tokens)?;
        }
        write!(
            f,
            " but the model's context is {} tokens (max_position_embeddings); score shorter windows",
            self.context
        )
    }
}

impl std::error::Error for SequenceTooLong {}

/// The LLM as a noise detector over catalogue items: builds the scoring prompt of each
/// sequence from its titles and scores every item with `mode`. Titles are tokenised once, at
/// construction.
pub struct LlmNoiseScorer<'a> {
    llm: &'a Llm,
    catalog: &'a Catalog,
    titles: TitleTokens,
    /// Each title with its closing quote, tokenised together: the full-title continuations.
    /// Tokenised apart, a title ending in punctuation would end in two tokens (`)` `"`) where
    /// the model reads and writes one (`)"`: byte-level BPE pre-tokenizers keep runs of
    /// punctuation together), and its score would carry a penalty unrelated to noise.
    continuations: TitleTokens,
    pub mode: ScoreMode,
    /// Windows per forward batch (memory: a ~250-token prompt's cache is ~12 MB for SmolLM2).
    pub windows_per_batch: usize,
    /// Show a progress bar.
    pub progress: bool,
    /// The template head every scoring prompt starts with, forwarded once (None: disabled).
    shared: Option<SharedPrefix>,
}

impl<'a> LlmNoiseScorer<'a> {
    pub fn new(llm: &'a Llm, catalog: &'a Catalog, mode: ScoreMode) -> Result<Self> {
        let titles = TitleTokens::build(&llm.tokenizer, &catalog.titles)?;
        let closed: Vec<String> = catalog
            .titles
            .iter()
            .enumerate()
            .map(|(id, t)| match id {
                0 => String::new(),
                _ => format!("{t}{}", prompt::CLOSE_QUOTE),
            })
            .collect();
        let continuations = TitleTokens::build(&llm.tokenizer, &closed)?;
        let mut s = Self {
            llm,
            catalog,
            titles,
            continuations,
            mode,
            windows_per_batch: 8,
            progress: false,
            shared: None,
        };
        s.set_share_template(true)?;
        Ok(s)
    }

    /// Forward the template head shared by all scoring prompts once and continue its cache
    /// (on by default; exact: a prompt whose ids do not start with the head's is run in full).
    pub fn set_share_template(&mut self, on: bool) -> Result<()> {
        self.shared = None;
        if on {
            // The ids two prompts with different titles have in common (the preamble,
            // instruction and input label), less two tokens that might merge with a title.
            let mut ids = self.llm.encode_prompt(&prompt::scoring_prefix(&["x"]))?;
            let other = self.llm.encode_prompt(&prompt::scoring_prefix(&["y z"]))?;
            let common = ids.iter().zip(&other).take_while(|(a, b)| a == b).count();
            ids.truncate(common.saturating_sub(2));
            if !ids.is_empty() {
                self.shared = Some(SharedPrefix::new(self.llm, ids)?);
            }
        }
        Ok(())
    }

    /// Number of prompt tokens computed once and shared (0 when sharing is off).
    pub fn shared_prefix_len(&self) -> usize {
        self.shared.as_ref().map(|s| s.ids.len()).unwrap_or(0)
    }

    /// The cached title tokens (per catalogue id).
    pub fn title_tokens(&self) -> &TitleTokens {
        &self.titles
    }

    /// The scoring prompt's token ids for a sequence of item ids.
    pub fn prompt_tokens(&self, items: &[u32]) -> Result<Vec<u32>> {
        let titles: Vec<&str> = items
            .iter()
            .map(|&i| self.title(i))
            .collect::<Result<_>>()?;
        self.llm.encode_prompt(&prompt::scoring_prefix(&titles))
    }

    /// Check that scoring `items` with the prompt `prompt` fits the model's context: the prompt,
    /// plus (`titles`: full-title scores) every title but its last token, forwarded after it.
    /// Token counts only, no forward. `sequence` goes into the error.
    pub fn check_fits(
        &self,
        sequence: usize,
        prompt: &[u32],
        items: &[u32],
        titles: bool,
    ) -> std::result::Result<(), SequenceTooLong> {
        let title_tokens = if titles {
            items
                .iter()
                .filter(|&&i| (i as usize) < self.continuations.len())
                .map(|&i| self.continuations.get(i).len() - 1)
                .max()
                .unwrap_or(0)
        } else {
            0
        };
        let context = self.llm.config().max_position_embeddings;
        if prompt.len() + title_tokens > context {
            return Err(SequenceTooLong {
                sequence,
                items: items.len(),
                prompt_tokens: prompt.len(),
                title_tokens,
                context,
            });
        }
        Ok(())
    }

    /// The prompts of `chunk` (sequences `first..` of the call), each checked by
    /// [`Self::check_fits`] before anything is forwarded.
    fn chunk_prompts(&self, first: usize, chunk: &[&[u32]], titles: bool) -> Result<Vec<Vec<u32>>> {
        chunk
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let p = self.prompt_tokens(s)?;
                self.check_fits(first + k, &p, s, titles)?;
                Ok(p)
            })
            .collect()
    }

    fn title(&self, id: u32) -> Result<&str> {
        ensure!(
            id >= 1 && id <= self.catalog.num_items(),
            "item id {id} is not in the catalogue (1..={})",
            self.catalog.num_items()
        );
        Ok(self.catalog.title(id))
    }

    /// The continuation scored for an item: its title and the closing quote, tokenised
    /// together (so `(1995)"` ends in the model's `)"`, not in `)` then `"`).
    pub fn continuation(&self, id: u32) -> Vec<u32> {
        self.continuations.get(id).to_vec()
    }

    /// All three scores of every item of `sequences` (one entry per item).
    pub fn score_all(&self, sequences: &[&[u32]]) -> Result<Vec<Vec<ContinuationScore>>> {
        let mut out = Vec::with_capacity(sequences.len());
        let bar = self.bar(sequences.len());
        let per = self.windows_per_batch.max(1);
        for (c, chunk) in sequences.chunks(per).enumerate() {
            let prompts = self.chunk_prompts(c * per, chunk, true)?;
            let conts: Vec<Vec<Vec<u32>>> = chunk
                .iter()
                .map(|s| s.iter().map(|&i| self.continuation(i)).collect())
                .collect();
            out.extend(continuation_scores_shared(
                self.llm,
                &prompts,
                self.shared.as_ref(),
                &conts,
            )?);
            bar.inc(chunk.len() as u64);
        }
        bar.finish_and_clear();
        Ok(out)
    }

    fn bar(&self, n: usize) -> indicatif::ProgressBar {
        if !self.progress {
            return indicatif::ProgressBar::hidden();
        }
        let b = indicatif::ProgressBar::new(n as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} {wide_bar} {pos}/{len} windows ({per_sec}, eta {eta})",
            )
            .unwrap(),
        );
        b.set_message(self.mode.name());
        b
    }

    /// Scores of `mode` for every item of `sequences`.
    pub fn score_sequences(&self, sequences: &[&[u32]]) -> Result<Vec<Vec<f32>>> {
        if self.mode == ScoreMode::FirstToken {
            let mut out = Vec::with_capacity(sequences.len());
            let bar = self.bar(sequences.len());
            let per = self.windows_per_batch.max(1);
            for (c, chunk) in sequences.chunks(per).enumerate() {
                let prompts = self.chunk_prompts(c * per, chunk, false)?;
                let firsts: Vec<Vec<u32>> = chunk
                    .iter()
                    .map(|s| s.iter().map(|&i| self.continuation(i)[0]).collect())
                    .collect();
                out.extend(first_token_scores_shared(
                    self.llm,
                    &prompts,
                    self.shared.as_ref(),
                    &firsts,
                )?);
                bar.inc(chunk.len() as u64);
            }
            bar.finish_and_clear();
            return Ok(out);
        }
        let all = self.score_all(sequences)?;
        Ok(all
            .into_iter()
            .map(|v| {
                v.into_iter()
                    .map(|s| match self.mode {
                        ScoreMode::FullTitleMean => s.mean(),
                        _ => s.sum,
                    })
                    .collect()
            })
            .collect())
    }
}

impl NoiseScorer for LlmNoiseScorer<'_> {
    fn name(&self) -> &str {
        self.mode.name()
    }

    fn score(&mut self, items: &[u32], offsets: &[u32]) -> Result<Vec<f32>> {
        llm4dsr_kernels::item_loglik::validate_offsets(offsets, items.len())?;
        let seqs: Vec<&[u32]> = offsets
            .windows(2)
            .map(|w| &items[w[0] as usize..w[1] as usize])
            .collect();
        let kept: Vec<usize> = (0..seqs.len()).filter(|&i| !seqs[i].is_empty()).collect();
        let nonempty: Vec<&[u32]> = kept.iter().map(|&i| seqs[i]).collect();
        // A refused sequence is named by its index in `offsets`, not among the non-empty ones.
        let scores =
            self.score_sequences(&nonempty)
                .map_err(|e| match e.downcast::<SequenceTooLong>() {
                    Ok(mut t) => {
                        t.sequence = kept[t.sequence];
                        anyhow::Error::new(t)
                    }
                    Err(e) => e,
                })?;
        let out: Vec<f32> = scores.into_iter().flatten().collect();
        ensure!(out.len() == items.len(), "internal: score count mismatch");
        Ok(out)
    }
}

/// Argmax over the last dimension of `[rows, vocab]` logits.
pub(crate) fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}
