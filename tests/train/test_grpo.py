import pytest
import torch

from preft.train import GRPOConfig, GRPOTrainer, token_logprobs
from preft.train.data import collate
from preft.train.grpo import clipped_token_loss, group_advantages, k3_kl, normalise_loss

from .conftest import write_jsonl


@pytest.fixture
def prompts(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p, "answer": "x"} for p in ["ab", "hello", "xyz=", "42"]])


def grpo_config(tmp_path, **kw) -> GRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "grpo"),
        r=8,
        lora_alpha=16,
        learning_rate=5e-2,
        num_generations=8,
        per_device_train_batch_size=16,
        max_completion_length=2,
        max_prompt_length=32,
        reward_funcs=["regex:^[a-z]"],  # toy verifiable task: start with a lowercase letter (about 10% at random)
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    return GRPOConfig(**{**base, **kw})


def test_advantages_are_zero_for_groups_with_equal_rewards():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.3, 0.3, 0.3, 0.3])
    adv = group_advantages(rewards, 4)
    assert torch.equal(adv[:4], torch.zeros(4)) and torch.equal(adv[8:], torch.zeros(4))
    std = torch.tensor([0.0, 1.0, 0.0, 1.0]).std()
    assert torch.allclose(adv[4:8], torch.tensor([-0.5, 0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(group_advantages(rewards, 4, scale=False)[4:8], torch.tensor([-0.5, 0.5, -0.5, 0.5]))


def test_clipped_loss_uses_the_asymmetric_clip_range():
    ratio = torch.tensor([[1.25], [1.3], [0.7], [0.7]])  # four rows of one token each
    adv = torch.tensor([1.0, 1.0, -1.0, 1.0])
    loss, clipped = clipped_token_loss(ratio.log(), torch.zeros_like(ratio), adv, 0.2, 0.28)
    # 1.25 < 1 + 0.28: unclipped; 1.3 clips to 1.28; A < 0 and ratio 0.7 clips to 0.8; A > 0 keeps the smaller 0.7
    assert torch.allclose(loss, torch.tensor([[-1.25], [-1.28], [0.8], [-0.7]]))
    assert clipped.squeeze(1).tolist() == [0.0, 1.0, 1.0, 0.0]
    assert k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0])).item() == 0.0 and k3_kl(torch.tensor([-1.0]), torch.tensor([-2.0])).item() > 0


@pytest.mark.parametrize(
    "policy,kind,positions",
    [
        ("prefill", "lora", "all"),
        ("all", "lora", "all"),
        ("prefill", "direft", "all"),
        ("prefill", "loreft", "all"),
        ("prefill", "direft", "f1+l1"),
    ],
)
def test_rollout_logprobs_equal_training_logprobs_at_step_0(tmp_path, tiny_llama, prompts, policy, kind, positions):
    cfg = grpo_config(tmp_path, policy=policy, adapter=kind, positions=positions, temperature=0.7, max_completion_length=6, max_steps=1)
    trainer = GRPOTrainer(tiny_llama, cfg, prompts)
    with torch.no_grad():  # a non-zero adapter, so the mask matters
        for p in trainer.params:
            p.normal_(0.0, 0.1)
    rollout = trainer.rollout(0)
    mask = rollout.batch.completion_mask
    with torch.no_grad():
        train_logp = token_logprobs(trainer.model, rollout.batch, trainer.name, cfg.temperature)
    tol = 1e-5  # float32 on CPU: only rounding differs (left-padded incremental decode vs one right-padded forward)
    assert ((train_logp - rollout.rollout_logp).abs() * mask).max() <= tol
    # The check is sensitive: the other policy's mask gives different log-probs.
    wrong = collate(
        [
            (r[:n], r[n:m])
            for r, n, m in zip(rollout.batch.input_ids.tolist(), (mask.argmax(1)).tolist(), (rollout.batch.attention_mask.sum(1)).tolist())
        ],
        "all" if policy == "prefill" else "prefill",
        0,
    )
    with torch.no_grad():
        wrong_logp = token_logprobs(trainer.model, wrong, trainer.name, cfg.temperature)
    assert ((wrong_logp - rollout.rollout_logp).abs() * mask).max() > 1e-3
    # The trainer logs the same check on every step.
    assert trainer.train().metrics[0]["sampling/sampling_logp_difference/max"] <= tol


