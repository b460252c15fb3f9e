"""``preft train sft|grpo``: the trainer configs' fields are the flags (TRL style).

preft train sft  [--model DIR|FILE.gguf] --dataset train.jsonl --adapter lora --policy prefill --r 16 --max_steps 500
preft train sft  --dataset users.jsonl|users/ --output_dir runs/users   # rows name their user: one adapter per user, one job
preft train grpo [--model DIR|FILE.gguf] --dataset prompts.jsonl --reward_funcs math --num_generations 8 --beta 0.04
"""

from __future__ import annotations

import argparse

from preft.errors import PreftError
from preft.train.config import GRPOConfig, SFTConfig, add_config_arguments, config_from_args

TRAINERS = {"sft": SFTConfig, "grpo": GRPOConfig}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="trainer", required=True)
    helps = {
        "sft": "supervised fine-tuning on prompt/completion or messages JSONL",
        "grpo": "GRPO on prompts JSONL with verifiable rewards",
    }
    for name, cls in TRAINERS.items():
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        p.add_argument(
            "--model",
            default="default",
            help="the frozen base: a Hugging Face model folder, a .gguf file (converted once, cached), or 'default' "
            "(the built-in SmolLM2-135M-Instruct)",
        )
        p.add_argument(
            "--dataset",
            required=True,
            help="training JSONL file"
            + (
                "; rows with a user (or adapter) column, or a folder of <user>.jsonl files, train one adapter per user"
                if name == "sft"
                else ""
            ),
        )
        add_config_arguments(p, cls)


def run(args: argparse.Namespace) -> int:
    from preft.train.data import user_column_of
    from preft.train.grpo import GRPOTrainer
    from preft.train.multi_user import MultiUserSFTTrainer
    from preft.train.sft import SFTTrainer

    try:
        config = config_from_args(TRAINERS[args.trainer], args)
        if args.trainer == "sft" and user_column_of(args.dataset, config.user_column) is not None:
            users = MultiUserSFTTrainer(args.model, config, args.dataset).train()
            if not users.is_main:
                return 0
            early = sum(bool(s["stopped_early"]) for s in users.summaries.values())
            print(f"{len(users.adapters)} adapters saved to {users.output_dir}/<user>/ ({early} stopped early)")
            print(f"metrics: {users.output_dir / 'metrics.jsonl'}; per user: {users.output_dir / 'users.json'}")
            return 0
        trainer_cls = SFTTrainer if args.trainer == "sft" else GRPOTrainer
        result = trainer_cls(args.model, config, args.dataset).train()
    except PreftError as e:
        print(f"preft train {args.trainer}: error: {e}")
        return 2
    print(f"adapter saved to {result.adapter_path} after {result.steps} steps")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}" + (f"; plot: {result.plot_path}" if result.plot_path else ""))
    return 0
