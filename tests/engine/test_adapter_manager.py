"""Adapters disk -> host LRU -> device slots: many adapters, few slots; prefill adapters leave decode alone."""

from __future__ import annotations

import pytest
from engine_helpers import adapter_config, adapter_name, assert_matches_reference

import preft.engine.adapter_manager as adapter_manager
from preft.adapters import save_adapter
from preft.engine import LLM, AdapterInUseError, SamplingParams, UnknownAdapterError
from preft.errors import AdapterShapeError, BaseModelMismatchError, PreftError
from preft.hf import generate
from preft.tiny import random_adapter


def test_200_adapters_with_4_slots_all_correct_and_prefill_slots_released_after_prefill(tiny_checkpoint, family_pair, tmp_path):
    _, ref = family_pair("llama")
    llm = LLM(
        tiny_checkpoint("llama"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, max_adapter_slots=4, max_cpu_adapters=16
    )
    kinds = ["lora", "direft", "lora_all", "loreft"]
    names = []
    for i in range(200):
        config = adapter_config(kinds[i % 4], "prefill", r=(2, 4, 8)[i % 3])
        save_adapter(random_adapter(ref.config, config, seed=1000 + i, std=0.3), tmp_path / f"a{i}")
        names.append(f"user{i}")
        llm.add_adapter(names[-1], tmp_path / f"a{i}")
    prompts = [[(3 * i + 5 * j) % 250 + 5 for j in range(2 + i % 11)] for i in range(200)]

    engine = llm.engine
    for i, (prompt, name) in enumerate(zip(prompts, names)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=4, ignore_eos=True), name)
    slots_during_step = []
    launch = engine.runner.launch
    engine.runner.launch = lambda batch: slots_during_step.append(engine.stats()["adapter_slots_used"]) or launch(batch)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        assert engine.stats()["adapter_slots_used"] == 0  # no prompt is longer than one step's budget
        for seq in engine.scheduler.running:
            # A prefill adapter holds its slot exactly while prompt tokens remain to compute.
            assert (seq.slot is not None) == (seq.num_computed_tokens < seq.num_prompt_tokens)
    assert max(slots_during_step) == 4
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["adapter_slots_used"] == 0
    assert stats["cpu_adapter_misses"] > 0  # 200 adapters, 16 in host memory: some were read from disk again

    for i in range(200):
        ref.add_adapter(names[i], engine.adapters._host_get(names[i]))
    expected = []
    for start in range(0, 200, 5):  # the reference computes every used adapter on every row: keep batches small
        expected += generate(ref, prompts[start : start + 5], names[start : start + 5], max_new_tokens=4).token_ids
    for i in range(200):
        assert outputs[str(i)] == expected[i], f"request {i} with adapter {names[i]}"
        ref.remove_adapter(names[i])


@pytest.fixture
def count_adapter_calls(monkeypatch):
    calls = []
    original = adapter_manager.grouped_low_rank
    monkeypatch.setattr(adapter_manager, "grouped_low_rank", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("kinds", [("lora", "direft"), ("lora_all", "loreft")])
def test_decode_of_all_prefill_batch_calls_no_adapter_code(family_pair, count_adapter_calls, kinds):
    llm, _ = family_pair("llama")
    engine = llm.engine
    for i, kind in enumerate(kinds * 2):
        engine.add_request(f"p{i}", [5 + i, 6, 7, 8, 9], SamplingParams(max_tokens=5, ignore_eos=True), adapter_name(kind, "prefill", 4))
    engine.add_request("base", [9, 8, 7], SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()  # prefill of every request
    assert count_adapter_calls, "prefill must apply the adapters"
    count_adapter_calls.clear()
    while engine.has_unfinished_requests():
        engine.step()
    assert not count_adapter_calls, "a decode step of prefill-policy requests called adapter code"


def test_decode_of_all_policy_request_applies_adapter(family_pair, count_adapter_calls):
    llm, _ = family_pair("llama")
    engine = llm.engine
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True), adapter_name("lora", "all", 4))
    engine.step()
    count_adapter_calls.clear()
    while engine.has_unfinished_requests():
        engine.step()
    assert count_adapter_calls  # the baseline does pay for the adapter at decode


def test_same_weights_under_both_policies(family_pair):
    llm, ref = family_pair("qwen2")
    adapter = ref.get_adapter(adapter_name("direft", "all", 4))
    llm.add_adapter("as-prefill", adapter, policy="prefill")
    ref.add_adapter("as-prefill", adapter.with_policy("prefill"))
    try:
        info = {a.name: a for a in llm.list_adapters()}["as-prefill"]
        assert (info.kind, info.policy, info.rank) == ("direft", "prefill", 4)
        assert_matches_reference(llm, ref, [[5, 6, 7, 8], [9, 10]], ["as-prefill", adapter_name("direft", "all", 4)])
    finally:
        llm.remove_adapter("as-prefill")
        ref.remove_adapter("as-prefill")


