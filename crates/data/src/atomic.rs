//! Atomic outputs: a stage writes into a hidden staging directory (or temp file) beside its
//! destination and renames it into place only when everything succeeded. A failed or killed
//! stage leaves no partial output behind.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically (temp file in the same directory, fsync, rename).
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating directory {}", dir.display()))?;
    let tmp = temp_sibling(path);
    {
        use std::io::Write;
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} -> {}", tmp.display(), path.display()))?;
    Ok(())
}

/// A unique temporary name beside `path` (same filesystem, so rename is atomic):
/// `.{name}.tmp-{host}-{pid}`. The host and process id let a later run tell a killed run's
/// leftovers from a live writer's ([`sweep_stale_in`]).
pub fn temp_sibling(path: &Path) -> PathBuf {
    sibling(path, "tmp")
}

fn sibling(path: &Path, kind: &str) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(
        ".{name}.{kind}-{}-{}",
        host_name(),
        std::process::id()
    ))
}

/// This machine's name as it goes into temporary names (`[A-Za-z0-9.-]`, others as `_`).
fn host_name() -> &'static str {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_default();
        let h: String = raw
            .trim()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        if h.is_empty() {
            "localhost".into()
        } else {
            h
        }
    })
}

/// The (host, pid) of a temporary name written by [`temp_sibling`] or a moved-aside old
/// output (`.{name}.old-{host}-{pid}`); `None` for any other name.
fn temp_owner(file_name: &str) -> Option<(&str, u32)> {
    let rest = file_name.strip_prefix('.')?;
    let at = [".tmp-", ".old-"]
        .iter()
        .filter_map(|m| rest.rfind(m).map(|i| i + m.len()))
        .max()?;
    let owner = &rest[at..];
    let (host, pid) = owner.rsplit_once('-')?;
    Some((host, pid.parse().ok()?))
}

/// Remove the temporary files and staging directories in `dir` that a killed run on this
/// machine left behind (their process is gone). A live process's temporaries, and those of
/// other machines (a shared filesystem), are left alone. Returns how many were removed.
/// Only where `/proc` tells which processes are alive; elsewhere nothing is removed.
pub fn sweep_stale_in(dir: &Path) -> usize {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some((host, pid)) = name.to_str().and_then(temp_owner) else {
            continue;
        };
        if host != host_name() || proc.join(pid.to_string()).exists() {
            continue;
        }
        let p = e.path();
        let gone = match e.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&p).is_ok(),
            Ok(_) => std::fs::remove_file(&p).is_ok(),
            Err(_) => false,
        };
        if gone {
            tracing::warn!(
                "removed {}, left behind by a killed run (process {pid})",
                p.display()
            );
            removed += 1;
        }
    }
    removed
}

/// Bring back `dest` when a run was killed inside [`StagingDir::commit`] after moving the old
/// `dest` aside and before renaming the new one into place: `dest` is missing and a moved-aside
/// copy (`.{name}.old-{host}-{pid}`) is beside it. Returns whether it did.
pub fn recover_moved_aside(dest: &Path) -> Result<bool> {
    if dest.exists() {
        return Ok(false);
    }
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(false);
    };
    let prefix = format!(".{name}.old-");
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            std::fs::rename(e.path(), dest).with_context(|| {
                format!("renaming {} -> {}", e.path().display(), dest.display())
            })?;
            tracing::warn!(
                "{}: brought back from {} (a run was killed while replacing it)",
                dest.display(),
                e.path().display()
            );
            return Ok(true);
        }
    }
    Ok(false)
}

