//! The sharded-stage runner: how every stage that touches windows runs on many ranks.
//!
//! Users are partitioned into a config-fixed number of shards
//! (`llm4dsr_data::shard::shard_of`); rank r of n takes shards r, r+n, r+2n, ... For each shard
//! the stage's work function returns the shard's rows, which are written as one Parquet part
//! file named by shard (`part-00003-of-00016.parquet`) and then a small entry beside it
//! (`part-00003-of-00016.json`: rows, input rows, sha256, bytes, and the fingerprint of the
//! stage's config and inputs). Both are written atomically, the entry last, so an entry exists
//! only for a part that was completely written.
//!
//! When every rank is done, rank 0 verifies the parts (every shard present, each part's size,
//! hash and row count as its entry says, input rows adding up to the stage's input) and merges
//! them in shard order into the final file, atomically. A check that fails names the shard and
//! merges nothing. Rows are a function of the shard alone, so the merged file is byte-identical
//! whatever the number of ranks, and whether or not a run was interrupted and resumed: a re-run
//! skips every shard whose part and entry are complete and carry the same fingerprint.
//!
//! Costs: every part is written once and read twice more (hash at verification, copy at
//! merge); resume hashes existing parts again. Parts live in a directory beside the output
//! (`<out>.parts/`), removed by the stage once its output is committed.
//!
//! Test hook: `LLM4DSR_TEST_ABORT_AFTER_SHARDS=<rank>:<n>` makes rank `<rank>` abort the
//! process (SIGABRT, like a killed node) right after writing its n-th part file.

use anyhow::{anyhow, bail, ensure, Context, Result};
use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use llm4dsr_comm::Comm;
use llm4dsr_data::atomic::StagingDir;
use llm4dsr_data::manifest::{sha256_bytes, sha256_file};
use llm4dsr_data::shard::{part_name, shards_of_rank};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// The environment variable of the abort test hook (`<rank>:<n>`).
pub const ABORT_HOOK_VAR: &str = "LLM4DSR_TEST_ABORT_AFTER_SHARDS";

/// Part files written by this process so far, over all sharded stages (for the test hook).
static PARTS_WRITTEN: AtomicU32 = AtomicU32::new(0);

/// What one shard's work produced.
pub struct ShardOutput {
    /// The shard's rows, all of the stage's schema, in a deterministic order.
    pub batches: Vec<RecordBatch>,
    /// How many input rows (e.g. windows) the shard consumed; rank 0 checks these add up.
    pub input_rows: u64,
}

/// The per-part manifest entry, written beside each part file.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct PartEntry {
    pub shard: u32,
    pub num_shards: u32,
    /// Rows in the part file.
    pub rows: u64,
    /// Input rows the shard consumed.
    pub input_rows: u64,
    pub sha256: String,
    pub bytes: u64,
    /// Hash of the stage's config and inputs; a part with another fingerprint is stale.
    pub fingerprint: String,
}

/// What the merge saw, identical on every rank after [`ShardedStage::run`].
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MergeSummary {
    pub shards: u32,
    pub rows: u64,
    pub input_rows: u64,
    /// Parts written by this run (all ranks) and parts reused from an earlier, interrupted run.
    pub parts_written: u64,
    pub parts_reused: u64,
}

/// One sharded pass of a stage over its input.
pub struct ShardedStage<'a> {
    /// Name for logs and errors, e.g. "score/train".
    pub name: String,
    /// Directory of the part files and their entries.
    pub parts_dir: PathBuf,
    pub num_shards: u32,
    /// Schema of every part and of the merged output.
    pub schema: SchemaRef,
    /// Hash of everything the output depends on (config, input hashes, tool version).
    pub fingerprint: String,
    pub comm: &'a dyn Comm,
}

/// Where a stage writing `out` keeps its part files: `<out>.parts/` beside it.
pub fn parts_root_of(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    out.with_file_name(format!("{name}.parts"))
}

/// A fingerprint from any serialisable description of a stage's config and inputs.
pub fn fingerprint(what: &impl Serialize) -> Result<String> {
    Ok(sha256_bytes(&serde_json::to_vec(what)?))
}

/// Where a sharded stage's output goes. [`prepare_output`] decides.
pub enum OutputPlan {
    /// The directory already holds this run's output, intact: nothing to do.
    UpToDate,
    /// Build it: rank 0 holds the staging directory renamed into place at the end.
    Build(Option<StagingDir>),
}

