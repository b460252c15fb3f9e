"""Trainer configs: TRL-style dataclasses whose fields are the ``preft train`` flags.

``SFTConfig`` and ``GRPOConfig`` share the adapter and optimisation fields of ``TrainConfig``.
Every field's ``metadata["help"]`` is its CLI help; ``add_config_arguments`` turns a dataclass
into argparse flags (``--learning_rate 1e-3``, ``--bf16/--no-bf16``, ``--target_modules q_proj v_proj``).
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
    r: int = _f(8, "adapter rank")
    lora_alpha: float = _f(16.0, "LoRA alpha (scaling = alpha / r)")
    lora_dropout: float = _f(0.0, "dropout on the adapter input (LoRA and ReFT)")
    use_rslora: bool = _f(False, "rsLoRA scaling alpha / sqrt(r)")
    target_modules: list[str] = _f(["all-linear"], "LoRA target modules (q_proj ... down_proj) or all-linear")
    layers: list[int] | None = _f(None, "decoder layers to adapt (default: all)")
    positions: str = _f("all", "ReFT positions: all, or pyreft-style f3+l3 (prefill policy)")
    # optimisation
    learning_rate: float = _f(1e-4, "peak learning rate (AdamW)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    lr_scheduler_type: str = _f("linear", "learning-rate schedule after warm-up", choices=SCHEDULES)
    warmup_ratio: float = _f(0.0, "fraction of the steps spent warming up linearly")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0: off)")
    num_train_epochs: float = _f(1.0, "epochs over the dataset (ignored when max_steps > 0)")
    max_steps: int = _f(-1, "optimizer steps to run (-1: from num_train_epochs)")
    per_device_train_batch_size: int = _f(8, "rows per micro-batch")
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step")
    seed: int = _f(0, "seed for init, data order, dropout and sampling")
    bf16: bool | None = _f(None, "load the base model in bfloat16 (default: on CUDA when supported); adapters stay float32")
    device: str | None = _f(None, "torch device (default: cuda if available)")
    # data
    skip_bad_rows: bool = _f(False, "skip malformed dataset rows (counted) instead of stopping at the first")
    # bookkeeping
    logging_steps: int = _f(1, "log metrics every N optimizer steps")
    save_steps: int = _f(0, "write a resumable checkpoint every N steps (0: only at the end)")
    save_total_limit: int | None = _f(None, "keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = _f(None, "checkpoint directory to resume from, or 'latest' (newest in output_dir)")
    disable_tqdm: bool = _f(False, "no progress bar")

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTER_KINDS:
            raise PreftError(f"--adapter must be one of {ADAPTER_KINDS}, got {self.adapter!r}")
        if self.lr_scheduler_type not in SCHEDULES:
            raise PreftError(f"--lr_scheduler_type must be one of {SCHEDULES}, got {self.lr_scheduler_type!r}")
        if self.per_device_train_batch_size < 1 or self.gradient_accumulation_steps < 1:
            raise PreftError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise PreftError("set --max_steps > 0 or --num_train_epochs > 0")
        self.adapter_config()  # validates rank, policy, modules, positions now rather than after loading the model

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

    max_length: int = _f(1024, "longest prompt+completion in tokens; longer completions are truncated")
    eval_dataset: str | None = _f(None, "JSONL file for eval loss")
    eval_split: float = _f(0.0, "fraction of the training rows held out for eval loss (when no --eval_dataset)")
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
    loss_type: str = _f("dapo", "grpo: mean per sequence then per batch; dapo: mean over all completion tokens", choices=("grpo", "dapo"))
    scale_rewards: bool = _f(True, "divide group-centred rewards by the group std")
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
        if self.loss_type not in ("grpo", "dapo"):
            raise PreftError(f"--loss_type must be grpo or dapo, got {self.loss_type!r}")


# ---- dataclass <-> argparse ------------------------------------------------------------------


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--flag`` per dataclass field, typed from the annotation, with the field's help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, optional = _unwrap(hints[f.name])
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kw: dict[str, Any] = {"default": default, "help": f.metadata.get("help", "") + f" (default: {default})"}
        if "choices" in f.metadata:
            kw["choices"] = f.metadata["choices"]
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is list:
            kw["nargs"] = "+"
            kw["type"] = typing.get_args(kind)[0]
        else:
            kw["type"] = kind
        parser.add_argument(f"--{f.name}", **kw)


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def _unwrap(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False
