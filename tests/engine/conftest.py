"""Engine fixtures: per family one ``LLM`` and one reference ``PreftModel`` holding the same adapters."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import KINDS, POLICIES, adapter_config, adapter_name
from transformers import AutoModelForCausalLM

from preft.engine import LLM
from preft.hf import PreftModel
from preft.tiny import random_adapter


@pytest.fixture(scope="session")
def family_pair(tiny_checkpoint):
    """``family_pair(family) -> (llm, ref)``: an LLM and a PreftModel sharing adapters of every kind x policy x rank {2, 4, 8}."""
    built = {}

    def get(family: str = "llama"):
        if family not in built:
            path = tiny_checkpoint(family)
            llm = LLM(path, dtype="float32", device="cpu", block_size=4, num_kv_blocks=256, max_adapter_slots=8, max_num_batched_tokens=256)
            ref = PreftModel(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval())
            seed = 0
            for kind in KINDS:
                for policy in POLICIES:
                    for r in (2, 4, 8):
                        adapter = random_adapter(ref.config, adapter_config(kind, policy, r), seed=seed, std=0.3)
                        seed += 1
                        ref.add_adapter(adapter_name(kind, policy, r), adapter)
                        llm.add_adapter(adapter_name(kind, policy, r), adapter)
            built[family] = (llm, ref)
        return built[family]

    get.built = built
    return get


@pytest.fixture(autouse=True)
def shared_engines_end_empty(request):
    """After every test, each shared engine is idle: no request left, KV pool and adapter slots empty."""
    yield
    if "family_pair" not in request.fixturenames:
        return
    for family, (llm, _) in request.getfixturevalue("family_pair").built.items():
        stats = llm.engine.stats()
        assert not llm.engine.has_unfinished_requests(), f"{family} engine still has requests"
        assert stats["kv_blocks_used"] == 0, f"{family} engine leaked {stats['kv_blocks_used']} KV blocks"
        assert stats["adapter_slots_used"] == 0, f"{family} engine leaked adapter slots"
