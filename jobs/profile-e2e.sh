#!/usr/bin/env bash
# Where the time of end-to-end scoring goes on the GPU: the LLM forward on candle's CUDA
# backend + the fused kernel (benches/scoring_e2e.rs), in one device call of ~2-3 minutes.
#
#   on this machine:  jobs/gpu-check.sh build-candle      (target-gpu/bin/scoring-e2e)
#   device call:      command: bash jobs/profile-e2e.sh   carry: ["target-gpu/bin"]   timeout_s: 400
#
# Ours against PyTorch + transformers is `jobs/gpu-check.sh run --e2e-only`; this script says
# why ours takes the time it takes. (Measured 2026-11-27 on an H200 and dropped: turning
# cudarc's per-argument event tracking off changed nothing, within 2%.)
# Nsight Compute (ncu, --clock-control none: the clocks are left alone) over the timed run
# only (LLM4DSR_E2E_PROFILE=1, --profile-from-start off) of one SmolLM2 batch of 64 windows:
# each kernel's duration, summed by kernel name, against the same run's wall time unprofiled.
# The sum of kernel times over the wall time says how busy the GPU is; the rest is the host
# (launch and allocation overhead) or gaps between launches. The forward uses our decoder
# kernels (the default) unless LLM4DSR_DECODER_OPS says `candle`.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=target-gpu/bin
OUT=${OUT:-$(mktemp -d)}
[ -x "$BIN/scoring-e2e" ] || { echo "missing $BIN/scoring-e2e: jobs/gpu-check.sh build-candle" >&2; exit 2; }
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
status=0

NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$NCU" ]; then
  echo "SKIP: no ncu on this machine"
else
  for case in forward_only full_title; do
    echo "== ncu: smollm2-135m, 64 windows, $case (timed run only)"
    LLM4DSR_DECODER_OPS=${LLM4DSR_DECODER_OPS:-kernels} LLM4DSR_E2E_PROFILE=1 timeout 90 "$NCU" --clock-control none --profile-from-start off \
      --metrics gpu__time_duration.sum --csv --page raw --log-file "$OUT/ncu-$case.csv" \
      "$BIN/scoring-e2e" --config smollm2-135m --windows 64 --batch 64 --device cuda --cases "$case" \
      > "$OUT/ncu-$case.out" 2> "$OUT/ncu-$case.err"
    rc=$?; [ $rc -ne 0 ] && { echo "ncu $case: exit $rc"; tail -5 "$OUT/ncu-$case.err"; status=1; }
    python3 - "$OUT/ncu-$case.csv" <<'PY'
import csv, sys, collections
lines = open(sys.argv[1], errors="replace").read().splitlines()
start = next((i for i, l in enumerate(lines) if '"Kernel Name"' in l), None)
if start is None:
    print("no kernel rows in", sys.argv[1]); print("\n".join(lines[-5:])); sys.exit(0)
rows = list(csv.reader(lines[start:]))
head = rows[0]
k, t = head.index("Kernel Name"), head.index("gpu__time_duration.sum")
unit = rows[1][t] if len(rows) > 1 else ""
scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0, "second": 1e3}.get(unit, None)
tot = collections.defaultdict(float); cnt = collections.Counter()
for r in rows[1:]:
    if len(r) <= max(k, t):
        continue
    try:
        v = float(r[t].replace(",", ""))
    except ValueError:
        continue
    name = r[k].split("(")[0].split("<")[0][:60]
    tot[name] += v * (scale or 1e-6); cnt[name] += 1
all_ms = sum(tot.values())
print(f"{sum(cnt.values())} kernels, {all_ms:.2f} ms of kernel time (unit {unit})")
print("| kernel | launches | ms | share |")
print("|---|---:|---:|---:|")
for name, ms in sorted(tot.items(), key=lambda x: -x[1])[:25]:
    print(f"| {name} | {cnt[name]} | {ms:.3f} | {100 * ms / all_ms:.1f}% |")
PY
  done
  echo "(wall time unprofiled: 64 / windows_per_s of jobs/gpu-check.sh run --e2e-only's smollm2-135m lines)"
fi
echo "profile-e2e: $([ $status -eq 0 ] && echo PASSED || echo FAILED) (logs in $OUT)"
exit $status
