//! Grounding: a generated replacement title -> a real catalogue item (method.md, step 4).
//!
//! 1. Exact title match: the title, trimmed of surrounding whitespace, equals a catalogue title
//!    byte for byte. Resolved here, before any model or kernel runs. Where the catalogue holds
//!    one title under several ids, the lowest id wins ([`CatalogueIndex::duplicate_titles`]
//!    counts the others).
//! 2. Otherwise the nearest catalogue item by L2 distance between title embeddings
//!    ([`TitleEmbedder`]: the reference is the base LLM's last-layer, last-token hidden state;
//!    all-MiniLM-L6-v2 sentence embeddings are the cheaper alternative). The search is
//!    [`llm4dsr_kernels::CatalogSearch`]: the catalogue's embeddings are uploaded to the GPU once
//!    (and prepared for the tensor-core grounding kernel) when one is present, and searched on
//!    the CPU otherwise; both return the same top-k, exact for the f32 distance of the
//!    centred embeddings (the catalogue mean subtracted, see `CatalogSearch`). Row 0
//!    (padding) is never returned.
//!
//! Titles are checked before anything runs ([`check_title`]): an empty title has nothing to
//! ground ([`Match::Empty`], item 0, counted by the caller), an over-long one is an error.

use crate::embed::{last_token_embeddings, MiniLm};
use crate::load::Llm;
use anyhow::{bail, Result};
use llm4dsr_data::Catalog;
use llm4dsr_kernels::CatalogSearch;
use std::collections::HashMap;

/// Longest title accepted for grounding, in characters (a generated title is bounded by the
/// generation budget; anything longer is a broken input, not a title).
pub const MAX_TITLE_CHARS: usize = 1024;

/// Text -> embedding, one row per text. Implementations must give a text the same row
/// whatever else is in the call (batch invariance), so any sharding of the work gives the
/// same grounding.
pub trait TitleEmbedder {
    /// Name recorded in manifests: `llm-last-token` or `minilm`.
    fn name(&self) -> &'static str;
    /// Embedding width.
    fn dim(&self) -> usize;
    /// `[texts, dim]` row-major f32.
    fn embed(&self, texts: &[&str]) -> Result<Vec<f32>>;
}

/// The reference embedding: the base LLM's last-layer hidden state (after the final norm) at
/// the last token of the title, `batch` titles per packed forward.
pub struct LastTokenEmbedder<'a> {
    pub llm: &'a Llm,
    pub batch: usize,
}

impl TitleEmbedder for LastTokenEmbedder<'_> {
    fn name(&self) -> &'static str {
        "llm-last-token"
    }
    fn dim(&self) -> usize {
        self.llm.decoder.hidden_size()
    }
    fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
        last_token_embeddings(self.llm, texts, self.batch)
    }
}

/// all-MiniLM-L6-v2 sentence embeddings (mean-pooled, unit length), `batch` titles per forward.
pub struct MiniLmEmbedder {
    pub model: MiniLm,
    pub batch: usize,
}

impl TitleEmbedder for MiniLmEmbedder {
    fn name(&self) -> &'static str {
        "minilm"
    }
    fn dim(&self) -> usize {
        self.model.hidden
    }
    fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
        self.model.embed(texts, self.batch)
    }
}

/// How a title was grounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Match {
    /// Equal to a catalogue title.
    Exact,
    /// The nearest catalogue item by embedding distance.
    Nearest,
    /// The title is empty: nothing to ground (item 0).
    Empty,
}

impl Match {
    pub fn name(self) -> &'static str {
        match self {
            Match::Exact => "exact",
            Match::Nearest => "nearest",
            Match::Empty => "empty",
        }
    }
}

/// One grounded title.
#[derive(Clone, Debug, PartialEq)]
pub struct Grounded {
    /// The catalogue item (1-based id); 0 for [`Match::Empty`].
    pub item: u32,
    pub how: Match,
    /// Squared L2 distance to `item`'s embedding (0 for exact and empty matches).
    pub dist2: f32,
    /// For [`Match::Nearest`]: the k nearest items, nearest first (`item` is the first), with
    /// their squared distances. Empty otherwise.
    pub neighbours: Vec<u32>,
    pub neighbour_dist2: Vec<f32>,
}

/// The title as matched: surrounding whitespace removed.
pub fn normalise(title: &str) -> &str {
    title.trim()
}

/// Refuse a title no grounding should see: over [`MAX_TITLE_CHARS`] characters or with a
/// control character other than tab (a stray newline means a broken generation or file).
pub fn check_title(title: &str) -> Result<()> {
    let n = title.chars().count();
    if n > MAX_TITLE_CHARS {
        bail!("title of {n} characters exceeds the limit of {MAX_TITLE_CHARS}");
    }
    if let Some(c) = title.chars().find(|c| c.is_control() && *c != '\t') {
        bail!("title contains the control character {c:?}");
    }
    Ok(())
}

