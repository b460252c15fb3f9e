"""Shared fixtures: tiny random checkpoints of every supported family, built once per session."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from preft.tiny import build_tiny_checkpoint

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """``tiny_checkpoint(family) -> Path`` of a tiny random float32 checkpoint (cached per family)."""
    built = {}

    def get(family: str = "llama"):
        if family not in built:
            built[family] = build_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{family}"), family)
        return built[family]

    return get


@pytest.fixture
def tiny_hf_model(tiny_checkpoint):
    """``tiny_hf_model(family)``: a fresh float32 transformers model in eval mode."""

    def load(family: str = "llama"):
        return AutoModelForCausalLM.from_pretrained(tiny_checkpoint(family), dtype=torch.float32).eval()

    return load
