"""Grouped padded attention: the groups cover every sequence once, keep padding small, and compute exactly
what one unpadded SDPA call per sequence computes."""

from __future__ import annotations

import random

import pytest
import torch

from preft.engine import attention
from preft.engine.attention import build_metadata, paged_attention, plan_groups

BLOCK = 4


def test_groups_separate_prefill_chunks_from_decodes_and_short_from_long_contexts():
    query_lens = [1, 1, 1, 1, 1, 32, 1]
    context_lens = [300, 40, 290, 50, 45, 64, 296]
    groups = plan_groups(query_lens, context_lens, 16)
    assert sorted(i for g in groups for i in g) == list(range(7))
    assert [5] in groups  # a prefill chunk is not padded together with decodes
    assert {frozenset(g) for g in groups} == {frozenset([5]), frozenset([0, 6, 2]), frozenset([3, 4, 1])}


def test_groups_pad_little_and_a_short_batch_stays_one_group():
    rng = random.Random(0)
    query_lens = [rng.choice([1, 1, 1, 7, 30]) for _ in range(64)]
    context_lens = [q + rng.randint(0, 400) for q in query_lens]
    for group in plan_groups(query_lens, context_lens, 16):
        padded = len(group) * max(query_lens[i] for i in group) * max(-(-context_lens[i] // 16) * 16 for i in group)
        real = sum(query_lens[i] * -(-context_lens[i] // 16) * 16 for i in group)
        assert len(group) == 1 or padded <= attention.GROUP_PADDING_RATIO * real + attention.GROUP_SLACK_SCORES
    assert len(plan_groups([1] * 64, [33 + i % 15 for i in range(64)], 16)) == 1  # all within the same 3 blocks


@pytest.mark.parametrize("window", [None, 5])
def test_grouped_attention_equals_one_call_per_sequence(window):
    torch.manual_seed(0)
    rng = random.Random(1)
    heads, kv_heads, head_dim, num_blocks = 4, 2, 8, 200
    k_cache, v_cache = torch.randn(2, num_blocks, BLOCK, kv_heads, head_dim).unbind(0)
    query_lens = [1, 1, 9, 1, 3, 1, 1, 17, 1]
    context_lens = [q + rng.randint(0, 60) for q in query_lens]
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(-(-c // BLOCK))] for c in context_lens]
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    q = torch.randn(sum(query_lens), heads, head_dim)
    slots = torch.zeros(sum(query_lens), dtype=torch.long)  # not used by attention itself
    meta = build_metadata(slots, starts, query_lens, context_lens, tables, BLOCK, window)
    assert len(meta.padded) > 1
    grouped = paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5)
    meta.padded = None  # the reference: one SDPA call per sequence, nothing padded
    per_sequence = paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5)
    assert (grouped - per_sequence).abs().max().item() < 1e-5
