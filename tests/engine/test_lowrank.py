"""The PyTorch grouped low-rank paths: the gathered (decode) path equals the per-slot reference."""

from __future__ import annotations

import pytest
import torch

from preft.adapters import low_rank_delta
from preft.engine.lowrank import gathered_low_rank, grouped_low_rank, grouped_low_rank_reference

RANKS = [4, 1, 8, 2]  # mixed ranks stored zero-padded to 8, as the engine's slot stacks do


def slot_stacks(fan_in=24, fan_out=20, with_bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r_max = max(RANKS)
    down = torch.zeros(len(RANKS), r_max, fan_in)
    up = torch.zeros(len(RANKS), fan_out, r_max)
    bias = torch.zeros(len(RANKS), r_max) if with_bias else None
    for s, r in enumerate(RANKS):
        down[s, :r] = torch.randn(r, fan_in, generator=gen)
        up[s, :, :r] = torch.randn(fan_out, r, generator=gen)
        if with_bias:
            bias[s, :r] = torch.randn(r, generator=gen)
    return down, up, bias, torch.tensor(RANKS), torch.tensor([0.5, 2.0, 1.0, 0.25])


@pytest.mark.parametrize("with_bias", [True, False])
def test_gathered_path_equals_the_per_slot_reference(with_bias):
    down, up, bias, ranks, scaling = slot_stacks(with_bias=with_bias)
    x = torch.randn(11, 24)
    token_slot = torch.tensor([2, -1, 0, 3, 3, 1, -1, 2, 0, 1, 3])
    expected = grouped_low_rank_reference(x, token_slot, down, up, bias, ranks, scaling)
    got = gathered_low_rank(x, token_slot, down, up, bias, scaling)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], torch.zeros(20)) and got[0].abs().sum() > 0
    # and the reference itself is the shared maths, token by token
    r = RANKS[2]
    one = low_rank_delta(x[0], down[2, :r], up[2, :, :r], bias[2, :r] if with_bias else None, 1.0)
    torch.testing.assert_close(expected[0], one, atol=1e-5, rtol=1e-5)


def test_dispatch_adds_into_an_aliased_output_like_the_reft_edit():
    """ReFT edits the residual stream in place (x is out): every path must read x before writing."""
    down, up, bias, ranks, scaling = slot_stacks(fan_in=16, fan_out=16)
    token_slot = torch.tensor([0, 1, 2, 3, -1, 0])  # about one token per slot: the gathered path
    hidden = torch.randn(6, 16)
    expected = hidden + grouped_low_rank_reference(hidden, token_slot, down, up, bias, ranks, scaling)
    got = grouped_low_rank(hidden.clone(), token_slot, down, up, bias, ranks, scaling, out=None)
    torch.testing.assert_close(got, expected - hidden, atol=1e-5, rtol=1e-5)
    inplace = hidden.clone()
    grouped_low_rank(inplace, token_slot, down, up, bias, ranks, scaling, out=inplace)
    torch.testing.assert_close(inplace, expected, atol=1e-5, rtol=1e-5)
