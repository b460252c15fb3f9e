#!/usr/bin/env bash
# preft on one GPU, in one folder, in under 9 minutes: the CUDA tests, the throughput benchmark (base vs multi-LoRA vs
# LoRA-P vs DiReFT-P at 1, 64 and 512 adapters) on Qwen2.5-0.5B and Llama-3.1-8B shapes, the engine's host overhead,
# and the base decode step against the memory roofline. Results: benchmarks/results/<gpu>-<date>/ (JSON + PNG each,
# summary.md, run.log).
#
# Needs torch with CUDA, transformers, triton; no network, no weights (named shapes get random weights: timings do not
# depend on weight values), no FastAPI. Every step runs under `timeout`; a failing or slow step is logged and the next
# one runs. The exit status is the number of failed steps.
#
#   bash benchmarks/gpu/run.sh               # on the GPU machine
#   DRY_RUN=1 bash benchmarks/gpu/run.sh     # on a CPU: every step at a tiny size (checks the script itself)
#   MULTI_USER=1 bash benchmarks/gpu/run.sh  # also the multi-user SFT comparison (several more minutes)
# With 4 or more GPUs it also benchmarks the Llama-3.1-70B shape with --tensor-parallel-size 4 (up to 15 more minutes).
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
DATE=$(date +%F)
DRY_RUN=${DRY_RUN:-0}

if [ "$DRY_RUN" = 1 ]; then
  TAG="cpu-dryrun"
  DEVICE=cpu
else
  TAG=$($PY -c "import torch; from preft.bench.report import device_tag; print(device_tag(torch.device('cuda')))" 2>/dev/null || echo gpu)
  DEVICE=cuda
fi
OUT=${OUT:-benchmarks/results/$TAG-$DATE}
mkdir -p "$OUT"
LOG="$OUT/run.log"
FAILED=0
: >"$OUT/steps.tsv"

# step NAME SECONDS CMD...: run CMD under a time limit, its output to the log and its own file; never stop the script.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $(date +%T) $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.out" 2>&1
  local rc=$?
  cat "$OUT/$name.out" >>"$LOG"
  local took=$((SECONDS - start))
  if [ $rc -eq 0 ]; then
    echo "   ok in ${took}s" | tee -a "$LOG"
  else
    FAILED=$((FAILED + 1))
    [ $rc -eq 124 ] && why="timed out" || why="exit $rc"
    echo "   FAILED ($why) after ${took}s; last lines:" | tee -a "$LOG"
    tail -n 5 "$OUT/$name.out" | sed 's/^/   | /' | tee -a "$LOG"
  fi
  printf '%s\t%s\t%s\n' "$name" "$rc" "$took" >>"$OUT/steps.tsv"
}

if [ "$DRY_RUN" = 1 ]; then
  MODELS=(tiny)
  ADAPTERS=1,2
  BENCH_ARGS=(--num-requests 4 --prompt-len 8 --output-len 8 --max-num-seqs 4 --warmup-requests 1)
  HOST_ARGS=(--batches 1,4 --mixed-decodes 3 --mixed-prefill 32 --steps 3 --warmup 1 --device-ms 3 --overlap-batch 4)
  SYNC_ARGS=(--num-requests 4 --prompt-len 8 --output-len 8 --max-num-seqs 4 --warmup-requests 1)
  ROOF_MODEL=""
  ROOF_ARGS=(--adapters 1 --batch 4 --steps 3 --dtype float32)
  LIMITS=(120 300 300 120 120 120)
else
  MODELS=(qwen2.5-0.5b llama-3.1-8b)
  ADAPTERS=1,64,512
  BENCH_ARGS=(--num-requests 512 --prompt-len 128 --output-len 64 --max-num-seqs 256 --warmup-requests 16 --dtype bfloat16)
  HOST_ARGS=(--steps 30 --warmup 5 --device-ms 3)
  SYNC_ARGS=(--num-requests 256 --prompt-len 128 --output-len 64 --max-num-seqs 256 --warmup-requests 16 --dtype bfloat16)
  ROOF_MODEL=qwen2.5-0.5b
  ROOF_ARGS=(--adapters 1 64 --batch 256 --steps 10 --dtype bfloat16)
  LIMITS=(110 100 170 50 60 40)  # 530 s in all, plus start-up
fi

# 1. CUDA tests (kernels against their PyTorch references, CUDA graphs); the server tests need FastAPI: not collected.
if $PY -c "import pytest" 2>/dev/null; then
  step cuda-tests "${LIMITS[0]}" $PY -m pytest -q -m cuda -p no:cacheprovider tests/engine tests/adapters tests/hf
else
  echo "== cuda-tests: pytest is not installed; skipped" | tee -a "$LOG"
  FAILED=$((FAILED + 1))
fi

# 2. Throughput, base vs multi-LoRA vs LoRA-P vs DiReFT-P, per model shape (random weights, built once and cached).
i=1
for model in "${MODELS[@]}"; do
  step "bench-$model" "${LIMITS[$i]}" $PY -m preft.cli bench --model "$model" --modes base,lora,lora-p,direft-p \
    --num-adapters "$ADAPTERS" --device "$DEVICE" --peer off --output-dir "$OUT" "${BENCH_ARGS[@]}"
  i=$((i + 1))
