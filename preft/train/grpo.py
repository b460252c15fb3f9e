"""GRPO for one adapter, on-policy under the serving semantics.

One optimizer step:

1. **Rollouts**: ``num_generations`` completions per prompt from ``preft.hf.generate`` with the
   adapter's policy (``prefill``: the adapter acts on the prompt and so on the first sampled token;
   later tokens come from the base model attending to the adapted prompt KV).
2. **Rewards** (summed over ``reward_funcs``) and **group-relative advantages**.
3. **Update**: the per-token log-probs of the sampled completions from one teacher-forced forward
   with the same ``adapter_mask`` as serving (``token_logprobs``), so they equal the rollout's
   log-probs (logged as ``rollout_logprob_max_abs_diff``). The clipped surrogate
   ``min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)`` with ``ratio = exp(logp - old)``
   (``old`` = the log-probs before this step's first update, so the clip acts from the second of
   ``num_iterations`` passes on), minus ``beta`` times the k3 KL estimate to the base model (the
   same ``PreftModel`` with no adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from preft.hf import PreftModel, generate
from preft.train.config import GRPOConfig
from preft.train.data import Batch, Example, collate, load_examples
from preft.train.rewards import load_reward, reward_name
from preft.train.trainer import AdapterTrainer, TrainResult, ordered_batches, token_logprobs


def group_advantages(rewards: Tensor, num_generations: int, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """``(r - mean_group) / (std_group + eps)`` per group of ``num_generations`` consecutive rewards.

    A group whose rewards are all equal gets advantages of exactly zero: it carries no signal.
    """
    grouped = rewards.view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    equal = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return torch.where(equal, torch.zeros_like(centred), centred).reshape(-1)


def clipped_token_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, epsilon: float, epsilon_high: float) -> tuple[Tensor, Tensor]:
    """Per-token ``-min(ratio A, clip(ratio, 1-eps, 1+eps_high) A)`` and where the clip was active."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased KL(policy || ref) estimate)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class Rollout:
    batch: Batch  # [prompt ; completion] rows with the serving adapter_mask
    advantages: Tensor  # [N]
    rollout_logp: Tensor  # [N, T] log-probs the generator sampled with (0 off the completion)
    ref_logp: Tensor | None  # [N, T] base-model log-probs when beta > 0
    rewards: dict[str, Tensor]  # per reward function [N]
    old_logp: Tensor | None = None


