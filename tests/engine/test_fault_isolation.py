"""One request's failure ends that request only; every other request gets exactly the tokens it gets alone (DESIGN §6)."""

from __future__ import annotations

import shutil

import pytest
import torch

from preft.adapters import LoraConfig, ReftConfig, save_adapter
from preft.engine import LLM, SamplingParams
from preft.engine.sampler import Sampler
from preft.tiny import random_adapter

PROMPTS = {"base-a": [5, 6, 7, 8, 9], "base-b": [11, 12, 13], "lora": [20, 21, 22, 23], "reft": [30, 31]}
ADAPTER_OF = {"base-a": None, "base-b": None, "lora": "lora", "reft": "reft"}


@pytest.fixture(params=[False, True], ids=["sync", "async"])
def llm(tiny_checkpoint, request):
    """Both scheduling modes: under asynchronous scheduling a failure is found one step late (tests/engine/test_async_scheduling.py)."""
    llm = LLM(
        tiny_checkpoint("llama"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64, max_adapter_slots=4,
        async_scheduling=request.param,
    )  # fmt: skip
    config = llm.engine.config
    llm.add_adapter("lora", random_adapter(config, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=1, std=0.3))
    llm.add_adapter("reft", random_adapter(config, ReftConfig(kind="direft", r=2), seed=2, std=0.3))
    llm.add_adapter("poisoned", random_adapter(config, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), seed=3, std=0.3))
    return llm


def run(llm, requests: dict[str, tuple[list[int], SamplingParams, str | None]]) -> dict:
    """Drive the engine until every request ended; request id -> (tokens of each choice, finish reasons, error)."""
    engine = llm.engine
    for request_id, (prompt, params, adapter) in requests.items():
        engine.add_request(request_id, prompt, params, adapter)
    last = {}
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            last[out.request_id] = out
    assert not engine.has_unfinished_requests(), "the engine did not finish its requests"
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["adapter_slots_used"] == 0, "a failure leaked KV blocks or slots"
    return {rid: ([c.token_ids for c in o.outputs], [c.finish_reason for c in o.outputs], o.error) for rid, o in last.items()}


def good_requests(seed: int | None = None) -> dict:
    params = SamplingParams(max_tokens=6, temperature=0.0 if seed is None else 0.8, seed=seed, ignore_eos=True, n=1 if seed is None else 2)
    return {rid: (prompt, params, ADAPTER_OF[rid]) for rid, prompt in PROMPTS.items()}


def alone(llm, requests: dict) -> dict:
    return {rid: run(llm, {rid: request})[rid] for rid, request in requests.items()}


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded-n2"])
def test_non_finite_logits_from_one_adapter_fail_that_request_only(llm, seed):
    good = good_requests(seed)
    expected = alone(llm, good)
    with torch.no_grad():  # weights that overflow to inf mid-forward (load-time validation would refuse a file like this)
        for tensor in llm.engine.adapters.entries["poisoned"].pinned.tensors.values():
            tensor.mul_(1e30)
    bad = {"bad": ([40, 41, 42], SamplingParams(max_tokens=6, ignore_eos=True), "poisoned")}
    got = run(llm, {**good, **bad})
    tokens, reasons, error = got.pop("bad")
    assert reasons == ["error"] and "non-finite logits" in error and "'poisoned'" in error
    assert got == expected


def test_an_exception_while_sampling_one_request_fails_it_and_rewinds_the_others(llm, monkeypatch):
    good = good_requests(seed=3)
    expected = alone(llm, good)

    class Flaky(Sampler):
        def launch(self, logits, seqs, *args):
            if any(s.request_id == "bad" for s in seqs):
                super().launch(logits, seqs, *args)  # draw for the others first: the rerun must draw the same again
                raise RuntimeError("boom")
            return super().launch(logits, seqs, *args)

    monkeypatch.setattr(llm.engine.runner, "sampler", Flaky())
    got = run(llm, {**good, "bad": ([40, 41], SamplingParams(max_tokens=4, temperature=0.5, seed=1), None)})
    assert got.pop("bad")[1:] == (["error"], "computing this request failed (RuntimeError)")
    assert got == expected


def test_a_tiny_temperature_fails_only_its_request(llm):
    good = good_requests()
    expected = alone(llm, good)
    got = run(llm, {**good, "bad": ([40, 41], SamplingParams(max_tokens=4, temperature=1e-40), None)})
    assert got.pop("bad")[1] == ["error"]
    assert got == expected


def test_adapter_deleted_from_disk_after_host_eviction_fails_only_its_requests(tiny_checkpoint, tmp_path):
    llm = LLM(
        tiny_checkpoint("llama"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64, max_adapter_slots=1, max_cpu_adapters=1
    )
    config = llm.engine.config
    for i, name in enumerate(["keep", "gone"]):
        save_adapter(random_adapter(config, LoraConfig(r=2, target_modules=["q_proj"]), seed=i, std=0.3), tmp_path / name)
        llm.add_adapter(name, tmp_path / name)
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    run(llm, {"warm": ([5, 6], params, "keep")})  # "keep" is in host memory, "gone" was evicted (host cache of 1)
    shutil.rmtree(tmp_path / "gone")
    expected = run(llm, {"keep": ([5, 6, 7], params, "keep"), "base": ([8, 9], params, None)})
    got = run(llm, {"keep": ([5, 6, 7], params, "keep"), "base": ([8, 9], params, None), "gone": ([5, 6], params, "gone")})
    assert got.pop("gone")[1:] == (["error"], "adapter 'gone' can no longer be read from disk (AdapterFormatError); add it again")
    assert got == expected
    assert str(tmp_path) not in str(got)
