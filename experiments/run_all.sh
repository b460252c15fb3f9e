#!/usr/bin/env bash
# Every full run behind docs/quality.md, in order, on CPU (one thread each; nice because machines are shared).
# Wall times measured on a shared 2-core CPU box are in docs/quality.md.
set -euo pipefail
cd "$(dirname "$0")/.."
nice -n 10 python experiments/train_base.py --out experiments/toy_base      # the base model + experiments/results/base/loss.png
nice -n 10 python -m experiments.make_adapters                          # preft/assets/adapters/{alice,bob,carol}
nice -n 10 python -m experiments.quality sft --steps 60                  # experiments/results/sft.{json,md,png}
nice -n 10 python -m experiments.quality length --steps 60 --eval-rows 96                                 # results/length.*
nice -n 10 python -m experiments.quality length --steps 150 --lr 3e-3 --ranks 16 --eval-rows 96 --out experiments/results/length_150steps
nice -n 10 python -m experiments.quality grpo --steps 80 --lr 1e-3 --grpo-skills recall --grpo-max-tokens 4
for e in json md png; do mv experiments/results/grpo.$e experiments/results/grpo_recall.$e; done
nice -n 10 python -m experiments.quality grpo --steps 80 --lr 1e-3 --grpo-skills sort_digits --grpo-max-tokens 10   # results/grpo.*
