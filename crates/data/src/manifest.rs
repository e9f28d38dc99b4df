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
    /// Hash of everything the output depends on (config, tool version, input and model
    /// hashes), where the stage computes one (the sharded stages); a re-run with the same
    /// fingerprint finds its output up to date ([`existing_output`]).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub fingerprint: String,
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

    /// Why `dir` no longer holds the outputs recorded here (each file missing, or with another
    /// size or sha256), or `None` when every one is intact.
    pub fn damaged_output(&self, dir: &Path) -> Option<String> {
        let mut why = Vec::new();
        for o in &self.outputs {
            let p = dir.join(&o.path);
            match sha256_file(&p) {
                Err(_) => why.push(format!("{} is missing or unreadable", p.display())),
                Ok((_, bytes)) if bytes != o.bytes => why.push(format!(
                    "{} has {bytes} bytes, its manifest records {}",
                    p.display(),
                    o.bytes
                )),
                Ok((sha, _)) if sha != o.sha256 => why.push(format!(
                    "{} has another sha256 than its manifest records",
                    p.display()
                )),
                Ok(_) => {}
            }
        }
        (!why.is_empty()).then(|| why.join("; "))
    }
}

/// What a stage finds where its output goes.
#[derive(Debug)]
pub enum Existing {
    /// Nothing there.
    Absent,
    /// The output of this same run (same stage, config and inputs), every recorded output
    /// intact: nothing to do.
    UpToDate(Manifest),
    /// The output of this same run, but a recorded output is missing or changed (why).
    Damaged(String),
    /// Something else: another run's output, or no readable manifest (why).
    Other(String),
}

/// Look at `out`: `same` tells whether a manifest found there is this run's.
pub fn existing_output(out: &Path, same: impl Fn(&Manifest) -> bool) -> Existing {
    if !out.exists() {
        return Existing::Absent;
    }
    match Manifest::read(out) {
        Err(e) => Existing::Other(format!("no readable manifest.json ({e:#})")),
        Ok(m) if !same(&m) => Existing::Other(format!(
            "its manifest.json records another run (stage `{}`, or another config or inputs)",
            m.stage
        )),
        Ok(m) => match m.damaged_output(out) {
            Some(why) => Existing::Damaged(why),
            None => Existing::UpToDate(m),
        },
    }
}

/// A stage's rule for an existing output directory: `Ok(Some(manifest))` when it is up to
/// date (the stage does nothing); `Ok(None)` when the stage must (re)build it: the path is
/// free, or it holds this run's output damaged (rebuilt with a warning naming the file), or
/// `overwrite` is set; an error naming `out` and the reason otherwise (nothing is touched).
pub fn reuse_existing(
    out: &Path,
    overwrite: bool,
    same: impl Fn(&Manifest) -> bool,
) -> Result<Option<Manifest>> {
    match existing_output(out, same) {
        Existing::Absent => Ok(None),
        Existing::UpToDate(m) => Ok(Some(m)),
        Existing::Damaged(why) => {
            tracing::warn!(
                "{}: rebuilding: the output of this same run is damaged ({why})",
                out.display()
            );
            Ok(None)
        }
        Existing::Other(_) if overwrite => Ok(None),
        Existing::Other(why) => anyhow::bail!(
            "{}: output directory already exists and holds something else: {why}; pass \
             --overwrite to replace it",
            out.display()
        ),
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
