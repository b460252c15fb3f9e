"""The engine thread never reads an adapter from disk: runtime loads and evicted adapters are read on worker threads."""

from __future__ import annotations

import asyncio
import threading

from preft.adapters import LoraConfig, save_adapter
from preft.engine import LLM, SamplingParams, adapter_manager
from preft.server.engine_loop import EngineLoop, RequestFailed
from preft.tiny import random_adapter


def test_adapter_reads_for_loads_and_after_eviction_happen_off_the_engine_thread(tiny_model, tmp_path, monkeypatch):
    llm = LLM(tiny_model, dtype="float32", device="cpu", block_size=4, num_kv_blocks=32, max_adapter_slots=1, max_cpu_adapters=1)
    readers: list[str] = []
    read = adapter_manager.load_adapter

    def spy(*args, **kwargs):
        readers.append(threading.current_thread().name)
        return read(*args, **kwargs)

    monkeypatch.setattr(adapter_manager, "load_adapter", spy)
    for i in range(2):
        save_adapter(random_adapter(llm.engine.config, LoraConfig(r=2, target_modules=["q_proj"]), seed=i), tmp_path / f"a{i}")
    loop = EngineLoop(llm)
    loop.start()

    async def scenario() -> list:
        await loop.load_adapter("a0", str(tmp_path / "a0"), None)
        await loop.load_adapter("a1", str(tmp_path / "a1"), None)  # the host cache holds one: a0 leaves it
        assert list(llm.engine.adapters.host) == ["a1"]
        sink: asyncio.Queue = asyncio.Queue()
        await loop.submit("r", [5, 6, 7], SamplingParams(max_tokens=2, ignore_eos=True), "a0", sink)
        items = [await sink.get()]
        while not (isinstance(items[-1], RequestFailed) or items[-1].finished):
            items.append(await sink.get())
        return items

    try:
        items = asyncio.run(scenario())
    finally:
        loop.shutdown()
    assert not isinstance(items[-1], RequestFailed) and items[-1].finished
    assert len(readers) == 3 and "preft-engine" not in readers, readers  # two loads and one read-back
    assert llm.engine.adapters.cpu_misses == 0  # the engine found a0 in host memory: nothing read on its thread
