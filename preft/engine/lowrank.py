"""Grouped low-rank product: every adapter of a batch applied in one call.

Adapters live in device *slots*: stacked ``down [S, R_max, in]``, ``up [S, out, R_max]``,
``bias [S, R_max]`` with each slot's true rank in ``ranks [S]`` and its scale in ``scaling [S]``.
Token ``n`` uses slot ``token_slot[n]`` (``-1``: no adapter, delta 0). Each slot computes
``low_rank_delta`` (``preft.adapters.maths``) on its own tokens at its own rank: no work is spent
on the zero padding of smaller ranks.

``grouped_low_rank`` dispatches to the Triton kernels on CUDA (``preft.engine.kernels``) and to
the PyTorch reference everywhere else. Both add into ``out`` when it is given.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from preft.adapters.maths import low_rank_delta


def grouped_low_rank_reference(
    x: Tensor,
    token_slot: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Tensor | None,
    ranks: Tensor | list[int],
    scaling: Tensor | list[float],
    out: Tensor | None = None,
) -> Tensor:
    """PyTorch reference: one ``low_rank_delta`` per slot present in ``token_slot``.

    Returns ``out + delta`` (or ``delta``) with shape ``[N, up.shape[1]]`` and ``x``'s dtype.
    """
    result = out if out is not None else x.new_zeros(x.shape[0], up.shape[1])
    ranks = ranks.tolist() if isinstance(ranks, Tensor) else ranks
    scaling = scaling.tolist() if isinstance(scaling, Tensor) else scaling
    for slot in torch.unique(token_slot).tolist():
        if slot < 0:
            continue
        rows = (token_slot == slot).nonzero().squeeze(-1)
        r = ranks[slot]
        delta = low_rank_delta(
            x.index_select(0, rows),
            down[slot, :r],
            up[slot, :, :r],
            None if bias is None else bias[slot, :r],
            scaling[slot],
        )
        result.index_add_(0, rows, delta.to(result.dtype))
    return result


def _triton_available() -> bool:
    if os.environ.get("PREFT_DISABLE_TRITON") == "1":
        return False
    try:
        from preft.engine import kernels  # noqa: F401
    except ImportError:
        return False
    return True


def grouped_low_rank(
    x: Tensor,
    token_slot: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Tensor | None,
    ranks: Tensor | list[int],
    scaling: Tensor | list[float],
    out: Tensor | None = None,
) -> Tensor:
    """Apply each token's adapter slot (see module doc); Triton on CUDA, PyTorch otherwise."""
    if x.is_cuda and _triton_available():
        from preft.engine.kernels import triton_grouped_low_rank

        return triton_grouped_low_rank(x, token_slot, down, up, bias, ranks, scaling, out=out)
    return grouped_low_rank_reference(x, token_slot, down, up, bias, ranks, scaling, out=out)
