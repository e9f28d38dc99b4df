//! One interface for running a stage on one process or on many (MPI). Stage code is written
//! once against [`Comm`]; [`Local`] is the single-process implementation (a real one: every
//! collective is the identity over one rank), and `Mpi` (feature `mpi`) runs over OpenMPI.

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
