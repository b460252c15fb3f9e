"""The KV pool: sized from the model, max_num_seqs and max_model_len; --kv-cache-memory-bytes overrides it;
untouched pages cost no memory."""

from __future__ import annotations

import argparse

import pytest
import torch

from preft.cli import main
from preft.engine import LLM, SamplingParams, llm_engine
from preft.engine.llm_engine import parse_memory_size
from preft.engine.model import load_config
from preft.engine.model_runner import kv_block_bytes, lazy_zeros
from preft.errors import PreftError

BLOCK = 16


def block_bytes(path) -> int:
    return kv_block_bytes(load_config(path), BLOCK, torch.float32)


def pool(llm: LLM) -> int:
    return llm.engine.block_manager.num_blocks


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_cpu_pool_holds_max_num_seqs_sequences_of_max_model_len(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", max_num_seqs=3, max_model_len=100)
    assert pool(llm) == 3 * 7  # ceil(100 / 16) blocks per sequence
    assert llm.engine.runner.kv_cache.shape[2] == 3 * 7 + 1  # plus the scratch block


def test_cpu_pool_is_capped_by_the_budget(tiny_checkpoint, monkeypatch, caplog):
    path = tiny_checkpoint("llama")
    monkeypatch.setattr(llm_engine, "CPU_KV_BUDGET_BYTES", 20 * block_bytes(path))
    assert pool(LLM(path, dtype="float32", device="cpu", max_num_seqs=64, max_model_len=160)) == 20
    assert "fewer than max_model_len" not in caplog.text
    assert pool(LLM(path, dtype="float32", device="cpu", max_num_seqs=64, max_model_len=512)) == 20
    assert "holds 320 tokens, fewer than max_model_len=512" in caplog.text  # said, not silently truncated


def test_kv_cache_memory_bytes_sets_the_pool(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    per_block = block_bytes(path)
    llm = LLM(path, dtype="float32", device="cpu", max_num_seqs=1, max_model_len=64, kv_cache_memory_bytes=100 * per_block + 5)
    assert pool(llm) == 100  # more than max_num_seqs * max_model_len would ask for: the flag wins
    assert pool(LLM(path, dtype="float32", device="cpu", max_model_len=64, kv_cache_memory_bytes="1MiB")) == (1 << 20) // per_block


def test_kv_cache_memory_bytes_too_small_for_max_model_len_is_a_clear_error(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    with pytest.raises(PreftError, match=r"kv_cache_memory_bytes=.*fewer than max_model_len=512.*lower max_model_len"):
        LLM(path, dtype="float32", device="cpu", max_model_len=512, kv_cache_memory_bytes=4 * block_bytes(path))
    with pytest.raises(PreftError, match="not a number of bytes"):
        LLM(path, dtype="float32", device="cpu", kv_cache_memory_bytes="lots")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("3000", 3000),
        (4096, 4096),
        ("512MiB", 512 << 20),
        ("1.5GiB", 3 << 29),
        ("2G", 2 * 10**9),
        ("4GB", 4 * 10**9),
        ("64k", 64000),
        ("2e9", 2 * 10**9),
    ],
)
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "12 parsecs", "-5", "0", "0MiB"])
def test_parse_memory_size_refuses_nonsense(text):
    with pytest.raises(PreftError):
        parse_memory_size(text)


def test_an_unused_pool_costs_no_resident_memory(tiny_checkpoint):
    before = rss_bytes()
    llm = LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", max_model_len=64, kv_cache_memory_bytes="1GiB")
    assert rss_bytes() - before < 100 << 20  # zero-filling the pool would add 1 GiB
    cache = llm.engine.runner.kv_cache
    assert cache.numel() * cache.element_size() >= 1 << 30
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4
    assert rss_bytes() - before < 100 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lazy_zeros_are_zeros(dtype):
    x = lazy_zeros((3, 5, 7), dtype)
    assert x.dtype == dtype and x.shape == (3, 5, 7) and not x.any()
    x += 1
    assert bool((x == 1).all())


def test_generate_flag_reaches_the_engine(tiny_checkpoint, capsys):
    path = str(tiny_checkpoint("llama"))
    args = ["generate", path, "--prompt", "hi", "--max-tokens", "2", "--device", "cpu", "--max-model-len", "512"]
    assert main([*args, "--kv-cache-memory-bytes", "1MiB"]) == 0
    assert main([*args, "--kv-cache-memory-bytes", "1KiB"]) == 2
    assert "fewer than max_model_len=512" in capsys.readouterr().out


def test_serve_and_bench_flags_reach_the_engine(monkeypatch):
    import preft.engine
    from preft.bench import cli as bench_cli
    from preft.server import cli as server_cli

    seen = {}

    class Stop(Exception):
        pass

    def fake_llm(config, **kwargs):  # the server passes one EngineConfig
        seen.update(vars(config), **kwargs)
        raise Stop

    parser = argparse.ArgumentParser()
    server_cli.add_arguments(parser)
    args = parser.parse_args(["some/model", "--kv-cache-memory-bytes", "3GiB"])
    monkeypatch.setattr(preft.engine, "LLM", fake_llm)
    with pytest.raises(Stop):
        server_cli.build_state(args)
    assert seen["kv_cache_memory_bytes"] == "3GiB"

    parser = argparse.ArgumentParser()
    bench_cli.add_arguments(parser)
    cfg = bench_cli.config_from_args(parser.parse_args(["--kv-cache-memory-bytes", "512MiB"]))
    assert cfg.kv_cache_memory_bytes == "512MiB"
