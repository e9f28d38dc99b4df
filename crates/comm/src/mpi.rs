//! [`Comm`] over MPI (OpenMPI through the `mpi` crate). Each method is one or two MPI
//! collectives on the world communicator; variable-length gathers first exchange the lengths.
//!
//! Costs: MPI_Init ~0.3 s; a collective on one node over shared memory is a few microseconds
//! plus the bytes at memory bandwidth; across nodes, latency plus bytes over the network (see
//! docs/scaling.md). `all_reduce_sum_*` copies the send buffer in chunks of 16 Mi elements (the
//! `mpi` crate has no MPI_IN_PLACE), so it needs at most 64 MiB of extra memory for f32.
//!
//! Threads: MPI is initialised with MPI_THREAD_SERIALIZED and every call goes through one
//! mutex, so the communicator can be shared between threads (`Comm: Send + Sync`) while MPI
//! only ever sees one call at a time.

use crate::Comm;
use anyhow::{bail, Result};
use mpi::collective::SystemOperation;
use mpi::datatype::{Equivalence, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::sync::Mutex;

/// Elements per MPI call: keeps counts far below MPI's `int` limit and bounds the copy that an
/// out-of-place all-reduce needs.
const CHUNK: usize = 16 << 20;

pub struct Mpi {
    // Field order matters: `world` must be dropped before `universe` finalises MPI.
    world: Mutex<SimpleCommunicator>,
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    _universe: Universe,
}

// SAFETY: the MPI handles inside are plain integers/pointers owned by the MPI library. MPI is
// initialised with at least MPI_THREAD_SERIALIZED (checked in `init`), and every call on
// `world` holds the mutex, so no two threads ever call MPI at the same time.
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

impl Mpi {
    /// Initialise MPI (once per process) and read this rank's place in the world and on its
    /// node (ranks sharing memory, via MPI_Comm_split_type).
    pub fn init() -> Result<Mpi> {
        let Some((universe, threading)) = mpi::initialize_with_threading(Threading::Serialized)
        else {
            bail!("MPI was already initialised in this process");
        };
        if threading < Threading::Serialized {
            bail!(
                "this MPI library provides thread level {threading:?}; llm4dsr needs \
                 MPI_THREAD_SERIALIZED"
            );
        }
        let world = universe.world();
        let node = world.split_shared(world.rank());
        let (local_rank, local_size) = (node.rank() as usize, node.size() as usize);
        drop(node);
        Ok(Mpi {
            rank: world.rank() as usize,
            size: world.size() as usize,
            local_rank,
            local_size,
            world: Mutex::new(world),
            _universe: universe,
        })
    }

    fn world(&self) -> std::sync::MutexGuard<'_, SimpleCommunicator> {
        // A panic while holding the lock leaves MPI state as it was: keep going.
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gather variable-length slices from every rank; returns the concatenation and lengths.
    fn all_gather_var<T: Equivalence + Copy + Default>(
        &self,
        mine: &[T],
    ) -> Result<(Vec<T>, Vec<usize>)> {
        let w = self.world();
        let n = mine.len() as u64;
        let mut lens = vec![0u64; self.size];
        w.all_gather_into(&n, &mut lens[..]);
        let total: u64 = lens.iter().sum();
        if total > i32::MAX as u64 {
            bail!(
                "all-gather of {total} elements exceeds MPI's per-call limit of {} elements",
                i32::MAX
            );
        }
        let counts: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
        let displs: Vec<i32> = counts
            .iter()
            .scan(0i32, |acc, &c| {
                let d = *acc;
                *acc += c;
                Some(d)
            })
            .collect();
        // An empty slice's pointer is dangling, and for bytes it is 0x1, which OpenMPI reads as
        // MPI_IN_PLACE: pass empty slices of real allocations instead.
        let spare = [T::default()];
        let send = if mine.is_empty() { &spare[..0] } else { mine };
        let mut out = vec![T::default(); total as usize + 1];
        {
            let recv = &mut out[..total as usize];
            let mut part = PartitionMut::new(recv, &counts[..], &displs[..]);
            w.all_gather_varcount_into(send, &mut part);
        }
        out.truncate(total as usize);
        Ok((out, lens.into_iter().map(|l| l as usize).collect()))
    }

    /// Fail (on every rank) unless all ranks pass the same length: a mismatch would otherwise
    /// crash inside MPI or hang.
    fn check_same_len(&self, what: &str, len: usize) -> Result<()> {
        let w = self.world();
        let mine = [len as i64, -(len as i64)];
        let mut ext = [0i64; 2];
        w.all_reduce_into(&mine[..], &mut ext[..], SystemOperation::max());
        let (max, min) = (ext[0], -ext[1]);
        if max != min {
            bail!("{what}: ranks passed different lengths (this rank {len}, min {min}, max {max})");
        }
        Ok(())
    }

    fn all_reduce_sum<T: Equivalence + Copy>(&self, what: &str, buf: &mut [T]) -> Result<()> {
        self.check_same_len(what, buf.len())?;
        let w = self.world();
        let mut send: Vec<T> = Vec::with_capacity(buf.len().min(CHUNK));
        for chunk in buf.chunks_mut(CHUNK) {
            send.clear();
            send.extend_from_slice(chunk);
            w.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
        Ok(())
    }
}

impl Comm for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.local_rank
    }
    fn local_size(&self) -> usize {
        self.local_size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn barrier(&self) -> Result<()> {
        self.world().barrier();
        Ok(())
    }

    fn broadcast_bytes(&self, root: usize, buf: &mut Vec<u8>) -> Result<()> {
        if root >= self.size {
            bail!(
                "broadcast from rank {root}, but the job has {} ranks",
                self.size
            );
        }
        let w = self.world();
        let p = w.process_at_rank(root as i32);
        let mut len = buf.len() as u64;
        p.broadcast_into(&mut len);
        buf.resize(len as usize, 0);
        for chunk in buf.chunks_mut(CHUNK) {
            p.broadcast_into(chunk);
        }
        Ok(())
    }

    fn all_gather_bytes(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let (flat, lens) = self.all_gather_var(mine)?;
        let mut out = Vec::with_capacity(lens.len());
        let mut at = 0;
        for l in lens {
            out.push(flat[at..at + l].to_vec());
            at += l;
        }
        Ok(out)
    }

    fn all_gather_f32(&self, mine: &[f32]) -> Result<Vec<f32>> {
        Ok(self.all_gather_var(mine)?.0)
    }

    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        self.all_reduce_sum("all_reduce_sum_f32", buf)
    }

    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        self.all_reduce_sum("all_reduce_sum_f64", buf)
    }

    fn abort(&self, code: i32) -> ! {
        // Do not wait for the lock: another thread may hold it inside a collective that will
        // never complete, which is exactly when a job needs aborting.
        match self.world.try_lock() {
            Ok(w) => w.abort(code),
            Err(_) => SimpleCommunicator::world().abort(code),
        }
    }
}