class GRPOTrainer(AdapterTrainer):
    """``GRPOTrainer(model_dir, config, train_dataset=prompts_path).train()``."""

    plot_name = "curves.png"

    def __init__(
        self, model_dir: str | Path, config: GRPOConfig, train_dataset: str | Path, model: PreftModel | None = None, tokenizer: Any = None
    ):
        super().__init__(model_dir, config, model, tokenizer)
        self.config: GRPOConfig = config
        self.updates_per_step = config.num_iterations
        self.reward_funcs = {reward_name(spec): load_reward(spec) for spec in config.reward_funcs}
        self.prompts, self.load_report = load_examples(
            train_dataset, self.tokenizer, config.max_prompt_length, needs_completion=False, skip_bad_rows=config.skip_bad_rows
        )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = getattr(getattr(self.model.model, "generation_config", None), "eos_token_id", None)
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self.plot_panels = {"loss": ["loss"], "reward": ["reward", *self.reward_funcs] if len(self.reward_funcs) > 1 else ["reward"]}
        print(f"preft train grpo: {train_dataset}: {self.load_report.summary()}")

    @property
    def prompts_per_micro_batch(self) -> int:
        return self.config.per_device_train_batch_size // self.config.num_generations

    def total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        per_epoch = math.ceil(len(self.prompts) / self.prompts_per_micro_batch)
        return max(1, math.ceil(cfg.num_train_epochs * per_epoch / cfg.gradient_accumulation_steps))

    @torch.no_grad()
    def rollout(self, index: int) -> Rollout:
        """Sample, score and prepare micro-batch ``index`` (seeded by ``seed`` and ``index``: resumable)."""
        cfg, g = self.config, self.config.num_generations
        examples: list[Example] = [
            self.prompts[i] for i in ordered_batches(len(self.prompts), self.prompts_per_micro_batch, cfg.seed, index)
        ]
        prompt_ids = [e.prompt_ids for e in examples for _ in range(g)]
        self.set_train(False)
        gen = generate(
            self.model,
            prompt_ids,
            self.name,
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=cfg.seed * 1_000_003 + index,
            eos_token_id=self.eos_ids,
            return_logits=True,
            pad_token_id=self.pad_id,
        )
        self.set_train(True)
        batch = collate(list(zip(prompt_ids, gen.token_ids)), cfg.policy, self.pad_id).to(self.device)
        rollout_logp = torch.zeros(batch.input_ids.shape, device=self.device)
        for i, (p, toks) in enumerate(zip(prompt_ids, gen.token_ids)):
            logp = torch.log_softmax(gen.logits[i].to(self.device) / cfg.temperature, dim=-1)
            rollout_logp[i, len(p) : len(p) + len(toks)] = logp.gather(-1, torch.tensor(toks, device=self.device)[:, None]).squeeze(-1)
        completions = [self.tokenizer.decode(t, skip_special_tokens=True) for t in gen.token_ids]
        prompts = [e.prompt for e in examples for _ in range(g)]
        keys = sorted({k for e in examples for k in e.columns})
        columns = {k: [e.columns.get(k) for e in examples for _ in range(g)] for k in keys}
        rewards = {}
        for name, func in self.reward_funcs.items():
            values = func(prompts=prompts, completions=completions, completion_ids=gen.token_ids, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            rewards[name] = torch.tensor([0.0 if v is None else float(v) for v in values])
        total = torch.stack(list(rewards.values())).sum(0)
        advantages = group_advantages(total, g, cfg.scale_rewards).to(self.device)
        ref_logp = token_logprobs(self.model, batch, None, cfg.temperature) if cfg.beta > 0 else None
        return Rollout(batch, advantages, rollout_logp, ref_logp, {"reward": total, **rewards})

    def policy_loss(self, ro: Rollout, n_tokens: int, n_seqs: int) -> tuple[Tensor, dict]:
        """This micro-batch's share of the step's loss (normalised over the whole accumulation window)."""
        cfg = self.config
        mask = ro.batch.completion_mask
        logp = token_logprobs(self.model, ro.batch, self.name, cfg.temperature)
        if ro.old_logp is None:
            ro.old_logp = logp.detach()
        per_token, clipped = clipped_token_loss(
            logp, ro.old_logp, ro.advantages, cfg.epsilon, cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        )
        stats = {"clip_ratio": float((clipped * mask).sum()), "logp_diff": float(((logp.detach() - ro.rollout_logp).abs() * mask).max())}
        if ro.ref_logp is not None:
            kl = k3_kl(logp, ro.ref_logp)
            per_token = per_token + cfg.beta * kl
            stats["kl"] = float((kl.detach() * mask).sum())
        if cfg.loss_type == "dapo":
            loss = (per_token * mask).sum() / n_tokens
        else:
            loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / n_seqs
        return loss, stats

    def training_step(self) -> dict:
        cfg = self.config
        accum = cfg.gradient_accumulation_steps
        rollouts = [self.rollout(self.step * accum + j) for j in range(accum)]
        n_tokens = sum(int(r.batch.completion_mask.sum()) for r in rollouts)
        n_seqs = sum(r.batch.input_ids.shape[0] for r in rollouts)
        logs: dict[str, float] = {}
        for iteration in range(cfg.num_iterations):
            loss_sum, clip, kl, diff = 0.0, 0.0, 0.0, 0.0
            for ro in rollouts:
                loss, stats = self.policy_loss(ro, n_tokens, n_seqs)
                loss.backward()
                loss_sum += float(loss.detach())
                clip, kl = clip + stats["clip_ratio"], kl + stats.get("kl", 0.0)
                diff = max(diff, stats["logp_diff"])
            grad_norm = self.optimizer_step()
            if iteration == 0:
                # Before any update of this step, training log-probs must equal the rollout's (on-policy).
                logs = {"loss": loss_sum, "grad_norm": grad_norm, "rollout_logprob_max_abs_diff": diff}
        logs["clip_ratio"] = clip / n_tokens  # clip_ratio and kl: of the last of the num_iterations passes
        if cfg.beta > 0:
            logs["kl"] = kl / n_tokens
        rewards = {k: torch.cat([r.rewards[k] for r in rollouts]) for k in rollouts[0].rewards}
        for k, v in rewards.items():
            logs[k] = float(v.mean())
        logs["reward_std"] = float(rewards["reward"].std())
        logs["completion_length"] = n_tokens / n_seqs
        zero = torch.cat([r.advantages.view(-1, cfg.num_generations).abs().amax(1) == 0 for r in rollouts]).float()
        logs["frac_zero_advantage_groups"] = float(zero.mean())
        return logs


def grpo(model_dir: str | Path, prompts: str | Path, config: GRPOConfig | None = None, **overrides: Any) -> TrainResult:
    """Train an adapter with GRPO; ``overrides`` build or replace ``GRPOConfig`` fields."""
    import dataclasses

    config = dataclasses.replace(config, **overrides) if config else GRPOConfig(**overrides)
    return GRPOTrainer(model_dir, config, prompts).train()
