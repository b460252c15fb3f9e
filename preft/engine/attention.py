"""Variable-length paged attention: one path for prefill chunks, decodes and mixed steps.

The KV cache of one layer is ``[num_blocks, block_size, kv_heads, head_dim]``; a sequence's keys
live in the blocks its block table lists. A step packs the new tokens of all its sequences into
``[N, ...]`` (no padding). Each step writes the new tokens' K/V into their cache slots, then every
query attends to its sequence's cached keys up to its own position: sequence ``b`` has the last
``q_len`` positions of ``context_lens[b]`` (causal with an offset, so a later prefill chunk or a
prefix-cache hit reads the keys before it), optionally within a sliding window (Mistral).

The metadata is flash-attn varlen / vLLM style (``AttentionMetadata``). On CUDA the Triton kernel
(``preft.engine.kernels.paged_attention``) reads K/V in place; if it fails to compile it is
dropped, loudly, once, for the PyTorch path below.

The PyTorch path (CPU, and the CUDA fallback) is a blockwise online softmax vectorised over all
queries of the step. Each sequence's queries are cut into tiles of at most ``Q_TILE``; tiles of
the same (power-of-two) size form a class, sorted by how far their keys reach, so key block ``j``
(``KEY_BLOCK`` keys) is computed only for the prefix of tiles that reach it: nothing is padded to
the longest context, and a prefill tile skips the key blocks above its causal diagonal. Masks
exist only for key blocks that cross a tile's diagonal, context end or window, at
``[tiles, Q_TILE, KEY_BLOCK]``. The per-step plan is built once (host arrays) and shared by all
layers.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Q_TILE = 64  # queries of one sequence computed together (PyTorch path)
KEY_BLOCK = 256  # keys per online-softmax step (PyTorch path); rounded up to whole cache blocks
_NEG = -1e30  # running max of a row that has seen no key yet: finite, so exp(-inf - _NEG) = 0, never NaN


@dataclass
class AttentionMetadata:
    """Where each token of a packed step reads and writes the KV cache (built once per step, shared by every layer).

    Device tensors are int32 (int64 accepted). ``host`` optionally carries the same
    ``(cu_query_lens, context_lens, block_tables)`` as NumPy arrays, so the PyTorch path plans
    without reading device memory.
    """

    slot_mapping: Tensor  # [N] flat cache slot (block * block_size + offset) of each new token
    cu_query_lens: Tensor  # [B + 1] sequence b's new tokens are rows cu_query_lens[b] .. cu_query_lens[b + 1]
    context_lens: Tensor  # [B] tokens in the cache after this step (past + new)
    block_tables: Tensor  # [B, W] the blocks holding each sequence's context (padding: any block id)
    max_query_len: int
    max_context_len: int
    sliding_window: int | None = None  # a query sees only the last `sliding_window` positions (Mistral)
    num_kv_splits: int | None = None  # Triton flash-decoding split; None: chosen per step (CUDA graphs fix it)
    host: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    plan: list[TileClass] | None = field(default=None, repr=False)  # the PyTorch path's plan, built by the first layer

    @property
    def num_seqs(self) -> int:
        return self.context_lens.numel()

    def host_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(cu_query_lens, context_lens, block_tables)`` as NumPy arrays (a device read only when ``host`` is unset)."""
        if self.host is not None:
            return self.host
        return tuple(t.cpu().numpy() for t in (self.cu_query_lens, self.context_lens, self.block_tables))


def build_metadata(
    slot_mapping: Tensor | list[int],
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> AttentionMetadata:
    """Metadata from per-sequence Python lists (tests, tools); the engine fills its persistent buffers instead."""
    device = slot_mapping.device if isinstance(slot_mapping, Tensor) else torch.device(device or "cpu")
    width = max(len(t) for t in block_tables)
    host = (
        np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32),
        np.asarray(context_lens, dtype=np.int32),
        np.array([t + [0] * (width - len(t)) for t in block_tables], dtype=np.int32),
    )
    cu, ctx, tables = (torch.from_numpy(a).to(device) for a in host)
    return AttentionMetadata(
        torch.as_tensor(slot_mapping, device=device), cu, ctx, tables, max(query_lens), max(context_lens), sliding_window, host=host
    )


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, slot_mapping: Tensor) -> None:
    """Store ``k, v [N, kv_heads, head_dim]`` into their cache slots (``slot_mapping`` int32 or int64)."""
    k_cache.view(-1, *k_cache.shape[2:]).index_put_((slot_mapping,), k)
    v_cache.view(-1, *v_cache.shape[2:]).index_put_((slot_mapping,), v)


