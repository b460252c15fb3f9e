"""DESIGN §1: one masked forward over [prompt ; completion] equals incremental generation.

Every family x adapter kind x policy, on a left-padded ragged batch whose rows use different
adapters and one row uses none. float32 on CPU; logits must agree to ``ATOL``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import DynamicCache

from preft.adapters import LoraConfig, ReftConfig
from preft.hf import PreftModel, generate
from preft.tiny import random_adapter

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
ATOL = 2e-5  # float32; measured max |diff| is ~1e-6 on these tiny models
PROMPTS = [[5, 17, 42, 99, 130, 7, 64], [200, 31, 8], [77, 78, 79, 80, 81], [12, 250, 3, 90]]


def make_config(kind: str, policy: str, r: int = 4):
    if kind == "lora":
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", policy=policy)
    if kind == "lora-qv":
        return LoraConfig(r=r, lora_alpha=r, target_modules=["q_proj", "v_proj"], policy=policy)
    return ReftConfig(kind=kind, r=r, policy=policy)


def wrapped(hf_model, kind: str, policy: str) -> PreftModel:
    """A PreftModel with two non-trivial adapters ``a`` (rank 4) and ``b`` (rank 2) of ``kind``."""
    model = PreftModel(hf_model)
    for seed, (name, r) in enumerate([("a", 4), ("b", 2)]):
        model.add_adapter(name, random_adapter(model.config, make_config(kind, policy, r), seed=seed))
    return model


def masked_forward_logits(model, prompts, completions, adapter_names, policy):
    """Logits that predict each completion token, from one left-padded masked forward."""
    rows = [p + c for p, c in zip(prompts, completions)]
    longest = max(map(len, rows))
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    attention = torch.zeros_like(ids)
    adapter_mask = torch.zeros(len(rows), longest)
    for i, (p, row) in enumerate(zip(prompts, rows)):
        pad = longest - len(row)
        ids[i, pad:] = torch.tensor(row)
        attention[i, pad:] = 1
        adapted = len(row) if policy == "all" else len(p)
        adapter_mask[i, pad : pad + adapted] = 1
    logits = model(ids, attention_mask=attention, adapter_mask=adapter_mask, adapter_names=adapter_names).logits
    out = []
    for i, (p, row) in enumerate(zip(prompts, rows)):
        pad = longest - len(row)
        # The token at p + j is predicted by the logits at position p + j - 1.
        out.append(logits[i, pad + len(p) - 1 : pad + len(row) - 1])
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["lora", "loreft", "direft"])
@pytest.mark.parametrize("policy", ["prefill", "all"])
def test_masked_forward_equals_incremental_generation(tiny_hf_model, family, kind, policy):
    model = wrapped(tiny_hf_model(family), kind, policy)
    names = ["a", "b", None, "a"]
    gen = generate(model, PROMPTS, names, max_new_tokens=6, return_logits=True)
    assert all(len(t) == 6 for t in gen.token_ids)
    with torch.no_grad():
        teacher = masked_forward_logits(model, PROMPTS, gen.token_ids, names, policy)
    for row, (inc, full) in enumerate(zip(gen.logits, teacher)):
        torch.testing.assert_close(full, inc, atol=ATOL, rtol=0, msg=f"row {row} ({names[row]})")


@pytest.mark.parametrize("kind", ["lora", "direft"])
def test_generation_without_mask_follows_policy_per_row(tiny_hf_model, kind):
    """Mixed policies in one batch: each row behaves as if it were generated alone."""
    model = PreftModel(tiny_hf_model("llama"))
    model.add_adapter("p", random_adapter(model.config, make_config(kind, "prefill"), seed=1))
    model.add_adapter("all", random_adapter(model.config, make_config(kind, "all"), seed=2))
    names = ["p", "all", None, "all"]
    batched = generate(model, PROMPTS, names, max_new_tokens=5, return_logits=True)
    for i, (prompt, name) in enumerate(zip(PROMPTS, names)):
        alone = generate(model, [prompt], name, max_new_tokens=5, return_logits=True)
        assert alone.token_ids[0] == batched.token_ids[i]
        torch.testing.assert_close(alone.logits[0], batched.logits[i], atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["lora", "loreft", "direft"])
def test_prefill_policy_decode_step_is_the_base_model(tiny_hf_model, kind):
    """After prefill, a `prefill` adapter has no effect except through the prompt KV; `all` does."""
    for policy, same in [("prefill", True), ("all", False)]:
        model = PreftModel(tiny_hf_model("qwen3"))
        model.add_adapter("a", random_adapter(model.config, make_config(kind, policy), seed=3))
        prompt = torch.tensor([PROMPTS[0]])
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(prompt, adapter_names="a", past_key_values=cache, use_cache=True)
            base_cache = copy.deepcopy(cache)
            step = torch.tensor([[33]])
            mask = torch.ones(1, prompt.shape[1] + 1, dtype=torch.long)
            adapted = model(step, attention_mask=mask, adapter_names="a", past_key_values=cache, use_cache=True).logits
            base = model(step, attention_mask=mask, adapter_names=None, past_key_values=base_cache, use_cache=True).logits
        assert torch.equal(adapted, base) == same, f"policy {policy}"
        if same:  # and the new KV entries are the base model's too
            for layer in range(len(cache.layers)):
                assert torch.equal(cache.layers[layer].keys, base_cache.layers[layer].keys)


@pytest.mark.parametrize("kind", ["lora", "loreft", "direft"])
def test_first_generated_token_is_adapted_under_prefill(tiny_hf_model, kind):
    """The adapter acts on the last prompt position, so the first token's logits change."""
    model = PreftModel(tiny_hf_model("llama"))
    model.add_adapter("a", random_adapter(model.config, make_config(kind, "prefill"), seed=4, std=0.3))
    adapted = generate(model, PROMPTS, "a", max_new_tokens=1, return_logits=True)
    base = generate(model, PROMPTS, None, max_new_tokens=1, return_logits=True)
    for a, b in zip(adapted.logits, base.logits):
        assert (a - b).abs().max() > 1e-2
    assert any(a != b for a, b in zip(adapted.token_ids, base.token_ids))


