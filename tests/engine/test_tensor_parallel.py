"""Tensor parallelism on CPU (gloo): 2 ranks give the same greedy tokens as 1, adapters included; a dead rank ends the engine.

Each 2-rank engine spawns one worker process; every test has a timeout, so a hang fails instead of blocking CI.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading

import pytest
import torch
from transformers import AutoConfig

from preft.adapters import LoraConfig, ReftConfig
from preft.engine import LLM, SamplingParams
from preft.engine.parallel import TensorParallelError, check_tensor_parallel, shard_lora
from preft.errors import PreftError
from preft.tiny import random_adapter

pytestmark = pytest.mark.timeout(180, method="thread")  # "thread": also ends a hang inside a C++ collective

# Small KV pool and step budget: prompts are prefilled in chunks and running sequences get preempted.
ENGINE = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=14, max_num_batched_tokens=8, max_adapter_slots=2)
PROMPTS = [list(range(1, 15)), [5, 6, 7, 8, 9, 10, 11, 12, 13], [9, 8, 7, 6, 5, 4, 3, 2, 1, 9, 8], [3] * 13, [40, 41, 42, 43, 44, 45]]
ADAPTERS = [None, "lora-p", "lora-all", "direft-p", "lora-p"]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


def adapters_for(config) -> dict:
    return {
        "lora-p": random_adapter(config, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", policy="prefill"), seed=1, std=0.3),
        "lora-all": random_adapter(config, LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", policy="all"), seed=2, std=0.3),
        "direft-p": random_adapter(config, ReftConfig(kind="direft", r=4, policy="prefill"), seed=3, std=0.3),
    }


@pytest.fixture(scope="module")
def engines(tiny_checkpoint):
    """``engines(family) -> (one-rank LLM, two-rank LLM)`` over the same tiny checkpoint, each holding the same adapters."""
    built: dict[str, tuple[LLM, LLM]] = {}

    def get(family: str):
        if family not in built:
            path = tiny_checkpoint(family)
            pair = (LLM(path, **ENGINE), LLM(path, tensor_parallel_size=2, **ENGINE))
            for llm in pair:
                for name, adapter in adapters_for(AutoConfig.from_pretrained(path)).items():
                    llm.add_adapter(name, adapter)
            built[family] = pair
        return built[family]

    yield get
    for _, sharded in built.values():
        sharded.engine.close()


def token_ids(llm: LLM, adapters: list[str | None]) -> list[list[int]]:
    outs = llm.generate(PROMPTS[: len(adapters)], GREEDY, adapter=adapters, use_tqdm=False)
    return [out.outputs[0].token_ids for out in outs]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_two_ranks_give_one_ranks_greedy_tokens_for_a_mixed_batch_with_chunked_prefill_and_preemption(engines, family):
    single, sharded = engines(family)
    expected = token_ids(single, ADAPTERS)
    before = sharded.engine.scheduler.num_preemptions
    assert token_ids(sharded, ADAPTERS) == expected
    assert sharded.engine.scheduler.num_preemptions > before, "the KV pool was meant to run out (preemption not exercised)"
    stats = sharded.engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["adapter_slots_used"] == 0


def test_adapters_loaded_and_unloaded_while_serving_match_one_rank(engines, tiny_checkpoint):
    single, sharded = engines("llama")
    config = AutoConfig.from_pretrained(tiny_checkpoint("llama"))
    late = {
        "late-lora": random_adapter(config, LoraConfig(r=2, lora_alpha=4, target_modules=["o_proj", "down_proj"]), seed=7, std=0.5),
        "late-direft": random_adapter(config, ReftConfig(kind="direft", r=2, policy="all"), seed=8, std=0.5),
    }
    for llm in (single, sharded):
        for name, adapter in late.items():
            llm.add_adapter(name, adapter)
    mixed = ["late-lora", "lora-p", "late-direft", None]  # three adapters, two slots: slots are evicted and rewritten
    assert token_ids(sharded, mixed) == token_ids(single, mixed)
    for llm in (single, sharded):
        llm.remove_adapter("late-lora")
        llm.add_adapter("late-lora", random_adapter(config, LoraConfig(r=4, lora_alpha=4, target_modules="all-linear"), seed=9, std=0.5))
    assert token_ids(sharded, mixed) == token_ids(single, mixed)  # the new factors, not the old ones, on every rank
    for llm in (single, sharded):
        for name in late:
            llm.remove_adapter(name)


def test_a_killed_rank_ends_the_engine_with_an_error_naming_it(tiny_checkpoint):
    llm = LLM(tiny_checkpoint("llama"), tensor_parallel_size=2, **ENGINE)
    try:
        assert len(token_ids(llm, [None])[0]) == GREEDY.max_tokens
        worker = llm.engine.parallel.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=30)
        with pytest.raises(TensorParallelError, match=r"worker died: rank 1 \(pid \d+, exit code -9\)"):
            token_ids(llm, [None])
    finally:
        llm.engine.close()
    assert not worker.is_alive()


def test_a_rank_that_dies_before_joining_the_group_is_reported_at_once(tiny_checkpoint, monkeypatch):
    """Joining the process group blocks in C++; rank 0 still notices the dead worker instead of waiting for the timeout."""
    from preft.engine import parallel

    wait = parallel.TensorParallel.wait

    def wait_then_kill(self, expected, *args, **kwargs):
        wait(self, expected, *args, **kwargs)
        if expected == "started":  # the worker is about to join: kill it first
            os.kill(self.procs[0].pid, signal.SIGKILL)
            self.procs[0].join(timeout=30)

    monkeypatch.setattr(parallel.TensorParallel, "wait", wait_then_kill)
    assert parallel.COLLECTIVE_TIMEOUT_S > 180  # waiting for the group's timeout would outlast the test's
    with pytest.raises(TensorParallelError, match=r"worker died: rank 1 \(pid \d+, exit code -9\)"):
        LLM(tiny_checkpoint("llama"), tensor_parallel_size=2, **ENGINE)


def test_a_size_that_does_not_divide_the_heads_is_refused_naming_the_sizes_that_would(tiny_checkpoint):
    with pytest.raises(
        PreftError, match=r"tensor_parallel_size 3 does not divide the model's 4 attention heads, 2 KV heads .*sizes that would: 1, 2"
    ):
        LLM(tiny_checkpoint("llama"), tensor_parallel_size=3, **ENGINE)
    check_tensor_parallel(AutoConfig.from_pretrained(tiny_checkpoint("llama")), 2)  # divides: no error


def test_row_parallel_lora_partial_products_sum_to_the_whole_delta():
    torch.manual_seed(0)
    a, b, x = torch.randn(4, 12), torch.randn(6, 4), torch.randn(3, 12)
    parts = [shard_lora("down_proj", a, b, rank, 2) for rank in range(2)]
    partial = sum(x.chunk(2, dim=1)[rank] @ pa.T @ pb.T for rank, (pa, pb) in enumerate(parts))
    torch.testing.assert_close(partial, x @ a.T @ b.T)
    column = [shard_lora("q_proj", a, b, rank, 2) for rank in range(2)]
    torch.testing.assert_close(torch.cat([x @ pa.T @ pb.T for pa, pb in column], dim=1), x @ a.T @ b.T)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the engine thread ends by raising
def test_a_killed_rank_fails_the_servers_requests_and_stops_the_server(tiny_checkpoint):
    from preft.server.engine_loop import EngineLoop, RequestFailed

    llm = LLM(tiny_checkpoint("llama"), tensor_parallel_size=2, **ENGINE)
    loop = EngineLoop(llm)
    stop_server = threading.Event()
    loop.on_crash = stop_server.set  # ``preft serve`` sends itself SIGTERM here
    loop.start()

    async def request() -> object:
        sink: asyncio.Queue = asyncio.Queue()
        await loop.submit("r1", [1, 2, 3], GREEDY, None, sink)
        while True:
            item = await asyncio.wait_for(sink.get(), timeout=60)
            if isinstance(item, RequestFailed) or item.finished:
                return item

    try:
        os.kill(llm.engine.parallel.procs[0].pid, signal.SIGKILL)
        llm.engine.parallel.procs[0].join(timeout=30)
        assert isinstance(asyncio.run(request()), RequestFailed)
        assert stop_server.wait(timeout=30)
        assert "tensor-parallel worker died: rank 1" in loop.error
    finally:
        loop.shutdown()
        llm.engine.close()
    assert not loop.alive
