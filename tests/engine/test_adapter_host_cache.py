"""The host adapter cache is bounded by count and by bytes; an adapter read on a worker thread can still leave it."""

from __future__ import annotations

import torch
from transformers import AutoConfig

from preft.adapters import LoraConfig, load_adapter, save_adapter
from preft.engine.adapter_manager import AdapterManager, adapter_bytes
from preft.tiny import random_adapter


def test_host_cache_keeps_at_most_its_bytes_least_recently_used_first(tiny_checkpoint, tmp_path):
    config = AutoConfig.from_pretrained(tiny_checkpoint("llama"))
    paths = [save_adapter(random_adapter(config, LoraConfig(r=4), seed=i), tmp_path / f"a{i}") for i in range(3)]
    one = adapter_bytes(load_adapter(paths[0]))
    manager = AdapterManager(config, torch.device("cpu"), torch.float32, max_cpu_adapters=64, max_cpu_adapter_bytes=2 * one + one // 2)
    for i, path in enumerate(paths):
        manager.add(f"a{i}", path)
    assert list(manager.host) == ["a1", "a2"] and manager.host_bytes == 2 * one
    manager.release(manager.acquire("a0"))  # a miss: read again, and the least recently used (a1) leaves
    assert list(manager.host) == ["a2", "a0"] and manager.cpu_misses == 1 and manager.host_bytes == 2 * one
    manager.remove("a0")
    assert list(manager.host) == ["a2"] and manager.host_bytes == one


def test_an_adapter_read_elsewhere_with_its_path_is_cached_not_pinned(tiny_checkpoint, tmp_path):
    config = AutoConfig.from_pretrained(tiny_checkpoint("llama"))
    path = save_adapter(random_adapter(config, LoraConfig(r=2), seed=1), tmp_path / "a")
    manager = AdapterManager(config, torch.device("cpu"), torch.float32, max_cpu_adapters=1)
    manager.add("read-elsewhere", load_adapter(path, model_config=config), path=path)
    manager.add("pinned", random_adapter(config, LoraConfig(r=2), seed=2))
    assert manager.entries["read-elsewhere"].pinned is None and manager.entries["read-elsewhere"].info.path == str(path)
    assert manager.entries["pinned"].pinned is not None and list(manager.host) == ["read-elsewhere"]
