//! Grounding quality and speed on real titles: how often a damaged ML-100K title is grounded
//! back to its own item, per embedder (`minilm`, `llm-last-token` = SmolLM2-135M) and per kind
//! of damage, through the same code as `llm4dsr ground` ([`CatalogueIndex`]: exact match, else
//! the nearest embedding through `CatalogSearch`).
//!
//! Damage (each applied to the same keyed sample of titles "Name (Year)"):
//! - `no year`: "Name"; `lowercase`: the whole title; `article first`: "Shining, The (1980)"
//!   -> "The Shining (1980)" (only titles with a trailing article); `typo`: one letter of the
//!   name dropped (keyed position); `exact`: the title unchanged (the exact-match path).
//!
//! A grounding counts as right when the item's title equals the original title (the catalogue
//! holds a few titles under two ids). Prints one Markdown table.
//!
//! Run: `cargo bench --bench ground` (release). LLM4DSR_BENCH_TITLES sets the sample (300);
//! LLM4DSR_BENCH_EMBEDDERS=minilm skips the (slow on CPU) SmolLM2 catalogue embedding.
//! Needs the assets (`llm4dsr assets fetch`); skips with a message otherwise.

use candle_core::Device;
use llm4dsr_data::{assets, KeyedRng, Purpose};
use llm4dsr_llm::embed::MiniLm;
use llm4dsr_llm::ground::{
    embed_items, CatalogueIndex, LastTokenEmbedder, Match, MiniLmEmbedder, TitleEmbedder,
};
use llm4dsr_llm::Llm;
use std::time::Instant;

#[path = "common/ml100k.rs"]
mod ml100k;

const ARTICLES: [&str; 3] = ["The", "A", "An"];

/// (name, year) of "Name (Year)".
fn split_title(t: &str) -> (&str, &str) {
    match t.rfind(" (") {
        Some(i) if t.ends_with(')') => (&t[..i], &t[i..]),
        _ => (t, ""),
    }
}

fn damage(kind: &str, title: &str, key: u64) -> Option<String> {
    let (name, year) = split_title(title);
    match kind {
        "exact" => Some(title.to_string()),
        "no year" => (!year.is_empty()).then(|| name.to_string()),
        "lowercase" => Some(title.to_lowercase()).filter(|t| t != title),
        "article first" => ARTICLES.iter().find_map(|a| {
            name.strip_suffix(&format!(", {a}"))
                .map(|rest| format!("{a} {rest}{year}"))
        }),
        "typo" => {
            let letters: Vec<usize> = name
                .char_indices()
                .filter(|(_, c)| c.is_alphabetic())
                .map(|(i, _)| i)
                .collect();
            if letters.len() < 4 {
                return None;
            }
            let mut r = KeyedRng::new(7, Purpose::Other, key);
            let at = letters[r.below(letters.len() as u64) as usize];
            let mut s = name.to_string();
            s.remove(at);
            Some(format!("{s}{year}"))
        }
        _ => unreachable!(),
    }
}

const KINDS: [&str; 5] = ["exact", "no year", "lowercase", "article first", "typo"];

