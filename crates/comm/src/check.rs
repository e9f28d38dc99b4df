//! A self-test of a communicator: every collective against answers each rank can compute on
//! its own. Run as `llm4dsr comm-check` under the cluster's launcher before a long job: it
//! proves the launcher, the MPI library and the binary agree (right world size, working
//! collectives, bit-identical all-reduce results on every rank). Costs a few milliseconds.

use crate::Comm;
use anyhow::{ensure, Result};

/// What a successful check saw on this rank.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckReport {
    pub backend: &'static str,
    pub rank: usize,
    pub size: usize,
    pub local_rank: usize,
    pub local_size: usize,
    /// Number of collective checks that passed.
    pub passed: usize,
}

/// A value that differs per rank and per index and is not exactly representable in sums, so
/// that summation order would show in the last bits.
fn wobble(rank: usize, i: usize) -> f32 {
    let x = (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (i as u64).wrapping_mul(31);
    ((x >> 40) as f32 / (1u64 << 24) as f32) * 1e-3 + 1.0 / (i as f32 + 3.0)
}

/// Run every collective and compare with the expected result; the first mismatch is an error.
/// Every rank must call this (it is itself a sequence of collectives).
pub fn run(comm: &dyn Comm) -> Result<CheckReport> {
    let (rank, size) = (comm.rank(), comm.size());
    ensure!(rank < size, "rank {rank} is not below size {size}");
    ensure!(
        comm.local_rank() < comm.local_size(),
        "local rank {} is not below local size {}",
        comm.local_rank(),
        comm.local_size()
    );
    let mut passed = 0;

    comm.barrier()?;
    passed += 1;

    // Broadcast from the first and the last rank; receivers start with a buffer of another
    // length, which the broadcast must replace.
    for root in [0, size - 1] {
        let message = format!("broadcast from rank {root} of {size}").into_bytes();
        let mut buf = if rank == root {
            message.clone()
        } else {
            vec![0xAB; rank * 7 + 1]
        };
        comm.broadcast_bytes(root, &mut buf)?;
        ensure!(
            buf == message,
            "broadcast_bytes from root {root}: rank {rank} received {:?}",
            String::from_utf8_lossy(&buf)
        );
        passed += 1;
    }

    // Gathers with a different length per rank (rank 0 sends nothing).
    let gathered = comm.all_gather_bytes(&vec![rank as u8; rank])?;
    ensure!(
        gathered.len() == size,
        "all_gather_bytes: {} parts for {size} ranks",
        gathered.len()
    );
    for (r, part) in gathered.iter().enumerate() {
        ensure!(
            part == &vec![r as u8; r],
            "all_gather_bytes: rank {rank} got {part:?} as rank {r}'s part"
        );
    }
    passed += 1;
    let mine: Vec<f32> = (0..=rank).map(|i| (rank * 100 + i) as f32).collect();
    let all = comm.all_gather_f32(&mine)?;
    let expect: Vec<f32> = (0..size)
        .flat_map(|r| (0..=r).map(move |i| (r * 100 + i) as f32))
        .collect();
    ensure!(
        all == expect,
        "all_gather_f32: rank {rank} got {all:?}, expected {expect:?}"
    );
    passed += 1;

    // Sums of small integers are exact in f32: the answer is known exactly.
    let n = 100_003;
    let mut buf: Vec<f32> = (0..n).map(|i| ((rank + 1) * (i % 1000)) as f32).collect();
    comm.all_reduce_sum_f32(&mut buf)?;
    let tri = (size * (size + 1) / 2) as f32;
    if let Some(i) = (0..n).find(|&i| buf[i] != tri * (i % 1000) as f32) {
        anyhow::bail!(
            "all_reduce_sum_f32: element {i} is {} on rank {rank}, expected {}",
            buf[i],
            tri * (i % 1000) as f32
        );
    }
    passed += 1;

    let mut sums = [rank as f64, 1.0, 0.1 * rank as f64];
    comm.all_reduce_sum_f64(&mut sums)?;
    let ranks = (size * (size - 1) / 2) as f64;
    ensure!(
        sums[0] == ranks && sums[1] == size as f64 && (sums[2] - 0.1 * ranks).abs() < 1e-9,
        "all_reduce_sum_f64: rank {rank} got {sums:?}"
    );
    passed += 1;

    // Inexact sums must still be bit-identical on every rank, or data-parallel replicas drift.
    let mut noisy: Vec<f32> = (0..4099).map(|i| wobble(rank, i)).collect();
    comm.all_reduce_sum_f32(&mut noisy)?;
    let bits: Vec<u8> = noisy.iter().flat_map(|x| x.to_le_bytes()).collect();
    let everyone = comm.all_gather_bytes(&bits)?;
    for (r, other) in everyone.iter().enumerate() {
        ensure!(
            other == &bits,
            "all_reduce_sum_f32: rank {r}'s result differs in its bits from rank {rank}'s"
        );
    }
    let exact: Vec<f64> = (0..4099)
        .map(|i| (0..size).map(|r| wobble(r, i) as f64).sum())
        .collect();
    for (i, (&got, &want)) in noisy.iter().zip(&exact).enumerate() {
        ensure!(
            ((got as f64) - want).abs() <= 1e-6 * want.abs().max(1.0),
            "all_reduce_sum_f32: element {i} is {got}, expected {want}"
        );
    }
    passed += 1;

    // Mismatched lengths must be an error on every rank, not a hang or a crash.
    if size > 1 {
        let mut odd = vec![1.0f32; rank + 1];
        let e = comm.all_reduce_sum_f32(&mut odd);
        ensure!(
            e.is_err(),
            "all_reduce_sum_f32 accepted different lengths on different ranks"
        );
        passed += 1;
    }

    comm.barrier()?;
    Ok(CheckReport {
        backend: comm.backend(),
        rank,
        size,
        local_rank: comm.local_rank(),
        local_size: comm.local_size(),
        passed,
    })
}
