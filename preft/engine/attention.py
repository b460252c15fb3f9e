"""Paged attention over a flattened batch of prefill chunks and decode tokens.

The KV cache of one layer is ``[num_blocks, block_size, kv_heads, head_dim]``; a sequence's
keys live in the blocks its ``block_table`` lists. Each step writes the new tokens' K/V into
their cache slots, then every query attends to its sequence's cached keys up to its own
position (causal with an offset: a chunk starting at ``start`` sees ``start + i + 1`` keys).

This PyTorch version is correct on every device: the batch's sequences are sorted by chunk length
and context and split into a few groups of similar shape; each group runs as one padded SDPA call
(queries padded to its longest chunk, keys to its longest context). Grouping keeps the padding
small when short and long contexts, or prefill chunks and decodes, share a step. On CUDA, decode
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

# A group of several sequences never pads to more than this many attention scores (queries x keys);
# a single sequence is never padded, so it always forms a group of its own.
MAX_PADDED_SCORES = 1 << 26
# A sequence joins a group while its padded scores, and the group's, stay within this factor of the
# real ones (or within GROUP_SLACK_SCORES of them): each extra group costs a few op launches per layer,
# about what ~128 padded keys of a decode row cost (measured on CPU, SmolLM2-135M shapes).
GROUP_PADDING_RATIO = 1.25
GROUP_SLACK_SCORES = 128


@dataclass
class AttentionMetadata:
    """Where each token of a flattened batch reads and writes the KV cache (built once per step)."""

    slot_mapping: Tensor  # [N] flat cache slot (block * block_size + offset) of each new token
    query_starts: list[int]  # per sequence: offset of its first new token in the batch
    query_lens: list[int]  # per sequence: number of new tokens
    context_lens: list[int]  # per sequence: tokens in the cache after this step (past + new)
    block_tables: list[list[int]]  # per sequence: the blocks holding its context
    sliding_window: int | None = None  # a query sees only the last `sliding_window` positions (Mistral)
    padded: list[PaddedBatch] | None = None  # the groups of sequences that run as one padded SDPA call each
    decode: tuple[Tensor, Tensor] | None = None  # (block tables [B, W], context lens [B]) for the Triton decode kernel


@dataclass
class PaddedBatch:
    """A group of B sequences run as one SDPA call, queries padded to Q and keys to K = W * block_size."""

    block_tables: Tensor  # [B * W] every sequence's W blocks (padding: block 0, masked out)
    query_rows: Tensor  # [B * Q] row of each padded query in the flattened batch (padding: row 0)
    valid: Tensor | None  # positions in the B * Q padded queries that are real; None when all are
    out_rows: Tensor  # rows in the flattened batch of the real queries, in padded order
    attn_mask: Tensor  # [B, 1, Q, K] bool: causal with each sequence's offset, keys beyond its context masked


def plan_groups(query_lens: list[int], context_lens: list[int], block_size: int) -> list[list[int]]:
    """Sequences (indices) grouped for padded attention: sorted by chunk length, then context, largest first;
    each joins the current group while the padding stays small (see ``GROUP_PADDING_RATIO``). Contexts
    count in whole blocks: the gather reads whole blocks anyway."""
    order = sorted(range(len(query_lens)), key=lambda i: (query_lens[i], context_lens[i]), reverse=True)
    groups: list[list[int]] = []
    q_max = k_max = real = 0
    for i in order:
        q, k = query_lens[i], -(-context_lens[i] // block_size) * block_size
        if groups:
            nq, nk = max(q_max, q), max(k_max, k)
            padded, joined_real = (len(groups[-1]) + 1) * nq * nk, real + q * k
            small = nq * nk <= max(GROUP_PADDING_RATIO * q * k, q * k + GROUP_SLACK_SCORES)  # for this sequence
            small = small and padded <= GROUP_PADDING_RATIO * joined_real + GROUP_SLACK_SCORES  # and the group
            if small and padded <= MAX_PADDED_SCORES:
                groups[-1].append(i)
                q_max, k_max, real = nq, nk, joined_real
                continue
        groups.append([i])
        q_max, k_max, real = q, k, q * k
    return groups


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
    meta.padded = [
        _padded_group(
            [query_starts[i] for i in group],
            [query_lens[i] for i in group],
            [context_lens[i] for i in group],
            [block_tables[i] for i in group],
            block_size,
            sliding_window,
            device,
        )
        for group in plan_groups(query_lens, context_lens, block_size)
    ]
    if max(query_lens) == 1 and decode_kernel:
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.long, device=device)
        meta.decode = (tables, torch.tensor(context_lens, device=device))
    return meta


def _padded_group(
    query_starts: list[int],
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
) -> PaddedBatch:
    q_len, width = max(query_lens), max(len(t) for t in block_tables)
    tables = torch.tensor([b for t in block_tables for b in t + [0] * (width - len(t))], dtype=torch.long, device=device)
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
    all_valid = min(query_lens) == q_len
    positions = None if all_valid else valid.flatten().nonzero().flatten()
    out_rows = rows.flatten() if all_valid else rows.flatten()[positions]
    return PaddedBatch(tables, rows.flatten(), positions, out_rows, mask[:, None])


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
    out = torch.empty_like(q)
    if meta.padded is not None:
        for group in meta.padded:
            _padded_attention(out, q, k_cache, v_cache, group, scale)
        return out
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


def _padded_attention(out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, group: PaddedBatch, scale: float) -> None:
    """Attention of one group's queries, written to their rows of ``out``."""
    batch, _, q_len, num_keys = group.attn_mask.shape
    # index_select, not advanced indexing: a plain row gather (several times faster on CPU).
    k = k_cache.index_select(0, group.block_tables).view(batch, num_keys, *k_cache.shape[2:])  # [B, K, kv_heads, D]
    v = v_cache.index_select(0, group.block_tables).view(batch, num_keys, *v_cache.shape[2:])
    q_pad = q.index_select(0, group.query_rows).view(batch, q_len, *q.shape[1:])  # [B, Q, heads, D]
    o = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=group.attn_mask, scale=scale, enable_gqa=True
    )  # [B, heads, Q, D]
    o = o.transpose(1, 2).reshape(batch * q_len, *q.shape[1:])
    out.index_copy_(0, group.out_rows, o if group.valid is None else o.index_select(0, group.valid))
