//! The ML-100K catalogue straight from the asset's `ml-100k.item` (titles as "Name (Year)",
//! titles of one character or less dropped, as `prepare` does), for benchmarks that need real
//! titles without a prepared dataset. None when the asset is absent.

use llm4dsr_data::{assets, Catalog};

pub fn ml100k_catalog() -> Option<Catalog> {
    let p = assets::asset_path("ml-100k/ml-100k.item");
    let text = std::fs::read_to_string(&p).ok()?;
    let mut c = Catalog::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() >= 3 && f[1].len() > 1 {
            c.push(format!("{} ({})", f[1], f[2]), f[0].to_string());
        }
    }
    Some(c)
}
