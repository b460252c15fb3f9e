"""Asynchronous scheduling: step t+1 is launched before step t's sampled ids are collected, with the same results.

On CPU nothing overlaps (the forward runs when launched), but the whole mechanism runs: pending input
tokens read from the last step's sampled ids on the device, stop checks one step late, tokens past a stop
dropped, steps with structured outputs or penalties collected first, and a failed step rolling back the
step launched on top of it. Each test compares against the same engine with ``async_scheduling`` off
(the attribute is read per step, so one engine serves both), float32 on CPU.
"""

from __future__ import annotations

import pytest
import torch
from engine_helpers import VOCAB, adapter_name, assert_matches_reference

from preft.adapters import LoraConfig
from preft.engine import LLM, SamplingParams
from preft.tiny import random_adapter

LOGPROB_ATOL = 1e-4  # float32 CPU; a step's batch differs between the modes, so rows may round differently


class Trace:
    """Records the order of ``launch`` and ``collect`` calls of an engine's runner, and pending input tokens."""

    def __init__(self, engine, monkeypatch):
        self.events: list[str] = []
        self.pending_steps = 0
        launch, collect = engine.runner.launch, engine.runner.collect

        def traced_launch(batch):
            if any(item.end > len(item.seq.token_ids) for item in batch):
                self.pending_steps += 1  # an input token of this step was still on the device
            self.events.append("launch")
            return launch(batch)

        def traced_collect(handle):
            self.events.append("collect")
            return collect(handle)

        monkeypatch.setattr(engine.runner, "launch", traced_launch)
        monkeypatch.setattr(engine.runner, "collect", traced_collect)

    def launches_ahead(self) -> int:
        """How many steps were launched while the step before them was not collected yet."""
        ahead, outstanding = 0, 0
        for event in self.events:
            if event == "launch":
                ahead += outstanding > 0
                outstanding += 1
            else:
                outstanding -= 1
        return ahead


def generate_both(llm, prompts, params, adapters=None):
    """The same requests with ``async_scheduling`` on and off: (async outputs, sync outputs)."""
    engine = llm.engine
    out = {}
    for mode in (True, False):
        engine.async_scheduling = mode
        try:
            out[mode] = llm.generate(prompts, params, adapter=adapters, use_tqdm=False)
        finally:
            engine.async_scheduling = False
        assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["adapter_slots_used"] == 0
    return out[True], out[False]


def assert_same(async_outs, sync_outs):
    for i, (a, s) in enumerate(zip(async_outs, sync_outs)):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in s.outputs], f"request {i}"
        assert [c.finish_reason for c in a.outputs] == [c.finish_reason for c in s.outputs], f"request {i}"
        assert [c.text for c in a.outputs] == [c.text for c in s.outputs], f"request {i}"
        for ca, cs in zip(a.outputs, s.outputs):
            assert (ca.logprobs is None) == (cs.logprobs is None)
            for step_a, step_s in zip(ca.logprobs or [], cs.logprobs or []):
                assert step_a.keys() == step_s.keys()
                assert max(abs(step_a[t] - step_s[t]) for t in step_a) < LOGPROB_ATOL


def test_async_equals_sync_with_many_adapters_sampling_modes_and_stops(family_pair, monkeypatch):
    llm, _ = family_pair("llama")
    names = [
        adapter_name("lora", "prefill", 2),
        None,
        adapter_name("lora_all", "all", 8),
        adapter_name("direft", "prefill", 8),
        adapter_name("loreft", "all", 2),
        None,
        adapter_name("lora_all", "prefill", 4),
    ]
    prompts = [[(7 * i + 3 * j) % 250 + 5 for j in range(3 + (5 * i) % 14)] for i in range(len(names))]
    # A stop token every request is likely to meet early: which token ends a sequence depends on the model.
    params = [
        SamplingParams(max_tokens=12, logprobs=3, ignore_eos=True),
        SamplingParams(max_tokens=9, temperature=0.8, top_p=0.9, seed=11, n=2, ignore_eos=True),
        SamplingParams(max_tokens=1, ignore_eos=True),  # its only token comes from the prefill step
        SamplingParams(max_tokens=12, temperature=1.0, top_k=20, seed=3, min_tokens=4, stop_token_ids=list(range(5, 130))),
        SamplingParams(max_tokens=10, logit_bias={17: 3.0}, stop_token_ids=[17], ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.7, min_p=0.05, seed=5, logprobs=0, ignore_eos=True),
        SamplingParams(max_tokens=2, ignore_eos=True),
    ]
    trace = Trace(llm.engine, monkeypatch)
    got, expected = generate_both(llm, prompts, params, names)
    assert_same(got, expected)
    assert any(c.finish_reason == "stop" for o in expected for c in o.outputs), "no request stopped early: the stop path went untested"
    assert trace.launches_ahead() >= 5, "the engine never launched a step before collecting the one before it"
    assert trace.pending_steps >= 5, "no step read its input tokens from the device"


