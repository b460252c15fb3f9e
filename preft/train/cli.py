"""``preft train sft|grpo``: the trainer configs' fields are the flags (TRL style).

preft train sft  [--model DIR|FILE.gguf] --dataset train.jsonl --adapter lora --policy prefill --r 16 --max_steps 500
preft train sft  --dataset users.jsonl|users/ --output_dir runs/users   # rows name their user: one adapter per user, one job
preft train grpo [--model DIR|FILE.gguf] --dataset prompts.jsonl --reward_funcs math --num_generations 8 --beta 0.04

TRL's names work too (``trl sft`` / ``trl grpo`` command lines): ``--model_name_or_path``, ``--dataset_name``
(a data file or a local dataset folder; ``--dataset_config``, ``--dataset_train_split``, ``--dataset_test_split``),
``--use_peft``, ``--lora_r``, ``--lora_target_modules``, ``--max_seq_length``, ``--bf16 false``, ...
"""

from __future__ import annotations

import argparse

from preft.errors import PreftError
from preft.train.config import GRPOConfig, SFTConfig, add_config_arguments, config_from_args, parse_bool

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
            "--model_name_or_path",
            dest="model",
            default="default",
            help="the frozen base: a Hugging Face model folder, a .gguf file (converted once, cached), or 'default' "
            "(the built-in SmolLM2-135M-Instruct)",
        )
        data = p.add_mutually_exclusive_group(required=True)
        data.add_argument(
            "--dataset",
            help="training data: a JSONL, JSON, Parquet or CSV file"
            + (
                "; rows with a user (or adapter) column, or a folder of <user>.jsonl|.parquet|... files, train one adapter "
                "per user (with --user_column none a folder is one dataset)"
                if name == "sft"
                else ""
            ),
        )
        data.add_argument(
            "--dataset_name",
            help="TRL's: a data file or a dataset folder (data files split by name, or save_to_disk), read with datasets.load_dataset; "
            "--dataset_train_split trains" + (", --dataset_test_split evaluates (unless --eval_strategy no)" if name == "sft" else ""),
        )
        p.add_argument("--dataset_config", default=None, help="TRL's: the dataset configuration name (load_dataset's name=)")
        p.add_argument("--dataset_train_split", default="train", help="TRL's: the split to train on (default: train)")
        p.add_argument("--dataset_test_split", default="test", help="TRL's: the split to evaluate on, when it exists (default: test)")
        p.add_argument(
            "--use_peft",
            type=parse_bool,
            nargs="?",
            const=True,
            default=True,
            metavar="true|false",
            help="TRL's: train a PEFT adapter; preft always does (false is refused: no full fine-tuning)",
        )
        add_config_arguments(p, cls)


def datasets_of(args: argparse.Namespace, config: SFTConfig | GRPOConfig) -> tuple[object, object | None]:
    """The training data and, from ``--dataset_name``'s test split, the eval data (None: none, or the config's)."""
    if args.dataset is not None:
        return args.dataset, None
    from preft.train.data import open_dataset, pick_split

    loaded = open_dataset(args.dataset_name, args.dataset_config)
    train = pick_split(loaded, args.dataset_train_split, args.dataset_name)
    has_test = hasattr(loaded, "keys") and args.dataset_test_split in loaded
    wants_eval = isinstance(config, SFTConfig) and config.evaluates and config.eval_dataset is None
    return train, loaded[args.dataset_test_split] if has_test and wants_eval else None


def run(args: argparse.Namespace) -> int:
    from preft.train.data import user_column_of
    from preft.train.grpo import GRPOTrainer
    from preft.train.multi_user import MultiUserSFTTrainer
    from preft.train.sft import SFTTrainer

    try:
        if not args.use_peft:
            raise PreftError("--use_peft false: preft trains adapters only (LoRA, LoReFT, DiReFT), not the full model")
        config = config_from_args(TRAINERS[args.trainer], args)
        train_data, eval_data = datasets_of(args, config)
        if args.trainer == "sft" and user_column_of(train_data, config.user_column) is not None:
            users = MultiUserSFTTrainer(args.model, config, train_data, eval_data).train()
            if not users.is_main:
                return 0
            early = sum(bool(s["stopped_early"]) for s in users.summaries.values())
            print(f"{len(users.adapters)} adapters saved to {users.output_dir}/<user>/ ({early} stopped early)")
            print(f"metrics: {users.output_dir / 'metrics.jsonl'}; per user: {users.output_dir / 'users.json'}")
            return 0
        if args.trainer == "sft":
            result = SFTTrainer(args.model, config, train_data, eval_data).train()
        else:
            result = GRPOTrainer(args.model, config, train_data).train()
    except PreftError as e:
        print(f"preft train {args.trainer}: error: {e}")
        return 2
    print(f"adapter saved to {result.adapter_path} after {result.steps} steps")
    print(f"metrics: {result.output_dir / 'metrics.jsonl'}" + (f"; plot: {result.plot_path}" if result.plot_path else ""))
    return 0
