"""Supervised fine-tuning of one adapter with the serving semantics.

Each row is one teacher-forced forward over ``[prompt ; completion]`` with the serving
``adapter_mask`` (``prefill``: 1 on prompt tokens, 0 on completion tokens; ``all``: 1 on every
token). The loss is the cross-entropy of the completion tokens only, averaged over all completion
tokens of the optimizer step (every micro-batch of a gradient-accumulation window is divided by
the window's token count, so accumulation equals one big batch).
"""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from typing import Any

import torch

from preft.errors import PreftError
from preft.hf import PreftModel
from preft.train.config import SFTConfig
from preft.train.data import Batch, DataError, Example, collate, load_examples, user_column_of
from preft.train.multi_user import MultiUserSFTTrainer, UsersResult
from preft.train.trainer import AdapterTrainer, TrainResult, ordered_batches, token_logprobs


def masked_nll_sum(model: PreftModel, batch: Batch, adapter_name: str) -> tuple[torch.Tensor, int]:
    """Sum of ``-log p(completion token)`` over the batch, and the number of completion tokens."""
    logp = token_logprobs(model, batch, adapter_name)
    return -(logp * batch.completion_mask).sum(), int(batch.completion_mask.sum())


class SFTTrainer(AdapterTrainer):
    """``SFTTrainer(model_dir, config, train_dataset=path).train()``."""

    def __init__(
        self,
        model_dir: str | Path,
        config: SFTConfig,
        train_dataset: str | Path,
        eval_dataset: str | Path | None = None,
        model: PreftModel | None = None,
        tokenizer: Any = None,
    ):
        if user_column_of(train_dataset, config.user_column) is not None:
            raise PreftError(
                f"{train_dataset}: the rows name their users, so this is a multi-user job (preft.train.MultiUserSFTTrainer, "
                "or preft.train.sft); pass --user_column none to train one adapter on every row"
            )
        super().__init__(model_dir, config, model, tokenizer)
        self.config: SFTConfig = config
        if config.early_stopping_patience > 0:
            raise PreftError("--early_stopping_patience is implemented for multi-user jobs (a dataset whose rows name their user)")
        examples, report = load_examples(train_dataset, self.tokenizer, config.max_length, skip_bad_rows=config.skip_bad_rows)
        self.load_report = report
        self.eval_examples: list[Example] = []
        eval_path = eval_dataset or config.eval_dataset
        if eval_path:
            self.eval_examples, _ = load_examples(eval_path, self.tokenizer, config.max_length, skip_bad_rows=config.skip_bad_rows)
        elif config.eval_split > 0:
            order = list(range(len(examples)))
            random.Random(config.seed).shuffle(order)
            n_eval = max(1, int(round(config.eval_split * len(examples))))
            held = set(order[:n_eval])
            self.eval_examples = [e for i, e in enumerate(examples) if i in held]
            examples = [e for i, e in enumerate(examples) if i not in held]
        if not examples:
            raise DataError(f"{train_dataset}: no training rows left after holding out --eval_split {config.eval_split}")
        self.examples = examples
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        print(f"preft train sft: {train_dataset}: {report.summary()}; {len(self.eval_examples)} eval rows")

    def total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        per_epoch = math.ceil(len(self.examples) / (cfg.per_device_train_batch_size * self.world_size))
        return max(1, math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps))

    def batch(self, examples: list[Example]) -> Batch:
        return collate([(e.prompt_ids, e.completion_ids) for e in examples], self.config.policy, self.pad_id).to(self.device)

    def training_step(self) -> dict:
        cfg = self.config
        acc, accum = self.accelerator, cfg.gradient_accumulation_steps
        micro = []
        for j in range(accum):
            rows = ordered_batches(
                len(self.examples), cfg.per_device_train_batch_size, cfg.seed, self.step * accum + j, self.rank, self.world_size
            )
            # A rank left without rows at the end of an epoch still runs (weight 0), so every rank joins the all-reduce.
            micro.append((self.batch([self.examples[i] for i in rows or [0]]), 1.0 if rows else 0.0))
        local = sum(w * float(b.completion_mask.sum()) for b, w in micro)
        n_tokens = int(acc.reduce(torch.tensor(local, device=self.device), "sum"))  # the whole step's tokens, every rank
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for j, (b, w) in enumerate(micro):
            with acc.no_sync(self.train_model) if j < accum - 1 else contextlib.nullcontext():
                nll, _ = masked_nll_sum(self.train_model, b, self.name)
                # DDP averages gradients over ranks: scaling by world_size makes it the sum over all tokens / n_tokens.
                acc.backward(nll * (w * self.world_size) / n_tokens)
            loss_sum += nll.detach().double() * w
        grad_norm = self.optimizer_step()
        loss_sum = float(acc.reduce(loss_sum, "sum"))
        return {"loss": loss_sum / n_tokens, "grad_norm": grad_norm, "tokens": n_tokens}

    def eval_due(self) -> bool:
        return bool(self.eval_examples) and self.config.eval_steps > 0 and self.step % self.config.eval_steps == 0

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean completion-token cross-entropy over the eval rows (empty when there are none)."""
        if not self.eval_examples:
            return {}
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # nll sum, token count
        bs = self.config.per_device_eval_batch_size
        mine = self.eval_examples[self.rank :: self.world_size]  # each rank scores its share
        for i in range(0, len(mine), bs):
            nll, count = masked_nll_sum(self.model, self.batch(mine[i : i + bs]), self.name)
            totals += torch.tensor([float(nll), count], dtype=torch.float64, device=self.device)
        total, n = self.accelerator.reduce(totals, "sum").tolist()
        return {"eval_loss": total / n}


def sft(model_dir: str | Path, dataset: str | Path, config: SFTConfig | None = None, **overrides: Any) -> TrainResult | UsersResult:
    """Train an adapter with SFT and return where it was saved (``result.adapter_path``) and its metrics.

    ``sft("models/qwen", "data.jsonl", SFTConfig(adapter="direft", r=8, max_steps=200))`` or
    ``sft(model, data, output_dir="out", policy="all")``: keyword overrides build or replace config fields.
    A dataset whose rows name their user (or a folder of ``<user>.jsonl``) trains one adapter per user
    in one job and returns a ``UsersResult`` (``preft.train.multi_user``).
    """
    import dataclasses

    config = dataclasses.replace(config, **overrides) if config else SFTConfig(**overrides)
    if user_column_of(dataset, config.user_column) is not None:
        return MultiUserSFTTrainer(model_dir, config, dataset).train()
    return SFTTrainer(model_dir, config, dataset).train()
