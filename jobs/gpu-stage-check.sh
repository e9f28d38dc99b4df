#!/usr/bin/env bash
# The pipeline's LLM stages on a GPU with the REAL model (SmolLM2-135M-Instruct, the asset's
# GGUF) and real data (ML-100K), checked against the CPU. The device machines have no network
# and take at most 64 MiB of carried files a call, below model + binary, so this packs them
# into two carries that two back-to-back device calls land in /tmp/llm4dsr-stage there (a warm
# machine keeps it between calls; it goes back ~30 s after a call, so make the second call at
# once).
#
#   jobs/gpu-stage-check.sh pack       # here (needs the assets: `llm4dsr assets fetch`):
#       the CLI built with candle's CUDA backend (jobs/build-cuda.sh; stripped, xz: ~11 MB), the
#       GGUF split in two, the ML-100K dataset prepared here, and the CPU's f32 scores of the
#       first test windows (`inspect-scores`), into target-gpu/stage-a and target-gpu/stage-b.
#   device call 1:  command "bash jobs/gpu-stage-check.sh receive"  carry ["target-gpu/stage-a"]
#   device call 2:  command "bash jobs/gpu-stage-check.sh run"      carry ["target-gpu/stage-b"]
#       reassembles (sha256 checked), then on the GPU: inspect-scores in f32
#       (LLM4DSR_LLM_DTYPE=f32) and bf16 against the CPU's table (jobs/stage_compare.py: f32
#       within 0.005 of the CPU, bf16 reported), and the `score` stage over the whole test
#       split (first-token and full-title, bf16, 64 windows a batch) with its wall time.
#       Outputs under $OUT (the tables, the logs, the stage's manifest).
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
A=target-gpu/stage-a
B=target-gpu/stage-b
WINDOWS=${WINDOWS:-24}
STAGE=/tmp/llm4dsr-stage

if [ "$mode" = pack ]; then
  set -e
  rm -rf "$A" "$B"
  mkdir -p "$A" "$B"
  CARGO_TARGET_DIR=target-cuda CARGO_CMD="build --bin llm4dsr" bash jobs/build-cuda.sh
  strip -o target-gpu/llm4dsr-cuda target-cuda/debug/llm4dsr
  xz -T2 -6 -c target-gpu/llm4dsr-cuda > "$A/llm4dsr.xz"
  cache=${LLM4DSR_CACHE:-$HOME/.cache/llm4dsr}
  gguf=$cache/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  [ -f "$gguf" ] || { echo "no $gguf: run 'cargo run --release -- assets fetch' first" >&2; exit 2; }
  # 50 MB in the first carry (with the ~11 MB binary: 61 MB of the 64 MiB), the rest (48 MB +
  # the dataset) in the second.
  split -b 50000000 -d "$gguf" "$B/model.part-"
  mv "$B/model.part-00" "$A/"
  (cd "$(dirname "$gguf")" && sha256sum "$(basename "$gguf")") | awk '{print $1 "  model.gguf"}' > "$B/model.sha256"
  cargo build --release -q --bin llm4dsr
  target/release/llm4dsr prepare --config configs/ml-100k.toml --out "$B/ml-100k" --overwrite
  target/release/llm4dsr inspect-scores --dataset "$B/ml-100k" --model "$gguf" \
    --windows "$WINDOWS" --device cpu > "$B/cpu-f32.txt"
  cp jobs/stage_compare.py "$B/"
  git rev-parse --short HEAD > "$B/COMMIT"
  du -sh "$A" "$B"
  echo "device call 1: bash jobs/gpu-stage-check.sh receive (carry $A), then at once"
  echo "device call 2: bash jobs/gpu-stage-check.sh run (carry $B)"
  exit 0
fi

if [ "$mode" = receive ]; then
  mkdir -p "$STAGE" && cp -r "$A"/. "$STAGE"/ && ls -la "$STAGE" && echo "received: $(du -sh "$STAGE")"
  exit 0
fi

[ "$mode" = run ] || { echo "usage: $0 pack | receive | run" >&2; exit 2; }
OUT=${OUT:-$(mktemp -d)}
status=0
cp -r "$B"/. "$STAGE"/ || exit 2
cd "$STAGE" || exit 2
[ -f model.part-00 ] || { echo "FAILED: $STAGE/model.part-00 missing: run 'receive' first (same warm machine)"; exit 2; }
cat model.part-* > model.gguf && sha256sum -c model.sha256 || { echo "FAILED: model reassembly"; exit 2; }
python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open("llm4dsr.xz"), open("llm4dsr", "wb"))'
chmod +x llm4dsr
export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
echo "commit $(cat COMMIT)"

for dt in f32 bf16; do
  t0=$(date +%s.%N)
  LLM4DSR_LLM_DTYPE=$dt timeout 180 ./llm4dsr inspect-scores --dataset ml-100k --model model.gguf \
    --windows "$WINDOWS" --device cuda > "$OUT/gpu-$dt.txt" 2> "$OUT/gpu-$dt.err"
  rc=$?
  echo "inspect-scores on the GPU ($dt): exit $rc, $(python3 -c "import time; print(round(time.time() - $t0, 1))") s"
  [ $rc -ne 0 ] && { tail -5 "$OUT/gpu-$dt.err"; status=1; continue; }
  if [ $dt = f32 ]; then
    python3 stage_compare.py cpu-f32.txt "$OUT/gpu-$dt.txt" --tol 0.005 --label "GPU f32 vs CPU f32" || status=1
  else
    python3 stage_compare.py cpu-f32.txt "$OUT/gpu-$dt.txt" --tol 1e9 --label "GPU bf16 vs CPU f32 (reported)"
  fi
done
cp cpu-f32.txt "$OUT/"

# The score stage over a whole split on the GPU (sharded, part files, manifest), timed.
for method in llm-first-token llm-full-title; do
  t0=$(date +%s.%N)
  timeout 300 ./llm4dsr score --dataset ml-100k --out "scores-$method" --method "$method" \
    --splits test --model model.gguf --device cuda --overwrite > "$OUT/score-$method.log" 2>&1
  rc=$?
  secs=$(python3 -c "import time; print(round(time.time() - $t0, 1))")
  windows=$(python3 -c "import json; m = json.load(open('scores-$method/manifest.json')); print(json.dumps(m.get('counts', m))[:300])" 2>/dev/null)
  echo "score --method $method --splits test on the GPU: exit $rc in $secs s; $windows"
  [ $rc -ne 0 ] && { tail -5 "$OUT/score-$method.log"; status=1; }
  cp "scores-$method/manifest.json" "$OUT/manifest-$method.json" 2>/dev/null
done
[ $status = 0 ] && echo "stage check: OK" || echo "stage check: FAILED"
exit $status