/// The catalogue prepared for grounding: exact-title table + the searchable embeddings.
pub struct CatalogueIndex {
    exact: HashMap<String, u32>,
    search: CatalogSearch,
    duplicate_titles: u64,
}

impl CatalogueIndex {
    /// `embeddings`: `[num_items, d]`, row i for item id i + 1 (as [`embed_items`] returns
    /// them). Row 0 of the search matrix is padding: zeros, excluded.
    pub fn new(catalog: &Catalog, embeddings: &[f32], d: usize) -> Result<Self> {
        let n = catalog.num_items() as usize;
        if d == 0 || embeddings.len() != n * d {
            bail!(
                "catalogue embeddings: {} values for {n} items of width {d} (expected {})",
                embeddings.len(),
                n * d
            );
        }
        let mut exact = HashMap::with_capacity(n);
        let mut duplicate_titles = 0;
        for id in 1..=n as u32 {
            let t = normalise(catalog.title(id));
            if exact.contains_key(t) {
                duplicate_titles += 1;
            } else {
                exact.insert(t.to_string(), id);
            }
        }
        let mut rows = vec![0f32; d];
        rows.extend_from_slice(embeddings);
        let search = CatalogSearch::new(rows, d, &[0])?;
        Ok(Self {
            exact,
            search,
            duplicate_titles,
        })
    }

    /// The item whose title equals `title` (after [`normalise`]), if any.
    pub fn exact(&self, title: &str) -> Option<u32> {
        self.exact.get(normalise(title)).copied()
    }

    /// Catalogue titles held by more than one id (the ids after the first).
    pub fn duplicate_titles(&self) -> u64 {
        self.duplicate_titles
    }

    /// Where the nearest-item searches run: "cuda" or "cpu".
    pub fn backend(&self) -> &'static str {
        self.search.backend()
    }

    pub fn dim(&self) -> usize {
        self.search.dim()
    }

    /// The nearest-item search over the catalogue's embeddings (row 0 = padding, excluded).
    pub fn catalog_search(&self) -> &CatalogSearch {
        &self.search
    }

    /// Ground `titles`: exact matches first, then one embedding call and one search for the
    /// rest, `k` neighbours each (k >= 1). Refuses a title [`check_title`] refuses (the error
    /// names its position in `titles`).
    pub fn ground(
        &self,
        titles: &[&str],
        embedder: &dyn TitleEmbedder,
        k: usize,
    ) -> Result<Vec<Grounded>> {
        if k == 0 {
            bail!("grounding needs k >= 1 neighbours");
        }
        if embedder.dim() != self.dim() {
            bail!(
                "embedder {} gives width {}, the catalogue embeddings have {}",
                embedder.name(),
                embedder.dim(),
                self.dim()
            );
        }
        let mut out = Vec::with_capacity(titles.len());
        let mut pending: Vec<(usize, &str)> = Vec::new();
        for (i, t) in titles.iter().enumerate() {
            if let Err(e) = check_title(t) {
                bail!("title {i}: {e}");
            }
            let t = normalise(t);
            let (item, how) = if t.is_empty() {
                (0, Match::Empty)
            } else if let Some(id) = self.exact(t) {
                (id, Match::Exact)
            } else {
                pending.push((i, t));
                (0, Match::Nearest)
            };
            out.push(Grounded {
                item,
                how,
                dist2: 0.0,
                neighbours: vec![],
                neighbour_dist2: vec![],
            });
        }
        if pending.is_empty() {
            return Ok(out);
        }
        let texts: Vec<&str> = pending.iter().map(|p| p.1).collect();
        let q = embedder.embed(&texts)?;
        if q.len() != texts.len() * self.dim() {
            bail!(
                "embedder {} returned {} values for {} titles of width {}",
                embedder.name(),
                q.len(),
                texts.len(),
                self.dim()
            );
        }
        let near = self.search.search(&q, k)?;
        if near.k == 0 {
            bail!("the catalogue has no items to ground to");
        }
        for (j, &(i, _)) in pending.iter().enumerate() {
            let idx = &near.index[j * near.k..(j + 1) * near.k];
            let dist = &near.dist2[j * near.k..(j + 1) * near.k];
            let g = &mut out[i];
            g.item = idx[0];
            g.dist2 = dist[0];
            g.neighbours = idx.to_vec();
            g.neighbour_dist2 = dist.to_vec();
        }
        Ok(out)
    }
}

