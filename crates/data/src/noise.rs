//! Noise scores: how likely each item of a sequence is noise (higher = more likely). Every
//! detector (the LLM's first-token or full-title likelihood, cheap heuristics such as item
//! popularity, a backbone's own likelihood) implements [`NoiseScorer`], so the `score` stage,
//! sharding and the correction threshold are written once.

use anyhow::Result;

/// Scores packed sequences: sequence s is `items[offsets[s]..offsets[s+1]]` (the items the
/// detector may look at: the whole window for training data, the history for valid/test).
pub trait NoiseScorer {
    /// A short name recorded in outputs and manifests, e.g. "llm-first-token", "popularity".
    fn name(&self) -> &str;
    /// One score per item position, aligned with `items`.
    fn score(&mut self, items: &[u32], offsets: &[u32]) -> Result<Vec<f32>>;
}
