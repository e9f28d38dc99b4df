//! Ranking metrics from the exact rank of the target. The rank is the number of catalogue
//! items that score above the target, plus those that tie with it (ties count against the
//! target: the pessimistic convention, so a model that scores everything equal gets no
//! credit). Counting is O(items) per user and needs no sort. HR@K = [rank < K];
//! NDCG@K = 1 / log2(rank + 2) when rank < K (one relevant item, so IDCG = 1).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// The cut-offs reported.
pub const KS: [usize; 5] = [1, 5, 10, 20, 50];

/// 0-based rank of `target` among `scores[1..]` (column 0 is padding and never ranked).
/// `excluded` items (e.g. the history, under the masking policy) are skipped unless they are
/// the target. Errors on a NaN score.
pub fn rank_of_target(scores: &[f32], target: usize, excluded: &[u32]) -> Result<usize> {
    let st = scores[target];
    if st.is_nan() {
        bail!("NaN score for the target item {target}");
    }
    let mut rank = 0usize;
    for (j, &s) in scores.iter().enumerate().skip(1) {
        if j != target && s >= st {
            rank += 1;
        }
    }
    for &e in excluded {
        let e = e as usize;
        if e != 0 && e != target && scores[e] >= st {
            rank -= 1;
        }
    }
    Ok(rank)
}

/// HR@k of one rank.
pub fn hit(rank: usize, k: usize) -> f64 {
    if rank < k {
        1.0
    } else {
        0.0
    }
}

/// NDCG@k of one rank.
pub fn ndcg(rank: usize, k: usize) -> f64 {
    if rank < k {
        1.0 / ((rank + 2) as f64).log2()
    } else {
        0.0
    }
}

/// Running sums (all-reducible as one f64 buffer).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricSums {
    pub hr: [f64; 5],
    pub ndcg: [f64; 5],
    pub count: f64,
}

impl MetricSums {
    pub fn add_rank(&mut self, rank: usize) {
        for (i, &k) in KS.iter().enumerate() {
            self.hr[i] += hit(rank, k);
            self.ndcg[i] += ndcg(rank, k);
        }
        self.count += 1.0;
    }

    pub fn to_buf(&self) -> Vec<f64> {
        let mut v = self.hr.to_vec();
        v.extend_from_slice(&self.ndcg);
        v.push(self.count);
        v
    }

    pub fn from_buf(b: &[f64]) -> Self {
        let mut s = Self::default();
        s.hr.copy_from_slice(&b[0..5]);
        s.ndcg.copy_from_slice(&b[5..10]);
        s.count = b[10];
        s
    }

    pub fn finish(&self) -> Metrics {
        let n = self.count.max(1.0);
        let mut values = BTreeMap::new();
        for (i, &k) in KS.iter().enumerate() {
            values.insert(format!("HR@{k}"), self.hr[i] / n);
            values.insert(format!("NDCG@{k}"), self.ndcg[i] / n);
        }
        Metrics {
            count: self.count as u64,
            values,
        }
    }
}

/// Averaged metrics of one split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Instances ranked.
    pub count: u64,
    /// "HR@10" -> value, ...
    pub values: BTreeMap<String, f64>,
}

impl Metrics {
    pub fn get(&self, name: &str) -> f64 {
        self.values.get(name).copied().unwrap_or(f64::NAN)
    }

    /// The metric names in report order: HR@1..HR@50, NDCG@1..NDCG@50.
    pub fn names() -> Vec<String> {
        KS.iter()
            .map(|k| format!("HR@{k}"))
            .chain(KS.iter().map(|k| format!("NDCG@{k}")))
            .collect()
    }
}

/// Append `row` under `header` to a CSV file, rewriting it atomically. A file whose header
/// differs is an error (never a silently misaligned table).
pub fn append_csv_row(path: &Path, header: &[String], row: &[String]) -> Result<()> {
    let head = header.join(",");
    let mut text = if path.exists() {
        let t =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let first = t.lines().next().unwrap_or("");
        if first != head {
            bail!(
                "{}: existing header `{first}` differs from this table's `{head}` (use another --results-csv)",
                path.display()
            );
        }
        t
    } else {
        format!("{head}\n")
    };
    if !text.ends_with('\n') {
        text.push('\n');
    }
    let cells: Vec<String> = row
        .iter()
        .map(|c| {
            if c.contains(',') || c.contains('"') {
                format!("\"{}\"", c.replace('"', "\"\""))
            } else {
                c.clone()
            }
        })
        .collect();
    text.push_str(&cells.join(","));
    text.push('\n');
    llm4dsr_data::atomic::write_file(path, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_counts_higher_and_tied_items_and_skips_padding() {
        // Column 0 is padding with a huge score: ignored.
        let s = [9.0, 0.5, 0.9, 0.7, 0.7, 0.1];
        assert_eq!(rank_of_target(&s, 2, &[]).unwrap(), 0);
        assert_eq!(rank_of_target(&s, 1, &[]).unwrap(), 3);
        // A tie counts against the target.
        assert_eq!(rank_of_target(&s, 3, &[]).unwrap(), 2);
        // Masking history item 2 lifts item 3 by one; masking the target itself is ignored.
        assert_eq!(rank_of_target(&s, 3, &[2, 3]).unwrap(), 1);
        assert!(rank_of_target(&[0.0, f32::NAN], 1, &[]).is_err());
    }

    #[test]
    fn metrics_match_hand_computed_values() {
        let mut m = MetricSums::default();
        for r in [0, 3, 12, 100] {
            m.add_rank(r);
        }
        let f = m.finish();
        assert_eq!(f.count, 4);
        assert!((f.get("HR@1") - 0.25).abs() < 1e-12);
        assert!((f.get("HR@5") - 0.5).abs() < 1e-12);
        assert!((f.get("HR@20") - 0.75).abs() < 1e-12);
        // NDCG@5 = (1 + 1/log2(5)) / 4 = (1 + 0.430677) / 4
        assert!(
            (f.get("NDCG@5") - 0.357669).abs() < 1e-6,
            "{}",
            f.get("NDCG@5")
        );
        // NDCG@20 adds 1/log2(14) = 0.262650
        assert!(
            (f.get("NDCG@20") - 0.423332).abs() < 1e-6,
            "{}",
            f.get("NDCG@20")
        );
        assert_eq!(MetricSums::from_buf(&m.to_buf()), m);
    }

    #[test]
    fn csv_rows_append_and_headers_are_checked() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("r.csv");
        let h = vec!["a".to_string(), "b".to_string()];
        append_csv_row(&p, &h, &["1".into(), "x,y".into()]).unwrap();
        append_csv_row(&p, &h, &["2".into(), "z".into()]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "a,b\n1,\"x,y\"\n2,z\n"
        );
        assert!(append_csv_row(&p, &["c".to_string()], &["1".into()]).is_err());
    }
}
