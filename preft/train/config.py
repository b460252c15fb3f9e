"""Trainer configs: TRL-style dataclasses whose fields are the ``preft train`` flags.

``SFTConfig`` and ``GRPOConfig`` share the adapter and optimisation fields of ``TrainConfig``.
Every field's ``metadata["help"]`` is its CLI help; ``add_config_arguments`` turns a dataclass
into argparse flags (``--learning_rate 1e-3``, ``--bf16``, ``--bf16 false``, ``--target_modules q_proj v_proj``).
TRL's names are accepted too (``metadata["aliases"]``: ``--lora_r`` for ``--r``, ``--lora_target_modules``,
``--max_seq_length``), so a TRL command line runs as it is (see docs/training.md for the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from preft.adapters import LoraConfig, ReftConfig
from preft.errors import PreftError

ADAPTER_KINDS = ("lora", "loreft", "direft")
SCHEDULES = ("constant", "linear", "cosine")
ROLLOUT_BACKENDS = ("hf", "engine")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
EVAL_STRATEGIES = ("no", "steps", "epoch")
REPORT_TO = ("none", "all")  # metrics always go to metrics.jsonl and a PNG; no logging integration is implemented


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Fields shared by every trainer: the adapter, the optimiser, the run."""

    output_dir: str = _f("preft-out", "directory for checkpoints, metrics.jsonl, plots and the final adapter")
    adapter_name: str = _f("default", "name of the trained adapter inside the model")
    # adapter
    adapter: str = _f("lora", "adapter kind", choices=ADAPTER_KINDS)
    policy: str = _f("prefill", "prefill: adapter on prompt tokens only (PreFT); all: on every token (PEFT)", choices=("prefill", "all"))
    r: int = _f(8, "adapter rank", aliases=("--lora_r",))
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the adapter input (LoRA and ReFT)")
    use_rslora: bool = _f(False, "rsLoRA scaling alpha / sqrt(r)")
    target_modules: list[str] = _f(
        ["all-linear"], "LoRA target modules (q_proj ... down_proj) or all-linear", aliases=("--lora_target_modules",)
    )
    layers: list[int] | None = _f(None, "decoder layers to adapt (default: all)")
    positions: str = _f("all", "ReFT positions: all, or pyreft-style f3+l3 (prefill policy)")
    # optimisation
    learning_rate: float = _f(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_scheduler_type: str = _f("linear", "learning-rate schedule after warm-up", choices=SCHEDULES)
    warmup_ratio: float = _f(0.0, "fraction of the steps spent warming up linearly")
    warmup_steps: int = _f(0, "optimizer updates spent warming up linearly (overrides --warmup_ratio when > 0)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    num_train_epochs: float = _f(1.0, "epochs over the dataset (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "optimizer steps to run (-1: from num_train_epochs)")
    per_device_train_batch_size: int = _f(8, "rows per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    seed: int = _f(0, "seed for init, data order, dropout and sampling")
    bf16: bool | None = _f(None, "load the base model in bfloat16 (default: on CUDA when supported); adapters stay float32")
    device: str | None = _f(None, "torch device (default: cuda if available)")
    gradient_checkpointing: bool = _f(False, "recompute the frozen base's decoder layers in the backward pass (less memory, more time)")
    # data
    skip_bad_rows: bool = _f(False, "skip malformed dataset rows (counted) instead of stopping at the first")
    # bookkeeping
    logging_steps: int = _f(1, "log metrics every N optimizer steps")
    save_steps: int = _f(0, "write a resumable checkpoint every N steps (0: only at the end)")
    save_total_limit: int | None = _f(None, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = _f(None, "checkpoint directory to resume from, or 'latest' (newest in output_dir)")
    disable_tqdm: bool = _f(False, "no progress bar")
    report_to: list[str] = _f(["none"], "none or all: metrics always go to metrics.jsonl and a PNG plot (no wandb/tensorboard)")

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTER_KINDS:
            raise PreftError(f"--adapter must be one of {ADAPTER_KINDS}, got {self.adapter!r}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise PreftError(f"--lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise PreftError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise PreftError("set --max_steps > 0 or --num_train_epochs > 0")
        if self.warmup_steps < 0:
            raise PreftError(f"--warmup_steps must be >= 0, got {self.warmup_steps}")
        if isinstance(self.report_to, str):
            self.report_to = [self.report_to]
        unknown = [r for r in self.report_to if r not in REPORT_TO]
        if unknown:
            raise PreftError(
                f"--report_to {' '.join(unknown)} is not supported: preft writes metrics.jsonl and a PNG plot in --output_dir "
                f"(use one of {REPORT_TO})"
            )
        self.adapter_config()  # validates rank, policy, modules, positions now rather than after loading the model

    def warmup_updates(self, total_updates: int) -> int:
        """Warm-up length in optimizer updates: ``warmup_steps`` if set, else ``warmup_ratio`` of the run."""
        return self.warmup_steps if self.warmup_steps > 0 else int(self.warmup_ratio * total_updates)

    def adapter_config(self) -> LoraConfig | ReftConfig:
        """The ``preft.adapters`` config these flags describe."""
        if self.adapter == "lora":
            modules: list[str] | str = self.target_modules
            if modules == ["all-linear"]:
                modules = "all-linear"
            return LoraConfig(
                r=self.r,
                lora_alpha=self.lora_alpha,
                target_modules=modules,
                lora_dropout=self.lora_dropout,
                use_rslora=self.use_rslora,
                layers=self.layers,
                policy=self.policy,
            )
        return ReftConfig(
            kind=self.adapter, r=self.r, layers=self.layers, positions=self.positions, dropout=self.lora_dropout, policy=self.policy
        )


@dataclass
class SFTConfig(TrainConfig):
    """Supervised fine-tuning: loss on the completion (or final assistant turn) only."""

    max_length: int = _f(1024, "longest prompt+completion in tokens; longer completions are truncated", aliases=("--max_seq_length",))
    dataset_text_field: str = _f("text", "column of language-modelling rows (plain text: the first token is the prompt)")
    eval_dataset: str | None = _f(None, "dataset file (JSONL, JSON, Parquet, CSV) or folder for eval loss")
    eval_split: float = _f(0.0, "fraction of the training rows held out for eval loss (when no --eval_dataset)")
    eval_strategy: str | None = _f(
        None,
        "no: never evaluate; steps: every --eval_steps (default: --logging_steps); epoch: every epoch "
        "(default: every --eval_steps when set, and at the end, whenever there are eval rows)",
        choices=EVAL_STRATEGIES,
    )
    eval_steps: int = _f(0, "compute eval loss every N steps (0: only at the end)")
    per_device_eval_batch_size: int = _f(8, "rows per eval batch")
    # many users in one job (a dataset whose rows name their user; preft.train.multi_user)
    user_column: str = _f(
        "auto",
        "column naming each row's user, one adapter per user: auto (user or adapter, when the rows have one), none "
        "(one adapter for the whole dataset), or a column name; a --dataset folder holds one <user>.jsonl per user",
    )
    users_per_step: int | None = _f(
        None,
        "multi-user jobs: users trained together; each step's batch holds one micro-batch of each "
        "(default: 8 on CUDA; 1 on CPU, where bigger batches measured slower per token)",
    )
    early_stopping_patience: int = _f(
        0, "multi-user jobs: stop a user after N evals without eval_loss improving (0: off); the user's best adapter is saved"
    )
    early_stopping_threshold: float = _f(0.0, "multi-user jobs: how much eval_loss must drop to count as an improvement")
    split_users_over_ranks: bool = _f(
        False,
        "multi-user jobs under torchrun: every rank trains every user on its share of each micro-batch (gradients all-reduced) "
        "instead of each user living on one rank",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.users_per_step is not None and self.users_per_step < 1:
            raise PreftError(f"--users_per_step must be >= 1, got {self.users_per_step}")
        if self.early_stopping_patience < 0:
            raise PreftError(f"--early_stopping_patience must be >= 0, got {self.early_stopping_patience}")
        if self.eval_strategy is not None and self.eval_strategy not in EVAL_STRATEGIES:
            raise PreftError(f"--eval_strategy must be one of {EVAL_STRATEGIES}, got {self.eval_strategy!r}")

    def eval_interval(self, steps_per_epoch: int) -> int:
        """Evaluate every N optimizer steps (0: only at the end, when there are eval rows)."""
        if self.eval_strategy == "epoch":
            return max(1, steps_per_epoch)
        if self.eval_strategy == "steps":
            return self.eval_steps or self.logging_steps
        return self.eval_steps if self.eval_strategy is None else 0

    @property
    def evaluates(self) -> bool:
        """False under ``--eval_strategy no``: eval rows are neither held out nor loaded."""
        return self.eval_strategy != "no"


@dataclass
class GRPOConfig(TrainConfig):
    """Group-relative policy optimisation with rollouts under the serving semantics."""

    learning_rate: float = _f(1e-5, "peak learning rate (AdamW)")
    reward_funcs: list[str] = _f(["exact"], "rewards, summed: exact, math, regex:PATTERN, python:module:function")
    num_generations: int = _f(8, "completions sampled per prompt (the group)")
    per_device_train_batch_size: int = _f(8, "completions per micro-batch (a multiple of num_generations)")
    max_prompt_length: int = _f(512, "longest prompt in tokens")
    max_completion_length: int = _f(64, "longest sampled completion in tokens")
    temperature: float = _f(1.0, "sampling temperature of the rollouts (> 0); log-probs use the same temperature")
    top_p: float = _f(1.0, "nucleus sampling of the rollouts")
    epsilon: float = _f(0.2, "clip range below 1 (and above, unless --epsilon_high)")
    epsilon_high: float | None = _f(None, "upper clip range (DAPO's clip-higher, e.g. 0.28)")
    beta: float = _f(0.0, "KL coefficient to the base model (0: no KL, no reference forward)")
    loss_type: str = _f(
        "dapo",
        "TRL's normalisations of the summed token losses: grpo: each completion's token mean, averaged over the completions; "
        "bnpo: token mean of each micro-batch, averaged over the micro-batches; dr_grpo: divided by completions x "
        "max_completion_length; dapo: divided by the completion tokens of the whole step (every micro-batch and process)",
        choices=GRPO_LOSS_TYPES,
    )
    reward_weights: list[float] | None = _f(
        None, "weight of each reward in --reward_funcs (default: 1 each); the reward is the weighted sum"
    )
    mask_truncated_completions: bool = _f(
        False, "completions cut at --max_completion_length (no EOS) get no loss; their rewards still count in the group advantages"
    )
    scale_rewards: str = _f(
        "group", "group (or true): divide group-centred rewards by the group std; none (or false): do not scale", choices=("group", "none")
    )
    num_iterations: int = _f(1, "updates per rollout batch (mu in the GRPO paper)")
    rollout_backend: str = _f(
        "hf",
        "rollout generator: hf (preft.hf.generate, the reference) or engine (preft.engine.LLM in-process, adapter weights synced in memory)",
        choices=ROLLOUT_BACKENDS,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_generations < 2:
            raise PreftError(f"--num_generations must be >= 2 for group-relative advantages, got {self.num_generations}")
        if self.per_device_train_batch_size % self.num_generations:
            raise PreftError(
                f"--per_device_train_batch_size {self.per_device_train_batch_size} must be a multiple of --num_generations {self.num_generations}"
            )
        if self.temperature <= 0:
            raise PreftError(f"--temperature must be > 0 for GRPO rollouts, got {self.temperature}")
        if self.rollout_backend not in ROLLOUT_BACKENDS:
            raise PreftError(f"--rollout_backend must be one of {ROLLOUT_BACKENDS}, got {self.rollout_backend!r}")
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise PreftError(f"--loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise PreftError(
                f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} --reward_funcs; give one weight per reward"
            )
        scale = {True: "group", False: "none", "true": "group", "false": "none"}.get(
            self.scale_rewards.lower() if isinstance(self.scale_rewards, str) else self.scale_rewards, self.scale_rewards
        )
        if scale not in ("group", "none"):
            raise PreftError(f"--scale_rewards must be group, none, true or false, got {self.scale_rewards!r}")
        self.scale_rewards = scale


# ---- dataclass <-> argparse ------------------------------------------------------------------


def parse_bool(text: str) -> bool:
    """``true/false`` (also ``yes/no``, ``1/0``) as ``HfArgumentParser`` reads them, for ``--bf16 false``."""
    value = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` (plus its TRL aliases) per dataclass field, typed from the annotation, with the field's help.

    Booleans take ``--flag``, ``--flag true|false`` (TRL/HfArgumentParser) and ``--no-flag``.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _unwrap(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict[str, Any] = {"default": default, "dest": f.name, "help": f.metadata.get("help", "") + f" (default: {default})"}
        if "choices" in f.metadata and kind is not bool:
            kw["choices"] = f.metadata["choices"]
            if f.name == "scale_rewards":  # TRL accepts true/false for group/none
                kw["choices"] = (*kw["choices"], "true", "false")
        if kind is bool:
            kw.update(type=parse_bool, nargs="?", const=True, metavar="true|false")
        elif typing.get_origin(kind) is list:
            kw["nargs"] = "+"
            kw["type"] = typing.get_args(kind)[0]
        else:
            kw["type"] = kind
        parser.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kw)
        if kind is bool:
            parser.add_argument(f"--no-{f.name}", f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _unwrap(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False
