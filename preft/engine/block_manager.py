"""Paged KV blocks: allocation, reference counts and prefix caching.

A block's hash chains over (parent hash, token ids, cache key), where the sequence supplies the
cache key (adapter identity and per-token edit mask): two requests share a cached block only if
they would compute exactly the same KV for it. Only full prompt blocks are ever registered, so
KV computed during decode is never reused as prompt KV (DESIGN §1).

Freed blocks keep their hash and stay reusable until the block is handed out again. A new block is
the lowest-numbered free block that holds no cached prefix; only when there is none is the least
recently freed cached block evicted. Low ids first keeps the KV memory in use compact: pages of a
lazily zeroed pool that were never handed out are never touched (``model_runner.lazy_zeros``).
"""

from __future__ import annotations

import hashlib
import heapq
import pickle
from collections import OrderedDict

from preft.engine.sequence import Sequence


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: bytes | None = None
        self.content: tuple | None = None  # (token ids, cache key) checked on a hit: no trust in hashes alone


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_uncached: list[int] = list(range(num_blocks))  # a heap: lowest block id first
        self.free_cached: OrderedDict[int, None] = OrderedDict()  # free blocks holding a cached prefix, LRU first
        self.cached: dict[bytes, int] = {}  # hash -> block id
        self.hits = 0
        self.queries = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.free_cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @staticmethod
    def _hash(parent: bytes | None, content: tuple) -> bytes:
        return hashlib.blake2b(pickle.dumps((parent, content)), digest_size=16).digest()

    def _take_free(self) -> int:
        if self.free_uncached:
            block_id = heapq.heappop(self.free_uncached)
        else:
            block_id, _ = self.free_cached.popitem(last=False)  # evict the least recently freed cached prefix
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash, block.content, block.ref_count = None, None, 1
        return block_id

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding ``seq``'s leading full prompt blocks (no references taken)."""
        if not self.enable_prefix_caching:
            return []
        found, parent = [], None
        for content in seq.block_cache_keys(0, seq.num_cacheable_blocks(self.block_size), self.block_size):
            h = self._hash(parent, content)
            block_id = self.cached.get(h)
            if block_id is None or self.blocks[block_id].content != content:
                break
            found.append(block_id)
            parent = h
        return found

    def allocate(self, seq: Sequence, token_budget: int) -> int:
        """Admit ``seq`` (no blocks yet): reuse cached prefix blocks, then allocate for up to ``token_budget`` more tokens.

        Sets ``seq.num_computed_tokens`` to the cached length and returns how many tokens to compute
        now; 0 (nothing changed) if blocks are short.
        """
        assert not seq.block_table
        prefix = self.match_prefix(seq)
        self.queries += 1
        cached_tokens = len(prefix) * self.block_size
        num_tokens = min(seq.num_tokens - cached_tokens, token_budget)
        needed = -(-(cached_tokens + num_tokens) // self.block_size) - len(prefix)
        free_after_hits = self.num_free_blocks - sum(1 for b in prefix if self.blocks[b].ref_count == 0)
        if needed > free_after_hits:
            return 0
        for block_id in prefix:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_cached[block_id]
            block.ref_count += 1
        seq.block_table = prefix + [self._take_free() for _ in range(needed)]
        seq.num_computed_tokens = seq.num_cached_tokens = cached_tokens
        self.hits += bool(prefix)
        return num_tokens

    def append(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s block table to hold ``num_tokens`` more tokens; False (nothing changed) if blocks are short."""
        table = seq.block_table
        needed = -(-(seq.num_computed_tokens + num_tokens) // self.block_size) - len(table)
        if needed <= 0:  # the common decode step: the last block has room
            return True
        if needed > len(self.free_uncached) + len(self.free_cached):
            return False
        for _ in range(needed):
            table.append(self._take_free())
        return True

    def register_computed(self, seq: Sequence, previously_computed: int, computed: int | None = None) -> None:
        """Publish the full prompt blocks whose KV a step completed (tokens ``previously_computed .. computed``,
        default: up to ``seq.num_computed_tokens``), for later prefix hits."""
        if not self.enable_prefix_caching:
            return
        first = previously_computed // self.block_size
        computed = seq.num_computed_tokens if computed is None else computed
        last = min(computed, seq.num_prompt_tokens) // self.block_size
        parent = self.blocks[seq.block_table[first - 1]].hash if first > 0 else None
        if first >= last or (first > 0 and parent is None):
            return  # nothing completed; or an unregistered parent (cannot happen for prompt blocks, but never chain on None)
        for i, content in enumerate(seq.block_cache_keys(first, last, self.block_size), start=first):
            block = self.blocks[seq.block_table[i]]
            h = self._hash(parent, content)
            if block.hash is None:
                block.hash, block.content = h, content
                self.cached.setdefault(h, block.block_id)
            parent = block.hash

    def unpublish_private(self, seq: Sequence) -> list[int]:
        """Withdraw from the prefix cache the blocks that only ``seq`` holds and return their ids.

        For a sequence that failed: the KV it wrote may hold NaN or garbage, so it must be neither reused
        as a prefix nor left for the next owner of the block (the engine zeroes it)."""
        private = [b for b in seq.block_table if self.blocks[b].ref_count == 1]
        for block_id in private:
            block = self.blocks[block_id]
            if block.hash is not None and self.cached.get(block.hash) == block_id:
                del self.cached[block.hash]
            block.hash, block.content = None, None
        return private

    def free_sequence(self, seq: Sequence) -> None:
        """Drop ``seq``'s references; blocks nobody uses become free (a cached prefix block keeps its hash, newest last)."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                if block.hash is not None and self.cached.get(block.hash) == block_id:
                    self.free_cached[block_id] = None
                else:
                    heapq.heappush(self.free_uncached, block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
