#!/usr/bin/env bash
# GPU check of the custom kernels (issue 6): correctness and timing in one run of at most
# ~8 minutes on one H100/H200. Not part of CI or the default build.
#
#   jobs/gpu-check.sh build [--release]
#                             on this (GPU-less) machine: build with --features cuda of the test
#                             binary (tests/kernels.rs) and the benchmark (benches/kernels.rs);
#                             stripped copies in target-gpu/bin (git-ignored: carry it to the GPU
#                             machine). No CUDA toolkit needed: cudarc opens libcuda/libnvrtc at
#                             run time. Default: the test profile (dependencies opt-level 3, our
#                             crates 1; minutes from a warm target dir); the kernels are NVRTC-
#                             compiled at run time, so the host profile does not change GPU
#                             times, only the host-side f64 reference checks. --release: a
#                             release build (68 min from a cold target dir on 2 cores).
#   jobs/gpu-check.sh build-candle
#                             optional (2026-11-27 on 2 cores: 9 min after a `check` of target-cuda,
#                             whose first run took 19 min with nvcc; 1-2 min incremental):
#                             benches/scoring_e2e.rs built with
#                             candle's CUDA backend (jobs/build-cuda.sh: nvcc from PyPI wheels, a
#                             link-time libcuda stub) into target-gpu/bin/scoring-e2e, so that `run`
#                             also times end-to-end scoring (the LLM forward on the GPU + the fused
#                             kernel) next to hf_scoring_baseline.py at the same shapes.
#   jobs/gpu-check.sh profile [v3] [v5] [v6] [rerank]
#                             on the GPU machine (same carry): Nsight Compute on the first launch of
#                             the scoring (SmolLM2 b64, Llama-3-8B b32) and grounding (1M x 4096)
#                             kernels of each version named (default v5; "rerank": the
#                             grounding's first-level re-rank at 1M x 4096): stall reasons,
#                             throughput, the SASS page; ~20-40 s per profile.
#                             `run --then-profile` does it after the run, in the same call, for
#                             v3 and for v5 / v6 where their smoke tests passed.
#   jobs/gpu-check.sh run [--quick] [--no-torch]
#                             on the GPU machine: nvidia-smi; the v3 (wgmma) layout test and the
#                             tensor-core grounding test, each in its own process first (a
#                             failure there turns v3 off for the rest: LLM4DSR_FUSED_V3=off /
#                             LLM4DSR_NEAREST_TC_CANDIDATES=v2, and the check fails; the re-rank
#                             first, with v2 candidates: LLM4DSR_NEAREST_TC_RERANK=plain); all GPU tests
#                             (fail if they SKIP); the GPU benchmarks (fused v1 / v2a / v3 and the
#                             materialising path at the four scoring shapes, v3 without its
#                             epilogue; nearest f32 and tensor-core with both candidate kernels at
#                             1M x 4096 and 100k x 384, the candidate kernels alone); the PyTorch
#                             baselines at the same shapes (jobs/torch_baselines.py, skipped with
#                             --no-torch) and hf_scoring_baseline.py if found (copy it into
#                             target-gpu/bin, or set HF_BASELINE). Logs go to $OUT; the tables are
#                             printed last. --quick: smallest shapes. --e2e-only: only the
#                             end-to-end step (scoring-e2e and PyTorch + transformers).
#
# Device call (the session's run tool):
#   command: bash jobs/gpu-check.sh run     carry: ["target-gpu/bin"]     timeout_s: 400
# Measured 2026-11-27 15:20 UTC on an H200 (docs/kernels.md 6): ~215 s of wall time with
# scoring-e2e carried and the PyTorch / HF baselines, 264 s with --then-profile for v5, plus
# ~35-40 s to start the machine; each step has its own timeout so one hang cannot eat the lease.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=target-gpu/bin
# Fingerprint of the sources the binaries are built from: a stale target-gpu/bin (built before
# a kernel changed) must not pass for a check of the current kernels.
src_hash() { cat kernels/*.cu kernels/*.cuh crates/kernels/src/*.rs tests/kernels.rs benches/kernels.rs | sha256sum | cut -c1-16; }
candle_hash() { cat kernels/*.cu kernels/*.cuh crates/kernels/src/*.rs crates/llm/src/*.rs crates/llm/src/models/*.rs benches/scoring_e2e.rs | sha256sum | cut -c1-16; }
mode=${1:-run}
shift || true

if [ "$mode" = build ]; then
  set -e
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
  profile=""
  [ "${1:-}" = --release ] && profile=--release
  json=$(mktemp)
  cargo test $profile --features cuda --test kernels --bench kernels --no-run \
    --message-format=json > "$json"
  mkdir -p "$BIN"
  python3 - "$json" "$BIN" <<'PY'
import json, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
found = {}
for line in open(src):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "kernels":
        kind = m["target"]["kind"][0]
        found[kind] = m["executable"]
for kind, out in (("test", "kernels-test"), ("bench", "kernels-bench")):
    if kind not in found:
        sys.exit(f"no {kind} executable named kernels in cargo's output")
    shutil.copy(found[kind], f"{dst}/{out}")
    print(f"{found[kind]} -> {dst}/{out}")
PY
  strip "$BIN/kernels-test" "$BIN/kernels-bench"
  src_hash > "$BIN/SOURCES"
  ls -la "$BIN"
  echo "carry target-gpu/bin and run: bash jobs/gpu-check.sh run"
  exit 0
fi

if [ "$mode" = build-candle ]; then
  set -e
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda}
  json=$(mktemp)
  CARGO_CMD="test --bench scoring_e2e --no-run --message-format=json" bash jobs/build-cuda.sh \
    | grep '^{' > "$json"
  mkdir -p "$BIN"
  exe=$(python3 -c '
import json, sys
for line in open(sys.argv[1]):
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "scoring_e2e":
        print(m["executable"])' "$json" | tail -1)
  [ -n "$exe" ] || { echo "no scoring_e2e executable in cargo's output" >&2; exit 1; }
  cp "$exe" "$BIN/scoring-e2e" && strip "$BIN/scoring-e2e"
  candle_hash > "$BIN/SOURCES-candle"
  ls -la "$BIN"; du -sh "$BIN"
  echo "carry target-gpu/bin (64 MiB at most) and run: bash jobs/gpu-check.sh run"
  exit 0
fi

[ "$mode" = run ] || [ "$mode" = profile ] || { echo "usage: $0 build [--release] | build-candle | run [--quick] [--no-torch] [--e2e-only] [--then-profile] | profile [v3] [v5] [v6] [rerank]" >&2; exit 2; }
quick=""
torch=1
e2e_only=0
then_profile=0
versions=""
for a in "$@"; do
  case "$mode:$a" in
    run:--quick) quick=--quick ;;
    run:--e2e-only) e2e_only=1 ;;
    run:--no-torch) torch=0 ;;
    run:--then-profile) then_profile=1 ;;
    profile:v3|profile:v5|profile:v6|profile:rerank) versions="$versions $a" ;;
    *) echo "unknown option $a for $mode" >&2; exit 2 ;;
  esac
done
versions=${versions:-v5}
OUT=${OUT:-$(mktemp -d)}
# Everything this script prints also goes to $OUT/summary.txt (the device call returns only
# the last 12,000 characters of the output), and at exit $OUT is packed into at most 8 files
# (what a device call brings back): summary.txt, bench.log, torch.log, e2e.log, tests.log,
# clocks.csv, phases.txt, and every other log and profile page in logs.tar.gz (Nsight
# Compute's binary reports left out).
exec > >(tee "$OUT/summary.txt") 2>&1
pack_out() {
  local keep="summary.txt bench.log torch.log e2e.log tests.log clocks.csv phases.txt logs.tar.gz"
  local rest=()
  [ -n "${CLOCKS_PID:-}" ] && kill "$CLOCKS_PID" 2>/dev/null
  for f in "$OUT"/*; do
    [ -e "$f" ] || continue
    case " $keep " in *" $(basename "$f") "*) continue ;; esac
    rest+=("$(basename "$f")")
  done
  [ ${#rest[@]} -eq 0 ] && return
  tar czf "$OUT/logs.tar.gz" -C "$OUT" --exclude='*.ncu-rep' "${rest[@]}" \
    && (cd "$OUT" && rm -rf -- "${rest[@]}")
}
trap pack_out EXIT
# The card's clocks, power and throttle reasons every 250 ms while the check runs, and the
# start of each step (phases.txt), so that a slow row can be told from a slowed card.
phase() { echo "$(date +%s.%N) $*" >> "$OUT/phases.txt"; }
for f in kernels-test kernels-bench; do
  [ -x "$BIN/$f" ] || { echo "missing $BIN/$f: run 'jobs/gpu-check.sh build' here and carry target-gpu/bin" >&2; exit 2; }
done
if [ "$(cat "$BIN/SOURCES" 2>/dev/null)" != "$(src_hash)" ]; then
  echo "FAILED: $BIN was built from other sources than these (kernels/, crates/kernels/, tests/kernels.rs, benches/kernels.rs): run 'jobs/gpu-check.sh build' again and carry it" >&2
  exit 2
fi

# libnvrtc: cudarc dlopens libnvrtc.so.13 by name; add the toolkit's and PyTorch's wheel dirs.
extra=""
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
         $(python3 -c 'import nvidia, os; r = nvidia.__path__[0]; print(" ".join(os.path.join(r, x, "lib") for x in os.listdir(r)))' 2>/dev/null); do
  [ -d "$d" ] && ls "$d"/libnvrtc.so* >/dev/null 2>&1 && extra="$extra:$d"
done
export LD_LIBRARY_PATH="${extra#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LLM4DSR_KERNELS=cuda RUST_LOG=${RUST_LOG:-info}
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"

status=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nvidia-smi; } \
  > "$OUT/nvidia-smi.txt" 2>&1
head -3 "$OUT/nvidia-smi.txt"
CLOCKS_PID=""
for reasons in clocks_event_reasons.active clocks_throttle_reasons.active; do
  if nvidia-smi --query-gpu=$reasons --format=csv,noheader >/dev/null 2>&1; then
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,$reasons \
      --format=csv,noheader,nounits -lms 250 > "$OUT/clocks.csv" 2>/dev/null &
    CLOCKS_PID=$!
    break
  fi
done
# clocks_summary: per step (phases.txt), the SM clock's min / median / max, the largest power
# draw, and the share of samples with a power or thermal cap among the throttle reasons.
clocks_summary() {
  [ -s "$OUT/clocks.csv" ] && [ -s "$OUT/phases.txt" ] || { echo "(no clock samples)"; return; }
  python3 - "$OUT/clocks.csv" "$OUT/phases.txt" <<'PY'
import sys, datetime, statistics
rows = []
for line in open(sys.argv[1]):
    f = [x.strip() for x in line.split(",")]
    try:
        t = datetime.datetime.strptime(f[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
        reasons = int(f[5], 16) if len(f) > 5 and f[5].startswith("0x") else 0
        rows.append((t, float(f[1]), float(f[3]), float(f[4]), reasons))
    except (ValueError, IndexError):
        continue
phases = []
for line in open(sys.argv[2]):
    t, _, name = line.strip().partition(" ")
    phases.append((float(t), name))
phases.append((float("inf"), "end"))
# 0x4 SW power cap, 0x20 SW thermal, 0x40 HW slowdown, 0x80 HW thermal, 0x400 HW power brake
CAP = 0x4 | 0x20 | 0x40 | 0x80 | 0x400
print("| step | samples | SM MHz min | median | max | max W | max C | capped |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
for (t0, name), (t1, _) in zip(phases, phases[1:]):
    r = [x for x in rows if t0 <= x[0] < t1]
    if not r:
        continue
    mhz = [x[1] for x in r]
    capped = sum(1 for x in r if x[4] & CAP)
    print(f"| {name} | {len(r)} | {min(mhz):.0f} | {statistics.median(mhz):.0f} | {max(mhz):.0f} | "
          f"{max(x[2] for x in r):.0f} | {max(x[3] for x in r):.0f} | {100 * capped / len(r):.0f}% |")
PY
}

# profile: Nsight Compute on the first launch of each kernel named (default v5; v5 / v6
# only where `run` passed their smoke tests: a hanging kernel would hang here too), at two
# scoring shapes (SmolLM2 b64, Llama-3-8B b32) and one grounding shape (1M x 4096): throughput,
# warp states with every stall reason per issued instruction, scheduler, occupancy, memory,
# and the per-instruction SASS page (where the warps stall: main loop or epilogue, which
# barrier, instruction fetch). One process per kernel (the benchmark's --only PART
# --shape N); reports and pages in $OUT.
profile() {  # profile VERSION...: the kernels of each version, unless its setting says off
  local NCU v part shape kern off t0 rc
  NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
  [ -n "$NCU" ] || { echo "FAILED: no ncu on this machine"; status=1; return; }
  "$NCU" --version | tail -1
  for v in "$@"; do
    # scoring at SmolLM2 b64 (shape 0: the epilogue's 18%) and Llama-3-8B b32 (shape 3: the
    # main loop), grounding at 1M x 4096 (shape 0); "rerank": the grounding's first-level
    # re-rank at 1M x 4096 (docs/kernels.md 3h; no setting turns it off).
    local specs=("scoring 0 item_loglik_fused_${v}_bf16 LLM4DSR_FUSED_${v^^}"
                 "scoring 3 item_loglik_fused_${v}_bf16 LLM4DSR_FUSED_${v^^}"
                 "grounding 0 nearest_tc_candidates_${v} LLM4DSR_NEAREST_TC_${v^^}")
    [ "$v" = rerank ] && specs=("grounding 0 nearest_tc_rerank -")
    for spec in "${specs[@]}"; do
      read -r part shape kern off <<< "$spec"
      local tag="$kern-s$shape"
      if [ "$off" != - ] && [ "${!off:-}" = off ]; then
        echo "SKIP: ncu $kern ($off=off: its smoke test failed)"; continue
      fi
      # Leave the device call's 600 s some margin (a profile takes ~20-40 s).
      if [ $SECONDS -gt "${PROFILE_DEADLINE_S:-500}" ]; then
        echo "SKIP: ncu $kern (${SECONDS} s into the call)"; continue
      fi
      echo "== ncu: $kern (first launch, the benchmark's $part shape $shape)"
      phase "ncu $tag"
      t0=$(date +%s)
      timeout 90 "$NCU" --clock-control none -k "regex:^$kern\$" -c 1 -o "$OUT/ncu-$tag" -f \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
        --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
        --section ComputeWorkloadAnalysis --section SourceCounters \
        --metrics 'regex:^smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio$' \
        "$BIN/kernels-bench" --gpu --only "$part" --shape "$shape" > "$OUT/ncu-$tag.out" 2> "$OUT/ncu-$tag.err"
      rc=$?
      echo "ncu $tag: exit $rc in $(( $(date +%s) - t0 )) s"
      [ $rc -ne 0 ] && { status=1; tail -5 "$OUT/ncu-$tag.err"; continue; }
      "$NCU" --import "$OUT/ncu-$tag.ncu-rep" --page details > "$OUT/ncu-$tag.txt" 2>&1
      "$NCU" --import "$OUT/ncu-$tag.ncu-rep" --page source --csv --print-source sass \
        > "$OUT/ncu-$tag-sass.csv" 2> "$OUT/ncu-$tag-sass.err" || echo "(no SASS page: see ncu-$tag-sass.err)"
      grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|Registers Per Thread|Achieved Occupancy|Warp Cycles Per Issued|Issue Slots Busy|No Eligible|One or More Eligible" \
        "$OUT/ncu-$tag.txt" | head -20
      # Stall reasons, largest first (cycles per issued instruction).
      grep -E "smsp__average_warps_issue_stalled_" "$OUT/ncu-$tag.txt" \
        | awk '{print $NF, $1}' | sort -rn | head -10
    done
  done
}
if [ "$mode" = profile ]; then
  profile $versions
  clocks_summary
  echo "profile: $([ $status -eq 0 ] && echo PASSED || echo FAILED) (reports in $OUT)"
  exit $status
fi

if [ $e2e_only = 1 ]; then
  echo "SKIP: the kernel tests and benchmarks (--e2e-only)"
else
# The sm_90a kernels first, each test in its own process with its own timeout: a fault poisons
# the CUDA context and a hang would eat the lease, so a failure (or a timeout, exit 124) turns
# that kernel off for the rest of the check (the environment setting named) and fails it.
#   smoke TITLE TEST SECONDS LOG OFF_SETTING GREP_PATTERN [wg5: rerun a hang with bounded waits]
smoke() {
  echo "== $1 (separate process)"
  phase "smoke $2"
  timeout "$3" "$BIN/kernels-test" --test-threads=1 --nocapture "$2" > "$OUT/$4" 2>&1
  local rc=$?
  grep -E "$6" "$OUT/$4" | head -40
  if [ $rc -ne 0 ]; then
    echo "FAILED: $2 (exit $rc; 124 = timed out, a hang); the rest runs with $5"
    # A v5 / v6 kernel that hung: once more with bounded barrier waits that print where
    # they were stuck (which barrier, step, block, warpgroup).
    if [ $rc -eq 124 ] && [ "${7:-}" = wg5 ]; then
      echo "== $2 again with LLM4DSR_WG5_HANG_CHECK=1 (where v5 waits)"
      LLM4DSR_WG5_HANG_CHECK=1 timeout "$3" "$BIN/kernels-test" --test-threads=1 --nocapture "$2" \
        > "$OUT/${4%.log}-hang.log" 2>&1
      grep -E "wg5 hang" "$OUT/${4%.log}-hang.log" | sort | uniq -c | sort -rn | head -20
    fi
    export "${5?}"
    status=1
  fi
}
smoke "v3 layout smoke test" gpu_v3_logits_layout 60 v3-smoke.log LLM4DSR_FUSED_V3=off \
  '^test |test result|v3 layout|V3 layout|\(row |wrong rows|panicked|SKIP'
# v4 (opt-in: the staggered warpgroups, mbarriers; the newest and least proven kernel).
smoke "v4 (opt-in) test" gpu_v4_matches_v3 60 v4-smoke.log LLM4DSR_FUSED_V4=off \
  '^test |test result|layout|panicked|SKIP|differs'
# v5 (opt-in: warp-specialised, TMA tensor maps, setmaxnreg; written without a GPU).
smoke "v5 (opt-in) test" gpu_v5_matches_v3 60 v5-smoke.log LLM4DSR_FUSED_V5=off \
  '^test |test result|layout|panicked|SKIP|differs' wg5
# v6 (opt-in: v5 on clusters of two blocks, the head tile multicast; written without a GPU):
# only where v5 passed (it is v5's protocol with a peer block), else off without a try.
if [ "${LLM4DSR_FUSED_V5:-}" = off ]; then
  echo "SKIP: v6 (v5 failed; v6 is v5 on clusters)"; export LLM4DSR_FUSED_V6=off
else
  smoke "v6 (opt-in) test" gpu_v6_matches_v3 60 v6-smoke.log LLM4DSR_FUSED_V6=off \
    '^test |test result|layout|panicked|SKIP|differs' wg5
fi
# The re-rank's rows staged through shared memory (the default since docs/kernels.md section
# 3h, written without a GPU): the grounding test with the long-proven v2 candidates only, so
# that a failure points at the re-rank; it turns the plain loop on for the rest
# (LLM4DSR_NEAREST_TC_RERANK=plain) and fails the check.
LLM4DSR_NEAREST_TC_CANDIDATES=v2 smoke \
  "tensor-core grounding, re-rank rows staged through shared memory (v2 candidates)" \
  gpu_nearest_tc_equals_f32_kernel 90 tc-rerank-smoke.log LLM4DSR_NEAREST_TC_RERANK=plain \
  '^test |test result|panicked|SKIP|GPU nearest tc V2'
smoke "tensor-core grounding with the v3 (wgmma) candidate kernel" \
  gpu_nearest_tc_equals_f32_kernel 90 tc3-smoke.log LLM4DSR_NEAREST_TC_CANDIDATES=v2 \
  '^test |test result|panicked|SKIP|GPU nearest tc V3'
smoke "tensor-core grounding with the v4 (staggered, opt-in) candidate kernel" \
  gpu_nearest_tc_v4_equals_f32_kernel 60 tc4-smoke.log LLM4DSR_NEAREST_TC_V4=off \
  '^test |test result|panicked|SKIP'

smoke "tensor-core grounding with the v5 (warp-specialised, opt-in) candidate kernel" \
  gpu_nearest_tc_v5_equals_f32_kernel 60 tc5-smoke.log LLM4DSR_NEAREST_TC_V5=off \
  '^test |test result|panicked|SKIP' wg5
# The compact form of the v3 candidates' selection (same lists from half the epilogue's code;
# opt-in, written without a GPU): the same test, compiled with -DNT3_SELECT_COMPACT. A failure
# fails the check; the default (unrolled) is what the rest runs either way.
LLM4DSR_NEAREST_TC_SELECT=compact smoke \
  "tensor-core grounding, v3 candidates with the compact selection (opt-in)" \
  gpu_nearest_tc_equals_f32_kernel 90 tc3-compact-smoke.log LLM4DSR_NEAREST_TC_SELECT=unrolled \
  '^test |test result|panicked|SKIP|GPU nearest tc V3'
# The row records staged in shared memory (opt-in LLM4DSR_NEAREST_TC_RECORDS=smem: cp.async
# and named barriers per consumer warpgroup on a 3-stage ring; written without a GPU): v5's
# test compiled that way, before the bench times it; a failure or a hang keeps the bench from
# building it (LLM4DSR_NEAREST_TC_RECORDS_SMEM=off) and fails the check.
if [ "${LLM4DSR_NEAREST_TC_V5:-}" = off ]; then
  echo "SKIP: v5 with the records in shared memory (v5 failed)"; export LLM4DSR_NEAREST_TC_RECORDS_SMEM=off
else
  LLM4DSR_NEAREST_TC_RECORDS=smem smoke \
    "tensor-core grounding, v5 candidates with the row records in shared memory (opt-in)" \
    gpu_nearest_tc_v5_equals_f32_kernel 60 tc5-smem-smoke.log LLM4DSR_NEAREST_TC_RECORDS_SMEM=off \
    '^test |test result|panicked|SKIP' wg5
fi
if [ "${LLM4DSR_NEAREST_TC_V5:-}" = off ]; then
  echo "SKIP: v6 candidates (v5 failed)"; export LLM4DSR_NEAREST_TC_V6=off
else
  smoke "tensor-core grounding with the v6 (2-block clusters, multicast, opt-in) candidate kernel" \
    gpu_nearest_tc_v6_equals_f32_kernel 60 tc6-smoke.log LLM4DSR_NEAREST_TC_V6=off \
    '^test |test result|panicked|SKIP' wg5
fi

echo "== GPU tests (tests/kernels.rs)"
phase "tests"
t0=$(date +%s)
timeout 150 "$BIN/kernels-test" --test-threads=1 --nocapture > "$OUT/tests.log" 2>&1
rc=$?
echo "tests: exit $rc in $(( $(date +%s) - t0 )) s"
grep -E "^test |test result|SKIP|panicked|error" "$OUT/tests.log" | head -40
if [ $rc -ne 0 ]; then status=1; fi
grep -E "GPU nearest tc .*TcStats" "$OUT/tests.log" | head -12
if grep -q "SKIP: GPU" "$OUT/tests.log"; then
  echo "FAILED: the GPU tests skipped on a GPU machine (see $OUT/tests.log)"; status=1
fi

echo "== the dispatching nearest_items with LLM4DSR_NEAREST_VERSION=tc (tests/kernels.rs)"
LLM4DSR_NEAREST_VERSION=tc timeout 60 "$BIN/kernels-test" --test-threads=1 --nocapture \
  gpu_nearest_matches_reference > "$OUT/tests-tc-env.log" 2>&1
rc=$?
grep -E "^test |test result" "$OUT/tests-tc-env.log" | head -3
[ $rc -ne 0 ] && status=1

echo "== GPU benchmarks (benches/kernels.rs --gpu $quick)"
phase "bench"
t0=$(date +%s)
timeout 240 "$BIN/kernels-bench" --gpu $quick > "$OUT/bench.log" 2> "$OUT/bench.err"
rc=$?
echo "bench: exit $rc in $(( $(date +%s) - t0 )) s"; tail -5 "$OUT/bench.err"
[ $rc -ne 0 ] && status=1

if [ $torch = 1 ]; then
  echo "== PyTorch baselines (jobs/torch_baselines.py $quick)"
  phase "torch"
  t0=$(date +%s)
  timeout 150 python3 jobs/torch_baselines.py $quick > "$OUT/torch.log" 2> "$OUT/torch.err"
  echo "torch: exit $? in $(( $(date +%s) - t0 )) s"; tail -3 "$OUT/torch.err"
else
  echo "SKIP: PyTorch baselines (--no-torch)"
fi

fi

HF=${HF_BASELINE:-}
for c in "$BIN/hf_scoring_baseline.py" shared/bench/hf_scoring_baseline.py ../shared/bench/hf_scoring_baseline.py; do
  [ -z "$HF" ] && [ -f "$c" ] && HF=$c
done
if [ -n "$HF" ] && [ -f "$HF" ] && [ -z "$quick" ] && [ $torch = 1 ] && [ $e2e_only = 0 ]; then
  echo "== $HF (smollm2-135m, 128 windows, batch 64)"
  timeout 120 python3 "$HF" --config smollm2-135m --windows 128 --batch 64 > "$OUT/hf.log" 2> "$OUT/hf.err"
  echo "hf: exit $?"; cat "$OUT/hf.log"
else
  echo "SKIP: hf_scoring_baseline.py (not found: set HF_BASELINE=path; or --quick / --no-torch)"
fi

# End to end: the LLM forward on candle's CUDA backend + the fused kernel, against PyTorch +
# transformers at the same shapes (optional: only when build-candle made the binary).
if [ -x "$BIN/scoring-e2e" ] && [ -z "$quick" ]; then
  if [ "$(cat "$BIN/SOURCES-candle" 2>/dev/null)" != "$(candle_hash)" ]; then
    echo "FAILED: $BIN/scoring-e2e was built from other sources: run 'jobs/gpu-check.sh build-candle' again"
    status=1
  else
    echo "== end-to-end scoring: ours (candle CUDA, bf16) vs PyTorch + transformers"
    phase "e2e"
    : > "$OUT/e2e.log"
    for spec in "smollm2-135m 512 64" "llama3-8b 128 16"; do
      set -- $spec
      # The forward with candle's ops, then with our decoder kernels (gathers, SwiGLU; the default).
      for ops in candle kernels; do
        LLM4DSR_DECODER_OPS=$ops LD_LIBRARY_PATH="/usr/local/cuda/lib64:$LD_LIBRARY_PATH" timeout 150 \
          "$BIN/scoring-e2e" --config "$1" --windows "$2" --batch "$3" --device cuda \
          >> "$OUT/e2e.log" 2>> "$OUT/e2e.err"
        rc=$?; echo "scoring-e2e $1 (decoder ops: $ops): exit $rc"; [ $rc -ne 0 ] && { status=1; tail -5 "$OUT/e2e.err"; }
      done
      if [ -n "$HF" ] && [ -f "$HF" ] && [ $torch = 1 ]; then
        timeout 150 python3 "$HF" --config "$1" --windows "$2" --batch "$3" >> "$OUT/e2e.log" 2>> "$OUT/e2e.err"
        echo "hf $1: exit $?"
      fi
    done
    python3 - "$OUT/e2e.log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print("| config | case | decoder ops | ours windows/s | PyTorch windows/s | ratio |")
print("|---|---|---|---:|---:|---:|")
for r in rows:
    if r.get("impl") != "llm4dsr":
        continue
    hf = [h for h in rows if h.get("impl") is None and h["config"] == r["config"] and h["case"] == r["case"]]
    w = hf[0]["windows_per_s"] if hf else None
    print(f"| {r['config']} | {r['case']} | {r.get('decoder_ops', '-')} | {r['windows_per_s']} | {w if w else '-'} | {round(r['windows_per_s'] / w, 2) if w else '-'} |")
PY
  fi
else
  echo "SKIP: end-to-end scoring (no $BIN/scoring-e2e: jobs/gpu-check.sh build-candle; or --quick)"
fi

phase "tables"
echo
echo "==================== tables ===================="
cat "$OUT/bench.log" "$OUT/torch.log" 2>/dev/null | grep -v '^{'
echo
echo "==================== clocks per step (nvidia-smi, every 250 ms) ===================="
clocks_summary
# --then-profile: the profile step in the same call, for v3 and for v5 / v6 where their smoke
# tests passed (a kernel turned off above is skipped), within the call's time
# (PROFILE_DEADLINE_S, default 500 s into the call); PROFILE_VERSIONS="v5" names fewer.
if [ $then_profile = 1 ] && [ $e2e_only = 0 ]; then
  echo; echo "==================== profile (Nsight Compute) ===================="
  profile ${PROFILE_VERSIONS:-v3 v5 v6}
  clocks_summary
fi
# The grounding target's verdict last, where the call's output tail always has it.
if grep -q '^## Grounding target' "$OUT/bench.log" 2>/dev/null; then
  echo; sed -n '/^## Grounding target/,/^$/p' "$OUT/bench.log"
fi
echo "gpu-check: $([ $status -eq 0 ] && echo PASSED || echo FAILED) (logs in $OUT)"
exit $status
