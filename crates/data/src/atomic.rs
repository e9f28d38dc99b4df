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

/// A unique temporary name beside `path` (same filesystem, so rename is atomic).
pub fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    dir.join(format!(".{name}.tmp-{}", std::process::id()))
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
            let old = self
                .dest
                .with_extension(format!("old-{}", std::process::id()));
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