def test_bad_adapters_are_refused_with_clear_errors(family_pair, tiny_checkpoint):
    llm, ref = family_pair("llama")
    with pytest.raises(UnknownAdapterError, match="unknown adapter 'nobody'"):
        llm.generate([[5, 6]], adapter="nobody", use_tqdm=False)
    _, qwen3 = family_pair("qwen3")
    other = random_adapter(qwen3.config, adapter_config("lora", "prefill"), seed=0)
    with pytest.raises((BaseModelMismatchError, AdapterShapeError)):
        llm.add_adapter("wrong-model", other)
    with pytest.raises(Exception, match="already registered"):
        llm.add_adapter(adapter_name("lora", "all", 4), ref.get_adapter(adapter_name("lora", "all", 4)))
    assert llm.engine.stats()["kv_blocks_used"] == 0


def test_remove_adapter_in_use_names_the_requests(family_pair):
    llm, ref = family_pair("mistral")
    engine = llm.engine
    llm.add_adapter("temp", ref.get_adapter(adapter_name("lora", "all", 2)))
    engine.add_request("r1", [5, 6, 7], SamplingParams(max_tokens=3), "temp")
    with pytest.raises(AdapterInUseError, match="r1"):
        llm.remove_adapter("temp")
    engine.remove_adapter("temp", wait=True)
    assert "temp" not in [a.name for a in llm.list_adapters()]
    while engine.has_unfinished_requests():
        engine.step()
    assert "temp" not in engine.adapters.entries
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["adapter_slots_used"] == 0


def test_adapter_lifecycle_users_and_pending_removal_live_in_the_adapter_manager(family_pair):
    llm, ref = family_pair("mistral")
    engine, manager = llm.engine, llm.engine.adapters
    llm.add_adapter("temp2", ref.get_adapter(adapter_name("direft", "prefill", 2)))
    engine.add_request("a", [5, 6, 7], SamplingParams(max_tokens=20, ignore_eos=True), "temp2")
    engine.add_request("b", [5, 6], SamplingParams(max_tokens=20, ignore_eos=True, n=2), "temp2")
    assert manager.users["temp2"] == {"a", "b"}
    engine.remove_adapter("temp2", wait=True)
    with pytest.raises(PreftError, match="'temp2' is being removed"):
        engine.add_request("c", [5], SamplingParams(), "temp2")
    engine.step()
    engine.abort_request("a")
    assert "temp2" in manager.entries and manager.users["temp2"] == {"b"}
    engine.stop_sequence("b", 0)
    assert "temp2" in manager.entries  # completion 1 of 'b' still runs
    engine.stop_sequence("b", 1)  # its last completion: the adapter goes with it
    assert "temp2" not in manager.entries and "temp2" not in manager.users and not manager.pending_removal
    assert not engine.has_unfinished_requests()
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["adapter_slots_used"] == 0


def test_base_requests_start_while_adapter_requests_wait_for_a_slot(family_pair, tiny_checkpoint):
    _, ref = family_pair("llama")
    busy, waiting = adapter_name("lora", "all", 4), adapter_name("direft", "prefill", 2)
    llm = LLM(tiny_checkpoint("llama"), dtype="float32", device="cpu", block_size=4, num_kv_blocks=64, max_adapter_slots=1)
    for name in (busy, waiting):
        llm.add_adapter(name, ref.get_adapter(name))
    engine = llm.engine
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    engine.add_request("busy", [5, 6, 7], params, busy)  # an `all` adapter holds the only slot until it finishes
    engine.add_request("waiting", [8, 9], params, waiting)
    engine.add_request("later", [10, 11], params, busy)  # shares the resident adapter, but queues behind "waiting"
    engine.add_request("base", [12, 13], params)
    first_token_step: dict[str, int] = {}
    outputs = {}
    step = 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            first_token_step.setdefault(out.request_id, step)
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
    assert first_token_step["base"] == 1 and first_token_step["busy"] == 1
    assert first_token_step["waiting"] > first_token_step["busy"] + 6  # after "busy" released the slot
    assert first_token_step["later"] > first_token_step["waiting"]  # FCFS among adapter requests
    expected = generate(ref, [[5, 6, 7], [8, 9], [10, 11], [12, 13]], [busy, waiting, busy, None], max_new_tokens=8).token_ids
    assert [outputs[r] for r in ("busy", "waiting", "later", "base")] == expected
    assert engine.stats()["kv_blocks_used"] == 0
