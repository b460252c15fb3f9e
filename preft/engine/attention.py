"""Paged attention over a flattened batch of prefill chunks and decode tokens.

The KV cache of one layer is ``[num_blocks, block_size, kv_heads, head_dim]``; a sequence's
keys live in the blocks its ``block_table`` lists. Each step writes the new tokens' K/V into
their cache slots, then every query attends to its sequence's cached keys up to its own
position (causal with an offset: a chunk starting at ``start`` sees ``start + i + 1`` keys).

This PyTorch version is correct on every device; decode-only batches take one padded,
vectorised SDPA call, mixed batches loop over sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch reads and writes the KV cache (built once per step)."""

    slot_mapping: Tensor  # [N] flat cache slot (block * block_size + offset) of each new token
    query_starts: list[int]  # per sequence: offset of its first new token in the batch
    query_lens: list[int]  # per sequence: number of new tokens
    context_lens: list[int]  # per sequence: tokens in the cache after this step (past + new)
    block_tables: list[Tensor]  # per sequence: [num_blocks_needed] block ids
    decode_only: bool  # every sequence has exactly one new token
    padded_block_tables: Tensor | None = None  # [B, max_blocks] (decode_only)
    context_lens_tensor: Tensor | None = None  # [B] (decode_only)


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store ``k, v [N, kv_heads, head_dim]`` into their cache slots."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """``q [N, heads, head_dim]`` -> ``[N, heads, head_dim]``, each query attending causally to its sequence's cache."""
    if meta.decode_only:
        return _decode_attention(q, k_cache, v_cache, meta, scale)
    out = torch.empty_like(q)
    block_size = k_cache.shape[1]
    for start, n, ctx, table in zip(meta.query_starts, meta.query_lens, meta.context_lens, meta.block_tables):
        k = k_cache[table].flatten(0, 1)[:ctx]  # [ctx, kv_heads, D]
        v = v_cache[table].flatten(0, 1)[:ctx]
        assert table.numel() * block_size >= ctx
        key_pos = torch.arange(ctx, device=q.device)
        query_pos = torch.arange(ctx - n, ctx, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]  # [n, ctx]
        o = F.scaled_dot_product_attention(
            q[start : start + n].transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale, enable_gqa=True
        )
        out[start : start + n] = o.transpose(0, 1)
    return out


def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    tables = meta.padded_block_tables  # [B, max_blocks]
    k = k_cache[tables].flatten(1, 2)  # [B, L, kv_heads, D]
    v = v_cache[tables].flatten(1, 2)
    mask = torch.arange(k.shape[1], device=q.device)[None, :] < meta.context_lens_tensor[:, None]  # [B, L]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :], k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=True
    )  # [B, heads, 1, D]
    return o.squeeze(2)
