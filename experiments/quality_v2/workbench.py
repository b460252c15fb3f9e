"""Executes one run of the study on the real default model (SmolLM2-135M-Instruct), in this process.

Training uses ``preft.train``'s SFT and GRPO trainers on one shared ``PreftModel``; evaluation is
greedy generation through preft's serving engine (``preft.engine.LLM``, the adapter loaded from the
saved directory, as a user would serve it) plus teacher-forced curves along the reference
completion (per-position NLL, and the KL from the base model) with the training-side model.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from experiments.quality_v2 import tasks
from experiments.quality_v2.plan import ARMS, Run
from preft.train.data import collate, tokenize_row
from preft.train.trainer import completion_logits

MAX_POSITION = 256  # completion positions the curves cover
SEGMENTS = {"1-16": (1, 16), "17-64": (17, 64), "65-256": (65, 256)}  # 1-based completion token positions
RUN_DIRS = Path("runs/quality_v2")
ADAPTER = "quality"  # the adapter's name inside the training model


class Workbench:
    """The base model (training side and serving engine), loaded once; ``run(Run) -> metrics``."""

    def __init__(self, model: str = "default", device: str | None = None):
        from preft.engine import LLM
        from preft.train import SFTConfig
        from preft.train.trainer import load_model

        torch.set_num_threads(1)  # a shared small CPU: two threads per process oversubscribe it
        self.model_name = model
        # float32 on every device: the arms' differences are small, and a 135M model is cheap in float32 on a GPU too
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.tokenizer = load_model(model, SFTConfig(device=self.device.type, bf16=False), self.device)
        self.llm = LLM(model, dtype="float32", device=self.device.type, max_num_seqs=64)
        self._names = itertools.count()
        self._base_answers: dict[tuple, str] = {}  # the base model's greedy answer depends on the prompt only (many arms share them)

    # ---- one run ---------------------------------------------------------------------------------

    def run(self, run: Run) -> dict[str, Any]:
        data = tasks.build(run.task, run.seed, **self._task_kwargs(run))
        kind, policy = ARMS[run.arm]
        system = data.system_prompt if run.arm == "system-prompt" else None
        metrics: dict[str, Any] = {}
        if kind is None:
            metrics.update(self.evaluate(data, run, adapter_dir=None, system=system))
            metrics["system_prompt"] = system
            if run.task != "C":
                metrics.update(self.teacher_forced(data, run, adapter=None, policy="all", system=system))
            return metrics
        out = RUN_DIRS / run.run_id.replace("/", "_")
        log(f"training {run.run_id}")
        trainer = self.train_grpo if run.task == "C" else self.train_sft
        metrics["train"], adapter_dir = trainer(run, data, out, kind, policy)
        if run.task != "C":
            self.model.load_adapter(str(adapter_dir), ADAPTER)
            try:
                metrics.update(self.teacher_forced(data, run, adapter=ADAPTER, policy=policy, system=None))
            finally:
                self.model.remove_adapter(ADAPTER)
        metrics.update(self.evaluate(data, run, adapter_dir=adapter_dir, system=None))
        for checkpoint in out.glob("checkpoint-*"):  # the adapter stays; optimizer states are large
            shutil.rmtree(checkpoint)
        return metrics

    def teacher_forced(self, data: tasks.TaskData, run: Run, adapter: str | None, policy: str, system: str | None) -> dict:
        """Validation and eval loss on the reference answers; for task B also the per-position curves (Q3)."""
        log("teacher-forced losses")
        out = {"val_loss": self.mean_nll(data.splits["val"], adapter, policy, system)}
        if data.task == "B":
            n = run.budget.curve_items if run.budget else len(data.splits["eval"])
            out.update(self.curves(data.splits["eval"][:n], adapter, policy, system))
        else:
            nll, tokens = self.item_nll(data.splits["eval"], adapter, policy, system)
            out["eval_loss"] = sum(nll) / sum(tokens)
            out["eval_nll"] = {"nll": [round(x, 4) for x in nll], "tokens": tokens}  # per prompt, for a CI on the loss gap
        return out

    @staticmethod
    def _task_kwargs(run: Run) -> dict:
        return {"max_train_items": run.budget.b_train_items} if run.task == "B" and run.budget else {}

    def _write(self, items: list[tasks.Item], path: Path, with_answer: bool, extra: bool = False) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{"messages": i.chat(with_answer=with_answer), **({"answer": i.answer} if extra else {})} for i in items]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return path

    def _common(self, run: Run, out: Path, kind: str, policy: str) -> dict:
        resume = "latest" if any(out.glob("checkpoint-*")) else None
        return dict(
            output_dir=str(out), adapter_name=ADAPTER, adapter=kind, policy=policy, r=run.r, lora_alpha=2.0 * run.r,
            learning_rate=run.lr, warmup_ratio=0.05, seed=run.seed, device=self.device.type, bf16=False, disable_tqdm=True,
            logging_steps=1, save_steps=10, save_total_limit=1, resume_from_checkpoint=resume,
        )  # fmt: skip

    def train_sft(self, run: Run, data: tasks.TaskData, out: Path, kind: str, policy: str) -> tuple[dict, Path]:
        from preft.train import SFTConfig, SFTTrainer

        b = run.budget
        train_path = self._write(data.splits["train"], out / "train.jsonl", with_answer=True)
        val_path = self._write(data.splits["val"], out / "val.jsonl", with_answer=True)
        config = SFTConfig(
            **self._common(run, out, kind, policy), max_steps=b.sft_steps, per_device_train_batch_size=b.sft_batch,
            eval_steps=max(1, b.sft_steps // 6), per_device_eval_batch_size=16,
        )  # fmt: skip
        trainer = SFTTrainer(self.model_name, config, train_path, eval_dataset=val_path, model=self.model, tokenizer=self.tokenizer)
        try:
            result = trainer.train()
        finally:
            self.model.remove_adapter(ADAPTER)
        return curves_of(result.metrics, ["loss", "eval_loss"]), result.adapter_path

    def train_grpo(self, run: Run, data: tasks.TaskData, out: Path, kind: str, policy: str) -> tuple[dict, Path]:
        from preft.train import GRPOConfig, GRPOTrainer

        b = run.budget
        prompts = self._write(data.splits["train"], out / "prompts.jsonl", with_answer=False, extra=True)
        config = GRPOConfig(
            **self._common(run, out, kind, policy), max_steps=b.grpo_steps, num_generations=b.grpo_generations,
            per_device_train_batch_size=b.grpo_generations, gradient_accumulation_steps=b.grpo_prompts,
            max_completion_length=b.grpo_completion, max_prompt_length=256, reward_funcs=["math"],
        )  # fmt: skip
        trainer = GRPOTrainer(self.model_name, config, prompts, model=self.model, tokenizer=self.tokenizer)
        try:
            result = trainer.train()
        finally:
            self.model.remove_adapter(ADAPTER)
        curves = curves_of(result.metrics, ["loss", "reward", "completions/mean_length", "reward_std"])
        curves["completion_length"] = curves.pop("completions/mean_length")  # TRL's metric name, stored under a plain key
        return curves, result.adapter_path

    # ---- evaluation ------------------------------------------------------------------------------

    def prompt_ids(self, item: tasks.Item, system: str | None) -> list[int]:
        text = self.tokenizer.apply_chat_template(item.chat(system), tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def answers(self, items: list[tasks.Item], adapter: str | None, system: str | None, max_tokens: int) -> list[str]:
        from preft.engine import SamplingParams

        prompts = [self.prompt_ids(i, system) for i in items]
        params = SamplingParams(max_tokens=max_tokens, temperature=0)
        if adapter is not None:
            return [o.outputs[0].text.strip() for o in self.llm.generate(prompts, params, adapter=adapter, use_tqdm=False)]
        missing = list(dict.fromkeys(k for k in ((max_tokens, *p) for p in prompts) if k not in self._base_answers))
        outs = self.llm.generate([list(k[1:]) for k in missing], params, use_tqdm=False) if missing else []
        self._base_answers.update((k, o.outputs[0].text.strip()) for k, o in zip(missing, outs))
        return [self._base_answers[(max_tokens, *p)] for p in prompts]

    def evaluate(self, data: tasks.TaskData, run: Run, adapter_dir: Path | None, system: str | None) -> dict:
        """Greedy answers to the validation and eval prompts through the serving engine; per-item scores (paired across arms)."""
        max_tokens = (run.budget.eval_tokens if run.budget else {"A": 48, "B": 256, "C": 96})[data.task]
        name = None
        if adapter_dir is not None:
            name = f"{ADAPTER}-{next(self._names)}"
            self.llm.add_adapter(name, str(adapter_dir))
        log(f"greedy answers ({len(data.splits['val'])} val + {len(data.splits['eval'])} eval prompts, <= {max_tokens} tokens)")
        try:
            val = self.answers(data.splits["val"], name, system, max_tokens)
            test = self.answers(data.splits["eval"], name, system, max_tokens)
        finally:
            if name is not None:
                self.llm.remove_adapter(name)
        val_scores = [tasks.score(data, i, a) for i, a in zip(data.splits["val"], val)]
        scores = [tasks.score(data, i, a) for i, a in zip(data.splits["eval"], test)]
        out = {
            "val_score": mean([s["score"] for s in val_scores]),
            "score": mean([s["score"] for s in scores]),
            "items": {k: [int(s[k]) for s in scores] for k in scores[0]},
            "kinds": [i.kind for i in data.splits["eval"]],
            "answer_tokens": [len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in test],
            "reference_tokens": [len(self.tokenizer(i.answer, add_special_tokens=False)["input_ids"]) for i in data.splits["eval"]],
            "examples": [{"prompt": i.prompt, "reference": i.answer, "answer": a} for i, a in list(zip(data.splits["eval"], test))[:6]],
        }
        return out

    def mean_nll(self, items: list[tasks.Item], adapter: str | None, policy: str, system: str | None = None) -> float:
        """Mean NLL per reference completion token (teacher-forced, the adapter under its serving mask)."""
        nll, tokens = self.item_nll(items, adapter, policy, system)
        return sum(nll) / sum(tokens)

    @torch.no_grad()
    def item_nll(
        self, items: list[tasks.Item], adapter: str | None, policy: str, system: str | None = None
    ) -> tuple[list[float], list[int]]:
        """Per item, the summed NLL of its reference completion tokens and their count."""
        nll: list[float] = []
        tokens: list[int] = []
        for rows in batched([self.pair(i, system) for i in items], 16):
            batch = collate(rows, policy, self.tokenizer.pad_token_id).to(self.device)
            logits, start = completion_logits(self.model, batch, adapter)
            logp = torch.log_softmax(logits.float(), -1).gather(-1, batch.input_ids[:, start:, None]).squeeze(-1)
            mask = batch.completion_mask[:, start:]
            nll += (-(logp * mask).sum(-1)).tolist()
            tokens += mask.sum(-1).long().tolist()
        return nll, tokens

    def pair(self, item: tasks.Item, system: str | None) -> tuple[list[int], list[int]]:
        ex = tokenize_row({"messages": item.chat(system, with_answer=True)}, self.tokenizer, True)
        return ex.prompt_ids, ex.completion_ids

    @torch.no_grad()
    def curves(self, items: list[tasks.Item], adapter: str | None, policy: str, system: str | None) -> dict:
        """Along the reference completions of ``items``: mean NLL and KL(model || base) per completion position, and per segment.

        "model" is the adapter under its serving mask (or the base model with ``system`` in the prompt);
        "base" is the base model on the plain prompt. Both score the same completion tokens.
        """
        sums = torch.zeros(3, MAX_POSITION, dtype=torch.float64)  # nll, kl, count
        per_item = {name: {"nll": [], "kl": [], "tokens": []} for name in SEGMENTS}  # for bootstrap CIs over items
        for chunk in batched(items, 4):
            model_rows = [self.pair(i, system) for i in chunk]
            base_rows = [self.pair(i, None) for i in chunk]
            model_logp = self._completion_logprobs(model_rows, adapter, policy)
            base_logp = self._completion_logprobs(base_rows, None, "all")
            for (_, completion), lm, lb in zip(model_rows, model_logp, base_logp):
                n = min(len(completion), MAX_POSITION)
                targets = torch.tensor(completion[:n])
                nll = -lm[:n].gather(-1, targets[:, None]).squeeze(-1).double()
                kl = (lm[:n].exp() * (lm[:n] - lb[:n])).sum(-1).double()
                sums[0, :n] += nll
                sums[1, :n] += kl
                sums[2, :n] += 1
                for name, (lo, hi) in SEGMENTS.items():
                    per_item[name]["nll"].append(round(float(nll[lo - 1 : hi].sum()), 4))
                    per_item[name]["kl"].append(round(float(kl[lo - 1 : hi].sum()), 5))
                    per_item[name]["tokens"].append(max(0, min(n, hi) - lo + 1))
        count = sums[2].clamp(min=1)
        used = int((sums[2] > 0).sum())
        return {
            "eval_loss": float(sums[0].sum() / sums[2].sum()),
            "nll_by_position": [round(x, 5) for x in (sums[0] / count)[:used].tolist()],
            "kl_by_position": [round(x, 6) for x in (sums[1] / count)[:used].tolist()],
            "tokens_by_position": [int(x) for x in sums[2][:used].tolist()],
            "segments": per_item,
        }

    def _completion_logprobs(self, rows: list[tuple[list[int], list[int]]], adapter: str | None, policy: str) -> list[torch.Tensor]:
        """Per row, ``[len(completion), vocab]`` log-probs of each completion position (teacher-forced, serving mask)."""
        batch = collate(rows, policy, self.tokenizer.pad_token_id).to(self.device)
        logits, start = completion_logits(self.model, batch, adapter)
        logp = torch.log_softmax(logits.float(), -1).cpu()
        return [logp[b, len(p) - start : len(p) - start + len(c)] for b, (p, c) in enumerate(rows)]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]   {message}", flush=True)


def curves_of(rows: list[dict], keys: list[str]) -> dict:
    """``{key: [[step, value], ...]}`` from a trainer's metrics rows."""
    return {k: [[r["step"], round(r[k], 5)] for r in rows if k in r] for k in keys}


def batched(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def mean(xs: list[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else float("nan")