done

# 2a. Asynchronous scheduling's share: the first model's base and LoRA-P at 64 adapters again, synchronous steps.
step "bench-${MODELS[0]}-sync" "${LIMITS[5]}" $PY -m preft.cli bench --model "${MODELS[0]}" --modes base,lora-p \
  --num-adapters 64 --device "$DEVICE" --peer off --no-async-scheduling --output-dir "$OUT/sync" "${SYNC_ARGS[@]}"

# 2b. The paper's headline setting: the Llama-3.1-70B shape, tensor parallel over 4 GPUs (each rank draws its own shard's
# random weights: no 140 GB checkpoint). Only where 4 GPUs are found; DRY_RUN checks the path with 2 CPU ranks on tiny.
NUM_GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$DRY_RUN" = 1 ]; then
  step bench-tiny-tp2 120 $PY -m preft.cli bench --model tiny --tensor-parallel-size 2 --modes base,lora,lora-p,direft-p \
    --num-adapters "$ADAPTERS" --device cpu --peer off --output-dir "$OUT/tp2" "${BENCH_ARGS[@]}"
elif [ "$NUM_GPUS" -ge 4 ]; then
  step bench-llama-3.1-70b-tp4 900 $PY -m preft.cli bench --model llama-3.1-70b --tensor-parallel-size 4 \
    --modes base,lora,lora-p,direft-p --num-adapters 512 --device cuda --peer off --output-dir "$OUT" "${BENCH_ARGS[@]}"
else
  echo "== bench-llama-3.1-70b-tp4: needs 4 GPUs, found $NUM_GPUS; skipped" | tee -a "$LOG"
fi

# 3. The engine's own work per step (model forward stubbed): decode 1/64/256 and a mixed step.
step host-overhead "${LIMITS[3]}" $PY -m preft.cli bench host-overhead --json "$OUT/host_overhead.json" --device "$DEVICE" "${HOST_ARGS[@]}"

# 4. The base decode step against the memory roofline (and the adapter modes beside it).
ROOF_DIR=()
if [ -n "$ROOF_MODEL" ]; then
  dir=$($PY -c "import torch; from preft.bench.shapes import resolve_model; print(resolve_model('$ROOF_MODEL', dtype=torch.bfloat16))" 2>>"$LOG")
  [ -n "$dir" ] && ROOF_DIR=(--model "$dir")
fi
step roofline "${LIMITS[4]}" $PY -m preft.engine.profile_decode "${ROOF_DIR[@]}" --device "$DEVICE" --roofline \
  --json "$OUT/decode_roofline.json" --plot "$OUT/decode_roofline.png" "${ROOF_ARGS[@]}"

# 5. Optional: many users' adapters trained in one job vs one job per user (docs/training.md).
if [ "${MULTI_USER:-0}" = 1 ]; then
  step multi-user-sft 1200 $PY benchmarks/multi_user_sft.py --model "${MODEL:-qwen2.5-0.5b}" --device "$DEVICE" \
    --users "${USERS:-64}" --examples "${EXAMPLES:-32}" --users-per-step "${USERS_PER_STEP:-16}" --out "$OUT/multi-user-sft"
fi

# A short table of everything, from the JSON files.
$PY - "$OUT" <<'EOF' >"$OUT/summary.md" 2>>"$LOG"
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print(f"# preft on {out.name}\n")
print("| step | status | seconds |\n|---|---|---|")
for line in (out / "steps.tsv").read_text().splitlines():
    name, rc, took = line.split("\t")
    print(f"| {name} | {'ok' if rc == '0' else 'timed out' if rc == '124' else 'exit ' + rc} | {took} |")
for path in sorted(out.glob("*.json")):
    data = json.loads(path.read_text())
    if "runs" in data:  # preft bench
        print(f"\n## {path.stem}\n\n| adapters | mode | output tok/s | x base | x lora |\n|---|---|---|---|---|")
        for r in data["runs"]:
            fmt = lambda v: "-" if v is None else f"{v:.2f}"
            print(f"| {r['num_adapters']} | {r['mode']} | {r['output_tok_s']:.0f} | {fmt(r.get('ratio_to_base'))} | {fmt(r.get('ratio_to_lora'))} |")
    elif "results" in data:  # host overhead
        print("\n## host overhead (ms per step, model stubbed)\n\n| step | batch | median | p90 |\n|---|---|---|---|")
        for r in data["results"]:
            print(f"| {r['step']} | {r['batch']} | {r['host_ms_median']:.3f} | {r['host_ms_p90']:.3f} |")
    elif "roofline" in data and data["roofline"]:
        r = data["roofline"]
        peak = f"{r['fraction_of_peak']:.0%} of {r['peak_gbps']:.0f} GB/s" if r["peak_gbps"] else "peak unknown"
        print(f"\n## base decode roofline\n\nbatch {r['batch']}: {r['step_ms']:.2f} ms/step, {r['achieved_gbps']:.0f} GB/s ({peak})")
EOF
cat "$OUT/summary.md" | tee -a "$LOG"
echo "== done: $FAILED step(s) failed; results in $OUT" | tee -a "$LOG"
exit "$FAILED"
