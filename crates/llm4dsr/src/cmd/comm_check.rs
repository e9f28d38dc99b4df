//! `llm4dsr comm-check`: run under the cluster's launcher before a long job to see where each
//! rank landed and that every collective works (see `llm4dsr_comm::check`). Rank 0 prints one
//! line per rank, in rank order.

use anyhow::{ensure, Result};
use llm4dsr_comm::Comm;
use serde::{Deserialize, Serialize};

#[derive(clap::Args, Debug, Serialize, Deserialize)]
pub struct CommCheckArgs {
    /// Fail unless the job has exactly this many ranks (a binary started by the wrong launcher
    /// runs as N separate jobs of one rank each, which otherwise looks like success).
    #[arg(long)]
    pub expect_size: Option<usize>,
    /// Also time all_reduce_sum_f32 of this many floats (e.g. a model's parameter count) and
    /// print the median time and bandwidth: the figures docs/scaling.md's model needs.
    #[arg(long, default_value_t = 0)]
    pub bench_floats: usize,
    /// Timed repetitions of the all-reduce (after 3 warm-up calls).
    #[arg(long, default_value_t = 20)]
    pub bench_iters: usize,
}

pub fn run(args: CommCheckArgs, comm: &dyn Comm) -> Result<()> {
    if let Some(n) = args.expect_size {
        ensure!(
            comm.size() == n,
            "this job has {} rank(s), --expect-size says {n} (started by the wrong launcher, or \
             a binary built without MPI?)",
            comm.size()
        );
    }
    let report = llm4dsr_comm::check::run(comm)?;
    let line = format!(
        "rank {}/{} local {}/{} host {} backend {}: {} collective checks passed",
        report.rank,
        report.size,
        report.local_rank,
        report.local_size,
        crate::cli::hostname(),
        report.backend,
        report.passed
    );
    let lines = comm.all_gather_bytes(line.as_bytes())?;
    if comm.is_root() {
        for l in lines {
            println!("{}", String::from_utf8_lossy(&l));
        }
    }
    if args.bench_floats > 0 {
        bench_all_reduce(comm, args.bench_floats, args.bench_iters.max(1))?;
    }
    Ok(())
}

/// Median wall time of an all-reduce of `n` floats, printed by rank 0 as one table row.
/// "bus bandwidth" is the usual ring-all-reduce normalisation: 2 (p-1)/p x bytes / time.
fn bench_all_reduce(comm: &dyn Comm, n: usize, iters: usize) -> Result<()> {
    let mut buf = vec![1.0f32; n];
    for _ in 0..3 {
        comm.all_reduce_sum_f32(&mut buf)?;
    }
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        buf.iter_mut().for_each(|x| *x = 1.0);
        comm.barrier()?;
        let t = std::time::Instant::now();
        comm.all_reduce_sum_f32(&mut buf)?;
        times.push(t.elapsed().as_secs_f64());
    }
    ensure!(
        buf.iter().all(|&x| x == comm.size() as f32),
        "all-reduce benchmark: wrong sum"
    );
    // The slowest rank's time is the step's time.
    let mut slowest = times.clone();
    let gathered = comm.all_gather_f32(&times.iter().map(|&t| t as f32).collect::<Vec<_>>())?;
    for (i, s) in slowest.iter_mut().enumerate() {
        for r in 0..comm.size() {
            *s = s.max(gathered[r * iters + i] as f64);
        }
    }
    slowest.sort_by(|a, b| a.total_cmp(b));
    let median = slowest[iters / 2];
    let bytes = (n * 4) as f64;
    let p = comm.size() as f64;
    if comm.is_root() {
        println!(
            "all_reduce_sum_f32 ranks {} floats {n} bytes {} median_ms {:.3} bus_GB/s {:.2}",
            comm.size(),
            n * 4,
            median * 1e3,
            2.0 * (p - 1.0) / p * bytes / median / 1e9
        );
    }
    Ok(())
}