def test_async_preemption_and_prefix_hits_equal_the_reference(family_pair, tiny_checkpoint):
    _, ref = family_pair("llama")
    names = [adapter_name("lora", "prefill", 2), None, adapter_name("lora_all", "all", 8), adapter_name("direft", "prefill", 8)]
    shared = [9, 8, 7, 6, 5, 4, 3, 2]  # one shared prefix: two blocks of 4, hit by the later requests
    prompts = [shared + [20 + i] * (1 + i) for i in range(len(names))] * 2
    names = names * 2
    llm = LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=18, max_adapter_slots=2)
    llm.engine.async_scheduling = True
    for name in {n for n in names if n}:
        llm.add_adapter(name, ref.get_adapter(name))
    assert_matches_reference(llm, ref, prompts, names, max_tokens=10)
    stats = llm.engine.stats()
    assert stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0


def test_a_sequence_outgrowing_the_pool_keeps_the_token_in_flight(family_pair, tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=3, async_scheduling=True)
    out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length"
    assert len(out.outputs[0].token_ids) == 12 - 5 + 1  # as synchronous: 3 blocks x 4 tokens of KV, plus the last sample


def test_penalties_and_structured_outputs_collect_before_the_next_launch(family_pair, monkeypatch):
    llm, _ = family_pair("qwen2")
    prompts = [[5, 17, 42, 99], [200, 31, 8]]
    params = [
        SamplingParams(max_tokens=8, repetition_penalty=1.5, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(max_tokens=8, structured={"regex": "[ab]{2,6}"}),
    ]
    for p in params:
        trace = Trace(llm.engine, monkeypatch)
        got, expected = generate_both(llm, prompts[:1], [p])
        assert_same(got, expected)
        async_events = trace.events[: len(trace.events) // 2]  # the async run came first
        assert async_events[:6] == ["launch", "collect"] * 3, "a step that needs its tokens on the host overlapped"
        monkeypatch.undo()
    text = got[0].outputs[0].text
    assert 2 <= len(text) <= 6 and set(text) <= {"a", "b"}


def test_a_request_aborted_while_its_step_runs_emits_nothing_more(family_pair):
    llm, _ = family_pair("llama")
    engine = llm.engine
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    alone = llm.generate([[40, 41, 42]], params, use_tqdm=False)[0].outputs[0].token_ids
    engine.async_scheduling = True
    try:
        engine.add_request("keep", [40, 41, 42], params)
        engine.add_request("drop", [50, 51, 52, 53], params)
        seen = {"keep": [], "drop": []}
        for _ in range(3):
            for out in engine.step():
                seen[out.request_id] += out.outputs[0].new_token_ids
        assert engine.inflight is not None and any(s.request_id == "drop" for s in engine.inflight.sampled)
        final = engine.abort_request("drop")
        assert final.finished and final.outputs[0].finish_reason == "abort"
        dropped_at = len(seen["drop"])
        while engine.has_unfinished_requests():
            for out in engine.step():
                assert out.request_id == "keep", "the aborted request produced output after its abort"
                seen["keep"] += out.outputs[0].new_token_ids
    finally:
        engine.async_scheduling = False
    assert seen["keep"] == alone
    assert dropped_at == len(final.outputs[0].token_ids)
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("policy", ["prefill", "all"])
def test_non_finite_logits_in_flight_fail_only_their_request(tiny_checkpoint, policy):
    """A broken adapter's NaN shows when its step is collected, after the next step was launched on top of it:
    that step is rolled back, the failed one rerun per request, and the other requests get exactly their tokens."""
    llm = LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64, max_adapter_slots=4)
    config = llm.engine.config
    llm.add_adapter("good", random_adapter(config, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], policy=policy), seed=1, std=0.3))
    bad = random_adapter(config, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], policy=policy), seed=2, std=0.3)
    llm.add_adapter("bad", bad)
    prompts = {"a": ([5, 6, 7, 8, 9], None), "b": ([11, 12, 13], "good"), "c": ([20, 21, 22, 23], "good"), "x": ([40, 41, 42], "bad")}
    params = SamplingParams(max_tokens=6, temperature=0.9, seed=4, ignore_eos=True)
    engine = llm.engine
    good = {rid: request for rid, request in prompts.items() if rid != "x"}
    expected = {rid: llm.generate([p], params, adapter=a, use_tqdm=False)[0].outputs[0].token_ids for rid, (p, a) in good.items()}
    with torch.no_grad():  # (never used yet, so not in a device slot: the poisoned host copy is what gets loaded)
        for tensor in engine.adapters.entries["bad"].pinned.tensors.values():
            tensor.mul_(1e30)  # overflows to inf mid-forward; the prefill step of "x" fails
    engine.async_scheduling = True
    try:
        for rid, (prompt, adapter) in prompts.items():
            engine.add_request(rid, prompt, params, adapter)
        assert engine.step() == []  # launches the prefill step (which fails, unknown yet)
        launched = engine.runner.launch
        rolled_back = []
        engine.runner.launch = lambda batch: rolled_back.append(batch) or launched(batch)
        last = {out.request_id: out for out in engine.step()}  # launches a decode step on top, then collects the failure
        engine.runner.launch = launched
        # the decode step was launched on top of the failed one and rolled back: its sequences computed again from there
        assert rolled_back and all(item.seq.num_computed_tokens <= item.start for item in rolled_back[0] if not item.seq.is_finished)
        while engine.has_unfinished_requests():
            for out in engine.step():
                last[out.request_id] = out
    finally:
        engine.async_scheduling = False
    failed = [rid for rid, out in last.items() if out.error]
    assert failed == ["x"] and "non-finite logits" in last["x"].error
    assert {rid: out.outputs[0].token_ids for rid, out in last.items() if rid != "x"} == expected
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["adapter_slots_used"] == 0


