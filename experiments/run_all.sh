#!/usr/bin/env bash
# Every full run behind docs/quality.md, in order, on CPU (one thread each; nice because machines are shared).
# Wall times measured on a shared 2-core CPU box are in docs/quality.md.
set -euo pipefail
cd "$(dirname "$0")/.."
nice -n 10 python experiments/train_base.py --out preft/assets/base      # the base model + experiments/results/base/loss.png
nice -n 10 python -m experiments.make_adapters                          # preft/assets/adapters/{alice,bob,carol}
nice -n 10 python -m experiments.quality sft                            # experiments/results/sft.{json,md,png}
nice -n 10 python -m experiments.quality length                         # experiments/results/length.{json,md,png}
nice -n 10 python -m experiments.quality grpo                           # experiments/results/grpo.{json,md,png}
