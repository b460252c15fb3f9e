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
the longest context, and a prefill tile skips the key blocks above its causal diagonal. A (key
block, chunk of tiles) pair is one gather of ``MAX_GATHER_BYTES`` at most and one call of torch's
fused CPU flash attention, which returns the log-sum-exp that merges the blocks; additive masks
exist only for blocks that cross a tile's diagonal, context end or window, at
``[tiles, 1, q, KEY_BLOCK]``. The per-step plan is built once (host arrays) and shared by all
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

Q_TILE = 128  # queries of one sequence computed together (PyTorch path)
KEY_BLOCK = 256  # keys per online-softmax step (PyTorch path); rounded up to whole cache blocks
# Keys gathered per fused call (PyTorch path; values as many): small enough to stay in a core's cache until the
# kernel reads them (measured ~2x faster than one big gather), large enough to keep the calls few.
MAX_GATHER_BYTES = 1 << 19
_NEG = -1e30  # log-sum-exp of a query that sees no key of a block: finite, so merging never meets inf - inf


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

# torch's fused CPU flash attention, which also returns the log-sum-exp that merges key blocks (GQA since torch 2.5).
_FUSED_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 5):
    _FUSED_CPU = None


@dataclass
class Chunk:
    """Tiles ``first .. end`` of a tile class against one key block: one gather and one fused call."""

    first: int
    end: int
    num_keys: int  # keys read per tile: the key block, cut short after the chunk's farthest-reaching tile
    cache_blocks: Tensor  # [(end - first) * num_keys / block_size] cache block ids, tile-major
    bias: Tensor | None  # [end - first, 1, q, num_keys] 0 where a query sees the key, -inf where not; None: sees all
    blind: Tensor | None  # [end - first, 1, q] True for a query that sees no key of this block; None: none
    stale: Tensor | None  # [end - first, 1, num_keys, 1] True for a key past its tile's context (zeroed); None: none
    merge: bool  # False for the first key block (it starts the tiles' running result)


@dataclass
class TileClass:
    """Tiles of ``q`` queries each (a sequence's last tile is padded by repeating its last query)."""

    q: int
    rows: Tensor  # [tiles * q] packed row of each tile query
    real: Tensor | None  # positions in ``rows`` that are not padding (None: all)
    out_rows: Tensor  # packed rows of the real positions
    chunks: list[Chunk]


