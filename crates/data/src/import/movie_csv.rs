//! The LLM4DSR reference repository's window files (`../shared/data/llm4dsr-movie`): one CSV
//! per split with columns `user_id, item_ids, mask, item_titles, replaced_item_titles,
//! timestamp`, lists written as Python literals (`[3110, 2338]`, `['a', "b's"]`), titles
//! HTML-escaped (`&amp;`), and a JSON catalogue `id2name4Rec.json` (id -> title).
//!
//! The data is already windowed and split, so `prepare` only imports it: catalogue ids are kept
//! (they are dense 1..=n already), titles are unescaped, and each noisy position (mask 1 or 2)
//! gets its original item by looking its `replaced_item_titles` entry up in the catalogue
//! (a title shared by several ids resolves to the smallest, counted as ambiguous). Users get
//! dense ids in order of first appearance (train, valid, test); a window's `pos` is its ordinal
//! among its user's windows in that order (the source has no per-user positions). There is no
//! per-interaction log, so no `interactions.parquet` is written.

use super::{check_utf8, html_unescape, read_file};
use crate::catalog::Catalog;
use crate::interactions::FnvMap;
use crate::prepare::{finish, Prepared, Protocol};
use crate::windows::{Windows, MASK_CLEAN, MASK_NOISE, MASK_SFT_SWAP};
use anyhow::{anyhow, bail, Context, Result};
use std::path::Path;

/// Read `id2name4Rec.json`: ids must be exactly 1..=n.
pub fn read_catalog(path: &Path) -> Result<Catalog> {
    let bytes = read_file(path, "catalogue")?;
    let text = check_utf8(path, &bytes, b',', &[])?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(text)
        .with_context(|| format!("{}: not a JSON object of id -> title", path.display()))?;
    let mut titles: Vec<Option<String>> = vec![None; map.len() + 1];
    for (k, v) in &map {
        let id: usize = k
            .parse()
            .ok()
            .filter(|&i| i >= 1 && i <= map.len())
            .ok_or_else(|| {
                // Name the first id missing from 1..=n when the key is a number past n.
                let missing = (1..=map.len()).find(|i| !map.contains_key(&i.to_string()));
                let gap = match (k.parse::<usize>().ok(), missing) {
                    (Some(_), Some(m)) => format!(" (id {m} is missing)"),
                    _ => String::new(),
                };
                anyhow!(
                    "{}: key `{k}`: item ids must be 1..={} without gaps{gap}",
                    path.display(),
                    map.len()
                )
            })?;
        let t = v.as_str().map(html_unescape).unwrap_or_default();
        if t.trim().is_empty() {
            bail!("{}: field `{k}`: null or empty title", path.display());
        }
        titles[id] = Some(t.trim().to_string());
    }
    let mut c = Catalog::new();
    for (id, t) in titles.into_iter().enumerate().skip(1) {
        c.push(t.expect("ids are checked dense"), id.to_string());
    }
    Ok(c)
}

/// Split CSV text into records of fields (RFC 4180: quoted fields, `""` escapes, newlines
/// inside quotes). Returns (line number of the record start, fields).
fn csv_records(text: &str) -> Vec<(usize, Vec<String>)> {
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut in_quotes = false;
    let mut line = 1usize;
    let mut start_line = 1usize;
    let mut chars = text.chars().peekable();
    while let Some(ch) = chars.next() {
        if in_quotes {
            match ch {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(ch);
                }
                _ => field.push(ch),
            }
            continue;
        }
        match ch {
            '"' => in_quotes = true,
            ',' => fields.push(std::mem::take(&mut field)),
            '\r' => {}
            '\n' => {
                fields.push(std::mem::take(&mut field));
                if !(fields.len() == 1 && fields[0].is_empty()) {
                    out.push((start_line, std::mem::take(&mut fields)));
                }
                fields.clear();
                line += 1;
                start_line = line;
            }
            _ => field.push(ch),
        }
    }
    if !field.is_empty() || !fields.is_empty() {
        fields.push(field);
        out.push((start_line, fields));
    }
    out
}

