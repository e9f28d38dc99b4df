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
        hostname(),
        report.backend,
        report.passed
    );
    let lines = comm.all_gather_bytes(line.as_bytes())?;
    if comm.is_root() {
        for l in lines {
            println!("{}", String::from_utf8_lossy(&l));
        }
    }
    Ok(())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "?".into())
}
