"""Paged attention over a flattened batch of prefill chunks and decode tokens.

The KV cache of one layer is ``[num_blocks, block_size, kv_heads, head_dim]``; a sequence's
keys live in the blocks its ``block_table`` lists. Each step writes the new tokens' K/V into
their cache slots, then every query attends to its sequence's cached keys up to its own
position (causal with an offset: a chunk starting at ``start`` sees ``start + i + 1`` keys).

This PyTorch version is correct on every device: a batch runs as one padded SDPA call (queries
padded to the longest chunk, keys to the longest context), or, when that padding would be too
large (one long prefill chunk beside many decodes), as one SDPA call per sequence. On CUDA, decode
batches use a Triton kernel that reads K/V in place (``preft.engine.paged_decode_triton``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

# A padded batch (every sequence's queries padded to the longest chunk, keys to the longest context)
# runs as one SDPA call; above this many attention scores the per-sequence loop is cheaper on memory.
MAX_PADDED_SCORES = 1 << 26


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch reads and writes the KV cache (built once per step)."""

    slot_mapping: Tensor  # [N] flat cache slot (block * block_size + offset) of each new token
    query_starts: list[int]  # per sequence: offset of its first new token in the batch
    query_lens: list[int]  # per sequence: number of new tokens
    context_lens: list[int]  # per sequence: tokens in the cache after this step (past + new)
    block_tables: list[list[int]]  # per sequence: the blocks holding its context
    sliding_window: int | None = None  # a query sees only the last `sliding_window` positions (Mistral)
    padded: PaddedBatch | None = None  # set when the batch runs as one padded SDPA call
    decode: tuple[Tensor, Tensor] | None = None  # (block tables [B, W], context lens [B]) for the Triton decode kernel


@dataclass
class PaddedBatch:
    block_tables: Tensor  # [B, max_blocks] (padding: block 0, masked out)
    query_rows: Tensor  # [B, Q] row of each padded query in the flattened batch (padding: row 0)
    query_valid: Tensor  # [B, Q] bool
    attn_mask: Tensor  # [B, 1, Q, K] bool: causal with each sequence's offset, keys beyond its context masked


def build_metadata(
    slot_mapping: Tensor,
    query_starts: list[int],
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    sliding_window: int | None = None,
    decode_kernel: bool = False,
) -> AttentionMetadata:
    """Per-step attention metadata; ``decode_kernel``: a decode-only batch may use the Triton kernel (CUDA)."""
    meta = AttentionMetadata(slot_mapping, query_starts, query_lens, context_lens, block_tables, sliding_window)
    device = slot_mapping.device
    batch, q_len = len(query_lens), max(query_lens)
    width = max(len(t) for t in block_tables)
    if batch * q_len * width * block_size > MAX_PADDED_SCORES:
        return meta
    tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long, device=device)
    starts = torch.tensor(query_starts, device=device)
    lens = torch.tensor(query_lens, device=device)
    ctx = torch.tensor(context_lens, device=device)
    i = torch.arange(q_len, device=device)
    valid = i[None, :] < lens[:, None]  # [B, Q]
    rows = torch.where(valid, starts[:, None] + i[None, :], 0)
    query_pos = ctx[:, None] - lens[:, None] + i[None, :]  # absolute position of each query
    key_pos = torch.arange(width * block_size, device=device)
    mask = causal_mask(query_pos[:, :, None], key_pos[None, None, :], sliding_window)  # [B, Q, K]; also keeps keys < ctx
    mask[:, :, 0] |= ~valid  # padding queries see one key, so no row is fully masked (no NaN)
    meta.padded = PaddedBatch(tables, rows, valid, mask[:, None])
    if q_len == 1 and decode_kernel:
        meta.decode = (tables, ctx)
    return meta


_TRITON_DECODE: list = []  # [module or None], resolved on first use


def decode_kernel_usable(device: torch.device, block_size: int) -> bool:
    """Whether decode batches on ``device`` can use the Triton paged decode kernel."""
    return device.type == "cuda" and triton_decode_module() is not None and triton_decode_module().supported(block_size)


def triton_decode_module():
    """The Triton decode kernel module, or None (no Triton, PREFT_DISABLE_TRITON=1, or it failed once)."""
    if not _TRITON_DECODE:
        module = None
        if os.environ.get("PREFT_DISABLE_TRITON") != "1":
            try:
                from preft.engine import paged_decode_triton as module
            except ImportError:
                module = None
        _TRITON_DECODE.append(module)
    return _TRITON_DECODE[0]


def causal_mask(query_pos: Tensor, key_pos: Tensor, sliding_window: int | None) -> Tensor:
    """Whether a query at ``query_pos`` sees the key at ``key_pos`` (broadcast), with an optional sliding window."""
    mask = key_pos <= query_pos
    return mask & (key_pos > query_pos - sliding_window) if sliding_window else mask


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store ``k, v [N, kv_heads, head_dim]`` into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """``q [N, heads, head_dim]`` -> ``[N, heads, head_dim]``, each query attending causally to its sequence's cache."""
    if meta.decode is not None and triton_decode_module() is not None:
        try:
            return triton_decode_module().paged_decode_attention(q, k_cache, v_cache, *meta.decode, scale, meta.sliding_window)
        except Exception as e:  # a compile problem on an untested GPU/Triton combination: fall back, loudly, once
            logger.warning("Triton paged decode attention failed (%s); using the PyTorch path from now on", e)
            _TRITON_DECODE[0] = None
    if meta.padded is not None:
        return _padded_attention(q, k_cache, v_cache, meta.padded, scale)
    out = torch.empty_like(q)
    for start, n, ctx, table in zip(meta.query_starts, meta.query_lens, meta.context_lens, meta.block_tables):
        table = torch.tensor(table, dtype=torch.long, device=q.device)
        k = k_cache[table].flatten(0, 1)[:ctx]  # [ctx, kv_heads, D]
        v = v_cache[table].flatten(0, 1)[:ctx]
        key_pos = torch.arange(ctx, device=q.device)
        query_pos = torch.arange(ctx - n, ctx, device=q.device)
        mask = causal_mask(query_pos[:, None], key_pos[None, :], meta.sliding_window)  # [n, ctx]
        o = F.scaled_dot_product_attention(
            q[start : start + n].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[start : start + n] = o.transpose(0, 1)
    return out


def _padded_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, padded: PaddedBatch, scale: float) -> Tensor:
    k = k_cache[padded.block_tables].flatten(1, 2)  # [B, K, kv_heads, D]
    v = v_cache[padded.block_tables].flatten(1, 2)
    q_pad = q[padded.query_rows]  # [B, Q, heads, D]
    o = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=padded.attn_mask, scale=scale, enable_gqa=True
    )  # [B, heads, Q, D]
    return o.transpose(1, 2)[padded.query_valid]  # valid rows in batch order = the flattened token order
