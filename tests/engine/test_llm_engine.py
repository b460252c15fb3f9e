"""The engine against the reference generator (``preft.hf.generate``): greedy tokens equal, log-probs close.

float32 on CPU, tolerance ``LOGPROB_ATOL`` (conftest). Covers every family x adapter kind x policy,
mixed batches, chunked prefill, preemption and prefix-cache hits.
"""

from __future__ import annotations

import pytest
from engine_helpers import KINDS, POLICIES, adapter_config, adapter_name, assert_matches_reference

import preft.engine.attention as attention_module
from preft.engine import LLM, SamplingParams
from preft.hf import generate
from preft.tiny import random_adapter

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
PROMPTS = [[5, 17, 42, 99, 130, 7, 64, 33, 21], [200, 31, 8], [77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_equals_reference_per_family_kind_policy(family_pair, family, kind, policy):
    llm, ref = family_pair(family)
    name = adapter_name(kind, policy)
    assert_matches_reference(llm, ref, PROMPTS, [name] * len(PROMPTS))
    # The adapter is not a no-op: its tokens differ from the base model's somewhere.
    base = generate(ref, PROMPTS, None, max_new_tokens=6).token_ids
    adapted = generate(ref, PROMPTS, name, max_new_tokens=6).token_ids
    assert base != adapted


def mixed_batch():
    """Rows with LoRA (q/v/down and all-linear), DiReFT, LoReFT of ranks 2/4/8, both policies, and base rows."""
    names = [
        adapter_name("lora", "prefill", 2),
        None,
        adapter_name("lora_all", "all", 8),
        adapter_name("direft", "prefill", 8),
        adapter_name("loreft", "all", 2),
        adapter_name("lora", "all", 4),
        None,
        adapter_name("lora_all", "prefill", 4),
        adapter_name("direft", "all", 2),
        adapter_name("loreft", "prefill", 8),
        adapter_name("lora", "prefill", 8),
    ]
    prompts = [[(7 * i + 3 * j) % 250 + 5 for j in range(3 + (5 * i) % 14)] for i in range(len(names))]
    return prompts, names


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("attention", ["default tiles", "small tiles"])
def test_mixed_batch_of_many_adapters_and_base_rows_equals_reference(family_pair, monkeypatch, family, attention):
    if attention == "small tiles":  # many query tiles and key blocks per sequence, so the online softmax spans blocks
        monkeypatch.setattr(attention_module, "Q_TILE", 2)
        monkeypatch.setattr(attention_module, "KEY_BLOCK", 4)
    llm, ref = family_pair(family)
    prompts, names = mixed_batch()
    assert len({n for n in names if n}) > llm.engine.adapters.num_slots  # more adapters than slots: some requests wait
    assert_matches_reference(llm, ref, prompts, names)


@pytest.mark.parametrize("budget", [1, 3, 5, 8])
def test_chunked_prefill_across_block_boundaries_equals_reference(family_pair, monkeypatch, budget):
    llm, ref = family_pair("qwen2")
    monkeypatch.setattr(llm.engine.scheduler, "max_num_batched_tokens", budget)
    prompts, names = mixed_batch()
    steps = []
    original = llm.engine.runner.launch
    monkeypatch.setattr(llm.engine.runner, "launch", lambda batch: steps.append(sum(b.num_new_tokens for b in batch)) or original(batch))
    assert_matches_reference(llm, ref, prompts[:6], names[:6])
    assert max(steps) <= budget


def small_pool_llm(path, ref, names, num_kv_blocks, **kw):
    llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=num_kv_blocks, max_adapter_slots=4, **kw)
    for name in {n for n in names if n}:
        llm.add_adapter(name, ref.get_adapter(name))
    return llm


def test_preemption_by_recompute_equals_reference(family_pair, tiny_checkpoint):
    _, ref = family_pair("llama")
    prompts, names = mixed_batch()
    prompts, names = prompts[:6], names[:6]
    llm = small_pool_llm(tiny_checkpoint("llama"), ref, names, num_kv_blocks=14)
    assert_matches_reference(llm, ref, prompts, names, max_tokens=10)
    assert llm.engine.stats()["num_preemptions"] > 0


def test_sequence_outgrowing_the_whole_pool_finishes_with_length(family_pair, tiny_checkpoint):
    _, ref = family_pair("llama")
    llm = small_pool_llm(tiny_checkpoint("llama"), ref, [], num_kv_blocks=3)
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 12 - 5 + 1  # 3 blocks x 4 tokens of KV, plus the token sampled from the last
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_prefix_cache_hits_only_same_adapter_and_mask(family_pair):
    llm, ref = family_pair("mistral")
    prompt = [(11 * j) % 250 + 5 for j in range(18)]  # 4 full blocks are cacheable
    a, b = adapter_name("lora_all", "prefill", 4), adapter_name("direft", "prefill", 4)
    first = assert_matches_reference(llm, ref, [prompt], [a])[0]
    again = assert_matches_reference(llm, ref, [prompt], [a])[0]
    assert again.metrics["num_cached_tokens"] == 16
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    other = assert_matches_reference(llm, ref, [prompt], [b])[0]
    assert other.metrics["num_cached_tokens"] == 0  # different adapter: no reuse
    base = assert_matches_reference(llm, ref, [prompt], [None])[0]
    assert base.metrics["num_cached_tokens"] == 0  # adapted KV is never base KV
    base_again = assert_matches_reference(llm, ref, [prompt], [None])[0]
    assert base_again.metrics["num_cached_tokens"] == 16


@pytest.mark.parametrize("policy", POLICIES)
def test_multi_turn_prefix_cache_never_reuses_decode_kv(family_pair, policy):
    llm, ref = family_pair("qwen3")
    name = adapter_name("lora", policy, 8)
    turn1 = [(13 * j) % 250 + 5 for j in range(9)]
    answer = assert_matches_reference(llm, ref, [turn1], [name], max_tokens=9)[0].outputs[0].token_ids
    turn2 = turn1 + answer + [40, 41, 42, 43, 44]  # the previous answer comes back inside the next prompt
    out = assert_matches_reference(llm, ref, [turn2], [name])[0]
    # Blocks 0-1 were prompt blocks of turn 1; block 2 straddles prompt and answer, later ones are decode KV.
    assert out.metrics["num_cached_tokens"] == 8
    again = assert_matches_reference(llm, ref, [turn2], [name])[0]
    assert again.metrics["num_cached_tokens"] == (len(turn2) - 1) // 4 * 4


@pytest.mark.parametrize("kind", ["loreft", "direft"])
def test_reft_first_last_positions_equal_reference_across_chunks(family_pair, monkeypatch, kind):
    llm, ref = family_pair("llama")
    adapter = random_adapter(ref.config, adapter_config(kind, "prefill", 4, positions="f2+l3"), seed=77, std=0.5)
    llm.add_adapter("positions", adapter)
    ref.add_adapter("positions", adapter)
    try:
        prompts, _ = mixed_batch()
        names = ["positions", None, "positions", adapter_name("direft", "prefill", 4)]
        assert_matches_reference(llm, ref, prompts[:4], names)
        monkeypatch.setattr(llm.engine.scheduler, "max_num_batched_tokens", 3)  # the last-3 positions fall in later chunks
        assert_matches_reference(llm, ref, prompts[:4], names)
        # The same 13 tokens open a longer prompt: blocks 0-1 (edit mask 1100 0000 either way) are reused,
        # block 2 is not (edited "last 3" tokens 10-11 before, none now).
        assert len(prompts[2]) == 13
        out = assert_matches_reference(llm, ref, [prompts[2] + [9] * 8], ["positions"])[0]
        assert out.metrics["num_cached_tokens"] == 8
    finally:
        llm.remove_adapter("positions")
        ref.remove_adapter("positions")
