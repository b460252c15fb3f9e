"""The PyTorch varlen paged attention (CPU, and the CUDA fallback) equals the reference on every case of ``CASES``,
with the default tiles and with tiny ones (many query tiles and key blocks per sequence); its plan pads nothing to the
longest context, and the dispatcher falls back from a failing Triton kernel once, loudly."""

from __future__ import annotations

import logging
import types

import numpy as np
import pytest
import torch
from attention_reference import CASES, TOLERANCE, Case, max_error, random_step, reference_paged_attention

from preft.engine import attention
from preft.engine.attention import build_metadata, paged_attention, plan_tiles, torch_paged_attention


def torch_attention(q, k_cache, v_cache, case: Case, tables):
    meta = build_metadata(
        torch.zeros(q.shape[0], dtype=torch.int32), list(case.query_lens), list(case.context_lens), tables, case.sliding_window
    )
    return torch_paged_attention(q, k_cache, v_cache, meta, case.head_dim**-0.5)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("tiles", ["default", "tiny"])
def test_torch_paged_attention_matches_reference(monkeypatch, case, tiles):
    if tiles == "tiny":  # KEY_BLOCK below the block size rounds up to one cache block (4 or 8 keys)
        monkeypatch.setattr(attention, "Q_TILE", 4)
        monkeypatch.setattr(attention, "KEY_BLOCK", 1)
    assert max_error(case, torch_attention) <= TOLERANCE[case.dtype]


def test_each_tile_reads_only_the_key_blocks_it_reaches(monkeypatch):
    """A decode next to a long context is not padded to it, and a prefill tile skips the blocks above its diagonal."""
    monkeypatch.setattr(attention, "Q_TILE", 16)
    monkeypatch.setattr(attention, "KEY_BLOCK", 16)
    context_lens = [5, 300, 64]  # query lens 1, 1, 64
    cu_query_lens, tables = np.array([0, 1, 2, 66]), np.zeros((3, -(-300 // 4)), dtype=np.int32)
    plan = plan_tiles(cu_query_lens, np.array(context_lens), tables, 4, None, 1, torch.device("cpu"))
    assert sorted(c.q for c in plan) == [1, 16]
    decodes = next(c for c in plan if c.q == 1)
    assert [c.end - c.first for c in decodes.chunks] == [2] + [1] * 18  # the 5-token context reads one block of 16 keys
    assert [c.num_keys for c in decodes.chunks] == [16] * 18 + [300 - 18 * 16]  # the last block stops at the context
    prefill = next(c for c in plan if c.q == 16)
    assert [(c.first, c.end) for c in prefill.chunks] == [(0, 4), (0, 3), (0, 2), (0, 1)]  # tile i reads blocks 0..i only
    assert all(c.bias is not None for c in prefill.chunks)  # each block holds one tile's diagonal
    assert prefill.chunks[0].bias.shape == (4, 1, 16, 16)  # masks are per tile and key block, never [B, Q, K]
    assert decodes.chunks[1].bias is None  # the 300-token decode sees all of keys 16..31
    monkeypatch.setattr(attention, "MAX_GATHER_BYTES", 3 * 16)
    chunked = plan_tiles(cu_query_lens, np.array(context_lens), tables, 4, None, 1, torch.device("cpu"))
    assert [(c.first, c.end) for c in chunked[1].chunks][:3] == [(0, 3), (3, 4), (0, 3)]  # at most 3 tiles per call
    assert [c.merge for c in chunked[1].chunks] == [False, False, True, True, True]


def test_a_window_query_that_sees_no_key_of_a_block_stays_finite(monkeypatch):
    monkeypatch.setattr(attention, "KEY_BLOCK", 4)
    q, k, v, tables = random_step([3, 1], [40, 33], 2, 1, 8, 4)
    meta = build_metadata(torch.zeros(4, dtype=torch.int32), [3, 1], [40, 33], tables, sliding_window=3)
    got = torch_paged_attention(q, k, v, meta, 0.5)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, reference_paged_attention(q, k, v, [3, 1], [40, 33], tables, 0.5, 3), rtol=0, atol=1e-5)


def test_metadata_is_planned_once_per_step():
    q, k, v, tables = random_step([5, 1], [9, 12], 4, 2, 8, 4)
    meta = build_metadata(torch.zeros(6, dtype=torch.int32), [5, 1], [9, 12], tables)
    first = torch_paged_attention(q, k, v, meta, 0.3)
    plan = meta.plan
    assert torch.equal(torch_paged_attention(q, k, v, meta, 0.3), first) and meta.plan is plan  # the next layer reuses it


def test_failing_triton_kernel_falls_back_to_pytorch_once_and_loudly(monkeypatch, caplog):
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no compiler for this GPU")

    monkeypatch.setattr(attention, "_TRITON_KERNEL", [types.SimpleNamespace(paged_attention=broken)])
    q, k, v, tables = random_step([3, 1], [7, 5], 4, 2, 8, 4)
    meta = build_metadata(torch.zeros(4, dtype=torch.int32), [3, 1], [7, 5], tables)
    cuda_like = types.SimpleNamespace(is_cuda=True)
    monkeypatch.setattr(attention, "torch_paged_attention", lambda *args: torch.zeros(1))
    with caplog.at_level(logging.WARNING, logger="preft.engine.attention"):
        paged_attention(cuda_like, k, v, meta, 0.3)
        paged_attention(cuda_like, k, v, meta, 0.3)
    assert len(calls) == 1 and attention.triton_kernel() is None
    assert caplog.text.count("Triton paged attention failed") == 1 and "no compiler for this GPU" in caplog.text
