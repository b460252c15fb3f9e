"""Fixtures: a tiny checkpoint with saved adapters, and real uvicorn servers on free ports of 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from server_helpers import ADAPTERS
from transformers import AutoConfig

from preft.adapters import LoraConfig, ReftConfig, save_adapter
from preft.tiny import build_tiny_checkpoint, random_adapter


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("server-tiny") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def adapter_root(tiny_model, tmp_path_factory) -> Path:
    """A folder of saved adapters: the four of ``ADAPTERS`` and ``many-00``..``many-31`` (rank 2..5 LoRA/DiReFT, both policies)."""
    root = tmp_path_factory.mktemp("adapters")
    model_config = AutoConfig.from_pretrained(tiny_model)
    for seed, (name, config) in enumerate(ADAPTERS.items()):
        save_adapter(random_adapter(model_config, config, seed=seed + 1, std=0.3), root / name)
    for i in range(32):
        policy = "prefill" if i % 2 == 0 else "all"
        if i % 4 < 2:
            config = LoraConfig(r=2 + i % 4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], policy=policy)
        else:
            config = ReftConfig(kind="direft", r=2 + i % 4, policy=policy)
        save_adapter(random_adapter(model_config, config, seed=100 + i, std=0.3), root / f"many-{i:02d}")
    return root
