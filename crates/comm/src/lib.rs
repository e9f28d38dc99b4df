//! One interface for running a stage on one process or on many (MPI). Stage code is written
//! once against [`Comm`]; [`Local`] is the single-process implementation (a real one: every
//! collective is the identity over one rank), and `Mpi` (feature `mpi`) runs over OpenMPI.
//!
//! [`init`] is the one entry point a binary calls first: it reads the launcher's environment
//! ([`Launch::detect`]: OpenMPI's `mpirun`, Slurm's `srun`, or a PMI launcher such as MPICH's
//! hydra) and returns the matching communicator, or a clear error when the launcher started
//! N ranks but this binary was built without MPI (it would otherwise run as N independent
//! single-rank jobs that all write the same output). MPI_Init costs ~0.3 s, so a binary started
//! without a launcher never initialises MPI.
//!
//! [`check`] runs every collective against known answers: `llm4dsr comm-check` uses it to
//! prove a cluster set-up before a long job.

pub mod check;
mod launch;
#[cfg(feature = "mpi")]
mod mpi;

#[cfg(feature = "mpi")]
pub use crate::mpi::Mpi;
pub use launch::Launch;

use anyhow::Result;

/// Collective communication among the ranks of one job.
///
/// Every rank must call every collective in the same order with compatible arguments (as in
/// MPI). Results are identical on all ranks.
pub trait Comm: Send + Sync {
    /// This process's rank in 0..size.
    fn rank(&self) -> usize;
    /// Number of ranks in the job.
    fn size(&self) -> usize;
    /// Rank among the processes on this node (picks the GPU).
    fn local_rank(&self) -> usize;
    /// Block until every rank has arrived.
    fn barrier(&self) -> Result<()>;
    /// Replace `buf` on every rank with root's `buf` (lengths may differ before the call).
    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()>;
    /// Every rank's bytes, indexed by rank.
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// Every rank's f32s concatenated in rank order (lengths may differ between ranks).
    fn all_gather_f32(&self, mine: &[f32]) -> Result<Vec<f32>>;
    /// Element-wise sum over ranks, in place. All ranks pass the same length.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Element-wise sum of f64 over ranks, in place (metric sums, counts).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()>;

    fn is_root(&self) -> bool {
        self.rank() == 0
    }
    /// Number of ranks on this node (sizes per-node resources such as GPUs).
    fn local_size(&self) -> usize {
        1
    }
    /// Which implementation this is ("local", "mpi"), for logs and manifests.
    fn backend(&self) -> &'static str {
        "local"
    }
    /// End the whole job now with `code`: under MPI every rank is stopped (MPI_Abort), so a
    /// failing rank cannot leave the others waiting forever in a collective.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The GPU ordinal this rank should use among `visible` devices: the local rank, wrapped.
/// When the launcher already gives each rank exactly one device (Slurm `--gpus-per-task=1`
/// sets CUDA_VISIBLE_DEVICES per task), that device is ordinal 0.
pub fn gpu_ordinal(comm: &dyn Comm, visible: usize) -> usize {
    if visible <= 1 {
        0
    } else {
        comm.local_rank() % visible
    }
}

/// The communicator this process should use, chosen from the launcher's environment.
///
/// - No launcher (or a launcher that started one rank) and no MPI build: [`Local`].
/// - A launcher and a build with feature `mpi`: MPI is initialised and its world size checked
///   against the launcher's (a mismatch means the binary was linked against another MPI than
///   the launcher's, and every rank would otherwise believe it is alone).
/// - A launcher that started N > 1 ranks and a build without MPI: an error saying so.
///
/// `LLM4DSR_COMM=local` forces [`Local`] (only valid for a single rank); `LLM4DSR_COMM=mpi`
/// forces MPI even without a detected launcher (a launcher this code does not know).
pub fn init() -> Result<Box<dyn Comm>> {
    let launch = Launch::detect(|k| std::env::var(k).ok())?;
    let forced = std::env::var("LLM4DSR_COMM").ok();
    choose(launch, forced.as_deref())
}

fn choose(launch: Option<Launch>, forced: Option<&str>) -> Result<Box<dyn Comm>> {
    match forced {
        None | Some("") | Some("auto") => {}
        Some("local") => {
            if let Some(l) = &launch {
                if l.size > 1 {
                    anyhow::bail!(
                        "LLM4DSR_COMM=local, but {} started {} ranks: each would run the whole \
                         job alone. Unset LLM4DSR_COMM or start one process.",
                        l.launcher,
                        l.size
                    );
                }
            }
            return Ok(Box::new(Local));
        }
        Some("mpi") => return init_mpi(launch),
        Some(other) => anyhow::bail!("LLM4DSR_COMM={other}: expected auto, local or mpi"),
    }
    match launch {
        None => Ok(Box::new(Local)),
        Some(l) => init_mpi(Some(l)),
    }
}