fn main() -> anyhow::Result<()> {
    let gguf = assets::asset_path("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let minilm_dir = assets::asset_path("all-minilm-l6-v2");
    let Some(catalog) = ml100k::ml100k_catalog()
        .filter(|_| gguf.exists() && minilm_dir.join("model.safetensors").exists())
    else {
        eprintln!("SKIP: ML-100K, SmolLM2 or MiniLM assets absent (run `llm4dsr assets fetch`)");
        return Ok(());
    };
    let sample: usize = std::env::var("LLM4DSR_BENCH_TITLES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let which =
        std::env::var("LLM4DSR_BENCH_EMBEDDERS").unwrap_or_else(|_| "minilm,llm-last-token".into());
    let n = catalog.num_items();
    let mut r = KeyedRng::new(3, Purpose::Other, 0);
    let picks: Vec<u32> = (0..sample).map(|_| 1 + r.below(n as u64) as u32).collect();
    println!(
        "Grounding damaged ML-100K titles back to their items: {n} catalogue items, {} sampled \
         titles, k = 10, {} threads",
        picks.len(),
        rayon_threads()
    );
    println!();
    println!(
        "| embedder | damage | titles | exact | top-1 right | top-10 right | \
         embed titles/s | search ms / title |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    let dev = Device::Cpu;
    let llm;
    let mut embedders: Vec<Box<dyn TitleEmbedder>> = Vec::new();
    for name in which.split(',') {
        match name.trim() {
            "minilm" => embedders.push(Box::new(MiniLmEmbedder {
                model: MiniLm::load(&minilm_dir, &dev)?,
                batch: 64,
            })),
            "llm-last-token" => {
                llm = Llm::load(&gguf, &dev)?;
                embedders.push(Box::new(LastTokenEmbedder {
                    llm: &llm,
                    batch: 64,
                }));
                break; // `llm` is borrowed from here on
            }
            other => anyhow::bail!("LLM4DSR_BENCH_EMBEDDERS: unknown embedder {other:?}"),
        }
    }
    for e in &embedders {
        let ids: Vec<u32> = (1..=n).collect();
        let t = Instant::now();
        let emb = embed_items(&catalog, &ids, e.as_ref())?;
        let cat_rate = n as f64 / t.elapsed().as_secs_f64();
        let index = CatalogueIndex::new(&catalog, &emb, e.dim())?;
        eprintln!(
            "{}: catalogue embedded at {cat_rate:.1} titles/s; search on {}",
            e.name(),
            index.backend()
        );
        for kind in KINDS {
            let cases: Vec<(u32, String)> = picks
                .iter()
                .filter_map(|&id| damage(kind, catalog.title(id), id as u64).map(|t| (id, t)))
                .collect();
            if cases.is_empty() {
                continue;
            }
            let titles: Vec<&str> = cases.iter().map(|c| c.1.as_str()).collect();
            let g = index.ground(&titles, e.as_ref(), 10)?;
            // The two costs of the titles without an exact match, apart: their embedding,
            // and the exact top-10 search of the whole catalogue.
            let nearest: Vec<&str> = titles
                .iter()
                .zip(&g)
                .filter(|(_, x)| x.how == Match::Nearest)
                .map(|(t, _)| *t)
                .collect();
            let t = Instant::now();
            let q = e.embed(&nearest)?;
            let embed_s = t.elapsed().as_secs_f64();
            let t = Instant::now();
            let found = index.catalog_search().search(&q, 10)?;
            let search_s = t.elapsed().as_secs_f64();
            let again: Vec<u32> = g
                .iter()
                .filter(|x| x.how == Match::Nearest)
                .map(|x| x.item)
                .collect();
            let firsts: Vec<u32> = found.index.chunks(found.k.max(1)).map(|c| c[0]).collect();
            anyhow::ensure!(
                again == firsts,
                "{kind}: the search alone disagrees with ground()"
            );
            let right = |id: u32, item: u32| catalog.title(item) == catalog.title(id);
            let exact = g.iter().filter(|x| x.how == Match::Exact).count();
            let top1 = cases
                .iter()
                .zip(&g)
                .filter(|(c, x)| right(c.0, x.item))
                .count();
            let top10 = cases
                .iter()
                .zip(&g)
                .filter(|(c, x)| right(c.0, x.item) || x.neighbours.iter().any(|&i| right(c.0, i)))
                .count();
            let pct = |k: usize| format!("{:.1}%", 100.0 * k as f64 / cases.len() as f64);
            let (rate, search) = if nearest.is_empty() {
                ("-".to_string(), "-".to_string())
            } else {
                (
                    format!("{:.1}", nearest.len() as f64 / embed_s),
                    format!("{:.3}", 1e3 * search_s / nearest.len() as f64),
                )
            };
            println!(
                "| {} | {kind} | {} | {} | {} | {} | {rate} | {search} |",
                e.name(),
                cases.len(),
                pct(exact),
                pct(top1),
                pct(top10),
            );
        }
    }
    Ok(())
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism()
            .map(|n| n.to_string())
            .unwrap_or_else(|_| "?".into())
    })
}