def expected_reward(trainer) -> float:
    """Exact mean reward of the toy task: P(first completion token is a lowercase letter), over the prompts."""
    lowercase = torch.tensor([trainer.tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz"])
    with torch.no_grad():
        probs = [
            trainer.model(torch.tensor([ex.prompt_ids]), adapter_names=trainer.name).logits[0, -1].softmax(-1) for ex in trainer.prompts
        ]
    return sum(float(p[lowercase].sum()) for p in probs) / len(probs)


def test_grpo_raises_mean_reward_for_the_prefill_policy(tmp_path, tiny_llama, prompts):
    trainer = GRPOTrainer(tiny_llama, grpo_config(tmp_path, policy="prefill", max_steps=40, seed=0), prompts)
    before = expected_reward(trainer)
    result = trainer.train()
    # The exact expected reward is noise-free (seeds 0-5 all go from 0.11 to 0.32-0.45 in 40 steps).
    assert expected_reward(trainer) > before + 0.15
    rewards = [r["reward"] for r in result.metrics]
    assert len(rewards) == 40 and sum(rewards[-10:]) / 10 > sum(rewards[:5]) / 5  # the sampled rewards rise too
    assert result.plot_path.name == "curves.png" and result.plot_path.is_file()
    assert max(r["sampling/sampling_logp_difference/max"] for r in result.metrics) <= 1e-5


def test_kl_to_the_base_starts_at_zero_and_grows(tmp_path, tiny_llama, prompts):
    result = GRPOTrainer(tiny_llama, grpo_config(tmp_path, beta=0.1, max_steps=4), prompts).train()
    kls = [r["kl"] for r in result.metrics]
    assert kls[0] == pytest.approx(0.0, abs=1e-7)  # LoRA starts as the identity (B = 0)
    assert kls[-1] > 1e-6


def test_num_iterations_reuses_rollouts_and_activates_the_clip(tmp_path, tiny_llama, prompts):
    cfg = grpo_config(tmp_path, num_iterations=3, epsilon=0.01, max_steps=3, learning_rate=5e-2)
    result = GRPOTrainer(tiny_llama, cfg, prompts).train()
    assert max(r["clip_ratio/region_mean"] for r in result.metrics) > 0  # later passes move away from the rollout policy


def test_batch_size_must_be_a_multiple_of_num_generations(tmp_path):
    with pytest.raises(ValueError, match="multiple of --num_generations 8"):
        grpo_config(tmp_path, per_device_train_batch_size=12)


def test_grpo_resume_continues_identically(tmp_path, tiny_llama, prompts):
    kw = dict(max_steps=4, save_steps=2, lora_dropout=0.1, lr_scheduler_type="linear")
    full = GRPOTrainer(tiny_llama, grpo_config(tmp_path / "a", **kw), prompts).train()
    first = GRPOTrainer(tiny_llama, grpo_config(tmp_path / "b", **kw), prompts)
    step = first.training_step
    first.training_step = lambda: (_ for _ in ()).throw(KeyboardInterrupt) if first.step == 2 else step()
    with pytest.raises(KeyboardInterrupt):
        first.train()
    resumed = GRPOTrainer(tiny_llama, grpo_config(tmp_path / "b", resume_from_checkpoint="latest", **kw), prompts).train()
    for key in ("loss", "reward", "grad_norm"):
        assert [r[key] for r in resumed.metrics] == pytest.approx([r[key] for r in full.metrics], abs=1e-6), key


# ---- TRL's loss types, reward weights, truncated completions, metric names --------------------


def test_loss_types_normalise_as_trl_documents_on_a_hand_computed_example():
    # Two micro-batches of a step; max_completion_length 3. Token losses (0 = no token):
    #   A: completion 1 [1, 2, 3], completion 2 [4]; B: completion 3 [6, 6], completion 4 truncated and masked
    per_token = [torch.tensor([[1.0, 2, 3], [4, 0, 0]]), torch.tensor([[6.0, 6, 0], [5, 5, 5]])]
    masks = [torch.tensor([[1.0, 1, 1], [1, 0, 0]]), torch.tensor([[1.0, 1, 0], [0, 0, 0]])]
    counts = {"tokens": 6.0, "completions": 4.0, "micro_batches": 2.0}
    want = {
        "grpo": (2 + 4 + 6 + 0) / 4,  # completion means 2, 4, 6, 0 (masked), averaged over the 4 completions
        "bnpo": ((1 + 2 + 3 + 4) / 4 + 12 / 2) / 2,  # micro-batch token means 2.5 and 6, averaged
        "dr_grpo": 22 / (4 * 3),  # token sum / (completions x max_completion_length)
        "dapo": 22 / 6,  # token sum / the step's tokens
    }
    real = torch.ones(2)
    for loss_type, expected in want.items():
        got = sum(float(normalise_loss(p, m, real, loss_type, counts, 3)) for p, m in zip(per_token, masks))
        assert got == pytest.approx(expected, abs=1e-6), loss_type
    assert len(set(round(v, 6) for v in want.values())) == 4  # the example tells the four apart


def fake_rollouts(trainer, tokens_for_row):
    """Replace the generator by fixed completions (row i gets tokens_for_row(i)), with log-probs 0."""

    def generate(prompt_ids, seed):
        tokens = [tokens_for_row(i) for i in range(len(prompt_ids))]
        return tokens, [torch.zeros(len(t)) for t in tokens], trainer.config.temperature

    trainer.generate_rollouts = generate


@pytest.mark.parametrize("mask_truncated", [False, True])
def test_reward_weights_weight_the_rewards_and_truncated_completions_can_be_masked(tmp_path, tiny_llama, prompts, mask_truncated):
    cfg = grpo_config(
        tmp_path,
        reward_funcs=["regex:^a", "regex:b"],
        reward_weights=[2.0, -1.0],
        mask_truncated_completions=mask_truncated,
        max_completion_length=2,
        max_steps=1,
    )
    trainer = GRPOTrainer(tiny_llama, cfg, prompts)
    tok = trainer.tokenizer
    a, b = tok.convert_tokens_to_ids("a"), tok.convert_tokens_to_ids("b")
    # even rows: "a" then EOS (terminated); odd rows: "bb" (cut at max_completion_length 2: truncated)
    fake_rollouts(trainer, lambda i: [a, tok.eos_token_id] if i % 2 == 0 else [b, b])
    ro = trainer.rollout(0)
    assert ro.rewards["regex"].tolist() == [1.0, 0.0] * 8 and ro.rewards["regex_2"].tolist() == [0.0, 1.0] * 8
    assert ro.rewards["reward"].tolist() == [2.0, -1.0] * 8  # 2 * regex - 1 * regex_2
    assert ro.truncated.tolist() == [0.0, 1.0] * 8
    lengths = ro.batch.completion_mask.sum(1).tolist()
    assert lengths == ([2.0, 0.0] * 8 if mask_truncated else [2.0, 2.0] * 8)
    assert (ro.advantages[1::2] < 0).all()  # a masked completion's reward still counts in its group's advantages
    logs = trainer.train().metrics[0]
    assert logs["reward"] == pytest.approx(0.5) and logs["rewards/regex/mean"] == 0.5 and logs["rewards/regex_2/mean"] == 0.5
    assert logs["completions/clipped_ratio"] == 0.5 and logs["completions/mean_length"] == 2.0
    assert logs["frac_reward_zero_std"] == 0.0


def test_grpo_logs_trl_metric_names(tmp_path, tiny_llama, prompts):
    metrics = GRPOTrainer(tiny_llama, grpo_config(tmp_path, beta=0.1, max_steps=2), prompts).train().metrics
    trl_names = {
        "loss",
        "grad_norm",
        "learning_rate",
        "epoch",
        "num_tokens",
        "reward",
        "reward_std",
        "rewards/regex/mean",
        "rewards/regex/std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "completions/min_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "completions/mean_terminated_length",
        "kl",
        "clip_ratio/region_mean",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "sampling/sampling_logp_difference/mean",
        "sampling/sampling_logp_difference/max",
    }
    assert trl_names <= set(metrics[0]), trl_names - set(metrics[0])
    # 16 completions of (prompt + 2 tokens) per step: num_tokens counts every prompt and completion token so far
    assert metrics[1]["num_tokens"] > metrics[0]["num_tokens"] > 16 * 2
    assert metrics[1]["epoch"] == pytest.approx(2 * metrics[0]["epoch"])


def test_conversational_prompts_give_rewards_conversational_completions(tmp_path, tiny_llama, monkeypatch):
    module = tmp_path / "chat_rewards.py"
    module.write_text(
        "SEEN = {}\ndef first_completion(prompts, completions, **kw):\n    SEEN['c'] = completions[0]\n    SEEN['p'] = prompts[0]\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    chat = [{"role": "user", "content": "2+2?"}]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": chat, "answer": "4"}])
    cfg = grpo_config(tmp_path, reward_funcs=["chat_rewards.first_completion", "exact"], num_generations=2, per_device_train_batch_size=2)
    trainer = GRPOTrainer(tiny_llama, cfg, data)
    fake_rollouts(trainer, lambda i: [trainer.tokenizer.convert_tokens_to_ids("4"), trainer.tokenizer.eos_token_id])
    ro = trainer.rollout(0)
    import chat_rewards

    seen = chat_rewards.SEEN
    assert seen["p"] == chat and seen["c"] == [{"role": "assistant", "content": "4"}]  # TRL's conversational reward inputs
    assert ro.rewards["exact"].tolist() == [1.0, 1.0]  # the built-in rewards read conversational completions too
    assert list(ro.rewards) == ["reward", "first_completion", "exact"]
