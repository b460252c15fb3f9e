"""Variable-length paged attention in Triton: prefill chunks, decodes and mixed steps in one launch.

The step's queries are packed ``[N, heads, D]``; sequence ``b`` owns rows ``cu_query_lens[b] ..
cu_query_lens[b + 1]``, its last ``q_len`` positions of ``context_lens[b]`` (a prefix-cache hit or an
earlier chunk is the part before them). Keys and values are read in place from the paged cache
``[blocks, block_size, kv_heads, D]`` through ``block_tables [B, W]``.

One program computes one tile of ``BLOCK_Q`` queries of one sequence for one KV head: the rows of
its ``BLOCK_M = BLOCK_Q * group`` tile are (query, head of the GQA group) pairs, so the keys are
loaded once for the whole group. The keys are visited ``BLOCK_N`` at a time with an online softmax
in float32 (causal with the sequence's offset, optional sliding window). Tile ``t`` of sequence ``b``
is program ``cu_query_lens[b] // BLOCK_Q + b + t`` (as in vLLM's unified attention), so the grid,
``N // BLOCK_Q + B``, depends only on the step's sizes: a CUDA graph replays it with new lengths.

Flash decoding: when the step has few tiles and long contexts, each tile's key range is split over
``num_splits`` programs (grid axis 2) writing partial (max, sum, accumulator) rows; a second kernel
merges them. The split count is a launch argument, so a graph may fix it at capture.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

NO_WINDOW = 1 << 30  # sliding window "off": every earlier key is within it
MIN_SPLIT_KEYS = 512  # a split covers at least this many keys (shorter ones cost more to merge than they save)
MAX_SPLITS = 16


@triton.jit
def _find_sequence(cu_query_lens_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence owning program ``tile``: sequence ``b``'s tiles start at ``cu_query_lens[b] // BLOCK_Q + b``."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        if tl.load(cu_query_lens_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit(do_not_specialize=["window", "num_seqs", "num_splits"])  # a loop bound of 1 must stay a runtime value
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, cu_query_lens_ptr, context_lens_ptr, out_ptr, part_acc_ptr, part_stats_ptr,
    scale, window, num_seqs, num_splits,
    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, stride_ot, stride_oh,
    stride_pt, stride_ph, stride_ps,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    DECODE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one query per sequence: program = token = sequence
        seq = tile
        q_first = 0
    else:
        seq = _find_sequence(cu_query_lens_ptr, tile, num_seqs, BLOCK_Q)
        q_first = (tile - tl.load(cu_query_lens_ptr + seq) // BLOCK_Q - seq) * BLOCK_Q
    q_start = tl.load(cu_query_lens_ptr + seq)
    q_len = tl.load(cu_query_lens_ptr + seq + 1) - q_start
    if q_first >= q_len:
        return
    context = tl.load(context_lens_ptr + seq)

    r = tl.arange(0, BLOCK_M)
    q_idx = q_first + r // GROUP  # the row's query within its sequence
    head = kv_head * GROUP + r % GROUP
    row_ok = (r < BLOCK_Q * GROUP) & (q_idx < q_len)
    token = q_start + q_idx
    pos = context - q_len + q_idx  # absolute position of the row's query
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0
    )

    # Keys this tile sees: from the first query's window start to the last query's own position.
    key_end = context - q_len + tl.minimum(q_first + BLOCK_Q, q_len)
    key_start = tl.maximum(context - q_len + q_first - window + 1, 0)
    tile_lo = key_start // BLOCK_N
    tile_hi = tl.cdiv(key_end, BLOCK_N)
    per_split = tl.cdiv(tile_hi - tile_lo, num_splits)
    lo = tile_lo + split * per_split
    hi = tl.minimum(lo + per_split, tile_hi)

    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    denom = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for j in range(lo, hi):
        key_pos = j * BLOCK_N + n
        key_ok = key_pos < key_end
        block = tl.load(tables_ptr + seq * stride_tb + key_pos // BLOCK_SIZE, mask=key_ok, other=0)
        offsets = block.to(tl.int64) * stride_kb + (key_pos % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        k = tl.load(k_ptr + offsets[None, :] + d[:, None], mask=key_ok[None, :] & d_ok[:, None], other=0.0)  # [D_PAD, BLOCK_N]
        scores = tl.dot(q, k, input_precision=PRECISION) * scale
        visible = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - window)
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet (window, padding rows)
        p = tl.exp(scores - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        denom = denom * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + offsets[:, None] + d[None, :], mask=key_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, D_PAD]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    if SPLIT:  # partial results, merged by _merge_splits_kernel
        part = token * stride_pt + head * stride_ph + split * stride_ps
        tl.store(part_acc_ptr + part[:, None] + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_stats_ptr + 2 * (part // D_PAD), m, mask=row_ok)
        tl.store(part_stats_ptr + 2 * (part // D_PAD) + 1, denom, mask=row_ok)
    else:
        out = acc / tl.where(denom == 0.0, 1.0, denom)[:, None]
        out_offsets = token[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_splits_kernel(
    part_acc_ptr, part_stats_ptr, out_ptr, num_splits,
    stride_pt, stride_ph, stride_ps, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):  # fmt: skip
    token = tl.program_id(0)
    head = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    s_ok = s < num_splits
    part = token * stride_pt + head * stride_ph + s * stride_ps
    m = tl.load(part_stats_ptr + 2 * (part // D_PAD), mask=s_ok, other=float("-inf"))
    denom = tl.load(part_stats_ptr + 2 * (part // D_PAD) + 1, mask=s_ok, other=0.0)
    acc = tl.load(part_acc_ptr + part[:, None] + d[None, :], mask=s_ok[:, None] & (d[None, :] < HEAD_DIM), other=0.0)
    weight = tl.exp(m - tl.max(m, axis=0))  # empty splits (m = -inf) weigh 0; the split holding the query's own key is finite
    out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(denom * weight, axis=0)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def tile_shape(group: int, max_query_len: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_Q)``: rows of a tile and queries per tile (``BLOCK_M // group``; 1 for decode-only steps)."""
    if max_query_len == 1:
        return max(16, triton.next_power_of_2(group)), 1
    block_m = max(64, triton.next_power_of_2(group))
    return block_m, block_m // group


