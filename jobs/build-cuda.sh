#!/usr/bin/env bash
# Build llm4dsr with candle's own CUDA backend (the model forward on the GPU) on a machine
# WITHOUT a GPU or CUDA toolkit: the recipe of ../shared/docs/gpu-build.md as a script.
# Not run by default or in CI. Costs: ~20 s and 1.2 GB of NVIDIA wheels from PyPI, then
# candle-kernels' nvcc work (~1.5 min PTX + ~15 min libmoe.a on 2 cores) and the release build.
#
#   jobs/build-cuda.sh                 # cargo build --release --features candle-cuda
#   FEATURES="cuda" jobs/build-cuda.sh # our NVRTC kernels only (needs none of this: plain cargo)
#   CARGO_TARGET_DIR=target-cuda CARGO_CMD="check --tests --benches" jobs/build-cuda.sh
#
# The binary then LINKS libcuda.so.1, libcudart.so.13, libcublas.so.13(+Lt), libcurand.so.10:
# on the GPU machine run it with LD_LIBRARY_PATH=/usr/local/cuda/lib64:$LD_LIBRARY_PATH.
# The libcuda stub made here is for linking only: never ship or carry it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.cuda-venv}                       # git-ignored
# candle-cuda = our kernels + candle-core's CUDA storage + candle-nn's CUDA ops (softmax, RMS
# norm, rotary embedding: without candle-nn's feature they fail at run time on a GPU).
FEATURES=${FEATURES:-"candle-cuda"}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}

# nvcc pinned to 13.0: a newer nvcc emits PTX the GPU machines' 580 driver cannot JIT.
if [ ! -x "$VENV/bin/pip" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.48 nvidia-cuda-crt==13.0.48 nvidia-nvvm==13.0.48 \
  nvidia-cuda-runtime==13.0.48 nvidia-cuda-nvrtc==13.0.48 nvidia-cuda-cccl==13.0.50 \
  nvidia-cublas==13.0.0.19 nvidia-curand==10.4.0.35
W=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
mkdir -p "$W/nvvm/bin" && ln -sf ../../bin/cicc "$W/nvvm/bin/cicc"     # nvcc.profile expects it there
(cd "$W/lib" && for l in cudart.so.13 nvrtc.so.13 cublas.so.13 cublasLt.so.13 curand.so.10; do
   ln -sf "lib$l" "lib${l%%.so*}.so"; done)                             # -lfoo needs unversioned names

# libcuda.so comes only with a driver: a LINK-TIME stub exporting every cu* symbol cudarc
# declares, each returning 100 = CUDA_ERROR_NO_DEVICE (never called: not shipped).
STUB="$W/lib/stubs"
if [ ! -f "$STUB/libcuda.so" ]; then
  mkdir -p "$STUB"
  SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | tail -1)
  grep -oE 'fn cu[A-Za-z0-9_]+\(' "$SYS" | sed -E 's/fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u \
    | awk '{ printf "int %s(void) { return 100; }\n", $1 }' > "$STUB/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so.1" "$STUB/cuda_stub.c"
  ln -sf libcuda.so.1 "$STUB/libcuda.so"
  echo "stub libcuda: $(wc -l < "$STUB/cuda_stub.c") symbols from $SYS"
fi

export PATH="$W/bin:$PATH" CUDA_ROOT="$W" CUDA_HOME="$W" CUDA_PATH="$W" CUDA_COMPUTE_CAP=90  # sm_90a: H100/H200
export LIBRARY_PATH="$W/lib:$STUB${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -2
# CARGO_CMD="check --tests --benches" type-checks everything against candle's CUDA backend
# (build scripts, nvcc included, still run; no codegen).
CARGO_CMD=${CARGO_CMD:-"build --release"}
cargo $CARGO_CMD --features "$FEATURES"
echo "cargo $CARGO_CMD done in $CARGO_TARGET_DIR (features: $FEATURES)"