/// Decide what a sharded stage does with its output directory `out`. Up to date when its
/// manifest is `stage`'s with this `fingerprint` (everything the output depends on) and every
/// output it records is intact; then a parts directory that a run killed between its commit
/// and its clean-up left beside `out` is removed. A damaged output of the same run is rebuilt
/// (with a warning naming the files); anything else at `out` is refused unless `overwrite` (an
/// error naming `out`, nothing touched). Rank 0 decides and every rank learns the answer (a
/// collective: every rank calls it).
pub fn prepare_output(
    comm: &dyn Comm,
    out: &Path,
    overwrite: bool,
    stage: &str,
    fingerprint: &str,
) -> Result<OutputPlan> {
    let mut verdict = Vec::new();
    if comm.is_root() {
        let found = llm4dsr_data::manifest::reuse_existing(out, overwrite, |m| {
            m.stage == stage && m.fingerprint == fingerprint
        })?;
        if found.is_some() {
            let parts = parts_root_of(out);
            if parts.exists() {
                std::fs::remove_dir_all(&parts)
                    .with_context(|| format!("removing {}", parts.display()))?;
            }
            tracing::info!(
                "{}: up to date (the same {stage} run's output, every file intact): nothing to do",
                out.display()
            );
        }
        verdict.push(found.is_some() as u8);
    }
    comm.broadcast_bytes(0, &mut verdict)?;
    if verdict.first() == Some(&1) {
        return Ok(OutputPlan::UpToDate);
    }
    let staging = if comm.is_root() {
        Some(StagingDir::new(out, true)?)
    } else {
        None
    };
    Ok(OutputPlan::Build(staging))
}

impl<'a> ShardedStage<'a> {
    fn part_path(&self, shard: u32) -> PathBuf {
        self.parts_dir.join(part_name(shard, self.num_shards))
    }

    fn entry_path(&self, shard: u32) -> PathBuf {
        self.part_path(shard).with_extension("json")
    }

    /// The whole pass: this rank's shards, then rank 0 verifies and merges into `dest`
    /// (required on rank 0, ignored elsewhere). Every rank must call it; every rank gets the
    /// same summary, or the same error.
    pub fn run(
        &self,
        dest: Option<&Path>,
        expected_input_rows: u64,
        work: impl FnMut(u32) -> Result<ShardOutput>,
    ) -> Result<MergeSummary> {
        ensure!(
            self.num_shards > 0,
            "{}: the shard count must be positive",
            self.name
        );
        let (written, reused) = self.produce(work)?;
        let mut counts = [written as f64, reused as f64];
        self.comm.all_reduce_sum_f64(&mut counts)?;
        // The all-reduce doubles as the barrier: every rank's parts are on disk now.
        let mut outcome = Vec::new();
        if self.comm.is_root() {
            let dest = dest.ok_or_else(|| anyhow!("{}: rank 0 needs a destination", self.name))?;
            let result = self
                .verify_and_merge(dest, expected_input_rows)
                .map(|mut s| {
                    s.parts_written = counts[0] as u64;
                    s.parts_reused = counts[1] as u64;
                    s
                })
                .map_err(|e| format!("{e:#}"));
            outcome = serde_json::to_vec(&result)?;
        }
        self.comm.broadcast_bytes(0, &mut outcome)?;
        let result: std::result::Result<MergeSummary, String> = serde_json::from_slice(&outcome)?;
        match result {
            Ok(s) => Ok(s),
            Err(e) if self.comm.is_root() => Err(anyhow!(e)),
            Err(e) => Err(anyhow!("rank 0 could not merge: {e}")),
        }
    }