/// A Python literal list element.
enum Elem {
    Int(i64),
    Str(String),
}

/// Parse a Python literal list of ints or strings (`[1, 2]`, `['a', "b's", 'c\'d']`).
fn parse_py_list(s: &str) -> Result<Vec<Elem>, String> {
    let s = s.trim();
    let inner = s
        .strip_prefix('[')
        .and_then(|x| x.strip_suffix(']'))
        .ok_or_else(|| format!("`{}` is not a list literal", truncate(s)))?;
    let mut out = Vec::new();
    let mut it = inner.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let Some(&c) = it.peek() else { break };
        if c == '\'' || c == '"' {
            it.next();
            let mut v = String::new();
            loop {
                match it.next() {
                    None => return Err("unterminated string in list".into()),
                    Some(q) if q == c => break,
                    Some('\\') => match it.next() {
                        Some('n') => v.push('\n'),
                        Some('t') => v.push('\t'),
                        Some('r') => v.push('\r'),
                        Some('x') => {
                            let h: String = it.by_ref().take(2).collect();
                            v.push(
                                u32::from_str_radix(&h, 16)
                                    .ok()
                                    .and_then(char::from_u32)
                                    .ok_or("bad \\x escape")?,
                            );
                        }
                        Some('u') => {
                            let h: String = it.by_ref().take(4).collect();
                            v.push(
                                u32::from_str_radix(&h, 16)
                                    .ok()
                                    .and_then(char::from_u32)
                                    .ok_or("bad \\u escape")?,
                            );
                        }
                        Some(o) => v.push(o),
                        None => return Err("dangling backslash".into()),
                    },
                    Some(o) => v.push(o),
                }
            }
            out.push(Elem::Str(v));
        } else {
            let mut t = String::new();
            while it.peek().is_some_and(|&x| x != ',') {
                t.push(it.next().unwrap());
            }
            let t = t.trim();
            out.push(Elem::Int(
                t.parse::<i64>()
                    .map_err(|_| format!("`{}` is not an integer", truncate(t)))?,
            ));
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        match it.next() {
            None => break,
            Some(',') => continue,
            Some(o) => return Err(format!("unexpected `{o}` in list")),
        }
    }
    Ok(out)
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

/// Counts gathered while reading the CSVs.
#[derive(Default)]
struct ImportCounts {
    original_ambiguous: u64,
    title_mismatches: u64,
    mask2_positions: u64,
}

#[allow(clippy::too_many_arguments)]
fn read_split(
    path: &Path,
    catalog: &Catalog,
    by_title: &FnvMap<&str, u32>,
    users: &mut FnvMap<String, u32>,
    user_ids: &mut Vec<String>,
    per_user: &mut Vec<u32>,
    counts: &mut ImportCounts,
) -> Result<Windows> {
    let bytes = read_file(path, "windows CSV")?;
    let text = check_utf8(path, &bytes, b',', &[])?;
    let records = csv_records(text);
    let Some((_, header)) = records.first() else {
        bail!("{}: empty file", path.display());
    };
    let col = |name: &str| {
        header.iter().position(|h| h.trim() == name).ok_or_else(|| {
            anyhow!(
                "{}: missing column `{name}` (columns present: {})",
                path.display(),
                header.join(", ")
            )
        })
    };
    let (cu, ci, cm, ct, cr, cts) = (
        col("user_id")?,
        col("item_ids")?,
        col("mask")?,
        col("item_titles")?,
        col("replaced_item_titles")?,
        col("timestamp")?,
    );
    let n = catalog.num_items();
    let mut w = Windows::new();
    let (mut items, mut mask, mut original) = (Vec::new(), Vec::new(), Vec::new());
    for (line, rec) in records.iter().skip(1) {
        let err = |field: &str, msg: String| {
            anyhow!("{}: line {line}, field `{field}`: {msg}", path.display())
        };
        if rec.len() != header.len() {
            bail!(
                "{}: line {line}: expected {} fields, found {}",
                path.display(),
                header.len(),
                rec.len()
            );
        }
        let ints = |c: usize, name: &str| -> Result<Vec<i64>> {
            parse_py_list(&rec[c])
                .map_err(|m| err(name, m))?
                .into_iter()
                .map(|e| match e {
                    Elem::Int(v) => Ok(v),
                    Elem::Str(_) => Err(err(name, "expected integers, found a string".into())),
                })
                .collect()
        };
        let strs = |c: usize, name: &str| -> Result<Vec<String>> {
            parse_py_list(&rec[c])
                .map_err(|m| err(name, m))?
                .into_iter()
                .map(|e| match e {
                    Elem::Str(v) => Ok(html_unescape(&v)),
                    Elem::Int(_) => Err(err(name, "expected strings, found an integer".into())),
                })
                .collect()
        };
        let ids = ints(ci, "item_ids")?;
        let m = ints(cm, "mask")?;
        let titles = strs(ct, "item_titles")?;
        let replaced = strs(cr, "replaced_item_titles")?;
        let ts: i64 = rec[cts]
            .trim()
            .parse()
            .map_err(|_| err("timestamp", format!("`{}` is not an integer", rec[cts])))?;
        if ids.len() < 2 {
            bail!(err(
                "item_ids",
                format!(
                    "a window needs a history and a target, found {} items",
                    ids.len()
                )
            ));
        }
        if m.len() != ids.len() || titles.len() != ids.len() {
            bail!(err(
                if m.len() != ids.len() {
                    "mask"
                } else {
                    "item_titles"
                },
                format!(
                    "lengths differ: item_ids {}, mask {}, item_titles {}",
                    ids.len(),
                    m.len(),
                    titles.len()
                )
            ));
        }
        items.clear();
        mask.clear();
        original.clear();
        let mut r = replaced.iter();
        for k in 0..ids.len() {
            let id = ids[k];
            if id < 1 || id > n as i64 {
                bail!(err(
                    "item_ids",
                    format!("unknown item id {id} (catalogue has 1..={n})")
                ));
            }
            let id = id as u32;
            if catalog.title(id) != titles[k].trim() {
                counts.title_mismatches += 1;
            }
            let mk = match m[k] {
                0 => MASK_CLEAN,
                1 => MASK_NOISE,
                2 => {
                    counts.mask2_positions += 1;
                    MASK_SFT_SWAP
                }
                v => bail!(err("mask", format!("value {v} is not 0, 1 or 2"))),
            };
            let orig = if mk == MASK_CLEAN {
                id
            } else {
                let t = r.next().ok_or_else(|| {
                    err(
                        "replaced_item_titles",
                        "fewer titles than positions with mask 1 or 2".into(),
                    )
                })?;
                match by_title.get(t.trim()) {
                    Some(&o) if o != u32::MAX => o,
                    Some(_) => {
                        counts.original_ambiguous += 1;
                        (1..=n).find(|&i| catalog.title(i) == t.trim()).unwrap()
                    }
                    None => bail!(err(
                        "replaced_item_titles",
                        format!("title `{}` is not in the catalogue", truncate(t))
                    )),
                }
            };
            items.push(id);
            mask.push(mk);
            original.push(orig);
        }
        if r.next().is_some() {
            bail!(err(
                "replaced_item_titles",
                "more titles than positions with mask 1 or 2".into()
            ));
        }
        let src = rec[cu].trim();
        if src.is_empty() {
            bail!(err("user_id", "empty user id".into()));
        }
        let u = match users.get(src) {
            Some(&u) => u,
            None => {
                user_ids.push(src.to_string());
                per_user.push(0);
                let u = user_ids.len() as u32;
                users.insert(src.to_string(), u);
                u
            }
        };
        let pos = per_user[u as usize - 1];
        per_user[u as usize - 1] += 1;
        w.push(u, pos, &items, &mask, &original, ts);
    }
    Ok(w)
}

/// Import the three splits and the catalogue, then run the shared tail of the protocol
/// (test targets, noise counts, SFT instances).
pub fn prepare(
    train: &Path,
    valid: &Path,
    test: &Path,
    catalog_path: &Path,
    p: &Protocol,
) -> Result<Prepared> {
    let catalog = read_catalog(catalog_path)?;
    // Title -> id; u32::MAX marks a title shared by several ids.
    let mut by_title: FnvMap<&str, u32> = FnvMap::default();
    for id in 1..=catalog.num_items() {
        by_title
            .entry(catalog.title(id))
            .and_modify(|v| *v = u32::MAX)
            .or_insert(id);
    }
    let mut users = FnvMap::default();
    let mut user_ids = Vec::new();
    let mut per_user = Vec::new();
    let mut ic = ImportCounts::default();
    let mut splits: [Windows; 3] = Default::default();
    for (s, path) in [train, valid, test].into_iter().enumerate() {
        splits[s] = read_split(
            path,
            &catalog,
            &by_title,
            &mut users,
            &mut user_ids,
            &mut per_user,
            &mut ic,
        )?;
    }
    let mut out = Prepared {
        catalog,
        users: user_ids,
        interactions: None,
        splits,
        ..Default::default()
    };
    let names = ["train", "valid", "test"];
    for (s, w) in out.splits.iter().enumerate() {
        out.counts
            .push((format!("01_read.windows.{}", names[s]), w.len() as u64));
    }
    out.counts.push((
        "01_read.catalog_items".into(),
        out.catalog.num_items() as u64,
    ));
    out.counts
        .push(("01_read.users".into(), out.users.len() as u64));
    out.counts
        .push(("01_read.title_mismatches".into(), ic.title_mismatches));
    out.counts
        .push(("01_read.original_ambiguous".into(), ic.original_ambiguous));
    out.counts
        .push(("01_read.mask2_positions".into(), ic.mask2_positions));
    let total: u64 = out.splits.iter().map(|w| w.len() as u64).sum();
    out.counts.push(("07_windows.total".into(), total));
    finish(&mut out, p)?;
    out.notes.push(
        "source: reference window CSVs (already windowed and split: no title filter, k-core, noise injection or re-split; noise_p, k_core, window and split do not apply)"
            .into(),
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_gap_names_the_missing_id() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("id2name4Rec.json");
        std::fs::write(&p, r#"{"1": "A", "2": "B", "4": "D"}"#).unwrap();
        let e = format!("{:#}", read_catalog(&p).unwrap_err());
        assert!(
            e.contains("key `4`") && e.contains("id 3 is missing"),
            "{e}"
        );
    }

    #[test]
    fn python_lists_and_csv_quotes() {
        let v = parse_py_list(r#"['a', "b's", 'c\'d', 'x\\y']"#).unwrap();
        let s: Vec<String> = v
            .into_iter()
            .map(|e| match e {
                Elem::Str(s) => s,
                Elem::Int(_) => panic!(),
            })
            .collect();
        assert_eq!(s, vec!["a", "b's", "c'd", "x\\y"]);
        assert!(matches!(
            parse_py_list("[1, 22]").unwrap()[1],
            Elem::Int(22)
        ));
        assert!(parse_py_list("[]").unwrap().is_empty());
        assert!(parse_py_list("[1, x]").is_err());
        let r = csv_records("a,b\r\n1,\"[\"\"x\"\", 'y']\"\n\n");
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].1[1], "[\"x\", 'y']");
    }

    fn files(dir: &Path, train_row: &str) -> [std::path::PathBuf; 4] {
        let cat = dir.join("id2name4Rec.json");
        std::fs::write(
            &cat,
            r#"{"1": "A &amp; B", "2": "C", "3": "D", "4": "E", "5": "D"}"#,
        )
        .unwrap();
        let header = "user_id,item_ids,mask,item_titles,replaced_item_titles,timestamp\n";
        let ok = "7,\"[1, 2, 3]\",\"[0, 1, 0]\",\"['A &amp; B', 'C', 'D']\",\"['E']\",100\n";
        let mk = |name: &str, row: &str| {
            let p = dir.join(name);
            std::fs::write(&p, format!("{header}{row}")).unwrap();
            p
        };
        [
            mk("train.csv", train_row),
            mk("valid.csv", ok),
            mk("test.csv", ok),
            cat,
        ]
    }

    #[test]
    fn imports_windows_with_originals_and_refuses_bad_rows() {
        let d = tempfile::tempdir().unwrap();
        let ok = "7,\"[1, 2, 3]\",\"[0, 1, 0]\",\"['A &amp; B', 'C', 'D']\",\"['E']\",100\n";
        let [tr, va, te, cat] = files(d.path(), ok);
        let p = Protocol::default();
        let out = prepare(&tr, &va, &te, &cat, &p).unwrap();
        assert_eq!(out.catalog.title(1), "A & B");
        let w = out.splits[0].get(0);
        assert_eq!(w.items, &[1, 2, 3]);
        assert_eq!(w.mask, &[0, 1, 0]);
        assert_eq!(w.original, &[1, 4, 3]);
        assert_eq!(out.users, vec!["7"]);
        // The second window of user 7 (valid) has pos 1.
        assert_eq!(out.splits[1].get(0).pos, 1);
        assert_eq!(out.count("01_read.title_mismatches"), Some(0));

        let cases = [
            (
                "7,\"[1, 9, 3]\",\"[0, 0, 0]\",\"['A', 'C', 'D']\",[],1\n",
                "field `item_ids`: unknown item id 9",
            ),
            (
                "7,\"[1, 2, 3]\",\"[0, 0]\",\"['A', 'C', 'D']\",[],1\n",
                "field `mask`: lengths differ",
            ),
            (
                "7,\"[1, 2, 3]\",\"[0, 0, 0]\",\"['A', 'C']\",[],1\n",
                "field `item_titles`: lengths differ",
            ),
            (
                "7,\"[1, 2, 3]\",\"[0, 1, 0]\",\"['A', 'C', 'D']\",[],1\n",
                "field `replaced_item_titles`: fewer titles",
            ),
            (
                "7,\"[1, 2, 3]\",\"[0, 1, 0]\",\"['A', 'C', 'D']\",\"['Z']\",1\n",
                "field `replaced_item_titles`: title `Z` is not in the catalogue",
            ),
            (
                "7,\"[1, 2, x]\",\"[0, 0, 0]\",\"['A', 'C', 'D']\",[],1\n",
                "field `item_ids`: `x` is not an integer",
            ),
            (
                "7,\"[1, 2, 3]\",\"[0, 0, 0]\",\"['A', 'C', 'D']\",[],soon\n",
                "field `timestamp`",
            ),
        ];
        for (row, want) in cases {
            let [tr, va, te, cat] = files(d.path(), row);
            let e = prepare(&tr, &va, &te, &cat, &p).unwrap_err().to_string();
            assert!(e.contains("train.csv: line 2, ") && e.contains(want), "{e}");
        }
        // A title shared by ids 3 and 5 resolves to 3 and is counted.
        let amb = "7,\"[1, 2, 3]\",\"[0, 1, 0]\",\"['A', 'C', 'D']\",\"['D']\",100\n";
        let [tr, va, te, cat] = files(d.path(), amb);
        let out = prepare(&tr, &va, &te, &cat, &p).unwrap();
        assert_eq!(out.splits[0].get(0).original, &[1, 3, 3]);
        assert_eq!(out.count("01_read.original_ambiguous"), Some(1));
    }
}
