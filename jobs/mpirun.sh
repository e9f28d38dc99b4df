#!/usr/bin/env bash
# Run one llm4dsr stage on this machine (or the hosts in a hostfile) with N ranks under
# OpenMPI's mpirun. Every argument after the options goes to llm4dsr unchanged.
#
#   jobs/mpirun.sh -n 3 -- score --dataset data/ml-1m --out runs/scores --method popularity
#   jobs/mpirun.sh -n 2 -- comm-check --expect-size 2
#
# Options (or environment):
#   -n RANKS        number of ranks (RANKS, default 2)
#   -b BINARY       the MPI-enabled llm4dsr (LLM4DSR_BIN, default target/release/llm4dsr;
#                   build it with `cargo build --release --features mpi`)
#   -f HOSTFILE     OpenMPI hostfile for several machines (HOSTFILE, default: this machine)
#
# Ranks beyond the cores get --oversubscribe; each rank's thread pool gets cores / (ranks per
# machine) threads (RAYON_NUM_THREADS; the machines of a hostfile are taken to have this one's
# cores), and ranks are not pinned to one core (--bind-to none) so that those threads can run.
# The LLM4DSR_* variables, RUST_LOG, RAYON_NUM_THREADS, LD_LIBRARY_PATH and CUDA_VISIBLE_DEVICES
# that are set here reach every rank. Resume: run the same command again; finished shards are
# skipped.
set -euo pipefail

RANKS=${RANKS:-2}
BIN=${LLM4DSR_BIN:-target/release/llm4dsr}
HOSTFILE=${HOSTFILE:-}
while getopts "n:b:f:h" opt; do
  case $opt in
    n) RANKS=$OPTARG ;;
    b) BIN=$OPTARG ;;
    f) HOSTFILE=$OPTARG ;;
    h) sed -n '2,/^set -euo/{/^set -euo/d;p}' "$0"; exit 0 ;;
    *) sed -n '2,/^set -euo/{/^set -euo/d;p}' "$0" >&2; exit 2 ;;
  esac
done
case $RANKS in
  ''|*[!0-9]*|0) echo "jobs/mpirun.sh: -n wants a number of ranks >= 1, not '$RANKS'" >&2; exit 2 ;;
esac
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
if [ $# -eq 0 ]; then
  echo "jobs/mpirun.sh: no llm4dsr arguments given (try: jobs/mpirun.sh -n 2 -- comm-check)" >&2
  exit 2
fi

command -v mpirun >/dev/null || {
  echo "jobs/mpirun.sh: mpirun not found (Debian/Ubuntu: apt-get install openmpi-bin libopenmpi-dev)" >&2
  exit 2
}
[ -x "$BIN" ] || {
  echo "jobs/mpirun.sh: $BIN is not an executable (cargo build --release --features mpi, or -b PATH)" >&2
  exit 2
}
# A binary without MPI would run as $RANKS separate single-rank jobs; it refuses to start
# under a launcher anyway, but say it before starting anything.
if command -v ldd >/dev/null && ! ldd "$BIN" | grep -q 'libmpi'; then
  echo "jobs/mpirun.sh: $BIN is not linked against MPI: rebuild with --features mpi" >&2
  exit 2
fi

CORES=$(nproc)
ARGS=(-n "$RANKS" --bind-to none)
PER_HOST=$RANKS
if [ -n "$HOSTFILE" ]; then
  [ -r "$HOSTFILE" ] || { echo "jobs/mpirun.sh: cannot read hostfile $HOSTFILE" >&2; exit 2; }
  ARGS+=(--hostfile "$HOSTFILE")
  HOSTS=$(grep -cvE '^[[:space:]]*(#|$)' "$HOSTFILE" || true)
  [ "${HOSTS:-0}" -ge 1 ] || { echo "jobs/mpirun.sh: $HOSTFILE names no host" >&2; exit 2; }
  PER_HOST=$(( (RANKS + HOSTS - 1) / HOSTS ))
elif [ "$RANKS" -gt "$CORES" ]; then
  ARGS+=(--oversubscribe)
fi
THREADS=$(( CORES / PER_HOST )); [ "$THREADS" -ge 1 ] || THREADS=1
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-$THREADS}
# OpenMPI refuses to run as root unless told twice (containers, CI).
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
# Forward the variables llm4dsr reads (only those that are set).
for v in RUST_LOG RAYON_NUM_THREADS LD_LIBRARY_PATH CUDA_VISIBLE_DEVICES $(compgen -v LLM4DSR_); do
  if [ -n "${!v:-}" ]; then ARGS+=(-x "$v"); fi
done

echo "jobs/mpirun.sh: $RANKS ranks x $RAYON_NUM_THREADS threads: $BIN $*" >&2
exec mpirun "${ARGS[@]}" "$BIN" "$@"
