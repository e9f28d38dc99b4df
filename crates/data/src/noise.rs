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

/// How well a detector's top-k flags match the injected noise masks.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DetectionMetrics {
    /// Flags per sequence (the k highest-scoring positions).
    pub k: usize,
    pub sequences: u64,
    /// Positions scored (all sequences).
    pub positions: u64,
    /// Positions with mask != 0 among them.
    pub noisy_positions: u64,
    /// Flagged positions (k per sequence, fewer for shorter sequences).
    pub flagged: u64,
    /// Flagged positions that are noisy.
    pub true_positives: u64,
    /// The most true positives any flagging could reach: per sequence, its noisy positions,
    /// at most k.
    pub max_true_positives: u64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Precision of flagging uniformly at random (= noisy_positions / positions).
    pub random_precision: f64,
    /// Precision of a perfect detector (max_true_positives / flagged): below 1 when some
    /// sequences hold fewer than k noisy positions (with k = 1: the share of sequences
    /// holding noise).
    pub precision_ceiling: f64,
}

/// Flag the `k` highest-scoring positions of each sequence (ties: the earlier position) and
/// compare with `mask` (non-zero = noise). Sequences are packed like [`NoiseScorer::score`].
pub fn detection_metrics(
    scores: &[f32],
    mask: &[u8],
    offsets: &[u32],
    k: usize,
) -> DetectionMetrics {
    assert_eq!(scores.len(), mask.len(), "scores and masks are not aligned");
    let mut m = DetectionMetrics {
        k,
        ..Default::default()
    };
    let mut order: Vec<usize> = Vec::new();
    for w in offsets.windows(2) {
        let (a, b) = (w[0] as usize, w[1] as usize);
        m.sequences += 1;
        m.positions += (b - a) as u64;
        let noisy = mask[a..b].iter().filter(|&&x| x != 0).count();
        m.noisy_positions += noisy as u64;
        m.max_true_positives += noisy.min(k) as u64;
        order.clear();
        order.extend(a..b);
        order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]).then(i.cmp(&j)));
        for &i in order.iter().take(k) {
            m.flagged += 1;
            m.true_positives += (mask[i] != 0) as u64;
        }
    }
    let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    m.precision = ratio(m.true_positives, m.flagged);
    m.recall = ratio(m.true_positives, m.noisy_positions);
    m.f1 = if m.precision + m.recall > 0.0 {
        2.0 * m.precision * m.recall / (m.precision + m.recall)
    } else {
        0.0
    };
    m.random_precision = ratio(m.noisy_positions, m.positions);
    m.precision_ceiling = ratio(m.max_true_positives, m.flagged);
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_detection_by_hand() {
        // seq 0: noise at 1, top score at 1 (hit); seq 1: noise at 0, top score at 2 (miss).
        let scores = [0.1, 0.9, 0.2, 0.0, 0.5, 0.7];
        let mask = [0, 1, 0, 1, 0, 0];
        let m = detection_metrics(&scores, &mask, &[0, 3, 6], 1);
        assert_eq!((m.flagged, m.true_positives, m.noisy_positions), (2, 1, 2));
        assert!((m.precision - 0.5).abs() < 1e-12 && (m.recall - 0.5).abs() < 1e-12);
        assert!((m.random_precision - 2.0 / 6.0).abs() < 1e-12);
        assert!((m.precision_ceiling - 1.0).abs() < 1e-12);
        let m2 = detection_metrics(&scores, &mask, &[0, 3, 6], 3);
        assert_eq!((m2.flagged, m2.true_positives), (6, 2));
        assert!((m2.recall - 1.0).abs() < 1e-12);
        // Three flags per sequence, one noisy position in each: a perfect detector hits 2 of 6.
        assert_eq!(m2.max_true_positives, 2);
        assert!((m2.precision_ceiling - 2.0 / 6.0).abs() < 1e-12);
        // A sequence without noise lowers the top-1 ceiling to the share of noisy sequences.
        let m3 = detection_metrics(&scores, &[0, 1, 0, 0, 0, 0], &[0, 3, 6], 1);
        assert!((m3.precision_ceiling - 0.5).abs() < 1e-12);
        assert_eq!(m3.true_positives, 1);
    }
}
