//! Which launcher started this process, read from the environment it sets for each rank.
//! Knowing the launcher's rank count before MPI_Init lets a binary built without MPI refuse to
//! run as N unrelated copies, and lets a single-process run skip MPI_Init altogether.

use anyhow::{bail, Context, Result};

/// A process's place in a launched job, as the launcher describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Launch {
    /// Human-readable launcher name, used in messages.
    pub launcher: &'static str,
    pub size: usize,
    pub rank: usize,
    /// Rank among the processes on this node.
    pub local_rank: usize,
}

/// (launcher, size variable, rank variable, local-rank variable, variable that must be set).
///
/// OpenMPI comes first: `mpirun` inside a Slurm allocation sets both its own and Slurm's
/// variables, and it is the one that started us. Slurm counts only inside a job step (`srun`):
/// a batch script itself has SLURM_NTASKS but is one process, and SLURM_STEP_NUM_TASKS is set
/// by `srun` alone. PMI_* covers MPICH's hydra and other PMI launchers.
const LAUNCHERS: [(&str, &str, &str, &str, &str); 3] = [
    (
        "mpirun (OpenMPI)",
        "OMPI_COMM_WORLD_SIZE",
        "OMPI_COMM_WORLD_RANK",
        "OMPI_COMM_WORLD_LOCAL_RANK",
        "OMPI_COMM_WORLD_SIZE",
    ),
    (
        "srun (Slurm)",
        "SLURM_STEP_NUM_TASKS",
        "SLURM_PROCID",
        "SLURM_LOCALID",
        "SLURM_STEP_NUM_TASKS",
    ),
    (
        "a PMI launcher",
        "PMI_SIZE",
        "PMI_RANK",
        "MPI_LOCALRANKID",
        "PMI_SIZE",
    ),
];

impl Launch {
    /// Read the launcher's variables through `env` (normally `std::env::var`). `Ok(None)`: no
    /// launcher started this process. Malformed values are an error naming the variable.
    pub fn detect(env: impl Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        for (launcher, size_var, rank_var, local_var, marker) in LAUNCHERS {
            if env(marker).is_none() {
                continue;
            }
            let num = |var: &str, required: bool| -> Result<Option<usize>> {
                match env(var) {
                    None if required => bail!(
                        "{launcher}: {marker} is set but {var} is not; cannot tell this \
                         process's rank"
                    ),
                    None => Ok(None),
                    Some(v) => v
                        .trim()
                        .parse::<usize>()
                        .map(Some)
                        .with_context(|| format!("{launcher}: {var}={v:?} is not a number")),
                }
            };
            let size = num(size_var, true)?.unwrap();
            let rank = num(rank_var, true)?.unwrap();
            // Without a local rank, assume one rank per node (the safe choice for GPUs).
            let local_rank = num(local_var, false)?.unwrap_or(0);
            if size == 0 || rank >= size {
                bail!("{launcher}: {rank_var}={rank} is not below {size_var}={size}");
            }
            return Ok(Some(Launch {
                launcher,
                size,
                rank,
                local_rank,
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn detect(vars: &[(&str, &str)]) -> Result<Option<Launch>> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Launch::detect(|k| m.get(k).cloned())
    }

    #[test]
    fn openmpi() {
        let l = detect(&[
            ("OMPI_COMM_WORLD_SIZE", "3"),
            ("OMPI_COMM_WORLD_RANK", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "0"),
            // mpirun inside a Slurm allocation: OpenMPI's variables win.
            ("SLURM_STEP_NUM_TASKS", "1"),
            ("SLURM_PROCID", "0"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.size, l.rank, l.local_rank), (3, 2, 0));
        assert_eq!(l.launcher, "mpirun (OpenMPI)");
    }

    #[test]
    fn slurm_step_but_not_batch_script() {
        let l = detect(&[
            ("SLURM_STEP_NUM_TASKS", "8"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
        ])
        .unwrap()
        .unwrap();
        assert_eq!((l.size, l.rank, l.local_rank), (8, 5, 1));
        // The batch script itself (no srun): one process, no launcher.
        assert_eq!(
            detect(&[("SLURM_NTASKS", "8"), ("SLURM_JOB_ID", "7")]).unwrap(),
            None
        );
    }

    #[test]
    fn none_and_bad_values() {
        assert_eq!(detect(&[]).unwrap(), None);
        let e = detect(&[
            ("OMPI_COMM_WORLD_SIZE", "two"),
            ("OMPI_COMM_WORLD_RANK", "0"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("OMPI_COMM_WORLD_SIZE=\"two\""), "{e}");
        let e = detect(&[("PMI_SIZE", "2"), ("PMI_RANK", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("PMI_RANK=2 is not below PMI_SIZE=2"), "{e}");
        let e = detect(&[("PMI_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("PMI_RANK is not"), "{e}");
    }
}
