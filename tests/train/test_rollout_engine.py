"""GRPO rollouts through the in-process serving engine with live (in-memory) adapter weights."""

import pytest
import torch

from preft.train import GRPOConfig, GRPOTrainer, token_logprobs

from .conftest import write_jsonl
from .test_grpo import expected_reward

TOL = 1e-5  # float32 on CPU: the engine's paged-KV incremental decode vs one teacher-forced forward differ by rounding only


def engine_config(tmp_path, **kw) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "grpo"),
        r=8,
        learning_rate=5e-2,
        num_generations=4,
        per_device_train_batch_size=8,
        max_completion_length=6,
        max_prompt_length=64,
        reward_funcs=["regex:^[a-z]"],
        temperature=0.7,
        lr_scheduler_type="constant",
        rollout_backend="engine",
        disable_tqdm=True,
        max_steps=1,
    )
    return GRPOConfig(**{**base, **kw})


@pytest.fixture
def long_prompts(tmp_path):
    # Longer than one KV block (16 tokens), so the engine's prefix cache holds full prompt blocks.
    rows = [{"prompt": "the quick brown fox jumps over the lazy dog " + s} for s in ["ab", "hello", "xyz=", "42"]]
    return write_jsonl(tmp_path / "long.jsonl", rows)


def max_diff(trainer, rollout) -> float:
    with torch.no_grad():  # the engine reports log-probs before temperature
        train_logp = token_logprobs(trainer.model, rollout.batch, trainer.name, rollout.rollout_temperature)
    return float(((train_logp - rollout.rollout_logp).abs() * rollout.batch.completion_mask).max())


@pytest.mark.parametrize("policy,kind", [("prefill", "lora"), ("all", "lora"), ("prefill", "direft"), ("prefill", "loreft")])
def test_engine_rollout_logprobs_equal_training_logprobs_at_step_0(tmp_path, tiny_llama, long_prompts, policy, kind):
    trainer = GRPOTrainer(tiny_llama, engine_config(tmp_path, policy=policy, adapter=kind), long_prompts)
    with torch.no_grad():
        for p in trainer.params:
            p.normal_(0.0, 0.1)
    rollout = trainer.rollout(0)
    assert rollout.rollout_temperature == 1.0
    assert rollout.batch.completion_mask.sum() > 8
    assert max_diff(trainer, rollout) <= TOL
    assert trainer.train().metrics[0]["sampling/sampling_logp_difference/max"] <= TOL


def test_engine_never_serves_stale_adapter_weights(tmp_path, tiny_llama, long_prompts):
    trainer = GRPOTrainer(tiny_llama, engine_config(tmp_path), long_prompts)
    with torch.no_grad():
        for p in trainer.params:
            p.normal_(0.0, 0.1)
    first = trainer.rollout(0)
    hash_before = trainer.model.get_adapter(trainer.name).content_hash()
    assert trainer.engine.engine.adapters.get(trainer.name).ref.content_hash == hash_before
    assert max_diff(trainer, first) <= TOL
    hits_before = trainer.engine.engine.stats()["prefix_cache_hits"]
    # New weights: the same prompts again must be computed with them, not from a stale slot or cached KV block.
    with torch.no_grad():
        for p in trainer.params:
            p.add_(torch.randn_like(p) * 0.1)
    second = trainer.rollout(0)
    assert trainer.engine.engine.adapters.get(trainer.name).ref.content_hash != hash_before
    assert max_diff(trainer, second) <= TOL
    # ... and the check can fail: the first rollout's log-probs are far from the new weights' log-probs.
    assert max_diff(trainer, first) > 1e-3
    assert trainer.engine.engine.stats()["prefix_cache_hits"] >= hits_before  # the cache was on (hits within a rollout's group)
    assert len(trainer.engine.list_adapters()) == 1


def test_engine_backend_trains_the_toy_task(tmp_path, tiny_llama):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": p} for p in ["ab", "hello", "xyz=", "42"]])
    cfg = engine_config(tmp_path, num_generations=8, per_device_train_batch_size=16, max_completion_length=2, max_steps=40, temperature=1.0)
    trainer = GRPOTrainer(tiny_llama, cfg, prompts)
    before = expected_reward(trainer)
    result = trainer.train()
    assert expected_reward(trainer) > before + 0.15  # exact expected reward (noise-free), as for the hf backend
    assert max(r["sampling/sampling_logp_difference/max"] for r in result.metrics) <= TOL


def test_unknown_rollout_backend_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="--rollout_backend must be one of"):
        engine_config(tmp_path, rollout_backend="vllm")
