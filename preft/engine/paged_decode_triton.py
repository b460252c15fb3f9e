"""Triton paged attention for decode batches (one query per sequence), CUDA only.

The PyTorch path (``preft.engine.attention``) gathers every sequence's keys and values into a
padded copy before SDPA; for large models that copy costs more than the weights. This kernel
reads K/V in place through the block table: one program per (sequence, KV head) handles the
query heads of that GQA group with an online softmax over the sequence's blocks, in float32.

Same maths as ``paged_attention`` (causal: the query is the last position; optional sliding
window). Checked against the PyTorch path under Triton's interpreter
(``tests/engine/test_paged_decode_triton.py``).
"""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    context_ptr,
    out_ptr,
    scale,
    window,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_tb,
    stride_ob,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    context = tl.load(context_ptr + seq)
    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    t = tl.arange(0, BLOCK_SIZE)
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(
        tl.float32
    )
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    denom = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    first_key = tl.where(window > 0, tl.maximum(context - window, 0), 0)
    # Start at the block of the first visible key: every processed block has one, so no row is all -inf.
    for i in range(first_key // BLOCK_SIZE, tl.cdiv(context, BLOCK_SIZE)):
        block = tl.load(tables_ptr + seq * stride_tb + i)
        pos = i * BLOCK_SIZE + t
        t_ok = (pos < context) & (pos >= first_key)
        offsets = block * stride_kb + t[:, None] * stride_kt + kv_head * stride_kh + d[None, :]
        k = tl.load(k_ptr + offsets, mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + offsets, mask=t_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK_SIZE]
        scores = tl.where(t_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        denom = denom * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / denom[:, None]
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=g_ok[:, None] & d_ok[None, :],
    )


def supported(block_size: int) -> bool:
    return block_size == triton.next_power_of_2(block_size)


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor, scale: float, sliding_window: int | None = None
) -> Tensor:
    """``q [B, heads, D]`` (one query per sequence, the last position) -> ``[B, heads, D]``.

    ``k_cache, v_cache [blocks, block_size, kv_heads, D]``; ``block_tables [B, W]``; ``context_lens [B]``.
    """
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert k_cache.stride(3) == 1 and q.stride(2) == 1, "the last (head_dim) dimension must be contiguous"
    group = heads // kv_heads
    out = q.new_empty(q.shape)
    _paged_decode_kernel[(batch, kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        scale,
        sliding_window or 0,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=triton.next_power_of_2(group),
        BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim),
    )
    return out
