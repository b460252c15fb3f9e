"""GRPO for one adapter, on-policy under the serving semantics.

One optimizer step:

1. **Rollouts**: ``num_generations`` completions per prompt with the adapter's policy (``prefill``:
   the adapter acts on the prompt and so on the first sampled token; later tokens come from the
   base model attending to the adapted prompt KV), from ``--rollout_backend``: ``hf``, the reference
   generator ``preft.hf.generate`` on the training model itself, or ``engine``, a ``preft.engine.LLM``
   in the same process whose copy of the adapter is replaced by ``PreftModel.get_adapter`` before
   every rollout (in memory; a new content hash, so no stale device slot or prefix-cache block).
2. **Rewards** (``reward_weights``-weighted sum over ``reward_funcs``) and **group-relative advantages**;
   with ``mask_truncated_completions`` a completion cut at ``max_completion_length`` gets no loss.
3. **Update**: the per-token log-probs of the sampled completions from one teacher-forced forward
   with the same ``adapter_mask`` as serving (``token_logprobs``), so they equal the rollout's
   log-probs (logged as ``sampling/sampling_logp_difference/max``). The clipped surrogate
   ``min(ratio * A, clip(ratio, 1 - epsilon, 1 + epsilon_high) * A)`` with ``ratio = exp(logp - old)``
   (``old`` = the log-probs before this step's first update, so the clip acts from the second of
   ``num_iterations`` passes on), minus ``beta`` times the k3 KL estimate to the base model (the
   same ``PreftModel`` with no adapter). The summed token losses are normalised as TRL's ``loss_type``
   says (``policy_loss``). Metrics carry TRL's names (``reward``, ``rewards/<name>/mean``,
   ``completions/mean_length``, ``clip_ratio/region_mean``, ``num_tokens``, ...).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from preft.hf import PreftModel, generate
from preft.train.config import GRPOConfig
from preft.train.data import Batch, Example, collate, dataset_label, load_examples
from preft.train.rewards import load_reward, reward_names
from preft.train.trainer import AdapterTrainer, TrainResult, completion_logits, gather_logprobs, ordered_batches, token_logprobs


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
    """Per-token ``-min(ratio A, clip(ratio, 1-eps, 1+eps_high) A)`` and where the clip was active.

    The clip is active (``clip_ratio/region_mean``) where ``ratio < 1 - eps`` with ``A < 0`` (``low``) or
    ``ratio > 1 + eps_high`` with ``A > 0`` (``high``), as TRL counts it.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * adv
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def normalise_loss(
    per_token: Tensor, mask: Tensor, real: Tensor, loss_type: str, counts: dict[str, float], max_completion_length: int
) -> Tensor:
    """This micro-batch's share of the step's loss under TRL's ``loss_type``; summed over the micro-batches (and
    processes, ``counts`` being whole-step totals) it is the step's loss:

    - ``grpo``: each completion's token mean, averaged over the step's completions (a masked completion counts as 0);
    - ``bnpo``: each micro-batch's token mean, averaged over the step's micro-batches;
    - ``dr_grpo``: the token sum divided by completions x ``max_completion_length`` (a constant: no length bias);
    - ``dapo``: the token sum divided by the step's completion tokens.

    ``mask``: the tokens with a loss; ``real``: 1 for the rows that are completions (0 for an idle process's padding);
    ``counts``: ``tokens``, ``completions`` and ``micro_batches`` of the whole step.
    """
    token_sum = (per_token * mask).sum()
    if loss_type == "grpo":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1) * real).sum() / counts["completions"]
    if loss_type == "bnpo":
        return token_sum / mask.sum().clamp(min=1) * float(real.any()) / counts["micro_batches"]
    if loss_type == "dr_grpo":
        return token_sum / (counts["completions"] * max_completion_length)
    if loss_type == "dapo":
        return token_sum / max(counts["tokens"], 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1`` (non-negative, unbiased KL(policy || ref) estimate)."""
    delta = ref_logp - logp
    return torch.exp(delta) - delta - 1


@dataclass
class Rollout:
    batch: Batch  # [prompt ; completion] rows with the serving adapter_mask
    real: Tensor  # [N] 1 for a sampled completion, 0 for the padding rows of a process left without prompts
    lengths: Tensor  # [N] completion lengths in tokens (before any masking)
    truncated: Tensor  # [N] 1 where the completion was cut at max_completion_length (no EOS)
    advantages: Tensor  # [N]
    rollout_logp: Tensor  # [N, T] the generator's log-probs of the sampled tokens (0 off the completion)
    rollout_temperature: float  # the temperature rollout_logp is taken at (the engine reports them before temperature: 1.0)
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
        self.reward_funcs = dict(zip(reward_names(config.reward_funcs), (load_reward(spec) for spec in config.reward_funcs)))
        self.reward_weights = torch.tensor(config.reward_weights or [1.0] * len(self.reward_funcs), dtype=torch.float64)
        self.prompts, self.load_report = load_examples(
            train_dataset, self.tokenizer, config.max_prompt_length, needs_completion=False, skip_bad_rows=config.skip_bad_rows
        )
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        eos = getattr(getattr(self.model.model, "generation_config", None), "eos_token_id", None)
        eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = sorted(eos)
        self._engine = None  # built on the first rollout with --rollout_backend engine
        per_reward = [f"rewards/{name}/mean" for name in self.reward_funcs]
        self.plot_panels = {"loss": ["loss"], "reward": ["reward", *per_reward] if len(per_reward) > 1 else ["reward"]}
        print(f"preft train grpo: {dataset_label(train_dataset)}: {self.load_report.summary()}")

    @property
    def prompts_per_micro_batch(self) -> int:
        return self.config.per_device_train_batch_size // self.config.num_generations

    def total_steps(self) -> int:
        cfg = self.config
        if cfg.max_steps > 0:
            return cfg.max_steps
        return max(1, math.ceil(cfg.num_train_epochs * self.steps_per_epoch()))

    def steps_per_epoch(self) -> float:
        per_epoch = math.ceil(len(self.prompts) / (self.prompts_per_micro_batch * self.world_size))
        return per_epoch / self.config.gradient_accumulation_steps

    # ---- rollouts ------------------------------------------------------------------------------

    @property
    def engine(self):
        """The in-process serving engine (``--rollout_backend engine``), built on first use.

        Same model directory, device and dtype as the training model; a KV pool sized for one
        micro-batch of rollouts, so it leaves the device memory to training.
        """
        if self._engine is None:
            from preft.engine import LLM
            from preft.engine.config import EngineConfig

            cfg = self.config
            dtype = next(self.model.model.parameters()).dtype
            rows = cfg.per_device_train_batch_size
            block_size = 16
            blocks_per_row = -(-(cfg.max_prompt_length + cfg.max_completion_length) // block_size)
            engine_config = EngineConfig(
                model=str(self.model_dir),
                dtype="bfloat16" if dtype == torch.bfloat16 else "float32",
                device=str(self.device),
                max_adapter_slots=1,
                num_kv_blocks=rows * blocks_per_row + rows,
                block_size=block_size,
                max_num_seqs=rows,
                max_lora_rank=max(1, cfg.r),
            )
            self._engine = LLM(engine_config)
        return self._engine

    def sync_engine_adapter(self) -> str:
        """Give the engine the adapter's current weights (no disk); returns their content hash.

        Remove + add: the engine frees the old device slot and the new entry carries a new content
        hash, which keys both the slot and the prefix-cache blocks, so nothing computed with the old
        weights is reused.
        """
        llm = self.engine
        if any(info.name == self.name for info in llm.list_adapters()):
            llm.remove_adapter(self.name)
        adapter = self.model.get_adapter(self.name)
        llm.add_adapter(self.name, adapter)
        return adapter.content_hash()

    def generate_rollouts(self, prompt_ids: list[list[int]], seed: int) -> tuple[list[list[int]], list[Tensor], float]:
        """``num_generations`` completions of each distinct prompt (repeated ``g`` times in ``prompt_ids``), their
        per-token log-probs of the sampled tokens, and the temperature those log-probs are taken at."""
        cfg, g = self.config, self.config.num_generations
        if cfg.rollout_backend == "engine":
            from preft.engine import SamplingParams

            self.sync_engine_adapter()
            distinct = prompt_ids[::g]
            params = [
                SamplingParams(
                    max_tokens=cfg.max_completion_length,
                    temperature=cfg.temperature,
                    top_p=cfg.top_p,
                    seed=seed + k * g,  # the engine seeds completion j of a request with seed + j
                    n=g,
                    stop_token_ids=self.eos_ids,
                    logprobs=0,  # the sampled token's log-prob, before temperature
                )
                for k in range(len(distinct))
            ]
            outputs = self.engine.generate(distinct, params, adapter=self.name, use_tqdm=False)
            completions = [c for out in outputs for c in sorted(out.outputs, key=lambda c: c.index)]
            tokens = [list(c.token_ids) for c in completions]
            logps = [torch.tensor([lp[t] for lp, t in zip(c.logprobs, c.token_ids)]) for c in completions]
            return tokens, logps, 1.0
        self.set_train(False)
        gen = generate(
            self.model,
            prompt_ids,
            self.name,
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            seed=seed,
            eos_token_id=self.eos_ids,
            return_logits=True,
            pad_token_id=self.pad_id,
        )
        self.set_train(True)
        logps = []
        for logits, toks in zip(gen.logits, gen.token_ids):
            logp = torch.log_softmax(logits / cfg.temperature, dim=-1)
            logps.append(logp.gather(-1, torch.tensor(toks)[:, None]).squeeze(-1))
        return gen.token_ids, logps, cfg.temperature

    @torch.no_grad()
    def rollout(self, index: int) -> Rollout:
        """Sample, score and prepare micro-batch ``index`` (seeded by ``seed``, ``index`` and the rank: resumable)."""
        cfg, g = self.config, self.config.num_generations
        rows = ordered_batches(len(self.prompts), self.prompts_per_micro_batch, cfg.seed, index, self.rank, self.world_size)
        examples: list[Example] = [self.prompts[i] for i in rows or [0]]  # an idle rank (end of epoch) gets weight 0 in the loss
        prompt_ids = [e.prompt_ids for e in examples for _ in range(g)]
        seed = (cfg.seed * 1_000_003 + index) * self.world_size + self.rank
        token_ids, token_logps, rollout_temperature = self.generate_rollouts(prompt_ids, seed)
        batch = collate(list(zip(prompt_ids, token_ids)), cfg.policy, self.pad_id).to(self.device)
        real = torch.full((len(token_ids),), 1.0 if rows else 0.0, device=self.device)
        lengths = torch.tensor([len(t) for t in token_ids], dtype=torch.float64)
        eos = set(self.eos_ids)
        truncated = torch.tensor([len(t) >= cfg.max_completion_length and (not t or t[-1] not in eos) for t in token_ids])
        batch.completion_mask *= real[:, None]
        if cfg.mask_truncated_completions:  # TRL: no loss on a cut-off completion (its reward still counts in its group)
            batch.completion_mask *= (~truncated).float().to(self.device)[:, None]
        rollout_logp = torch.zeros(batch.input_ids.shape, device=self.device)
        for i, (p, logp) in enumerate(zip(prompt_ids, token_logps)):
            rollout_logp[i, len(p) : len(p) + len(logp)] = logp.to(self.device)
        completions: list[Any] = [self.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids]
        prompts = [e.prompt for e in examples for _ in range(g)]
        # TRL: a conversational prompt gets conversational completions in the reward functions
        completions = [[{"role": "assistant", "content": c}] if isinstance(p, list) else c for p, c in zip(prompts, completions)]
        keys = sorted({k for e in examples for k in e.columns})
        columns = {k: [e.columns.get(k) for e in examples for _ in range(g)] for k in keys}
        rewards = {}
        for name, func in self.reward_funcs.items():
            values = func(prompts=prompts, completions=completions, completion_ids=token_ids, **columns)
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
            rewards[name] = torch.tensor([0.0 if v is None else float(v) for v in values])
        total = (torch.stack(list(rewards.values()), dim=1).double() * self.reward_weights).sum(1).float()
        advantages = group_advantages(total, g, cfg.scale_rewards == "group").to(self.device)
        ref_logp = token_logprobs(self.model, batch, None, cfg.temperature) if cfg.beta > 0 else None
        return Rollout(
            batch, real, lengths, truncated.float(), advantages, rollout_logp, rollout_temperature, ref_logp, {"reward": total, **rewards}
        )

    # ---- update --------------------------------------------------------------------------------

    def policy_loss(self, ro: Rollout, counts: dict[str, float]) -> tuple[Tensor, dict]:
        """This rank's share of the step's loss (normalised over the whole accumulation window, all ranks: ``normalise_loss``)."""
        cfg = self.config
        mask = ro.batch.completion_mask
        logits, start = completion_logits(self.train_model, ro.batch, self.name)
        logp = gather_logprobs(logits, ro.batch, start, cfg.temperature)
        if ro.old_logp is None:
            ro.old_logp = logp.detach()
        per_token, clipped = clipped_token_loss(
            logp, ro.old_logp, ro.advantages, cfg.epsilon, cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        )
        # The on-policy check, at the temperature the generator reported its log-probs at.
        check = (
            logp.detach()
            if ro.rollout_temperature == cfg.temperature
            else gather_logprobs(logits.detach(), ro.batch, start, ro.rollout_temperature)
        )
        low = clipped * (ro.advantages < 0).float()[:, None]  # the clip active below 1 - epsilon (A < 0) or above 1 + epsilon_high
        diff = (check - ro.rollout_logp).abs() * mask
        stats = {
            "clip_ratio": float((clipped * mask).sum()),
            "clip_low": float((low * mask).sum()),
            "logp_diff": float(diff.max()),
            "logp_diff_sum": float(diff.sum()),
        }
        if ro.ref_logp is not None:
            kl = k3_kl(logp, ro.ref_logp)
            per_token = per_token + cfg.beta * kl
            stats["kl"] = float((kl.detach() * mask).sum())
        # DDP averages gradients over ranks: world_size times this rank's share makes the sum over ranks.
        loss = normalise_loss(per_token, mask, ro.real, cfg.loss_type, counts, cfg.max_completion_length) * self.world_size
        return loss, stats

    def training_step(self) -> dict:
        cfg = self.config
        acc, accum = self.accelerator, cfg.gradient_accumulation_steps
        rollouts = [self.rollout(self.step * accum + j) for j in range(accum)]
        local = [
            sum(float(r.batch.completion_mask.sum()) for r in rollouts),  # tokens with a loss
            sum(float(r.real.sum()) for r in rollouts),  # completions
            sum(float(r.real.any()) for r in rollouts),  # micro-batches with completions
            sum(float((r.batch.attention_mask.sum(1) * r.real).sum()) for r in rollouts),  # prompt + completion tokens
        ]
        totals = acc.reduce(torch.tensor(local, dtype=torch.float64, device=self.device), "sum").tolist()  # the whole step, every rank
        counts = dict(zip(("tokens", "completions", "micro_batches"), totals[:3]))
        self.num_tokens += int(totals[3])
        logs: dict[str, float] = {}
        for iteration in range(cfg.num_iterations):
            sums = torch.zeros(5, dtype=torch.float64, device=self.device)  # loss, clipped tokens, low-clipped, kl, |logp diff|
            diff = 0.0
            for j, ro in enumerate(rollouts):
                with acc.no_sync(self.train_model) if j < accum - 1 else contextlib.nullcontext():
                    loss, stats = self.policy_loss(ro, counts)
                    acc.backward(loss)
                sums += torch.tensor(
                    [
                        float(loss.detach()) / self.world_size,
                        stats["clip_ratio"],
                        stats["clip_low"],
                        stats.get("kl", 0.0),
                        stats["logp_diff_sum"],
                    ],
                    dtype=torch.float64,
                    device=self.device,
                )
                diff = max(diff, stats["logp_diff"])
            grad_norm = self.optimizer_step()
            loss_sum, clip, clip_low, kl, diff_sum = acc.reduce(sums, "sum").tolist()
            if iteration == 0:
                # Before any update of this step, training log-probs must equal the rollout's (on-policy).
                diff = float(acc.gather(torch.tensor([diff], device=self.device)).max())
                n_tokens = max(counts["tokens"], 1.0)
                logs = {
                    "loss": loss_sum,
                    "grad_norm": grad_norm,
                    "sampling/sampling_logp_difference/mean": diff_sum / n_tokens,
                    "sampling/sampling_logp_difference/max": diff,
                }
        n_tokens = max(counts["tokens"], 1.0)  # clip ratios and kl: of the last of the num_iterations passes
        logs["clip_ratio/region_mean"] = clip / n_tokens
        logs["clip_ratio/low_mean"] = clip_low / n_tokens
        logs["clip_ratio/high_mean"] = (clip - clip_low) / n_tokens
        if cfg.beta > 0:
            logs["kl"] = kl / n_tokens
        logs["num_tokens"] = self.num_tokens
        logs.update(self.rollout_metrics(rollouts))
        return logs

    def rollout_metrics(self, rollouts: list[Rollout]) -> dict[str, float]:
        """TRL's reward and completion metrics over every rank's completions (an idle rank's rows have weight 0)."""
        acc, g = self.accelerator, self.config.num_generations
        real = torch.cat([r.real.double().cpu() for r in rollouts])
        lengths = torch.cat([r.lengths for r in rollouts])
        truncated = torch.cat([r.truncated.double() for r in rollouts])
        zero_std = torch.cat([(r.advantages.view(-1, g).abs().amax(1) == 0).double().cpu().repeat_interleave(g) for r in rollouts])
        rewards = {k: torch.cat([r.rewards[k] for r in rollouts]).double() for k in rollouts[0].rewards}
        terminated = real * (1 - truncated)
        columns = [real, zero_std * real, lengths * real, truncated * real, lengths * terminated, terminated]
        for values in rewards.values():
            columns += [values * real, values**2 * real]
        sums = acc.reduce(torch.stack([c.sum() for c in columns]).to(self.device), "sum").tolist()
        n, n_zero, length_sum, n_truncated, terminated_sum, n_terminated, *reward_sums = sums
        lo = torch.where(real > 0, lengths, torch.full_like(lengths, math.inf)).min()
        hi = torch.where(real > 0, lengths, torch.full_like(lengths, -math.inf)).max()
        lo, hi = acc.gather(torch.stack([lo, -hi]).to(self.device).view(1, 2)).view(-1, 2).min(0).values.tolist()
        logs: dict[str, float] = {}
        for i, key in enumerate(rewards):
            mean, square = reward_sums[2 * i] / n, reward_sums[2 * i + 1] / n
            std = math.sqrt(max(0.0, (square - mean**2) * n / max(1.0, n - 1)))
            if key == "reward":
                logs["reward"], logs["reward_std"] = mean, std
            else:
                logs[f"rewards/{key}/mean"], logs[f"rewards/{key}/std"] = mean, std
        logs["frac_reward_zero_std"] = n_zero / n
        logs["completions/mean_length"] = length_sum / n
        logs["completions/min_length"], logs["completions/max_length"] = lo, -hi
        logs["completions/clipped_ratio"] = n_truncated / n
        logs["completions/mean_terminated_length"] = terminated_sum / n_terminated if n_terminated else 0.0
        return logs


def grpo(model_dir: str | Path, prompts: str | Path, config: GRPOConfig | None = None, **overrides: Any) -> TrainResult:
    """Train an adapter with GRPO; ``overrides`` build or replace ``GRPOConfig`` fields."""
    import dataclasses

    config = dataclasses.replace(config, **overrides) if config else GRPOConfig(**overrides)
    return GRPOTrainer(model_dir, config, prompts).train()