# --- dispatch -------------------------------------------------------------------------------------------------

_TRITON_KERNEL: list = []  # [module or None], resolved on first use; None after a failure (module state: one switch per process)


def triton_kernel():
    """The Triton attention module, or None (no Triton, PREFT_DISABLE_TRITON=1, or it failed once)."""
    if not _TRITON_KERNEL:
        module = None
        if os.environ.get("PREFT_DISABLE_TRITON") != "1":
            try:
                from preft.engine.kernels import paged_attention as module
            except ImportError:
                module = None
        _TRITON_KERNEL.append(module)
    return _TRITON_KERNEL[0]


def triton_usable(device: torch.device) -> bool:
    """Whether steps on ``device`` run the Triton kernel (CUDA with Triton); CUDA graphs need it (no host syncs)."""
    return device.type == "cuda" and triton_kernel() is not None


def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """``q [N, heads, head_dim]`` -> ``[N, heads, head_dim]``, each query attending causally to its sequence's cache."""
    kernel = triton_kernel() if q.is_cuda else None
    if kernel is not None:
        try:
            return kernel.paged_attention(
                q, k_cache, v_cache, meta.cu_query_lens, meta.context_lens, meta.block_tables,
                meta.max_query_len, meta.max_context_len, scale, meta.sliding_window, meta.num_kv_splits,
            )  # fmt: skip
        except Exception as e:  # a compile problem on an untested GPU/Triton combination: fall back, loudly, once
            logger.warning("Triton paged attention failed (%s); using the PyTorch path from now on", e)
            _TRITON_KERNEL[0] = None
    return torch_paged_attention(q, k_cache, v_cache, meta, scale)


# --- the PyTorch path -----------------------------------------------------------------------------------------


@dataclass
class KeyBlock:
    """Key block ``j`` of a tile class: the first ``num_tiles`` tiles (by reach) read it."""

    num_tiles: int
    cache_blocks: Tensor  # [num_tiles * KEY_BLOCK / block_size] cache block ids, tile-major
    masked: Tensor | None  # [num_tiles, Q, KEY_BLOCK] True where a query must not see the key; None: all visible


@dataclass
class TileClass:
    """Tiles of ``q`` queries each (a sequence's last tile is padded by repeating its last query)."""

    q: int
    rows: Tensor  # [tiles * q] packed row of each tile query
    real: Tensor | None  # positions in ``rows`` that are not padding (None: all)
    out_rows: Tensor  # packed rows of the real positions
    key_blocks: list[KeyBlock]
    key_block: int  # keys per block


