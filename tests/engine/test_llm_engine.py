"""The engine against the reference generator (``preft.hf.generate``): greedy tokens equal, log-probs close.

float32 on CPU, tolerance ``LOGPROB_ATOL`` (conftest). Covers every family x adapter kind x policy,
mixed batches, chunked prefill, preemption and prefix-cache hits.
"""

from __future__ import annotations

import pytest

from preft.hf import generate
from tests.engine.conftest import KINDS, POLICIES, adapter_name, assert_matches_reference

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
PROMPTS = [[5, 17, 42, 99, 130, 7, 64, 33, 21], [200, 31, 8], [77, 78, 79, 80, 81, 82, 83, 84, 85, 86, 87, 88, 89]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", POLICIES)
def test_greedy_equals_reference_per_family_kind_policy(family_pair, family, kind, policy):
    llm, ref = family_pair(family)
    name = adapter_name(kind, policy)
    assert_matches_reference(llm, ref, PROMPTS, [name] * len(PROMPTS))
    # The adapter is not a no-op: its tokens differ from the base model's somewhere.
    base = generate(ref, PROMPTS, None, max_new_tokens=6).token_ids
    adapted = generate(ref, PROMPTS, name, max_new_tokens=6).token_ids
    assert base != adapted
