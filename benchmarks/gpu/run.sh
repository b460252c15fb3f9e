#!/usr/bin/env bash
# GPU versions of preft's side-by-side comparisons, one command each.
# UNTESTED: no GPU was available when this file was written. Needs torch with CUDA; no internet, no weights:
# models are named shapes built with random weights (preft.bench.shapes), timings do not depend on weight values.
set -euo pipefail
cd "$(dirname "$0")/../.."
DATE=$(date +%F)

# Many users' adapters (docs/training.md): one joint `preft train sft` job vs one run per user, same rows and
# hyperparameters; wall time, CPU time, peak RSS, training tokens/s, per-user held-out loss (paired 95% CIs;
# with random weights the losses only check that joint == separate). The base loads in bf16 on CUDA.
# Cost: ${USERS} separate processes (CUDA start + model load each), so USERS=64 takes several minutes;
# USERS=16 is a quick check.
USERS=${USERS:-64}
EXAMPLES=${EXAMPLES:-32}
USERS_PER_STEP=${USERS_PER_STEP:-16}
MODEL=${MODEL:-qwen2.5-0.5b}
python benchmarks/multi_user_sft.py --model "$MODEL" --device cuda --users "$USERS" --examples "$EXAMPLES" \
  --users-per-step "$USERS_PER_STEP" --out "benchmarks/results/multi-user-sft-gpu-$DATE"
