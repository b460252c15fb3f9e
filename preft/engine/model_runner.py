"""Runs one scheduled step: flatten the sequences' new tokens, run the model, sample.

Owns the model and the paged KV cache ``[2 (k, v), layers, blocks, block_size, kv_heads, head_dim]``.
Per token it derives the KV slot, the position and the adapter slot (``-1`` for base requests and
for every token the adapter's policy leaves alone, e.g. decode tokens of ``prefill`` adapters).
On CUDA, decode steps replay CUDA graphs (``preft.engine.cuda_graphs``): adapter-free ones and
those with `all`-policy adapters alike.
"""

from __future__ import annotations

import math
import mmap
from dataclasses import dataclass

import torch
from torch import Tensor

from preft.engine.adapter_manager import AdapterManager
from preft.engine.attention import AttentionMetadata, build_metadata, decode_kernel_usable
from preft.engine.cuda_graphs import DecodeGraphs
from preft.engine.guided import GuidedDecoding
from preft.engine.model import CausalLM, sliding_window
from preft.engine.sampler import Sampler
from preft.engine.sequence import Sequence


class NonFiniteLogitsError(RuntimeError):
    """Some sequences' logits hold NaN or inf (e.g. a broken adapter); the engine fails only their requests."""

    def __init__(self, seqs: list[Sequence]):
        super().__init__(f"non-finite logits for request(s) {sorted({s.request_id for s in seqs})}")
        self.seqs = seqs


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: tokens ``start .. start + num_new_tokens`` get their KV computed."""

    seq: Sequence
    start: int
    num_new_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_new_tokens

    @property
    def samples(self) -> bool:
        """This chunk reaches the sequence's last token, so its logits give the next token."""
        return self.end == self.seq.num_tokens


def kv_block_bytes(config, block_size: int, dtype: torch.dtype) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    return 2 * config.num_hidden_layers * block_size * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def lazy_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """A zero CPU tensor whose pages become resident only when first written.

    ``torch.zeros`` writes every byte up front, so a KV pool would cost its full size in RSS (and
    seconds of page faults) before the first request. An anonymous private mapping is zero by
    contract and the kernel backs a page only when it is touched; the block manager hands out low
    block ids first, so resident memory follows the KV actually used.
    """
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    if nbytes == 0 or not hasattr(mmap, "MAP_PRIVATE"):
        return torch.zeros(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)  # the tensor keeps ``region`` alive


class ModelRunner:
    def __init__(self, model: CausalLM, adapters: AdapterManager, num_blocks: int, block_size: int):
        config = model.config
        self.model = model
        self.adapters = adapters
        self.block_size = block_size
        self.device = next(model.parameters()).device
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = config.num_key_value_heads or config.num_attention_heads
        dtype = next(model.parameters()).dtype
        # One block more than the block manager hands out: a scratch block for CUDA-graph padding rows.
        shape = (2, config.num_hidden_layers, num_blocks + 1, block_size, kv_heads, head_dim)
        self.kv_cache = lazy_zeros(shape, dtype) if self.device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=self.device)
        self.num_blocks = num_blocks
        self.sampler = Sampler()
        self.guided: GuidedDecoding | None = None  # set by the engine: structured-output bitmasks
        self.sliding_window = sliding_window(config)
        self.graphs: DecodeGraphs | None = None
        self.decode_kernel = decode_kernel_usable(self.device, block_size)

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> bool:
        """CUDA graphs for decode steps, adapter-free or with `all`-policy adapters (CUDA with Triton only); True if in use."""
        if not self.decode_kernel:
            return False
        graphs = DecodeGraphs(
            self.model, self.kv_cache, max_batch, -(-max_model_len // self.block_size), self.num_blocks, self.sliding_window, self.adapters
        )
        self.graphs = graphs if graphs.capture() else None
        return self.graphs is not None

    def _tensor(self, values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[Tensor, Tensor, AttentionMetadata, list[int]]:
        input_ids, positions, slot_mapping, logits_rows = [], [], [], []
        query_starts, query_lens, context_lens, block_tables = [], [], [], []
        bs = self.block_size
        for item in batch:
            seq, start, end = item.seq, item.start, item.end
            query_starts.append(len(input_ids))
            query_lens.append(end - start)
            context_lens.append(end)
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            table = seq.block_table
            slot_mapping += [table[p // bs] * bs + p % bs for p in range(start, end)]
            block_tables.append(table[: -(-end // bs)])
            if item.samples:
                logits_rows.append(len(input_ids) - 1)
        meta = build_metadata(
            self._tensor(slot_mapping), query_starts, query_lens, context_lens, block_tables, bs, self.sliding_window, self.decode_kernel
        )
        return self._tensor(input_ids), self._tensor(positions), meta, logits_rows

    def prepare_adapters(self, batch: list[ScheduledSeq], num_tokens: int):
        """Per-token adapter slots; None when no token of the step is adapted."""
        slots = {"lora": [-1] * num_tokens, "reft": [-1] * num_tokens}
        active: dict[str, set[int]] = {"lora": set(), "reft": set()}
        offset = 0
        for item in batch:
            seq, n = item.seq, item.num_new_tokens
            if seq.adapter is not None and (seq.adapter.policy == "all" or item.start < seq.num_prompt_tokens):
                if item.start >= seq.num_prompt_tokens:  # decode tokens of an `all` adapter: every one adapted
                    selected = [True] * n
                else:
                    mask = seq.adapter_mask(item.start, item.end)
                    selected = [] if mask is None else mask.tolist()
                if any(selected):
                    assert seq.slot is not None, f"sequence of request {seq.request_id!r} is adapted but holds no adapter slot"
                    kind = "lora" if seq.adapter.kind == "lora" else "reft"
                    slots[kind][offset : offset + n] = [seq.slot if m else -1 for m in selected]
                    active[kind].add(seq.slot)
            offset += n
        tensors = {kind: self._tensor(slots[kind]) if active[kind] else None for kind in slots}
        return self.adapters.batch(tensors["lora"], active["lora"], tensors["reft"], active["reft"])

    @torch.inference_mode()
    def run(self, batch: list[ScheduledSeq]) -> list[int]:
        """Compute the batch's new tokens' KV; return the next token of every sequence whose chunk reached its end."""
        input_ids, positions, meta, logits_rows = self.prepare(batch)
        adapters = self.prepare_adapters(batch, len(input_ids))
        hidden = None
        if self.graphs is not None and meta.decode is not None:  # decode step: replay (base model, or with `all` adapters)
            hidden = self.graphs.run(input_ids, positions, meta.slot_mapping, *meta.decode, adapters)
        if hidden is None:
            hidden = self.model(input_ids, positions, self.kv_cache, meta, adapters)
        if not logits_rows:
            return []
        logits = self.model.logits(hidden[self._tensor(logits_rows)])
        seqs = [item.seq for item in batch if item.samples]
        finite = torch.isfinite(logits).all(dim=-1)
        if not bool(finite.all()):  # greedy argmax would silently pick garbage; sampling would raise mid-batch
            raise NonFiniteLogitsError([seq for seq, ok in zip(seqs, finite.tolist()) if not ok])
        token_bitmask = self.guided.bitmask(seqs) if self.guided is not None else None  # structured outputs
        return self.sampler(logits, seqs, token_bitmask)