/// Embeddings of catalogue items `ids` (1-based), `[ids, dim]`. Refuses an empty or
/// over-long catalogue title (naming the item).
pub fn embed_items(
    catalog: &Catalog,
    ids: &[u32],
    embedder: &dyn TitleEmbedder,
) -> Result<Vec<f32>> {
    let mut texts = Vec::with_capacity(ids.len());
    for &id in ids {
        if id == 0 || id > catalog.num_items() {
            bail!(
                "item {id} is not in the catalogue (1..={})",
                catalog.num_items()
            );
        }
        let t = normalise(catalog.title(id));
        if t.is_empty() {
            bail!("item {id} has an empty title");
        }
        if let Err(e) = check_title(t) {
            bail!("item {id}: {e}");
        }
        texts.push(t);
    }
    embedder.embed(&texts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic toy embedder: letter counts (a..z), so similar titles are near.
    struct Letters;
    impl TitleEmbedder for Letters {
        fn name(&self) -> &'static str {
            "letters"
        }
        fn dim(&self) -> usize {
            26
        }
        fn embed(&self, texts: &[&str]) -> Result<Vec<f32>> {
            let mut v = vec![0f32; texts.len() * 26];
            for (i, t) in texts.iter().enumerate() {
                for c in t
                    .to_ascii_lowercase()
                    .bytes()
                    .filter(u8::is_ascii_lowercase)
                {
                    v[i * 26 + (c - b'a') as usize] += 1.0;
                }
            }
            Ok(v)
        }
    }

    fn catalog() -> Catalog {
        let mut c = Catalog::new();
        for t in [
            "Alien (1979)",
            "Aliens (1986)",
            "Heat (1995)",
            "Alien (1979)",
            "Up (2009)",
        ] {
            c.push(t.into(), String::new());
        }
        c
    }

    #[test]
    fn exact_then_nearest_then_empty() {
        let c = catalog();
        let ids: Vec<u32> = (1..=c.num_items()).collect();
        let e = embed_items(&c, &ids, &Letters).unwrap();
        let idx = CatalogueIndex::new(&c, &e, 26).unwrap();
        assert_eq!(idx.duplicate_titles(), 1);
        assert_eq!(idx.backend(), "cpu");
        let g = idx
            .ground(
                &["  Heat (1995) ", "Alien (1979)", "Alienz", "", "heat"],
                &Letters,
                2,
            )
            .unwrap();
        assert_eq!((g[0].item, g[0].how), (3, Match::Exact));
        // Duplicate title: the lowest id.
        assert_eq!((g[1].item, g[1].how), (1, Match::Exact));
        assert_eq!(g[2].how, Match::Nearest);
        assert_eq!(g[2].neighbours.len(), 2);
        assert_eq!(g[2].item, g[2].neighbours[0]);
        assert!(g[2].neighbours.iter().all(|&i| i != 0));
        // "Alienz" is one letter from Alien (1979) (ids 1 and 4: the lower wins), two from Aliens.
        let d = |t: &str, id: u32| -> f32 {
            let a = Letters.embed(&[t]).unwrap();
            let b = &e[(id as usize - 1) * 26..id as usize * 26];
            a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
        };
        // (Distances within f32 rounding: the search centres the embeddings first.)
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
        assert_eq!(g[2].item, 1);
        assert!(close(g[2].dist2, 1.0), "{}", g[2].dist2);
        for id in 1..=5 {
            assert!(
                g[2].dist2 <= d("Alienz", id) + 1e-5,
                "item {id} nearer than the answer"
            );
        }
        assert!(close(g[2].dist2, d("Alienz", g[2].item)));
        assert_eq!((g[3].item, g[3].how), (0, Match::Empty));
        // Case differs: not exact; nearest is Heat by letters.
        assert_eq!((g[4].item, g[4].how), (3, Match::Nearest));
    }

    #[test]
    fn bad_inputs_are_refused_with_the_position() {
        let c = catalog();
        let ids: Vec<u32> = (1..=c.num_items()).collect();
        let e = embed_items(&c, &ids, &Letters).unwrap();
        let idx = CatalogueIndex::new(&c, &e, 26).unwrap();
        let long = "x".repeat(MAX_TITLE_CHARS + 1);
        let err = idx.ground(&["Up (2009)", &long], &Letters, 1).unwrap_err();
        assert!(err.to_string().contains("title 1") && err.to_string().contains("exceeds"));
        let err = idx.ground(&["a\nb"], &Letters, 1).unwrap_err().to_string();
        assert!(err.contains("title 0") && err.contains("control"), "{err}");
        assert!(idx.ground(&["Up"], &Letters, 0).is_err());
        assert!(CatalogueIndex::new(&c, &e[..26 * 4], 26).is_err());
        assert!(embed_items(&c, &[6], &Letters).is_err());
        assert!(embed_items(&c, &[0], &Letters).is_err());
    }
}