def test_async_full_logprobs_equal_sync(family_pair):
    llm, _ = family_pair("mistral")
    prompts = [[5, 17, 42, 99, 130, 7], [200, 31, 8]]
    params = SamplingParams(max_tokens=6, ignore_eos=True, logprobs=VOCAB)
    got, expected = generate_both(llm, prompts, params, [adapter_name("direft", "all", 4), None])
    assert_same(got, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_launch_never_waits_for_the_device(tiny_checkpoint):
    """Overlap only happens if ``launch`` returns without syncing: no ``.item()``, no copy from pageable memory, no
    data-dependent shape. Decode steps with prefill adapters, an `all` adapter, seeded sampling and logprobs."""
    import warnings

    llm = LLM(tiny_checkpoint("llama"), dtype="float32", device="cuda", block_size=16, max_adapter_slots=4, async_scheduling=True)
    config = llm.engine.config
    for name, policy in (("p", "prefill"), ("a", "all")):
        llm.add_adapter(name, random_adapter(config, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], policy=policy), seed=1, std=0.1))
    engine = llm.engine
    params = [
        SamplingParams(max_tokens=40, ignore_eos=True),
        SamplingParams(max_tokens=40, temperature=0.8, top_p=0.9, top_k=50, seed=1, ignore_eos=True, logprobs=2),
    ]
    for i in range(8):
        engine.add_request(str(i), [5 + i, 6, 7, 8, 9], params[i % 2], [None, "p", "a", None][i % 4])
    for _ in range(4):  # prefill, then the first decodes (graphs, kernels warm)
        engine.step()
    launch = engine.runner.launch
    syncs = []

    def watched(batch):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                handle = launch(batch)
            syncs.extend(str(w.message) for w in caught if "synchroniz" in str(w.message).lower())
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return handle

    engine.runner.launch = watched
    try:
        for _ in range(10):
            engine.step()
    finally:
        engine.runner.launch = launch
    while engine.has_unfinished_requests():
        engine.step()
    assert not syncs, f"launch synchronised with the device: {syncs[:3]}"


def test_asking_for_asynchronous_scheduling_with_tensor_parallel_is_an_error(tiny_checkpoint):
    from preft.errors import PreftError

    with pytest.raises(PreftError, match="async_scheduling needs tensor_parallel_size=1"):
        LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", tensor_parallel_size=2, async_scheduling=True)
    assert LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", num_kv_blocks=8).engine.async_scheduling is False  # CPU default