/// A directory being built. Files go into `path()`; `commit()` renames it to the destination.
/// Dropped without `commit()`, the staging directory is removed.
pub struct StagingDir {
    staging: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl StagingDir {
    /// Start building `dest`. Fails if `dest` exists and `overwrite` is false.
    pub fn new(dest: &Path, overwrite: bool) -> Result<Self> {
        if dest.exists() && !overwrite {
            bail!(
                "output directory {} already exists (pass --overwrite to replace it)",
                dest.display()
            );
        }
        sweep_stale_in(
            dest.parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new(".")),
        );
        let staging = temp_sibling(dest);
        if staging.exists() {
            std::fs::remove_dir_all(&staging).ok();
        }
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("creating staging directory {}", staging.display()))?;
        Ok(Self {
            staging,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.staging
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Move the finished directory into place, replacing an older one.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.dest.exists() {
            let old = sibling(&self.dest, "old");
            std::fs::rename(&self.dest, &old)
                .with_context(|| format!("moving aside {}", self.dest.display()))?;
            std::fs::rename(&self.staging, &self.dest).with_context(|| {
                format!(
                    "renaming {} -> {}",
                    self.staging.display(),
                    self.dest.display()
                )
            })?;
            std::fs::remove_dir_all(&old).ok();
        } else {
            if let Some(p) = self.dest.parent() {
                std::fs::create_dir_all(p).ok();
            }
            std::fs::rename(&self.staging, &self.dest).with_context(|| {
                format!(
                    "renaming {} -> {}",
                    self.staging.display(),
                    self.dest.display()
                )
            })?;
        }
        self.committed = true;
        Ok(self.dest.clone())
    }
}

impl Drop for StagingDir {
    fn drop(&mut self) {
        if !self.committed {
            std::fs::remove_dir_all(&self.staging).ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temp_names_carry_host_and_pid() {
        let t = temp_sibling(Path::new("runs/x/out.parquet"));
        let name = t.file_name().unwrap().to_str().unwrap();
        assert_eq!(
            temp_owner(name),
            Some((host_name(), std::process::id())),
            "{name}"
        );
        assert_eq!(temp_owner(".a-b.tmp-node-3.x-77"), Some(("node-3.x", 77)));
        assert_eq!(temp_owner(".a.old-h-5"), Some(("h", 5)));
        assert_eq!(temp_owner("a.tmp-h-5"), None, "not hidden");
        assert_eq!(temp_owner(".a.tmp-h-x5"), None, "no pid");
        assert_eq!(temp_owner(".notes.txt"), None);
    }

    #[test]
    fn sweep_removes_only_dead_local_leftovers() {
        if !Path::new("/proc/self").exists() {
            eprintln!("SKIP: no /proc on this system, nothing is swept");
            return;
        }
        let dir = std::env::temp_dir().join(format!("llm4dsr-sweep-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        let host = host_name();
        // A pid above the kernel's limit (2^22) is never alive.
        let dead_dir = dir.join(format!(".out.tmp-{host}-999999999"));
        std::fs::create_dir_all(dead_dir.join("windows")).unwrap();
        std::fs::write(dead_dir.join("windows/train.parquet"), b"partial").unwrap();
        let dead_file = dir.join(format!(".part-1.parquet.tmp-{host}-999999998"));
        std::fs::write(&dead_file, b"partial").unwrap();
        let dead_old = dir.join(format!(".out.old-{host}-999999997"));
        std::fs::create_dir_all(&dead_old).unwrap();
        let live = temp_sibling(&dir.join("out"));
        std::fs::create_dir_all(&live).unwrap();
        let other_host = dir.join(".out.tmp-some-other-node-999999999");
        std::fs::create_dir_all(&other_host).unwrap();
        let user_file = dir.join(".hidden-999999999");
        std::fs::write(&user_file, b"mine").unwrap();

        assert_eq!(sweep_stale_in(&dir), 3);
        assert!(!dead_dir.exists() && !dead_file.exists() && !dead_old.exists());
        assert!(live.exists(), "a live process's staging directory is kept");
        assert!(other_host.exists(), "another machine's is kept");
        assert!(user_file.exists(), "names not ours are kept");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_copy_moved_aside_by_a_killed_commit_is_brought_back() {
        let dir = std::env::temp_dir().join(format!("llm4dsr-recover-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let dest = dir.join("last");
        let aside = dir.join(".last.old-somehost-12");
        std::fs::create_dir_all(&aside).unwrap();
        std::fs::write(aside.join("state.json"), b"{}").unwrap();
        assert!(recover_moved_aside(&dest).unwrap());
        assert!(dest.join("state.json").exists() && !aside.exists());
        assert!(
            !recover_moved_aside(&dest).unwrap(),
            "nothing to do when present"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn staging_dir_sweeps_a_killed_runs_leftovers_and_commits() {
        let dir = std::env::temp_dir().join(format!("llm4dsr-staging-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("ds");
        let killed = dir.join(format!(".ds.tmp-{}-999999999", host_name()));
        std::fs::create_dir_all(&killed).unwrap();
        let s = StagingDir::new(&dest, false).unwrap();
        if Path::new("/proc/self").exists() {
            assert!(!killed.exists());
        }
        std::fs::write(s.path().join("a"), b"1").unwrap();
        s.commit().unwrap();
        // Replacing: the old output is moved aside and removed, nothing is left beside it.
        let s = StagingDir::new(&dest, true).unwrap();
        std::fs::write(s.path().join("a"), b"2").unwrap();
        s.commit().unwrap();
        assert_eq!(std::fs::read(dest.join("a")).unwrap(), b"2");
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        let expect: Vec<String> = if Path::new("/proc/self").exists() {
            vec!["ds".into()]
        } else {
            names.clone()
        };
        assert_eq!(names.len(), expect.len(), "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
