//! Grounding search: for each query embedding, the k catalogue rows nearest in L2 distance.

use anyhow::{bail, Result};

/// Top-k neighbours per query, nearest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Nearest {
    pub k: usize,
    /// [queries * k] row indices into the catalogue matrix.
    pub index: Vec<u32>,
    /// [queries * k] squared L2 distances.
    pub dist2: Vec<f32>,
}

/// `queries` [b, d] and `catalog` [n, d], row-major f32. Ties break toward the lower index.
/// Rows listed in `exclude` (e.g. padding row 0) are never returned.
pub fn nearest_items(
    queries: &[f32],
    catalog: &[f32],
    d: usize,
    k: usize,
    exclude: &[u32],
) -> Result<Nearest> {
    if d == 0 || queries.len() % d != 0 || catalog.len() % d != 0 {
        bail!("nearest_items: buffers are not multiples of d={d}");
    }
    let b = queries.len() / d;
    let n = catalog.len() / d;
    let k = k.min(n.saturating_sub(exclude.len()));
    let norms: Vec<f32> = catalog
        .chunks_exact(d)
        .map(|r| r.iter().map(|x| x * x).sum())
        .collect();
    let mut index = Vec::with_capacity(b * k);
    let mut dist2 = Vec::with_capacity(b * k);
    for q in queries.chunks_exact(d) {
        let qn: f32 = q.iter().map(|x| x * x).sum();
        let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
        for (j, row) in catalog.chunks_exact(d).enumerate() {
            if exclude.contains(&(j as u32)) {
                continue;
            }
            let dot: f32 = q.iter().zip(row).map(|(a, b)| a * b).sum();
            let dd = (qn + norms[j] - 2.0 * dot).max(0.0);
            if best.len() < k || dd < best[best.len() - 1].0 {
                let at = best.partition_point(|&(x, _)| x <= dd);
                best.insert(at, (dd, j as u32));
                best.truncate(k);
            }
        }
        index.extend(best.iter().map(|x| x.1));
        dist2.extend(best.iter().map(|x| x.0));
    }
    Ok(Nearest { k, index, dist2 })
}
