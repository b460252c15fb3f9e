"""Grouped low-rank product: every adapter of a batch applied in one call.

Adapters live in device *slots*: stacked ``down [S, R_max, in]``, ``up [S, out, R_max]``,
``bias [S, R_max]`` with each slot's true rank in ``ranks [S]`` and its scale in ``scaling [S]``.
Token ``n`` uses slot ``token_slot[n]`` (``-1``: no adapter, delta 0). Each slot computes
``low_rank_delta`` (``preft.adapters.maths``) on its own tokens at its own rank: no work is spent
on the zero padding of smaller ranks.

``grouped_low_rank`` dispatches to the Triton kernels on CUDA (``preft.engine.kernels``) and to
PyTorch elsewhere: the per-slot reference, or, for small factors with few tokens per slot (decode
of ``all``-policy adapters on small models), a gathered batched matmul, so the CPU multi-LoRA
baseline is not slowed by a Python loop over slots where that loop is the bottleneck. All paths add into ``out``
when it is given; the gathered path relies on the padding beyond each slot's rank being zero,
as the engine's slot stacks keep it.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from preft.adapters.maths import low_rank_delta

# The gathered path copies every token's factors, so it only beats the per-slot loop where the
# loop's per-call overhead dominates: few tokens per slot AND small factors. Measured on CPU (one
# thread, rank 16): in=64, 256 tokens over 64 slots: loop 1.25 ms, gathered 0.55 ms; in=896 (Qwen2.5-0.5B):
# loop 2.9 ms, gathered 7.9 ms; in=4096 (Llama-3.1-8B): loop 7.5 ms, gathered 133 ms.
GATHER_MAX_TOKENS_PER_SLOT = 8
GATHER_MAX_FACTOR_SIZE = 8192  # r_max * in_features


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


def gathered_low_rank(
    x: Tensor,
    token_slot: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Tensor | None,
    scaling: Tensor | list[float],
    out: Tensor | None = None,
) -> Tensor:
    """Every adapted token's own factors gathered, then two batched matmuls (BGMV in PyTorch).

    Equal to ``grouped_low_rank_reference`` when ``down``/``up``/``bias`` are zero beyond each slot's rank.
    """
    result = out if out is not None else x.new_zeros(x.shape[0], up.shape[1])
    rows = (token_slot >= 0).nonzero().squeeze(-1)
    slots = token_slot.index_select(0, rows)
    scale = torch.as_tensor(scaling, dtype=x.dtype, device=x.device).index_select(0, slots)
    code = torch.bmm(down.index_select(0, slots), x.index_select(0, rows)[:, :, None]).squeeze(-1)
    if bias is not None:
        code = code + bias.index_select(0, slots)
    delta = torch.bmm(up.index_select(0, slots), code[:, :, None]).squeeze(-1) * scale[:, None]
    return result.index_add_(0, rows, delta.to(result.dtype))


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
    plan: object | None = None,
) -> Tensor:
    """Apply each token's adapter slot (see module doc); Triton on CUDA, PyTorch otherwise.

    ``plan`` (from ``segment_plan``) lets the Triton path group the step's tokens by slot once
    instead of once per layer; the PyTorch paths ignore it.
    """
    if x.is_cuda and _triton_available():
        from preft.engine.kernels import triton_grouped_low_rank

        return triton_grouped_low_rank(x, token_slot, down, up, bias, ranks, scaling, out=out, plan=plan)
    if down.shape[1] * down.shape[2] <= GATHER_MAX_FACTOR_SIZE:
        num_slots_used = int(torch.unique(token_slot[token_slot >= 0]).numel())
        if num_slots_used * GATHER_MAX_TOKENS_PER_SLOT >= token_slot.numel():
            return gathered_low_rank(x, token_slot, down, up, bias, scaling, out=out)
    return grouped_low_rank_reference(x, token_slot, down, up, bias, ranks, scaling, out=out)


def segment_plan(token_slot: Tensor, num_slots: int) -> object | None:
    """The step's token grouping for the Triton SGMV path (None where BGMV or PyTorch runs)."""
    if not (token_slot.is_cuda and _triton_available()):
        return None
    from preft.engine.kernels import BGMV_MAX_TOKENS
    from preft.engine.kernels import segment_plan as triton_segment_plan

    if token_slot.numel() <= BGMV_MAX_TOKENS:
        return None  # decode-sized: the per-token BGMV kernels need no grouping

    return triton_segment_plan(token_slot, num_slots)
