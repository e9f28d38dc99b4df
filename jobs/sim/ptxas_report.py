#!/usr/bin/env python3
"""NVRTC compile + ptxas resource report of kernels/*.cu without a GPU (registers, shared memory,
spills per entry point), through libnvrtc from the nvidia-cuda-nvrtc wheel (docs/kernels.md,
section 5). The Rust check (tests/kernels.rs, nvrtc_compiles_every_kernel) compiles the same
sources with the same -D options; this script adds `--ptxas-options=-v` on real architectures.

  python3 jobs/sim/ptxas_report.py kernels/nearest_tc.cu [-DNAME=V ...]
  python3 jobs/sim/ptxas_report.py kernels/item_loglik_fused_v3.cu   (sm_90a files: compiled
      after kernels/wgmma_common.cuh, as crates/kernels/src/sources.rs does, for sm_90a only)
  python3 jobs/sim/ptxas_report.py --sass=nearest_tc_rerank kernels/nearest_tc.cu
      (the SASS of the kernels whose name contains the text, for sm_90 / sm_90a: the cubin
      from NVRTC through nvdisasm; --sass= alone prints every kernel)
  NVRTC_LIB=/tmp/nvrtc/x/nvidia/cu13/lib/libnvrtc.so.13 (default)
  NVDISASM=/tmp/dis/x/nvidia/cu13/bin/nvdisasm (default; from the nvidia-cuda-nvdisasm wheel:
      pip download --no-deps nvidia-cuda-nvdisasm, then unzip it)
"""
import ctypes, os, re, subprocess, sys, tempfile

lib = ctypes.CDLL(os.environ.get("NVRTC_LIB", "/tmp/nvrtc/x/nvidia/cu13/lib/libnvrtc.so.13"))


SM90A = ("item_loglik_fused_v3.cu", "nearest_tc_v3.cu")


def compile_(path, arch, defs, extra=()):
    src = open(path, "rb").read()
    if os.path.basename(path) in SM90A:
        common = os.path.join(os.path.dirname(path), "wgmma_common.cuh")
        src = open(common, "rb").read() + b"\n#line 1\n" + src
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(path).encode(), 0, None, None) == 0
    opts = [f"--gpu-architecture={arch}".encode()] + [d.encode() for d in defs] + [e.encode() for e in extra]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    print(f"== {path} {arch} rc={rc}")
    print(log.value.decode()[:8000])
    if rc == 0 and SASS is not None and arch.startswith("sm_"):
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        print_sass(cubin.raw, SASS)
    return rc


def print_sass(cubin, only):
    """nvdisasm's listing of the kernels whose name contains `only` (all when empty)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        tool = os.environ.get("NVDISASM", "/tmp/dis/x/nvidia/cu13/bin/nvdisasm")
        text = subprocess.run([tool, "-c", "-g", f.name], capture_output=True, text=True, check=True).stdout
    # One section per kernel: ".text.<name>:" up to the next ".section".
    for sec in re.split(r"\n(?=\s*\.section\s+\.text\.)", text):
        m = re.search(r"\.text\.(\w+)", sec)
        if m and only in m.group(1):
            print(sec)


SASS = None


if __name__ == "__main__":
    for a in sys.argv[1:]:
        if a.startswith("--sass="):
            SASS = a[len("--sass="):]
    files = [a for a in sys.argv[1:] if not a.startswith("-")]
    defs = [a for a in sys.argv[1:] if a.startswith("-D")]
    rc = 0
    for f in files:
        sm90a = os.path.basename(f) in SM90A
        for arch in () if SASS is not None else ("compute_90a",) if sm90a else ("compute_80", "compute_90"):
            rc |= compile_(f, arch, defs)
        for arch in ("sm_90a",) if sm90a else ("sm_90",) if SASS is not None else ("sm_80", "sm_90"):
            rc |= compile_(f, arch, defs, ["--ptxas-options=-v"])
    sys.exit(rc)