    /// Phase 1: write this rank's parts, skipping complete ones. Returns (written, reused).
    pub fn produce(&self, mut work: impl FnMut(u32) -> Result<ShardOutput>) -> Result<(u32, u32)> {
        std::fs::create_dir_all(&self.parts_dir)
            .with_context(|| format!("creating {}", self.parts_dir.display()))?;
        // Temporary part files of a killed run on this machine.
        llm4dsr_data::atomic::sweep_stale_in(&self.parts_dir);
        let abort_after = abort_hook(self.comm.rank())?;
        let mine = shards_of_rank(self.comm.rank(), self.comm.size(), self.num_shards);
        let bar = if self.comm.is_root() {
            indicatif::ProgressBar::new(mine.len() as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} shards {pos}/{len} [{elapsed}] {bar:30}",
            )
            .unwrap(),
        );
        bar.set_message(self.name.clone());
        let (mut written, mut reused) = (0, 0);
        for shard in mine {
            match self.complete_entry(shard) {
                Ok(entry) => {
                    tracing::info!(
                        "{}: shard {shard} already complete ({} rows), skipped",
                        self.name,
                        entry.rows
                    );
                    reused += 1;
                    bar.inc(1);
                    continue;
                }
                Err(why) => tracing::debug!("{}: shard {shard}: {why:#}", self.name),
            }
            let out = work(shard).with_context(|| format!("{}: shard {shard}", self.name))?;
            let entry = self.write_part(shard, &out)?;
            tracing::debug!("{}: shard {shard}: wrote {} rows", self.name, entry.rows);
            written += 1;
            bar.inc(1);
            let total = PARTS_WRITTEN.fetch_add(1, Ordering::SeqCst) + 1;
            if abort_after == Some(total) {
                tracing::error!(
                    "{ABORT_HOOK_VAR}: rank {} aborts after writing {total} part file(s) \
                     (last: shard {shard} of {})",
                    self.comm.rank(),
                    self.name
                );
                std::process::abort();
            }
        }
        bar.finish_and_clear();
        Ok((written, reused))
    }

    /// The entry of `shard` if its part is complete and current; otherwise why not.
    fn complete_entry(&self, shard: u32) -> Result<PartEntry> {
        let entry = self.read_entry(shard)?;
        ensure!(
            entry.fingerprint == self.fingerprint,
            "written with another config or other inputs"
        );
        self.check_part(&entry)?;
        Ok(entry)
    }

    fn read_entry(&self, shard: u32) -> Result<PartEntry> {
        let p = self.entry_path(shard);
        let text = std::fs::read(&p).with_context(|| format!("no entry {}", p.display()))?;
        let e: PartEntry = serde_json::from_slice(&text)
            .with_context(|| format!("unreadable entry {}", p.display()))?;
        ensure!(
            e.shard == shard && e.num_shards == self.num_shards,
            "{} describes shard {} of {}",
            p.display(),
            e.shard,
            e.num_shards
        );
        Ok(e)
    }

    /// Does the part file match its entry (size, then hash)?
    fn check_part(&self, e: &PartEntry) -> Result<()> {
        let p = self.part_path(e.shard);
        let meta = std::fs::metadata(&p)
            .with_context(|| format!("part file {} is missing", p.display()))?;
        ensure!(
            meta.len() == e.bytes,
            "part file {} has {} bytes, its entry says {} (truncated or overwritten)",
            p.display(),
            meta.len(),
            e.bytes
        );
        let (sha, _) = sha256_file(&p)?;
        ensure!(
            sha == e.sha256,
            "part file {} does not match the sha256 in its entry",
            p.display()
        );
        Ok(())
    }

    fn write_part(&self, shard: u32, out: &ShardOutput) -> Result<PartEntry> {
        let path = self.part_path(shard);
        for b in &out.batches {
            ensure!(
                b.schema().fields() == self.schema.fields(),
                "{}: shard {shard} produced rows of another schema",
                self.name
            );
        }
        // An old entry must not outlive the part it described, even for an instant.
        let entry_path = self.entry_path(shard);
        if entry_path.exists() {
            std::fs::remove_file(&entry_path)
                .with_context(|| format!("removing stale {}", entry_path.display()))?;
        }
        llm4dsr_data::parquet_io::write_batches(&path, self.schema.clone(), &out.batches)?;
        let (sha256, bytes) = sha256_file(&path)?;
        let entry = PartEntry {
            shard,
            num_shards: self.num_shards,
            rows: out.batches.iter().map(|b| b.num_rows() as u64).sum(),
            input_rows: out.input_rows,
            sha256,
            bytes,
            fingerprint: self.fingerprint.clone(),
        };
        let text = serde_json::to_string_pretty(&entry)? + "\n";
        llm4dsr_data::atomic::write_file(&entry_path, text.as_bytes())?;
        Ok(entry)
    }

    /// Phase 2 (rank 0): verify every part against its entry, check the counts, and merge in
    /// shard order into `dest` (temp file + rename). Any failure names the shard; `dest` is
    /// then left untouched.
    pub fn verify_and_merge(&self, dest: &Path, expected_input_rows: u64) -> Result<MergeSummary> {
        let mut entries = Vec::with_capacity(self.num_shards as usize);
        for shard in 0..self.num_shards {
            let part = part_name(shard, self.num_shards);
            let entry = self
                .read_entry(shard)
                .and_then(|e| {
                    ensure!(
                        e.fingerprint == self.fingerprint,
                        "its entry was written with another config or other inputs"
                    );
                    self.check_part(&e)?;
                    Ok(e)
                })
                .with_context(|| {
                    format!(
                        "{}: shard {shard} ({part} in {}) is missing or damaged; nothing was \
                         merged (re-run the stage to redo that shard)",
                        self.name,
                        self.parts_dir.display()
                    )
                })?;
            entries.push(entry);
        }
        let input_rows: u64 = entries.iter().map(|e| e.input_rows).sum();
        ensure!(
            input_rows == expected_input_rows,
            "{}: the parts consumed {input_rows} input rows, the input has {expected_input_rows}; \
             nothing was merged",
            self.name
        );

        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let tmp = llm4dsr_data::atomic::temp_sibling(dest);
        let merged = self.merge_parts(&entries, &tmp);
        let rows = match merged {
            Ok(rows) => rows,
            Err(e) => {
                std::fs::remove_file(&tmp).ok();
                return Err(e);
            }
        };
        std::fs::rename(&tmp, dest)
            .with_context(|| format!("renaming {} -> {}", tmp.display(), dest.display()))?;
        Ok(MergeSummary {
            shards: self.num_shards,
            rows,
            input_rows,
            ..Default::default()
        })
    }

    fn merge_parts(&self, entries: &[PartEntry], tmp: &Path) -> Result<u64> {
        let file =
            std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = ArrowWriter::try_new(
            file,
            self.schema.clone(),
            Some(llm4dsr_data::parquet_io::writer_properties()),
        )?;
        let mut total = 0u64;
        for e in entries {
            let p = self.part_path(e.shard);
            let reader = ParquetRecordBatchReaderBuilder::try_new(
                std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?,
            )
            .with_context(|| {
                format!(
                    "{}: shard {}: unreadable part {}",
                    self.name,
                    e.shard,
                    p.display()
                )
            })?
            .build()?;
            let mut rows = 0u64;
            for b in reader {
                let b = b.with_context(|| format!("decoding {}", p.display()))?;
                rows += b.num_rows() as u64;
                w.write(&b)?;
            }
            if rows != e.rows {
                bail!(
                    "{}: shard {}: part {} holds {rows} rows, its entry says {}; nothing was merged",
                    self.name,
                    e.shard,
                    p.display(),
                    e.rows
                );
            }
            total += rows;
        }
        w.close()?;
        Ok(total)
    }

    /// Every part's rows in shard order, read back from the parts directory (after [`Self::run`]
    /// has verified them): how every rank gets a pass's whole output when the next pass needs it
    /// (the parts directory is on the filesystem all ranks share, as the merge already assumes).
    pub fn read_parts(&self) -> Result<Vec<RecordBatch>> {
        let mut out = Vec::new();
        for shard in 0..self.num_shards {
            let p = self.part_path(shard);
            let f = std::fs::File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            let reader = ParquetRecordBatchReaderBuilder::try_new(f)
                .with_context(|| format!("{}: not a readable Parquet file", p.display()))?
                .build()?;
            for b in reader {
                out.push(b.with_context(|| format!("decoding {}", p.display()))?);
            }
        }
        Ok(out)
    }

    /// Remove the parts directory (after the stage's output is committed).
    pub fn remove_parts(&self) -> Result<()> {
        if self.parts_dir.exists() {
            std::fs::remove_dir_all(&self.parts_dir)
                .with_context(|| format!("removing {}", self.parts_dir.display()))?;
        }
        Ok(())
    }
}

