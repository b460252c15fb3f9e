"""Rollout wall time of the two GRPO backends, side by side in one run.

python -m preft.train.rollout_bench [--model DIR] --prompts 8 --num_generations 8 --max_completion_length 32

Without ``--model`` a tiny llama (``preft.tiny``) is built in a temporary directory. Each backend
gets one warm-up rollout, then ``--repeats`` timed ones (the engine's include the adapter sync).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from preft.train.config import GRPOConfig
from preft.train.grpo import GRPOTrainer


def time_backend(model_dir: str, prompts: Path, backend: str, args: argparse.Namespace, out: Path) -> dict:
    cfg = GRPOConfig(
        output_dir=str(out / backend),
        rollout_backend=backend,
        num_generations=args.num_generations,
        per_device_train_batch_size=args.prompts * args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=1.0,
        reward_funcs=["regex:^[a-z]"],
        max_steps=1,
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(model_dir, cfg, prompts)
    with torch.no_grad():  # a non-zero adapter, as during training
        for p in trainer.params:
            p.normal_(0.0, 0.05)
    trainer.rollout(0)  # warm-up (builds the engine)
    times, tokens = [], 0
    for i in range(1, args.repeats + 1):
        start = time.perf_counter()
        ro = trainer.rollout(i)
        times.append(time.perf_counter() - start)
        tokens += int(ro.batch.completion_mask.sum())
    return {"backend": backend, "median_s": sorted(times)[len(times) // 2], "times_s": times, "tokens_per_rollout": tokens / args.repeats}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model directory (default: a tiny llama in a temporary directory)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--num_generations", type=int, default=8)
    parser.add_argument("--max_completion_length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            from preft.tiny import build_tiny_checkpoint

            model_dir = str(build_tiny_checkpoint(tmp / "tiny", "llama"))
        prompts = tmp / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": f"question {i}: what is {i} + {i}? answer:"}) + "\n" for i in range(args.prompts)))
        rows = [time_backend(model_dir, prompts, backend, args, tmp) for backend in ("hf", "engine")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.prompts} prompts x {args.num_generations} generations x {args.max_completion_length} tokens on {device}:")
    for row in rows:
        print(
            f"  {row['backend']:7s} median {row['median_s']:.3f} s per rollout ({row['tokens_per_rollout']:.0f} completion tokens)  {row['times_s']}"
        )
    print(f"  engine / hf: {rows[1]['median_s'] / rows[0]['median_s']:.2f}x the time")


if __name__ == "__main__":
    main()
