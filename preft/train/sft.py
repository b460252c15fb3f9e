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
from preft.train.data import Batch, DataError, Example, collate, dataset_label, load_examples, user_column_of
from preft.train.multi_user import MultiUserSFTTrainer, UsersResult
from preft.train.trainer import AdapterTrainer, TrainResult, completion_logits, gather_logprobs, ordered_batches, token_logprobs


def masked_nll_sum(model: PreftModel, batch: Batch, adapter_name: str) -> tuple[torch.Tensor, int]:
    """Sum of ``-log p(completion token)`` over the batch, and the number of completion tokens."""
    logp = token_logprobs(model, batch, adapter_name)
    return -(logp * batch.completion_mask).sum(), int(batch.completion_mask.sum())


def completion_loss_and_stats(model: PreftModel, batch: Batch, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The completion tokens' summed NLL (with grad) and ``[count, correct, entropy sum]`` for TRL's
    ``mean_token_accuracy`` (greedy token == target) and ``entropy`` (of the predicted distribution)."""
    logits, start = completion_logits(model, batch, adapter_name)
    mask = batch.completion_mask
    nll = -(gather_logprobs(logits, batch, start) * mask).sum()
    with torch.no_grad():  # over the completion tokens only, a few rows of [vocab] at a time (no second [B, T, vocab] tensor)
        where = mask[:, start:].nonzero()  # [n, 2]: (row, column) of each completion token
        targets = batch.input_ids[:, start:]
        stats = torch.zeros(3, dtype=torch.float64, device=logits.device)
        for rows, cols in (chunk.unbind(1) for chunk in where.split(256)):
            part = logits[rows, cols]
            logp = torch.log_softmax(part, dim=-1)
            hits = (part.argmax(-1) == targets[rows, cols]).sum()
            stats += torch.stack([torch.tensor(float(len(rows)), device=part.device), hits, -(logp.exp() * logp).sum()]).double()
    return nll, stats


class SFTTrainer(AdapterTrainer):
    """``SFTTrainer(model_dir, config, train_dataset=path).train()``."""

    def __init__(
        self,
        model_dir: str | Path,
        config: SFTConfig,
        train_dataset: Any,
        eval_dataset: Any = None,
        model: PreftModel | None = None,
        tokenizer: Any = None,
    ):
        """``train_dataset`` / ``eval_dataset``: a data file or folder, a ``datasets.Dataset`` or a list of rows (``preft.train.data``)."""
        if user_column_of(train_dataset, config.user_column) is not None:
            raise PreftError(
                f"{train_dataset}: the rows name their users, so this is a multi-user job (preft.train.MultiUserSFTTrainer, "
                "or preft.train.sft); pass --user_column none to train one adapter on every row"
            )
        super().__init__(model_dir, config, model, tokenizer)
        self.config: SFTConfig = config
        if config.early_stopping_patience > 0:
            raise PreftError("--early_stopping_patience is implemented for multi-user jobs (a dataset whose rows name their user)")
        load = dict(skip_bad_rows=config.skip_bad_rows, text_field=config.dataset_text_field)
        examples, report = load_examples(train_dataset, self.tokenizer, config.max_length, **load)
        self.load_report = report
        self.eval_examples: list[Example] = []
        eval_path = eval_dataset if eval_dataset is not None else config.eval_dataset
        if not config.evaluates:
            pass  # --eval_strategy no: no eval rows, none held out
        elif eval_path is not None:
            self.eval_examples, _ = load_examples(eval_path, self.tokenizer, config.max_length, **load)
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
        print(f"preft train sft: {dataset_label(train_dataset)}: {report.summary()}; {len(self.eval_examples)} eval rows")

    def total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        return max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch()))

    def steps_per_epoch(self) -> float:
        cfg = self.config
        return math.ceil(len(self.examples) / (cfg.per_device_train_batch_size * self.world_size)) / cfg.gradient_accumulation_steps

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
        local = [sum(w * float(b.completion_mask.sum()) for b, w in micro), sum(w * float(b.attention_mask.sum()) for b, w in micro)]
        # The whole step's completion tokens (the loss's normaliser) and input tokens, every rank.
        n_tokens, n_input = (int(v) for v in acc.reduce(torch.tensor(local, dtype=torch.float64, device=self.device), "sum").tolist())
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # nll, completion tokens, correct, entropy
        for j, (b, w) in enumerate(micro):
            with acc.no_sync(self.train_model) if j < accum - 1 else contextlib.nullcontext():
                nll, stats = completion_loss_and_stats(self.train_model, b, self.name)
                # DDP averages gradients over ranks: scaling by world_size makes it the sum over all tokens / n_tokens.
                acc.backward(nll * (w * self.world_size) / n_tokens)
            sums += torch.cat([nll.detach().double().view(1), stats]) * w
        grad_norm = self.optimizer_step()
        loss_sum, count, correct, entropy = acc.reduce(sums, "sum").tolist()
        self.num_tokens += n_input
        return {
            "loss": loss_sum / n_tokens,
            "grad_norm": grad_norm,
            "num_tokens": self.num_tokens,
            "mean_token_accuracy": correct / count,
            "entropy": entropy / count,
        }

    def eval_due(self) -> bool:
        every = self.config.eval_interval(math.ceil(self.steps_per_epoch()))
        return bool(self.eval_examples) and every > 0 and self.step % every == 0

    @torch.no_grad()
    def evaluate(self) -> dict:
        """``eval_loss`` (mean completion-token cross-entropy), ``eval_mean_token_accuracy``, ``eval_entropy``
        over the eval rows (empty when there are none)."""
        if not self.eval_examples:
            return {}
        totals = torch.zeros(4, dtype=torch.float64, device=self.device)  # nll sum, token count, correct, entropy
        bs = self.config.per_device_eval_batch_size
        mine = self.eval_examples[self.rank :: self.world_size]  # each rank scores its share
        for i in range(0, len(mine), bs):
            nll, stats = completion_loss_and_stats(self.model, self.batch(mine[i : i + bs]), self.name)
            totals += torch.cat([nll.double().view(1), stats])
        total, n, correct, entropy = self.accelerator.reduce(totals, "sum").tolist()
        return {"eval_loss": total / n, "eval_mean_token_accuracy": correct / n, "eval_entropy": entropy / n}


def sft(model_dir: str | Path, dataset: Any, config: SFTConfig | None = None, **overrides: Any) -> TrainResult | UsersResult:
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
