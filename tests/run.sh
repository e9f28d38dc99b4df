#!/usr/bin/env bash
# The test command (see README): installs what the tests need, fetches the real assets into
# the cache ($LLM4DSR_CACHE or ~/.cache/llm4dsr), then runs the whole suite, MPI tests included.
set -euo pipefail
cd "$(dirname "$0")/.."

# OpenMPI (the `mpi` feature and the mpirun tests) and libclang (bindgen of mpi-sys).
missing=()
command -v mpirun >/dev/null 2>&1 || missing+=(openmpi-bin)
dpkg -s libopenmpi-dev >/dev/null 2>&1 || missing+=(libopenmpi-dev)
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "tests/run.sh: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# OpenMPI refuses to start as root without these (CI runs as root).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1

# One feature set for every step, so nothing is compiled twice: MPI, and the CUDA kernels
# (compiled without a toolkit; with no GPU at run time they take the CPU path).
features="llm4dsr/mpi,llm4dsr/cuda"

cargo build --workspace --tests --features "$features"
cargo run -q --features "$features" -- assets fetch
cargo test --workspace --features "$features" "$@"
