"""CUDA graphs of the base-model decode step (nano-vllm style), for adapter-free decode batches.

A decode batch whose requests are all ``prefill``-policy (or base) runs the plain base model:
the same kernels every step, so one graph per batch-size bucket replays it with almost no CPU
launch overhead. Inputs are copied into static buffers; rows beyond the real batch point at a
scratch KV block that no sequence owns. Needs the Triton decode attention (host-sync free).

Guarded: capture runs a self-check (graph replay == eager forward on the same inputs); any
failure or mismatch disables graphs with a warning and the engine stays eager.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from preft.engine.attention import AttentionMetadata

logger = logging.getLogger(__name__)


class DecodeGraphs:
    def __init__(self, model, kv_cache: Tensor, max_batch: int, max_blocks_per_seq: int, scratch_block: int, sliding_window: int | None):
        device = kv_cache.device
        self.model, self.kv_cache, self.sliding_window = model, kv_cache, sliding_window
        block_size = kv_cache.shape[3]
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.buckets = sorted({b for b in (1, 2, 4, 8, *range(16, max_batch + 1, 16), max_batch) if b <= max_batch})
        size = self.buckets[-1]
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), self.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.full((size, max_blocks_per_seq), scratch_block, dtype=torch.long, device=device)
        self.context_lens = torch.ones(size, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, Tensor] = {}

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            self.slot_mapping[:b], [], [], [], [], self.sliding_window, padded=None, decode=(self.block_tables[:b], self.context_lens[:b])
        )

    def _forward(self, b: int) -> Tensor:
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, self._meta(b), None)

    @torch.inference_mode()
    def capture(self) -> bool:
        """Capture every bucket; False (graphs unusable) after any failure or a failed self-check."""
        try:
            pool = None
            for b in reversed(self.buckets):
                self._forward(b)  # warm-up: compiles the Triton kernels outside the capture
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[b] = self._forward(b)
                pool = graph.pool()
                self.graphs[b] = graph
            b = self.buckets[0]
            self.input_ids[:b].fill_(1)
            self.graphs[b].replay()
            torch.cuda.synchronize()
            eager = self._forward(b)
            if not torch.allclose(self.outputs[b], eager, rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"graph replay differs from eager by {(self.outputs[b] - eager).abs().max().item():.3g}")
        except Exception as e:
            logger.warning("CUDA graphs for decode disabled: %s", e)
            self.graphs.clear()
            return False
        return True

    def run(self, input_ids: Tensor, positions: Tensor, slot_mapping: Tensor, block_tables: Tensor, context_lens: Tensor) -> Tensor | None:
        """Hidden states of one decode step via the smallest fitting graph, or None when none fits."""
        n, width = input_ids.numel(), block_tables.shape[1]
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None or width > self.block_tables.shape[1] or not self.graphs:
            return None
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:bucket].fill_(self.scratch_slot)
        self.block_tables[:n, :width].copy_(block_tables)
        self.block_tables[n:bucket, 0].fill_(self.scratch_block)
        self.context_lens[:n].copy_(context_lens)
        self.context_lens[n:bucket].fill_(1)
        self.graphs[bucket].replay()
        return self.outputs[bucket][:n]