#[cfg(feature = "mpi")]
fn init_mpi(launch: Option<Launch>) -> Result<Box<dyn Comm>> {
    let comm = Mpi::init()?;
    if let Some(l) = &launch {
        if l.size != comm.size() || l.rank != comm.rank() {
            anyhow::bail!(
                "{} says this is rank {} of {}, but MPI reports rank {} of {}: this binary's MPI \
                 library does not match the launcher (build against the MPI that provides the \
                 launcher, or use `srun --mpi=pmix` / that MPI's mpirun)",
                l.launcher,
                l.rank,
                l.size,
                comm.rank(),
                comm.size()
            );
        }
    }
    Ok(Box::new(comm))
}

#[cfg(not(feature = "mpi"))]
fn init_mpi(launch: Option<Launch>) -> Result<Box<dyn Comm>> {
    match launch {
        Some(l) if l.size > 1 => anyhow::bail!(
            "{} started this process as rank {} of {}, but this llm4dsr was built without MPI \
             support, so every rank would run the whole job alone. Rebuild with \
             `cargo build --release --features mpi` (needs libopenmpi-dev, openmpi-bin, \
             libclang-dev), or run a single process.",
            l.launcher,
            l.rank,
            l.size
        ),
        Some(_) => Ok(Box::new(Local)),
        None => anyhow::bail!(
            "LLM4DSR_COMM=mpi, but this llm4dsr was built without MPI support (feature `mpi`)"
        ),
    }
}

/// The single-process implementation: one rank, collectives are the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct Local;

impl Comm for Local {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn broadcast_bytes(&self, _root: usize, _buf: &mut Vec<u8>) -> Result<()> {
        Ok(())
    }
    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn all_gather_f32(&self, mine: &[f32]) -> Result<Vec<f32>> {
        Ok(mine.to_vec())
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(size: usize, rank: usize) -> Option<Launch> {
        Some(Launch {
            launcher: "mpirun (OpenMPI)",
            size,
            rank,
            local_rank: rank,
        })
    }

    #[test]
    fn no_launcher_is_local() {
        let c = choose(None, None).unwrap();
        assert_eq!((c.rank(), c.size(), c.backend()), (0, 1, "local"));
    }

    #[test]
    fn forced_local_refuses_many_ranks() {
        let e = choose(launch(3, 1), Some("local"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("started 3 ranks"), "{e}");
        assert!(choose(launch(1, 0), Some("local")).is_ok());
        let e = choose(None, Some("nccl")).err().unwrap().to_string();
        assert!(e.contains("LLM4DSR_COMM=nccl"), "{e}");
    }

    #[cfg(not(feature = "mpi"))]
    #[test]
    fn many_ranks_without_mpi_is_a_clear_error() {
        let e = choose(launch(4, 2), None).err().unwrap().to_string();
        assert!(e.contains("rank 2 of 4"), "{e}");
        assert!(e.contains("built without MPI"), "{e}");
        // One rank under a launcher is harmless.
        assert_eq!(choose(launch(1, 0), None).unwrap().size(), 1);
    }

    #[test]
    fn gpu_ordinal_wraps_local_rank() {
        struct Placed(usize);
        impl Comm for Placed {
            fn rank(&self) -> usize {
                self.0
            }
            fn size(&self) -> usize {
                8
            }
            fn local_rank(&self) -> usize {
                self.0 % 4
            }
            fn barrier(&self) -> Result<()> {
                Ok(())
            }
            fn broadcast_bytes(&self, _: usize, _: &mut Vec<u8>) -> Result<()> {
                Ok(())
            }
            fn all_gather_bytes(&self, m: &[u8]) -> Result<Vec<Vec<u8>>> {
                Ok(vec![m.to_vec()])
            }
            fn all_gather_f32(&self, m: &[f32]) -> Result<Vec<f32>> {
                Ok(m.to_vec())
            }
            fn all_reduce_sum_f32(&self, _: &mut [f32]) -> Result<()> {
                Ok(())
            }
            fn all_reduce_sum_f64(&self, _: &mut [f64]) -> Result<()> {
                Ok(())
            }
        }
        assert_eq!(gpu_ordinal(&Placed(6), 4), 2);
        assert_eq!(gpu_ordinal(&Placed(6), 1), 0);
        assert_eq!(gpu_ordinal(&Placed(5), 2), 1);
    }

    #[test]
    fn local_passes_the_collective_check() {
        let r = check::run(&Local).unwrap();
        assert_eq!(r.size, 1);
    }
}
