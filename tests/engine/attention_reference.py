"""The obviously-correct paged attention every attention path is tested against, and random paged steps.

Per sequence: gather its keys block by block, build the causal (and sliding-window) mask from
absolute positions, softmax in float64. Slow on purpose; tests only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor


def reference_paged_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    scale: float,
    sliding_window: int | None = None,
) -> Tensor:
    """``q [N, heads, D]`` packed by sequence -> ``[N, heads, D]`` (float64 maths, ``q``'s dtype out)."""
    heads, block_size, kv_heads = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    out, start = [], 0
    for q_len, context, table in zip(query_lens, context_lens, block_tables):
        k = torch.cat([k_cache[b] for b in table])[:context].double()  # [context, kv_heads, D]
        v = torch.cat([v_cache[b] for b in table])[:context].double()
        assert k.shape[0] == context, f"block table of {len(table)} blocks of {block_size} is shorter than context {context}"
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # query head h reads KV head h // group
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        query_pos = torch.arange(context - q_len, context)[:, None]
        key_pos = torch.arange(context)[None, :]
        visible = key_pos <= query_pos
        if sliding_window:
            visible &= key_pos > query_pos - sliding_window
        scores = torch.einsum("qhd,khd->hqk", q[start : start + q_len].double(), k) * scale
        probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
        out.append(torch.einsum("hqk,khd->qhd", probs, v))
        start += q_len
    return torch.cat(out).to(q.dtype)


def random_step(
    query_lens: list[int],
    context_lens: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor, list[list[int]]]:
    """``(q, k_cache, v_cache, block_tables)`` of a step: every sequence on its own scattered blocks, plus spare ones;
    slots outside every context are NaN."""
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    needed = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(needed) + 3
    free = list(range(num_blocks))
    rng.shuffle(free)
    tables = [[free.pop() for _ in range(n)] for n in needed]
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    q = torch.randn(sum(query_lens), heads, head_dim, generator=gen).to(dtype)
    # Every slot no query may see holds NaN (spare blocks: other requests' KV; the tail of each last block: stale KV),
    # so an attention path that lets a masked key through (NaN + -inf, 0 * NaN) fails the comparison.
    for cache in (k_cache, v_cache):
        cache[free] = float("nan")
        for table, context in zip(tables, context_lens):
            cache[table[-1], (context - 1) % block_size + 1 :] = float("nan")
    return q, k_cache, v_cache, tables


@dataclass(frozen=True)
class Case:
    """One packed step: per sequence its new queries and its context after the step (context > queries: earlier
    chunks or a prefix-cache hit)."""

    name: str
    query_lens: tuple[int, ...]
    context_lens: tuple[int, ...]
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    block_size: int = 4
    sliding_window: int | None = None
    dtype: str = "float32"
    num_splits: int | None = None  # Triton: force the flash-decoding split

    def step(self) -> tuple[Tensor, Tensor, Tensor, list[list[int]]]:
        return random_step(
            list(self.query_lens),
            list(self.context_lens),
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.block_size,
            getattr(torch, self.dtype),
        )


MIXED = dict(query_lens=(1, 6, 1, 17, 1, 3, 9), context_lens=(4, 6, 9, 40, 1, 19, 16))  # decodes, chunks, prefix hits, block edges
CASES = [
    Case("mixed-gqa2", **MIXED),
    Case("mixed-gqa1", **MIXED, heads=3, kv_heads=3, head_dim=24),  # head_dim not a power of two
    Case("mixed-gqa3", **MIXED, heads=6, kv_heads=2),
    Case("mixed-gqa7", **MIXED, heads=7, kv_heads=1, block_size=8),
    Case("mixed-bf16", **MIXED, heads=6, kv_heads=2, dtype="bfloat16"),
    Case("mixed-window", **MIXED, sliding_window=5),
    Case("prefill-long-chunk", query_lens=(70, 2), context_lens=(75, 2), heads=6, kv_heads=2, block_size=16),
    Case("decode", query_lens=(1,) * 6, context_lens=(1, 3, 4, 5, 8, 33)),
    Case("decode-gqa7-bf16", query_lens=(1,) * 4, context_lens=(7, 8, 9, 31), heads=7, kv_heads=1, dtype="bfloat16"),
    Case("decode-window", query_lens=(1,) * 4, context_lens=(2, 6, 13, 40), sliding_window=6),
    Case("decode-split", query_lens=(1,) * 3, context_lens=(1, 70, 130), heads=6, kv_heads=2, num_splits=3),
    Case("mixed-split", **MIXED, num_splits=2),
    Case("mixed-split-window-bf16", **MIXED, heads=6, kv_heads=2, sliding_window=7, dtype="bfloat16", num_splits=4),
]
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}  # max |got - reference|, outputs of magnitude ~1 (bf16: inputs and p rounded)


def max_error(case: Case, attention) -> float:
    """Max |attention(...) - reference| on ``case``; ``attention(q, k_cache, v_cache, case, tables)`` returns ``[N, heads, D]``."""
    q, k_cache, v_cache, tables = case.step()
    scale = case.head_dim**-0.5
    got = attention(q, k_cache, v_cache, case, tables)
    want = reference_paged_attention(
        q, k_cache, v_cache, list(case.query_lens), list(case.context_lens), tables, scale, case.sliding_window
    )
    assert got.shape == want.shape and got.dtype == want.dtype
    return (got.cpu().double() - want.double()).abs().max().item()