def test_reft_first_last_positions_match_generation(tiny_hf_model):
    """pyreft-style f1+l2 positions: the masked forward restricts the edit exactly as generation does."""
    model = PreftModel(tiny_hf_model("mistral"))
    config = ReftConfig(kind="loreft", r=3, positions="f1+l2")
    model.add_adapter("a", random_adapter(model.config, config, seed=5, std=0.3))
    model.add_adapter("every", random_adapter(model.config, ReftConfig(kind="loreft", r=3), seed=5, std=0.3))
    gen = generate(model, PROMPTS, "a", max_new_tokens=4, return_logits=True)
    with torch.no_grad():
        teacher = masked_forward_logits(model, PROMPTS, gen.token_ids, "a", "prefill")
        every = generate(model, PROMPTS, "every", max_new_tokens=4, return_logits=True)
    for inc, full in zip(gen.logits, teacher):
        torch.testing.assert_close(full, inc, atol=ATOL, rtol=0)
    # Row 0 has 7 prompt tokens: positions 1..4 are skipped, so the result must differ from "all".
    assert (every.logits[0][0] - gen.logits[0][0]).abs().max() > 1e-3


def test_prompt_only_adapter_mask_ignores_padding(tiny_hf_model):
    """A mask of 1 on padding must not leak: padded tokens never reach real tokens."""
    model = wrapped(tiny_hf_model("llama"), "lora", "prefill")
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    attention = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        ones = model(ids, attention_mask=attention, adapter_mask=torch.ones(2, 5), adapter_names="a").logits
        real = model(ids, attention_mask=attention, adapter_mask=attention.float(), adapter_names="a").logits
    torch.testing.assert_close(ones[:, 2:], real[:, 2:], atol=0, rtol=0)


def test_kv_cache_is_accepted_under_either_name_without_a_deprecation_warning(tiny_hf_model):
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache``; PreftModel takes both
    and hands the cache to the wrapped model under the name its version expects."""
    import warnings

    from preft.errors import PreftError

    model = wrapped(tiny_hf_model("llama"), "lora", "prefill")
    prompt, step = torch.tensor([PROMPTS[0]]), torch.tensor([[33]])
    mask = torch.ones(1, prompt.shape[1] + 1, dtype=torch.long)
    logits = []
    for name in ("past_key_values", "cache"):
        cache = DynamicCache(config=model.config)
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(prompt, adapter_names="a", use_cache=True, **{name: cache})
            logits.append(model(step, attention_mask=mask, adapter_names="a", use_cache=True, **{name: cache}).logits)
        assert cache.get_seq_length() == prompt.shape[1] + 1  # the model really used the cache it was given
        assert not [w for w in caught if "past_key_values" in str(w.message)], [str(w.message) for w in caught]
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0)
    with pytest.raises(PreftError, match="not both"):
        model(prompt, past_key_values=DynamicCache(config=model.config), cache=DynamicCache(config=model.config))
