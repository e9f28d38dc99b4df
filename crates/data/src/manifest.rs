//! What a stage did: its config, seed, the sha256 of every input and output, and the counts
//! at every step (counts in = counts out + counts reported). Written as `manifest.json` in the
//! stage's output directory; a re-run compares against it to decide what can be skipped.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FileDigest {
    /// Path as given (inputs) or relative to the output directory (outputs).
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Stage name: "prepare", "train", "score", ...
    pub stage: String,
    /// `llm4dsr` version that wrote it.
    pub tool_version: String,
    pub seed: u64,
    /// The resolved configuration (every flag, whether from the CLI or the config file).
    pub config: serde_json::Value,
    pub inputs: Vec<FileDigest>,
    pub outputs: Vec<FileDigest>,
    /// Ordered counts, e.g. "interactions.read", "interactions.kcore_removed", ...
    pub counts: BTreeMap<String, u64>,
    /// Free-form notes a reader should see (protocol choices, warnings, fixed pitfalls).
    #[serde(default)]
    pub notes: Vec<String>,
}

impl Manifest {
    pub fn new(stage: &str, seed: u64, config: serde_json::Value) -> Self {
        Self {
            stage: stage.to_string(),
            tool_version: env!("CARGO_PKG_VERSION").to_string(),
            seed,
            config,
            ..Default::default()
        }
    }

    pub fn count(&mut self, key: &str, n: u64) {
        self.counts.insert(key.to_string(), n);
    }

    pub fn add_input(&mut self, path: &Path) -> Result<()> {
        let (sha256, bytes) = sha256_file(path)?;
        self.inputs.push(FileDigest {
            path: path.display().to_string(),
            sha256,
            bytes,
        });
        Ok(())
    }

    /// Record every regular file under `dir` (relative paths, sorted) as an output.
    pub fn add_outputs_under(&mut self, dir: &Path) -> Result<()> {
        let mut files = Vec::new();
        walk(dir, dir, &mut files)?;
        files.sort();
        for rel in files {
            if rel == "manifest.json" {
                continue;
            }
            let (sha256, bytes) = sha256_file(&dir.join(&rel))?;
            self.outputs.push(FileDigest {
                path: rel,
                sha256,
                bytes,
            });
        }
        Ok(())
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        crate::atomic::write_file(&dir.join("manifest.json"), text.as_bytes())
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join("manifest.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            walk(root, &p, out)?;
        } else {
            out.push(
                p.strip_prefix(root)
                    .unwrap()
                    .to_string_lossy()
                    .replace('\\', "/"),
            );
        }
    }
    Ok(())
}

/// sha256 (hex) and size of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((hex(&h.finalize()), n))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