/// Parse the test hook for this rank: `Some(n)` if this rank must abort after n parts.
fn abort_hook(rank: usize) -> Result<Option<u32>> {
    match std::env::var(ABORT_HOOK_VAR) {
        Ok(v) => parse_abort_hook(&v, rank),
        Err(_) => Ok(None),
    }
}

fn parse_abort_hook(v: &str, rank: usize) -> Result<Option<u32>> {
    let parsed = v.split_once(':').and_then(|(r, n)| {
        Some((
            r.trim().parse::<usize>().ok()?,
            n.trim().parse::<u32>().ok()?,
        ))
    });
    let Some((r, n)) = parsed else {
        bail!("{ABORT_HOOK_VAR}={v:?}: expected <rank>:<number of shards>, e.g. 1:1");
    };
    Ok((r == rank).then_some(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::UInt32Array;
    use arrow_schema::{DataType, Field, Schema};
    use llm4dsr_comm::Local;
    use std::sync::Arc;

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![Field::new(
            "user",
            DataType::UInt32,
            false,
        )]))
    }

    /// Shard s holds users s, s+8, s+16, ... below 100 (input rows: the same count).
    fn work(shard: u32) -> Result<ShardOutput> {
        let users: Vec<u32> = (shard..100).step_by(8).collect();
        let n = users.len() as u64;
        Ok(ShardOutput {
            batches: vec![RecordBatch::try_new(
                schema(),
                vec![Arc::new(UInt32Array::from(users))],
            )?],
            input_rows: n,
        })
    }

    fn stage<'a>(dir: &Path, comm: &'a dyn Comm) -> ShardedStage<'a> {
        ShardedStage {
            name: "test".into(),
            parts_dir: dir.join("out.parts"),
            num_shards: 8,
            schema: schema(),
            fingerprint: "f1".into(),
            comm,
        }
    }

    fn read_users(p: &Path) -> Vec<u32> {
        let r = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(p).unwrap())
            .unwrap()
            .build()
            .unwrap();
        r.flat_map(|b| {
            let b = b.unwrap();
            use arrow_array::cast::AsArray;
            b.column(0)
                .as_primitive::<arrow_array::types::UInt32Type>()
                .values()
                .to_vec()
        })
        .collect()
    }

    #[test]
    fn merges_in_shard_order_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let s = stage(dir.path(), &Local);
        let dest = dir.path().join("out.parquet");
        let sum = s.run(Some(&dest), 100, work).unwrap();
        assert_eq!(
            (
                sum.rows,
                sum.input_rows,
                sum.parts_written,
                sum.parts_reused
            ),
            (100, 100, 8, 0)
        );
        let users = read_users(&dest);
        let expect: Vec<u32> = (0..8).flat_map(|s| (s..100).step_by(8)).collect();
        assert_eq!(users, expect);
        let first = std::fs::read(&dest).unwrap();

        // A re-run reuses every part and writes the same bytes.
        let sum = s
            .run(Some(&dest), 100, |_| bail!("must not be called"))
            .unwrap();
        assert_eq!((sum.parts_written, sum.parts_reused), (0, 8));
        assert_eq!(std::fs::read(&dest).unwrap(), first);

        // Another fingerprint makes every part stale.
        let mut s2 = stage(dir.path(), &Local);
        s2.fingerprint = "f2".into();
        let sum = s2.run(Some(&dest), 100, work).unwrap();
        assert_eq!((sum.parts_written, sum.parts_reused), (8, 0));
    }

    #[test]
    fn missing_or_truncated_part_names_the_shard_and_merges_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s = stage(dir.path(), &Local);
        s.produce(work).unwrap();
        let dest = dir.path().join("out.parquet");

        // Truncated part 3.
        let p3 = s.part_path(3);
        let bytes = std::fs::read(&p3).unwrap();
        std::fs::write(&p3, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", s.verify_and_merge(&dest, 100).unwrap_err());
        assert!(e.contains("shard 3 (part-00003-of-00008.parquet"), "{e}");
        assert!(e.contains("truncated"), "{e}");
        assert!(!dest.exists());

        // Missing part 5 (part 3 restored).
        std::fs::write(&p3, &bytes).unwrap();
        std::fs::remove_file(s.part_path(5)).unwrap();
        let e = format!("{:#}", s.verify_and_merge(&dest, 100).unwrap_err());
        assert!(e.contains("shard 5 (part-00005-of-00008.parquet"), "{e}");
        assert!(e.contains("missing"), "{e}");
        assert!(!dest.exists());

        // Same size, other content: the hash catches it.
        s.produce(work).unwrap();
        let p1 = s.part_path(1);
        let mut b1 = std::fs::read(&p1).unwrap();
        let k = b1.len() / 2;
        b1[k] ^= 0xFF;
        std::fs::write(&p1, &b1).unwrap();
        let e = format!("{:#}", s.verify_and_merge(&dest, 100).unwrap_err());
        assert!(e.contains("shard 1 ") && e.contains("sha256"), "{e}");

        // Counts that do not add up.
        s.produce(work).unwrap();
        let e = format!("{:#}", s.verify_and_merge(&dest, 101).unwrap_err());
        assert!(
            e.contains("consumed 100 input rows, the input has 101"),
            "{e}"
        );
        assert!(!dest.exists());
        assert_eq!(s.verify_and_merge(&dest, 100).unwrap().rows, 100);
    }

    #[test]
    fn abort_hook_parses() {
        assert_eq!(parse_abort_hook("1:2", 1).unwrap(), Some(2));
        assert_eq!(parse_abort_hook("1:2", 0).unwrap(), None);
        let e = parse_abort_hook("rank1", 1).unwrap_err().to_string();
        assert!(e.contains("expected <rank>:<number of shards>"), "{e}");
    }
}