def plan_tiles(
    cu_query_lens: np.ndarray,
    context_lens: np.ndarray,
    block_tables: np.ndarray,
    block_size: int,
    sliding_window: int | None,
    bytes_per_key: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> list[TileClass]:
    """The PyTorch path's per-step plan (see the module doc); only host arrays are read. A chunk gathers at most
    ``MAX_GATHER_BYTES`` of keys (``bytes_per_key`` each) unless one tile needs more; biases are in ``dtype``."""
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
        chunks = []
        for j in range(-(-int(reach[tiles].max()) // key_block)):
            lo, a, active = j * key_block, 0, int(np.count_nonzero(reach[tiles] > j * key_block))  # reach is sorted: a prefix
            while a < active:
                hi = min(lo + key_block, -(-int(reach[tiles[a]]) // block_size) * block_size)  # no key past the chunk's reach
                b = min(active, a + max(1, MAX_GATHER_BYTES // ((hi - lo) * bytes_per_key)))
                key_pos = np.arange(lo, hi)[None, None, :]
                ids = tables[seq[a:b], lo // block_size : hi // block_size].reshape(-1)
                bias = blind = None
                # A bias is needed where a tile's first query sits before the block's end, or its window starts after the block's start.
                crosses = start[a:b].min() < hi - 1
                if sliding_window:
                    crosses = crosses or (query_pos[a:b, -1] - sliding_window + 1).max() > lo
                if crosses:
                    hidden = key_pos > query_pos[a:b, :, None]
                    if sliding_window:
                        hidden |= key_pos <= query_pos[a:b, :, None] - sliding_window
                    bias = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(torch.from_numpy(hidden), float("-inf"))[:, None]
                    bias = bias.to(device)
                    if hidden.all(axis=2).any():
                        blind = torch.from_numpy(hidden.all(axis=2)[:, None]).to(device)
                # Keys past a tile's context are another request's or stale slots: masking alone would let a NaN
                # there through (NaN + -inf, 0 * NaN), so they are zeroed after the gather.
                stale = key_pos[0] >= context_lens[seq[a:b], None]  # [tiles, keys]
                stale = torch.from_numpy(stale[:, None, :, None]).to(device) if stale.any() else None
                chunks.append(Chunk(a, b, hi - lo, torch.from_numpy(ids).to(device), bias, blind, stale, merge=j > 0))
                a = b
        all_real = bool(real.all())
        classes.append(
            TileClass(
                int(q),
                torch.from_numpy(rows).to(device),
                None if all_real else torch.from_numpy(np.flatnonzero(real)).to(device),
                torch.from_numpy(rows if all_real else rows[real]).to(device),
                chunks,
            )
        )
    return classes


def torch_paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata, scale: float) -> Tensor:
    """The PyTorch path: attention per (tile class, key block, chunk of tiles), merged by log-sum-exp (float32)."""
    if meta.plan is None:
        _, block_size, kv_heads, head_dim = k_cache.shape
        bytes_per_key = kv_heads * head_dim * k_cache.element_size()
        meta.plan = plan_tiles(*meta.host_arrays(), block_size, meta.sliding_window, bytes_per_key, q.device, q.dtype)
    out = torch.empty_like(q)
    for tiles in meta.plan:
        _tile_class_attention(out, q, k_cache, v_cache, tiles, scale)
    return out


def _block_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """``q [n, heads, Q, D]``, ``k, v [n, kv_heads, K, D]`` (strided views allowed) -> (out, log-sum-exp ``[n, heads, Q]``)."""
    if _FUSED_CPU is not None and q.device.type == "cpu":
        return _FUSED_CPU(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
    group = q.shape[1] // k.shape[1]
    scores = q.float() @ k.float().repeat_interleave(group, 1).transpose(-1, -2) * scale
    if bias is not None:
        scores += bias
    lse = scores.logsumexp(-1)
    return (scores - lse[..., None]).exp_() @ v.float().repeat_interleave(group, 1), lse


def _tile_class_attention(out: Tensor, q: Tensor, k_cache: Tensor, v_cache: Tensor, tiles: TileClass, scale: float) -> None:
    """Attention of one tile class, written to its rows of ``out``: one fused call per chunk, merged online."""
    _, heads, head_dim = q.shape
    kv_heads, nq = k_cache.shape[2], tiles.q
    num_tiles = tiles.rows.numel() // nq
    qt = q.index_select(0, tiles.rows).view(num_tiles, nq, heads, head_dim).transpose(1, 2)  # [tiles, heads, q, D]
    acc = q.new_empty(num_tiles, heads, nq, head_dim, dtype=torch.float32)
    lse = q.new_empty(num_tiles, heads, nq, dtype=torch.float32)
    for chunk in tiles.chunks:
        a, b, kb = chunk.first, chunk.end, chunk.num_keys
        # The gather is the only copy of the keys; transposed views go to the kernel as they are.
        k = k_cache.index_select(0, chunk.cache_blocks).view(b - a, kb, kv_heads, head_dim).transpose(1, 2)
        v = v_cache.index_select(0, chunk.cache_blocks).view(b - a, kb, kv_heads, head_dim).transpose(1, 2)
        if chunk.stale is not None:
            k.masked_fill_(chunk.stale, 0.0)
            v.masked_fill_(chunk.stale, 0.0)
        o, block_lse = _block_attention(qt[a:b], k, v, chunk.bias, scale)
        if chunk.blind is not None:  # a query that sees nothing here must weigh nothing in the merge
            block_lse = block_lse.masked_fill(chunk.blind, _NEG)
            o = o.masked_fill(chunk.blind[..., None], 0.0)
        if not chunk.merge:
            acc[a:b], lse[a:b] = o, block_lse
            continue
        # acc <- (acc * e^lse + o * e^block_lse) / (e^lse + e^block_lse), i.e. o + (acc - o) * sigmoid(lse - block_lse)
        weight = torch.sigmoid(lse[a:b] - block_lse)
        acc[a:b].sub_(o).mul_(weight[..., None]).add_(o)
        lse[a:b] = torch.logaddexp(lse[a:b], block_lse)
    o = acc.transpose(1, 2).reshape(-1, heads, head_dim)
    if tiles.real is not None:
        o = o.index_select(0, tiles.real)
    out.index_copy_(0, tiles.out_rows, o.to(out.dtype))
