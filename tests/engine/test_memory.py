"""GPU KV sizing (vLLM's rule) from a profiled worst-case step, checked on CPU with fake device numbers; warm-up."""

from __future__ import annotations

import logging

import pytest
import torch

from preft.engine import LLM, SamplingParams, llm_engine, memory
from preft.engine.memory import MemoryProfile, adapted_step, kv_cache_bytes, profile_adapters, profile_cuda_memory
from preft.engine.model import load_model
from preft.engine.model_runner import kv_block_bytes
from preft.errors import PreftError

GiB = 1 << 30


def test_kv_cache_bytes_is_the_fraction_of_the_whole_gpu_minus_the_profiled_peak():
    profile = MemoryProfile(total=80 * GiB, peak_allocated=20 * GiB, non_torch=GiB, num_tokens=2048)
    assert kv_cache_bytes(profile, 0.9) == int(0.9 * 80 * GiB) - 21 * GiB
    assert kv_cache_bytes(profile, 0.5) == 19 * GiB


def test_kv_cache_bytes_names_the_numbers_when_nothing_is_left():
    profile = MemoryProfile(total=16 * GiB, peak_allocated=14 * GiB, non_torch=GiB // 2, num_tokens=2048)
    with pytest.raises(PreftError) as error:
        kv_cache_bytes(profile, 0.9)
    message = str(error.value)
    for number in ("gpu_memory_utilization=0.9", "16.00 GiB", "allows 14.40 GiB", "2048 tokens", "14.00 GiB", "0.50 GiB"):
        assert number in message
    assert "raise gpu_memory_utilization" in message
    with pytest.raises(PreftError, match="less than one 4096-byte block"):
        kv_cache_bytes(MemoryProfile(16 * GiB, int(0.9 * 16 * GiB) - 100, 0, 8), 0.9, min_bytes=4096)
    with pytest.raises(PreftError, match=r"in \(0, 1\]"):
        kv_cache_bytes(profile, 1.5)


def test_profiled_step_runs_every_token_through_every_adapter_and_a_long_context(tiny_checkpoint, monkeypatch):
    model = load_model(tiny_checkpoint("qwen3"), torch.float32, "cpu")
    adapters = profile_adapters(model, max_adapter_slots=4)
    stacks = adapters.manager.lora_stacks
    assert {module for _, module in stacks} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert all(s.down.shape[:2] == (4, memory.PROFILE_ADAPTER_RANK) for s in stacks.values())  # full-size stacks
    assert len(adapters.manager.reft_stacks) == model.config.num_hidden_layers
    seen = []
    forward = type(model).forward
    monkeypatch.setattr(
        type(model), "forward", lambda self, ids, pos, kv, meta, a: seen.append((ids, kv, meta, a)) or forward(self, ids, pos, kv, meta, a)
    )
    scratch = adapted_step(model, num_tokens=40, context_len=24, num_logit_rows=3, block_size=4, adapters=adapters)
    ids, kv, meta, batch = seen[0]
    assert ids.numel() == 40 and meta.cu_query_lens.tolist() == [0, 24, 40] and meta.context_lens.tolist() == [24, 24]  # chunks <= context
    assert scratch == kv.numel() * kv.element_size() and kv.shape[2] == 6  # 24 keys of 4-token blocks
    assert bool((batch.lora_slot == adapters.lora_slot).all()) and bool((batch.reft_slot == adapters.reft_slot).all())
    adapted_step(model, num_tokens=8, context_len=24, num_logit_rows=1, block_size=4, adapters=adapters)
    _, kv, meta, _ = seen[1]
    assert kv.shape[2] == 2 and meta.block_tables.shape[1] == 6 and meta.context_lens.tolist() == [24]  # long context, small scratch


def test_profile_cuda_memory_reports_peak_without_the_scratch_cache(tiny_checkpoint, monkeypatch):
    """The CUDA measuring code, run on CPU with PyTorch's CUDA memory functions faked."""
    model = load_model(tiny_checkpoint("llama"), torch.float32, "cpu")
    calls = []
    fake = {
        "synchronize": lambda device=None: calls.append("sync"),
        "empty_cache": lambda: calls.append("empty_cache"),
        "reset_peak_memory_stats": lambda device=None: calls.append("reset"),
        "max_memory_allocated": lambda device=None: 30 * GiB,
        "mem_get_info": lambda device=None: (40 * GiB, 80 * GiB),
        "memory_reserved": lambda device=None: 32 * GiB,
    }
    for name, function in fake.items():
        monkeypatch.setattr(torch.cuda, name, function)
    profile = profile_cuda_memory(model, max_num_batched_tokens=20, max_model_len=32, max_num_seqs=4, block_size=16, max_adapter_slots=2)
    scratch = 2 * model.config.num_hidden_layers * 32 * model.config.num_key_value_heads * 16 * 4  # 32 tokens of float32 KV
    assert profile == MemoryProfile(total=80 * GiB, peak_allocated=30 * GiB - scratch, non_torch=8 * GiB, num_tokens=20)
    assert calls[:3] == ["sync", "empty_cache", "reset"] and calls[-1] == "empty_cache"  # measured from a clean allocator


def test_cuda_pool_is_sized_from_the_profile(tiny_checkpoint, monkeypatch, caplog):
    llm = LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", max_model_len=64, max_num_batched_tokens=128)
    engine = llm.engine
    per_block = kv_block_bytes(engine.config, engine.block_size, torch.float32)
    profiled = []

    def fake_profile(model, max_num_batched_tokens, max_model_len, max_num_seqs, block_size, max_adapter_slots, max_lora_rank):
        profiled.append((max_num_batched_tokens, max_model_len, max_num_seqs, block_size, max_adapter_slots, max_lora_rank))
        return MemoryProfile(total=1000 * per_block, peak_allocated=500 * per_block, non_torch=100 * per_block, num_tokens=128)

    monkeypatch.setattr(llm_engine, "profile_cuda_memory", fake_profile)
    engine.device = torch.device("cuda")  # only the sizing branch looks at it here
    assert engine._default_num_blocks(0.9, 5, None, 128, 3, 32) == 300
    assert profiled == [(128, 64, 5, 16, 3, 32)]  # adapter slots reserved at max_lora_rank
    with caplog.at_level(logging.WARNING):
        assert engine._default_num_blocks(0.601, 5, None, 128, 3) == 1  # one block: fewer tokens than max_model_len=64, said
    assert "holds 16 tokens, fewer than max_model_len=64" in caplog.text
    with pytest.raises(PreftError, match="no GPU memory left for the KV cache"):
        engine._default_num_blocks(0.6, 5, None, 128, 3)
    assert engine._default_num_blocks(0.9, 5, 7 * per_block, 128, 3) == 7  # kv_cache_memory_bytes: no profile
    assert len(profiled) == 3


def test_warm_up_leaves_nothing_behind(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("qwen2"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64)
    engine = llm.engine
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    before = llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0].outputs[0].token_ids
    empty = engine.stats()
    engine.warm_up()
    assert not engine.requests and not engine.has_unfinished_requests() and not engine.list_adapters()
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["adapter_slots_used"] == 0
    assert {k: stats[k] for k in ("prompt_tokens", "generation_tokens", "prefix_cache_hits", "prefix_cache_queries")} == {
        "prompt_tokens": 0, "generation_tokens": 0, "prefix_cache_hits": 0, "prefix_cache_queries": 0,
    }  # fmt: skip
    assert empty["prompt_tokens"] > 0  # the counters did count before
    assert llm.generate([[5, 6, 7, 8, 9]], params, use_tqdm=False)[0].outputs[0].token_ids == before


def test_cpu_engine_does_not_warm_up(tiny_checkpoint, monkeypatch):
    def fail(self):
        raise AssertionError("warm_up ran on CPU")

    monkeypatch.setattr(llm_engine.LLMEngine, "warm_up", fail)
    LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", num_kv_blocks=8)


def test_adapters_above_max_lora_rank_are_refused_and_the_warm_up_covers_every_rank_tile(tiny_checkpoint):
    from preft.adapters import LoraConfig
    from preft.engine.memory import kernel_warm_up_ranks
    from preft.tiny import random_adapter

    llm = LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=16, max_lora_rank=8)
    config = llm.engine.config
    llm.add_adapter("fits", random_adapter(config, LoraConfig(r=8, target_modules=["q_proj"]), seed=0))
    with pytest.raises(PreftError, match=r"adapter 'wide' has rank 9 > --max-lora-rank 8"):
        llm.add_adapter("wide", random_adapter(config, LoraConfig(r=9, target_modules=["q_proj"]), seed=0))
    assert [a.name for a in llm.list_adapters()] == ["fits"]
    # The Triton kernels tile the rank in 16, 32 or 64 (next power of two, clamped): a warm-up rank per tile used,
    # never wider than max_lora_rank (the profile reserved that much).
    assert kernel_warm_up_ranks(8) == [8]
    assert kernel_warm_up_ranks(17) == [16, 17]
    assert kernel_warm_up_ranks(64) == [16, 32, 64]
    assert kernel_warm_up_ranks(512) == [16, 32, 64]
