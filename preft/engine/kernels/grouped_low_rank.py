"""Triton grouped low-rank kernels (punica / S-LoRA style): shrink, then expand.

Semantics are exactly ``preft.engine.lowrank.grouped_low_rank_reference``: token ``n`` adds
``scaling[s] * (x[n] @ down[s, :r].T + bias[s, :r]) @ up[s, :, :r].T`` into ``out[n]`` with
``s = token_slot[n]`` and ``r = ranks[s]``; ``s = -1`` adds nothing.

Two launch shapes, both free of host synchronisation (so they can be captured in a CUDA graph
when ``ranks`` / ``scaling`` are device tensors):

- **BGMV** (batched gather matrix-vector, for decode): one program per token; the token's slot
  is read inside the kernel. No preprocessing at all.
- **SGMV** (segmented gather matmul, for prefill): tokens are grouped by slot (``SegmentPlan``)
  and each program multiplies a ``BLOCK_M``-row tile of one slot's tokens with that slot's
  factors, so a slot's weights are read once per tile instead of once per token.

Both loop only up to each slot's own rank (programs over padded rank columns exit at once),
accumulate in float32 and take float32 / bfloat16 / float16 inputs. The code ``x @ down.T + bias``
is kept in a float32 ``[N, R_max]`` scratch between the two kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

# Decode batches (one token per sequence, mostly distinct slots) go to BGMV; larger token
# counts (prefill chunks, tokens sharing slots) go to SGMV. Both are correct for any N.
BGMV_MAX_TOKENS = 64
SGMV_BLOCK_M = 16
_SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class SegmentPlan:
    """Tokens grouped by slot, in fixed-size tiles, computed on device without a host sync.

    Segment ``g`` holds the tokens of slot ``g - 1`` (segment 0: tokens with no adapter, skipped).
    ``sorted_rows[token_start[g] : token_start[g] + count[g]]`` are its token rows; it owns tiles
    ``tile_start[g] ..`` and ``tile_segment[t]`` says which segment tile ``t`` belongs to
    (``> num_slots`` for the spare tiles of the fixed upper bound ``cdiv(N, BLOCK_M) + num_slots``).
    Build it once per step and pass it to every call that shares ``token_slot``.
    """

    sorted_rows: Tensor
    token_start: Tensor
    count: Tensor
    tile_start: Tensor
    tile_segment: Tensor
    block_m: int

    @property
    def num_tiles(self) -> int:
        return self.tile_segment.numel()


def segment_plan(token_slot: Tensor, num_slots: int, block_m: int = SGMV_BLOCK_M) -> SegmentPlan:
    """Group ``token_slot [N]`` into ``block_m``-row tiles per slot.

    Values must lie in ``-1 .. num_slots - 1`` (not checked: a check would sync with the host).
    """
    segment = token_slot.long() + 1
    n = segment.numel()
    sorted_rows = torch.argsort(segment, stable=True)
    count = torch.zeros(num_slots + 1, dtype=torch.long, device=segment.device)
    count.scatter_add_(0, segment, torch.ones_like(segment))
    token_start = torch.cumsum(count, 0) - count
    tiles = (count + block_m - 1) // block_m
    tiles[0] = 0  # tokens without an adapter get no tile
    tile_end = torch.cumsum(tiles, 0)
    max_tiles = triton.cdiv(n, block_m) + num_slots
    tile_segment = torch.searchsorted(tile_end, torch.arange(max_tiles, device=segment.device), right=True)
    return SegmentPlan(
        sorted_rows=sorted_rows.to(torch.int32),
        token_start=token_start.to(torch.int32),
        count=count.to(torch.int32),
        tile_start=(tile_end - tiles).to(torch.int32),
        tile_segment=tile_segment.to(torch.int32),
        block_m=block_m,
    )


# ----------------------------------------------------------------------------------------------
# BGMV: one token per program.


@triton.jit
def _bgmv_shrink_kernel(
    x_ptr, token_slot_ptr, down_ptr, bias_ptr, ranks_ptr, code_ptr,
    K,
    stride_xm, stride_xk, stride_ds, stride_dr, stride_dk, stride_bs, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    r_block = tl.program_id(1)
    slot = tl.load(token_slot_ptr + n)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if r_block * BLOCK_R >= rank:
        return  # padding columns of a smaller rank: no work
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_ok = offs_r < rank
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    down_base = down_ptr + slot.to(tl.int64) * stride_ds
    for k in range(0, K, BLOCK_K):
        k_ok = (k + offs_k) < K
        xk = tl.load(x_ptr + n.to(tl.int64) * stride_xm + (k + offs_k) * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(
            down_base + offs_r[:, None] * stride_dr + (k + offs_k)[None, :] * stride_dk,
            mask=r_ok[:, None] & k_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * xk[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + slot.to(tl.int64) * stride_bs + offs_r, mask=r_ok, other=0.0).to(tl.float32)
    tl.store(code_ptr + n.to(tl.int64) * stride_cm + offs_r, acc, mask=r_ok)


@triton.jit
def _bgmv_expand_kernel(
    code_ptr, token_slot_ptr, up_ptr, ranks_ptr, scaling_ptr, out_ptr,
    OUT,
    stride_cm, stride_us, stride_un, stride_ur, stride_om, stride_on,
    BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0)
    n_block = tl.program_id(1)
    slot = tl.load(token_slot_ptr + n)
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    scale = tl.load(scaling_ptr + slot).to(tl.float32)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < OUT
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    up_base = up_ptr + slot.to(tl.int64) * stride_us
    for r in range(0, rank, BLOCK_R):  # only up to this slot's rank
        r_ok = (r + offs_r) < rank
        code = tl.load(code_ptr + n.to(tl.int64) * stride_cm + r + offs_r, mask=r_ok, other=0.0)
        w = tl.load(
            up_base + offs_n[:, None] * stride_un + (r + offs_r)[None, :] * stride_ur,
            mask=n_ok[:, None] & r_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w * code[None, :], axis=1)
    out_ptrs = out_ptr + n.to(tl.int64) * stride_om + offs_n * stride_on
    current = tl.load(out_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=n_ok)


# ----------------------------------------------------------------------------------------------
# SGMV: one tile of one slot's tokens per program.


@triton.jit
def _tile_rows(tile, tile_segment_ptr, tile_start_ptr, token_start_ptr, count_ptr, sorted_rows_ptr, NUM_SEGMENTS, BLOCK_M: tl.constexpr):
    """The slot, token rows and row mask of tile ``tile`` (slot -1: nothing to do)."""
    segment = tl.load(tile_segment_ptr + tile)
    valid = (segment > 0) & (segment < NUM_SEGMENTS)
    segment = tl.where(valid, segment, 0)
    local = (tile - tl.load(tile_start_ptr + segment)) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = (local < tl.load(count_ptr + segment)) & valid
    rows = tl.load(sorted_rows_ptr + tl.load(token_start_ptr + segment) + local, mask=m_ok, other=0)
    return segment - 1, rows.to(tl.int64), m_ok


@triton.jit
def _sgmv_shrink_kernel(
    x_ptr, down_ptr, bias_ptr, ranks_ptr, code_ptr,
    tile_segment_ptr, tile_start_ptr, token_start_ptr, count_ptr, sorted_rows_ptr,
    K, NUM_SEGMENTS,
    stride_xm, stride_xk, stride_ds, stride_dr, stride_dk, stride_bs, stride_cm,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    r_block = tl.program_id(1)
    slot, rows, m_ok = _tile_rows(
        tile, tile_segment_ptr, tile_start_ptr, token_start_ptr, count_ptr, sorted_rows_ptr, NUM_SEGMENTS, BLOCK_M
    )
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    if r_block * BLOCK_R >= rank:
        return
    offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    r_ok = offs_r < rank
    down_base = down_ptr + slot.to(tl.int64) * stride_ds
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = (k + offs_k) < K
        xt = tl.load(x_ptr + rows[:, None] * stride_xm + (k + offs_k)[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(
            down_base + (k + offs_k)[:, None] * stride_dk + offs_r[None, :] * stride_dr,
            mask=k_ok[:, None] & r_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(xt, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + slot.to(tl.int64) * stride_bs + offs_r, mask=r_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(code_ptr + rows[:, None] * stride_cm + offs_r[None, :], acc, mask=m_ok[:, None] & r_ok[None, :])


@triton.jit
def _sgmv_expand_kernel(
    code_ptr, up_ptr, ranks_ptr, scaling_ptr, out_ptr,
    tile_segment_ptr, tile_start_ptr, token_start_ptr, count_ptr, sorted_rows_ptr,
    OUT, NUM_SEGMENTS,
    stride_cm, stride_us, stride_un, stride_ur, stride_om, stride_on,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    n_block = tl.program_id(1)
    slot, rows, m_ok = _tile_rows(
        tile, tile_segment_ptr, tile_start_ptr, token_start_ptr, count_ptr, sorted_rows_ptr, NUM_SEGMENTS, BLOCK_M
    )
    if slot < 0:
        return
    rank = tl.load(ranks_ptr + slot)
    scale = tl.load(scaling_ptr + slot).to(tl.float32)
    offs_n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_ok = offs_n < OUT
    up_base = up_ptr + slot.to(tl.int64) * stride_us
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in range(0, rank, BLOCK_R):
        r_ok = (r + offs_r) < rank
        code = tl.load(code_ptr + rows[:, None] * stride_cm + (r + offs_r)[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        wt = tl.load(
            up_base + (r + offs_r)[:, None] * stride_ur + offs_n[None, :] * stride_un,
            mask=r_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        acc = tl.dot(code, wt, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :] * stride_on
    mask = m_ok[:, None] & n_ok[None, :]
    current = tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------


def _check(x: Tensor, token_slot: Tensor, down: Tensor, up: Tensor, bias: Tensor | None, out: Tensor | None) -> None:
    if x.dim() != 2 or down.dim() != 3 or up.dim() != 3:
        raise ValueError(
            f"expected x [N, in], down [S, R, in], up [S, out, R]; got {tuple(x.shape)}, {tuple(down.shape)}, {tuple(up.shape)}"
        )
    n, k = x.shape
    s, r_max, k_down = down.shape
    if k_down != k or up.shape[0] != s or up.shape[2] != r_max:
        raise ValueError(f"down {tuple(down.shape)} / up {tuple(up.shape)} do not fit x [N, {k}] (need down [S, R, {k}], up [S, out, R])")
    if token_slot.shape != (n,):
        raise ValueError(f"token_slot has shape {tuple(token_slot.shape)}, expected [{n}] (one slot per token of x)")
    if bias is not None and bias.shape != (s, r_max):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [{s}, {r_max}]")
    if out is not None and out.shape != (n, up.shape[1]):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected [{n}, {up.shape[1]}]")
    for name, t in (("x", x), ("down", down), ("up", up)):
        if t.dtype not in _SUPPORTED_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; the Triton kernels take {list(_SUPPORTED_DTYPES)}")
    if down.dtype != x.dtype or up.dtype != x.dtype:
        raise ValueError(f"x, down and up must share a dtype, got {x.dtype}, {down.dtype}, {up.dtype}")


def _block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def triton_grouped_low_rank(
    x: Tensor,
    token_slot: Tensor,
    down: Tensor,
    up: Tensor,
    bias: Tensor | None,
    ranks: Tensor | list[int],
    scaling: Tensor | list[float],
    out: Tensor | None = None,
    *,
    method: str = "auto",
    plan: SegmentPlan | None = None,
) -> Tensor:
    """Triton version of ``grouped_low_rank_reference``: returns ``out + delta`` (``out`` updated in place).

    ``method`` is ``"bgmv"`` (per-token gather, decode), ``"sgmv"`` (segmented, prefill) or
    ``"auto"`` (BGMV up to ``BGMV_MAX_TOKENS`` tokens, or SGMV when a ``plan`` is given).
    ``plan`` (from ``segment_plan``) lets every layer of a step reuse one grouping of tokens.
    Pass ``ranks`` / ``scaling`` as device tensors to stay free of host syncs (CUDA graphs).
    """
    _check(x, token_slot, down, up, bias, out)
    n, k = x.shape
    num_slots, r_max, _ = down.shape
    out_features = up.shape[1]
    device = x.device
    if out is None:
        out = torch.zeros(n, out_features, dtype=x.dtype, device=device)
    if n == 0:
        return out
    ranks_t = torch.as_tensor(ranks, dtype=torch.int32).to(device, non_blocking=True)
    scaling_t = torch.as_tensor(scaling, dtype=torch.float32).to(device, non_blocking=True)
    token_slot = token_slot.to(torch.int32).contiguous()  # no copy when it already is
    bias = bias if bias is None or bias.stride(1) == 1 else bias.contiguous()
    code = torch.empty(n, r_max, dtype=torch.float32, device=device)
    # fp32 inputs get exact fp32 products (the reference's precision); half inputs use tensor cores.
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    block_r = _block(r_max, 16, 64)
    bias_arg = bias if bias is not None else down  # never read when HAS_BIAS is False
    bias_stride = bias.stride(0) if bias is not None else 0
    if method == "auto":
        method = "sgmv" if plan is not None or n > BGMV_MAX_TOKENS else "bgmv"
    if method == "bgmv":
        # Tiles of at most 4096 elements (32 registers per thread at 4 warps): no spills at rank 64.
        block_k = _block(k, 16, 4096 // block_r)
        _bgmv_shrink_kernel[(n, triton.cdiv(r_max, block_r))](
            x, token_slot, down, bias_arg, ranks_t, code,
            k,
            x.stride(0), x.stride(1), down.stride(0), down.stride(1), down.stride(2), bias_stride, code.stride(0),
            HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_K=block_k,
        )  # fmt: skip
        block_n = _block(out_features, 16, min(128, 4096 // block_r))
        _bgmv_expand_kernel[(n, triton.cdiv(out_features, block_n))](
            code, token_slot, up, ranks_t, scaling_t, out,
            out_features,
            code.stride(0), up.stride(0), up.stride(1), up.stride(2), out.stride(0), out.stride(1),
            BLOCK_N=block_n, BLOCK_R=block_r,
        )  # fmt: skip
        return out
    if method != "sgmv":
        raise ValueError(f"method must be 'auto', 'bgmv' or 'sgmv', got {method!r}")
    plan = plan if plan is not None else segment_plan(token_slot, num_slots)
    meta = (plan.tile_segment, plan.tile_start, plan.token_start, plan.count, plan.sorted_rows)
    block_k = _block(k, 16, 64)
    _sgmv_shrink_kernel[(plan.num_tiles, triton.cdiv(r_max, block_r))](
        x, down, bias_arg, ranks_t, code, *meta,
        k, num_slots + 1,
        x.stride(0), x.stride(1), down.stride(0), down.stride(1), down.stride(2), bias_stride, code.stride(0),
        HAS_BIAS=bias is not None, PRECISION=precision, BLOCK_M=plan.block_m, BLOCK_R=block_r, BLOCK_K=block_k,
    )  # fmt: skip
    block_n = _block(out_features, 16, 64)
    _sgmv_expand_kernel[(plan.num_tiles, triton.cdiv(out_features, block_n))](
        code, up, ranks_t, scaling_t, out, *meta,
        out_features, num_slots + 1,
        code.stride(0), up.stride(0), up.stride(1), up.stride(2), out.stride(0), out.stride(1),
        PRECISION=precision, BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_R=block_r,
    )  # fmt: skip
    return out