def plan_tiles(
    cu_query_lens: np.ndarray,
    context_lens: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
) -> list[TileClass]:
    """The PyTorch path's per-step plan (see the module doc); only host arrays are read."""
    query_lens = np.diff(cu_query_lens).astype(np.int64)
    context_lens = context_lens.astype(np.int64)
    key_block = -(-KEY_BLOCK // block_size) * block_size
    per_key_block = key_block // block_size
    num_tiles = -(-query_lens // Q_TILE)
    tile_seq = np.repeat(np.arange(len(query_lens)), num_tiles)
    tile_first = (np.arange(len(tile_seq)) - np.repeat(np.cumsum(num_tiles) - num_tiles, num_tiles)) * Q_TILE
    tile_len = np.minimum(Q_TILE, query_lens[tile_seq] - tile_first)
    first_pos = context_lens[tile_seq] - query_lens[tile_seq] + tile_first  # position of each tile's first query
    reach = first_pos + tile_len  # keys [0, reach) hold everything the tile sees
    tile_q = 1 << np.ceil(np.log2(tile_len)).astype(np.int64)  # the class: tile length rounded up to a power of two
    num_key_blocks = -(-int(reach.max()) // key_block)
    tables = np.zeros((block_tables.shape[0], num_key_blocks * per_key_block), dtype=np.int64)
    width = min(block_tables.shape[1], tables.shape[1])
    tables[:, :width] = block_tables[:, :width]

    classes = []
    for q in np.unique(tile_q):
        tiles = np.flatnonzero(tile_q == q)
        tiles = tiles[np.argsort(-reach[tiles], kind="stable")]
        seq, first, length, start = tile_seq[tiles], tile_first[tiles], tile_len[tiles], first_pos[tiles]
        offset = np.minimum(np.arange(q)[None, :], length[:, None] - 1)  # padding repeats the last query
        rows = (cu_query_lens[seq][:, None] + first[:, None] + offset).reshape(-1)
        query_pos = start[:, None] + offset  # [tiles, q]
        real = (np.arange(q)[None, :] < length[:, None]).reshape(-1)
        blocks = []
        for j in range(-(-int(reach[tiles].max()) // key_block)):
            lo, hi = j * key_block, (j + 1) * key_block
            n = int(np.count_nonzero(reach[tiles] > lo))  # reach is sorted: the first n tiles
            ids = tables[seq[:n], j * per_key_block : (j + 1) * per_key_block].reshape(-1)
            masked = None
            # A mask is needed where a tile's first query sits before the block's end, or its window starts after the block's start.
            crosses = start[:n].min() < hi - 1
            if sliding_window:
                crosses = crosses or (query_pos[:n, -1] - sliding_window + 1).max() > lo
            if crosses:
                key_pos = np.arange(lo, hi)[None, None, :]
                hidden = key_pos > query_pos[:n, :, None]
                if sliding_window:
                    hidden |= key_pos <= query_pos[:n, :, None] - sliding_window
                masked = torch.from_numpy(hidden).to(device)
            blocks.append(KeyBlock(n, torch.from_numpy(ids).to(device), masked))
        all_real = bool(real.all())
        classes.append(
            TileClass(
                int(q),
                torch.from_numpy(rows).to(device),
                None if all_real else torch.from_numpy(np.flatnonzero(real)).to(device),
                torch.from_numpy(rows if all_real else rows[real]).to(device),
                blocks,
                key_block,
            )
        )
    return classes


def torch_paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """The PyTorch path: blockwise online softmax over key blocks, every query of the step at once (float32 maths)."""
    if meta.plan is None:
        meta.plan = plan_tiles(*meta.host_arrays(), k_cache.shape[1], meta.sliding_window, q.device)
    out = torch.empty_like(q)
    for tiles in meta.plan:
        _tile_class_attention(out, q, k_cache, v_cache, tiles, scale)
    return out


def _tile_class_attention(out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, tiles: TileClass, scale: float) -> None:
    """Attention of one tile class, written to its rows of ``out``."""
    _, heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group, nq, kb = heads // kv_heads, tiles.q, tiles.key_block
    num_tiles = tiles.rows.numel() // nq
    # [tiles, kv_heads, q * group, D]: a KV head's queries (query-major, then head of the group) form one matrix.
    qt = q.index_select(0, tiles.rows).view(num_tiles, nq, kv_heads, group, head_dim).transpose(1, 2)
    qt = qt.reshape(num_tiles, kv_heads, nq * group, head_dim).float() * scale
    m = denom = acc = None
    for block in tiles.key_blocks:
        n = block.num_tiles
        k = k_cache.index_select(0, block.cache_blocks).view(n, kb, kv_heads, head_dim).float()
        v = v_cache.index_select(0, block.cache_blocks).view(n, kb, kv_heads, head_dim).float()
        scores = qt[:n] @ k.permute(0, 2, 3, 1)  # [n, kv_heads, q * group, kb]
        if block.masked is not None:
            scores.view(n, kv_heads, nq, group, kb).masked_fill_(block.masked[:, None, :, None, :], float("-inf"))
        if m is None:  # the first block: every tile reads it
            m = scores.amax(-1).clamp_(min=_NEG)
            p = (scores - m[..., None]).exp_()
            denom = p.sum(-1)
            acc = p @ v.transpose(1, 2)
            continue
        m_new = torch.maximum(m[:n], scores.amax(-1))
        p = (scores - m_new[..., None]).exp_()
        alpha = (m[:n] - m_new).exp_()
        denom[:n].mul_(alpha).add_(p.sum(-1))
        acc[:n].mul_(alpha[..., None]).add_(p @ v.transpose(1, 2))
        m[:n] = m_new
    o = (acc / denom[..., None]).view(num_tiles, kv_heads, nq, group, head_dim).transpose(1, 2).reshape(-1, heads, head_dim)
    if tiles.real is not None:
        o = o.index_select(0, tiles.real)
    out.index_copy_(0, tiles.out_rows, o.to(out.dtype))