def num_programs(num_tokens: int, num_seqs: int, block_q: int) -> int:
    """Grid size over query tiles: an upper bound on the step's tiles that depends only on its sizes."""
    return num_tokens if block_q == 1 else num_tokens // block_q + num_seqs


@functools.cache
def _multiprocessors(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index if device_index is not None else torch.cuda.current_device()).multi_processor_count


def num_kv_splits(num_tiles: int, kv_heads: int, max_context_len: int, device: torch.device) -> int:
    """Flash-decoding split of each tile's keys: enough programs to fill the GPU when tiles are few and contexts long."""
    target = 2 * _multiprocessors(device.index) if device.type == "cuda" else 4  # the interpreter: any split is correct
    programs = num_tiles * kv_heads
    if programs >= target or max_context_len < 2 * MIN_SPLIT_KEYS:
        return 1
    return max(1, min(MAX_SPLITS, max_context_len // MIN_SPLIT_KEYS, triton.cdiv(target, programs)))


def paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cu_query_lens: Tensor,
    context_lens: Tensor,
    block_tables: Tensor,
    max_query_len: int,
    max_context_len: int,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """``q [N, heads, D]`` -> ``[N, heads, D]``: every query attends causally to its sequence's paged keys.

    ``cu_query_lens [B + 1]``, ``context_lens [B]``, ``block_tables [B, W]`` (int32 or int64, on ``q``'s
    device); ``max_query_len``, ``max_context_len``: host bounds (they pick the tile shape and the split
    count). ``num_splits``: the flash-decoding split (None: chosen from the sizes; a CUDA graph fixes it).
    """
    num_tokens, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if q.stride(2) != 1 or k_cache.stride(3) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_attention needs a contiguous head_dim and the same layout for the K and V caches")
    num_seqs = context_lens.numel()
    group = heads // kv_heads
    block_m, block_q = tile_shape(group, max_query_len)
    programs = num_programs(num_tokens, num_seqs, block_q)
    if num_splits is None:
        num_splits = num_kv_splits(num_seqs if block_q == 1 else programs, kv_heads, max_context_len, q.device)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    out = torch.empty_like(q)
    split = num_splits > 1
    if split:
        part_acc = torch.empty(num_tokens, heads, num_splits, d_pad, dtype=torch.float32, device=q.device)
        part_stats = torch.empty(num_tokens, heads, num_splits, 2, dtype=torch.float32, device=q.device)
    else:
        part_acc = part_stats = out  # never touched
    part_strides = (heads * num_splits * d_pad, num_splits * d_pad, d_pad)
    _paged_attention_kernel[(programs, kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, cu_query_lens, context_lens, out, part_acc, part_stats,
        scale, sliding_window or NO_WINDOW, num_seqs, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1), *part_strides,
        GROUP=group, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=32 if max_query_len == 1 else 64,
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, D_PAD=d_pad,
        DECODE=max_query_len == 1, SPLIT=split, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )  # fmt: skip
    if split:
        _merge_splits_kernel[(num_tokens, heads)](
            part_acc, part_stats, out, num_splits, *part_strides, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, D_PAD=d_pad, SPLITS_PAD=triton.next_power_of_2(num_splits),
        )  # fmt: skip
    return out
