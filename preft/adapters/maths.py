"""The adapter maths, defined once and used by training, the reference generator and the engine.

Every adapter is a low-rank edit ``delta = scaling * (x @ down.T + bias) @ up.T``:

==========  ========================  ==========  =============
kind        down ``[r, in]``          bias ``[r]``  up ``[out, r]``
==========  ========================  ==========  =============
LoRA        ``lora_A``                none        ``lora_B``
LoReFT      ``W - R``                 ``b``       ``R^T``
DiReFT      ``W1``                    ``b``       ``W2^T``
==========  ========================  ==========  =============

LoRA adds its delta to a linear module's output; ReFT adds it to the residual stream (the output
of a decoder layer). Because all three share this form, serving batches them with one grouped
low-rank product.
"""

from __future__ import annotations

import torch
from torch import Tensor


def low_rank_delta(x: Tensor, down: Tensor, up: Tensor, bias: Tensor | None = None, scaling: float = 1.0) -> Tensor:
    """``scaling * (x @ down.T + bias) @ up.T`` for ``x [..., in]``, ``down [r, in]``, ``up [out, r]``."""
    code = x @ down.t()
    if bias is not None:
        code = code + bias
    out = code @ up.t()
    return out * scaling if scaling != 1.0 else out


def loreft_factors(rotate: Tensor, source_weight: Tensor, source_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """LoReFT ``h + R^T (W h + b - R h)`` as ``(down, bias, up)`` = ``(W - R, b, R^T)``."""
    return source_weight - rotate, source_bias, rotate.t()


def direft_factors(proj: Tensor, source_weight: Tensor, source_bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """DiReFT ``h + W2^T (W1 h + b)`` as ``(down, bias, up)`` = ``(W1, b, W2^T)``."""
    return source_weight, source_bias, proj.t()


def positions_selected(index: Tensor, length: Tensor, positions: tuple[int, int] | None) -> Tensor:
    """Whether prompt token ``index`` of a prompt of ``length`` tokens is edited (pyreft f/l positions).

    ``positions`` is ``None`` (every prompt token) or ``(first, last)``.
    """
    if positions is None:
        return torch.ones_like(index, dtype=torch.bool)
    first, last = positions
    return (index < first) | (index >= length - last)


def reft_position_mask(adapter_mask: Tensor, positions: tuple[int, int] | None) -> Tensor:
    """Restrict ``adapter_mask [B, T]`` to the ReFT positions, counted over its masked tokens per row."""
    if positions is None:
        return adapter_mask
    on = adapter_mask > 0
    index = torch.cumsum(on.long(), dim=-1) - 1
    length = on.long().sum(dim=-1, keepdim=True)
    return adapter_mask * positions_selected(index, length, positions).to(adapter_mask.dtype)
