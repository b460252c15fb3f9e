"""CUDA graphs of the decode step (nano-vllm style): the base model, and the base model plus `all`-policy adapters.

A decode batch runs the same kernels every step, so one graph per batch-size bucket replays it
with almost no CPU launch overhead. Inputs are copied into static buffers; rows beyond the real
batch point at a scratch KV block that no sequence owns. Needs the Triton paged attention
(host-sync free; its grid depends only on the bucket, and its flash-decoding split is fixed at
capture from the bucket and the longest context). Two families of graphs share the buffers and
one memory pool:

- **base** ``(bucket, False, False)``: steps with no adapted token (``prefill``-policy or base
  requests). Captured up front at engine start.
- **adapters** ``(bucket, lora, reft)``: decode steps with `all`-policy adapters (the multi-LoRA
  baseline gets graphs too, so the PreFT / multi-LoRA ratio compares equally optimised paths).
  The graph applies the Triton BGMV kernels (no host sync; ranks and scaling read on device) of
  every LoRA ``(layer, module)`` stack / every ReFT layer stack that exists at capture time, with
  per-token slots from static int32 buffers (``lora_slot``, ``reft_slot``; padding rows ``-1``).
  The eager path's host-side masking (slots without factors at a stack -> ``-1``) is not baked
  in: a slot with no factors at a stack has rank 0 there and zero padded factors, so BGMV adds
  exactly nothing for it, whatever adapters later occupy the slots.

Stale graphs. A graph holds the addresses of the slot stacks it read at capture. Stacks are
created lazily and widened for larger ranks (``SlotStack.grow``), which replaces their tensors.
We chose a layout version over pre-sized stacks (a ``max_lora_rank`` option as in vLLM): it
costs no memory for modules no adapter targets and needs no engine option. The
``AdapterManager.layout_version`` is bumped by every stack allocation or reallocation; adapter
graphs are tagged with the version they were captured under, are all dropped as soon as it
differs, and are recaptured lazily, one bucket at a time, on the next `all`-policy decode step
that needs them. Layouts only grow (new stacks, larger ranks), so this happens a bounded and
small number of times; a benchmark's warm-up absorbs it. Writing adapters into existing slots
(loading, eviction) changes no address and no version: the graph reads the new factors.

Guarded: every capture runs a self-check (graph replay == eager forward on the same inputs, on
the scratch block; adapter graphs with the triggering step's slots cycled over the rows, so a
nonzero adapter is exercised); any failure disables that family of graphs with a warning and
those steps stay eager.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from preft.engine.attention import AttentionMetadata, triton_kernel
from preft.engine.lowrank import grouped_low_rank_reference

if TYPE_CHECKING:
    from preft.engine.adapter_manager import AdapterBatch, AdapterManager

logger = logging.getLogger(__name__)

GraphKey = tuple[int, bool, bool]  # (bucket, applies LoRA, applies ReFT); (b, False, False) is the base model


def bgmv(
    x: Tensor, token_slot: Tensor, down: Tensor, up: Tensor, bias: Tensor | None, ranks: Tensor, scaling: Tensor, out: Tensor
) -> Tensor:
    """The adapter op inside a graph: Triton BGMV on CUDA (capturable); the PyTorch reference elsewhere (CPU tests)."""
    if x.is_cuda:
        from preft.engine.kernels import triton_grouped_low_rank

        return triton_grouped_low_rank(x, token_slot, down, up, bias, ranks, scaling, out=out, method="bgmv")
    return grouped_low_rank_reference(x, token_slot, down, up, bias, ranks, scaling, out=out)


class GraphAdapters:
    """What the model sees as ``adapters`` inside an adapter graph: the stacks' tensors as they are at capture.

    Same interface as ``AdapterBatch`` (``lora``, ``reft``). Holding the tensors, not the stacks,
    mirrors what a captured graph holds (addresses), so a CPU stand-in replay is stale exactly
    when a real graph would be.
    """

    def __init__(self, manager: AdapterManager, lora_slot: Tensor | None, reft_slot: Tensor | None):
        self.lora_slot, self.reft_slot = lora_slot, reft_slot
        self.lora_factors = {}
        if lora_slot is not None:
            self.lora_factors = {key: (s.down, s.up, s.ranks, s.scaling) for key, s in manager.lora_stacks.items()}
        self.reft_factors = {}
        if reft_slot is not None:
            self.reft_factors = {layer: (s.down, s.up, s.bias, s.ranks, s.scaling) for layer, s in manager.reft_stacks.items()}

    def lora(self, layer: int, module: str, x: Tensor, out: Tensor) -> Tensor:
        factors = self.lora_factors.get((layer, module))
        if factors is None:
            return out
        down, up, ranks, scaling = factors
        return bgmv(x, self.lora_slot, down, up, None, ranks, scaling, out)

    def reft(self, layer: int, hidden: Tensor) -> Tensor:
        factors = self.reft_factors.get(layer)
        if factors is None:
            return hidden
        return bgmv(hidden, self.reft_slot, *factors, out=hidden)


class DecodeGraphs:
    def __init__(
        self,
        model,
        kv_cache: Tensor,
        max_batch: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        sliding_window: int | None,
        adapters: AdapterManager | None = None,
    ):
        device = kv_cache.device
        self.model, self.kv_cache, self.sliding_window, self.manager = model, kv_cache, sliding_window, adapters
        block_size = kv_cache.shape[3]
        self.scratch_slot = scratch_block * block_size
        self.scratch_block = scratch_block
        self.buckets = sorted({b for b in (1, 2, 4, 8, *range(16, max_batch + 1, 16), max_batch) if b <= max_batch})
        size = self.buckets[-1]
        self.max_context_len = max_blocks_per_seq * block_size
        # int32, as the runner's step buffers: the copies into these buffers convert nothing.
        self.input_ids = torch.zeros(size, dtype=torch.int32, device=device)
        self.positions = torch.zeros(size, dtype=torch.int32, device=device)
        self.slot_mapping = torch.full((size,), self.scratch_slot, dtype=torch.int32, device=device)
        self.block_tables = torch.full((size, max_blocks_per_seq), scratch_block, dtype=torch.int32, device=device)
        self.context_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.cu_query_lens = torch.arange(size + 1, dtype=torch.int32, device=device)  # one query per row, padding rows too
        self.lora_slot = torch.full((size,), -1, dtype=torch.int32, device=device)  # int32: what the kernels read, no cast in the graph
        self.reft_slot = torch.full((size,), -1, dtype=torch.int32, device=device)
        self.graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[GraphKey, Tensor] = {}
        self.views: dict[GraphKey, GraphAdapters] = {}
        self.pool = None
        self.adapter_graphs = adapters is not None  # False after a failed adapter capture: `all`-policy decode stays eager
        self.layout_version: int | None = None  # the manager's layout the adapter graphs were captured under

    def _meta(self, b: int) -> AttentionMetadata:
        kernel = triton_kernel() if self.kv_cache.is_cuda else None
        kv_heads = self.kv_cache.shape[4]
        return AttentionMetadata(
            self.slot_mapping[:b],
            self.cu_query_lens[: b + 1],
            self.context_lens[:b],
            self.block_tables[:b],
            max_query_len=1,
            max_context_len=self.max_context_len,
            sliding_window=self.sliding_window,
            # Fixed per bucket: a replay cannot change the grid. Sized for the longest context; empty splits are cheap.
            num_kv_splits=kernel.num_kv_splits(b, kv_heads, self.max_context_len, self.kv_cache.device) if kernel else None,
        )

    def _forward(self, key: GraphKey) -> Tensor:
        b = key[0]
        return self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, self._meta(b), self.views.get(key))

    def _record(self, key: GraphKey):
        """Warm up (compiles the Triton kernels outside the capture), then capture ``key``; output in ``outputs[key]``."""
        self._forward(key)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs[key] = self._forward(key)
        self.pool = graph.pool()
        return graph

    def _sync(self) -> None:
        if self.kv_cache.is_cuda:
            torch.cuda.synchronize()

    def _scratch_inputs(self) -> None:
        """Every row on the scratch KV block, no adapter: captures and self-checks touch no sequence's KV."""
        self.input_ids.fill_(1)
        self.positions.zero_()
        self.slot_mapping.fill_(self.scratch_slot)
        self.block_tables.fill_(self.scratch_block)
        self.context_lens.fill_(1)
        self.lora_slot.fill_(-1)
        self.reft_slot.fill_(-1)

    def _self_check(self, key: GraphKey, adapters: AdapterBatch | None) -> None:
        """Replay ``key`` and compare with the eager forward on the same inputs, all on the scratch block.

        Row ``i`` is a token at position ``k = i % block_size`` writing scratch slot ``k`` and attending
        to slots ``0..k``; adapter graphs give it the ``k``-th of ``adapters``' active slots (cycled).
        Rows that share a KV slot are identical, so no write races and the comparison is exact.
        """
        b = key[0]
        self._scratch_inputs()
        k = torch.arange(b, device=self.input_ids.device) % self.kv_cache.shape[3]
        self.input_ids[:b].copy_(1 + k)
        self.positions[:b].copy_(k)
        self.slot_mapping[:b].copy_(self.scratch_slot + k)
        self.context_lens[:b].copy_(k + 1)
        eager_adapters = None
        if adapters is not None:
            lora = self._cycle(self.lora_slot, k, adapters.lora_active) if key[1] else None
            reft = self._cycle(self.reft_slot, k, adapters.reft_active) if key[2] else None
            eager_adapters = self.manager.batch(lora, adapters.lora_active, reft, adapters.reft_active)
        self.graphs[key].replay()
        self._sync()
        replayed = self.outputs[key].clone()
        eager = self.model(self.input_ids[:b], self.positions[:b], self.kv_cache, self._meta(b), eager_adapters)
        if not torch.allclose(replayed, eager, rtol=1e-3, atol=1e-3):
            raise RuntimeError(f"graph {key} replay differs from eager by {(replayed - eager).abs().max().item():.3g}")

    @staticmethod
    def _cycle(buffer: Tensor, k: Tensor, slots: set[int]) -> Tensor:
        """Row ``i`` gets the ``k[i]``-th of ``slots`` (cycled) in ``buffer``; the same values as a long tensor for the eager path."""
        values = torch.tensor(sorted(slots), dtype=torch.long, device=buffer.device)
        rows = values[k % len(values)]
        buffer[: k.numel()].copy_(rows)
        return rows

    @torch.inference_mode()
    def capture(self) -> bool:
        """Capture the base-model graph of every bucket; False (graphs unusable) after any failure or a failed self-check."""
        try:
            self._scratch_inputs()
            for b in reversed(self.buckets):
                self.graphs[(b, False, False)] = self._record((b, False, False))
            self._self_check((self.buckets[0], False, False), None)
        except Exception as e:
            logger.warning("CUDA graphs for decode disabled: %s", e)
            self.graphs.clear()
            return False
        return True

    def _drop_adapter_graphs(self) -> None:
        for key in [k for k in self.graphs if k[1] or k[2]]:
            del self.graphs[key]
            self.outputs.pop(key, None)
            self.views.pop(key, None)

    @torch.inference_mode()
    def _capture_adapters(self, key: GraphKey, adapters: AdapterBatch) -> bool:
        """Capture and self-check the adapter graph ``key`` under the current stack layout; False disables adapter graphs."""
        b = key[0]
        try:
            self._scratch_inputs()
            self.views[key] = GraphAdapters(self.manager, self.lora_slot[:b] if key[1] else None, self.reft_slot[:b] if key[2] else None)
            self.graphs[key] = self._record(key)
            self._self_check(key, adapters)
        except Exception as e:
            logger.warning("CUDA graphs for decode with `all`-policy adapters disabled (those steps run eagerly): %s", e)
            self._drop_adapter_graphs()
            self.adapter_graphs = False
            return False
        return True

    def run(
        self,
        input_ids: Tensor,
        positions: Tensor,
        slot_mapping: Tensor,
        block_tables: Tensor,
        context_lens: Tensor,
        adapters: AdapterBatch | None = None,
    ) -> Tensor | None:
        """Hidden states of one decode step via the smallest fitting graph, or None when none fits (run eagerly).

        ``adapters``: the step's per-token slots (decode tokens of `all`-policy adapters), or None.
        """
        n, width = input_ids.numel(), block_tables.shape[1]
        bucket = next((b for b in self.buckets if b >= n), None)
        if bucket is None or width > self.block_tables.shape[1] or not self.graphs:
            return None
        key = (bucket, False, False)
        if adapters is not None:
            if not self.adapter_graphs:
                return None
            if self.layout_version != self.manager.layout_version:  # stacks were (re)allocated: every adapter graph is stale
                self._drop_adapter_graphs()
                self.layout_version = self.manager.layout_version
            key = (bucket, adapters.lora_slot is not None, adapters.reft_slot is not None)
            if key not in self.graphs and not self._capture_adapters(key, adapters):
                return None
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:bucket].fill_(self.scratch_slot)
        self.block_tables[:n, :width].copy_(block_tables)
        self.block_tables[n:bucket, 0].fill_(self.scratch_block)
        self.context_lens[:n].copy_(context_lens)
        self.context_lens[n:bucket].fill_(1)
        if key[1]:
            self.lora_slot[:n].copy_(adapters.lora_slot)
            self.lora_slot[n:bucket].fill_(-1)  # padding rows: no adapter
        if key[2]:
            self.reft_slot[:n].copy_(adapters.reft_slot)
            self.reft_slot[n:bucket].fill_(-1)
        self.graphs[key].replay()
        return self.outputs[key][:n]
