"""Runs one scheduled step: flatten the sequences' new tokens, run the model, sample.

Owns the model and the paged KV cache ``[2 (k, v), layers, blocks, block_size, kv_heads, head_dim]``.
Per token it derives the KV slot, the position and the adapter slot (``-1`` for base requests and
for every token the adapter's policy leaves alone, e.g. decode tokens of ``prefill`` adapters).
Step inputs live in persistent buffers (``StepBuffers``): filled with NumPy, one host-to-device copy
per step. On CUDA, decode steps replay CUDA graphs (``preft.engine.cuda_graphs``): adapter-free ones
and those with `all`-policy adapters alike.
"""

from __future__ import annotations

import math
import mmap

import numpy as np
import torch
from torch import Tensor

from preft.engine.adapter_manager import AdapterManager
from preft.engine.attention import AttentionMetadata, triton_usable
from preft.engine.cuda_graphs import DecodeGraphs
from preft.engine.guided import GuidedDecoding
from preft.engine.model import CausalLM, sliding_window
from preft.engine.parallel import StepMessage, TensorParallel
from preft.engine.sampler import NonFiniteLogitsError, SampleHandle, Sampler  # noqa: F401 (NonFiniteLogitsError: re-exported)
from preft.engine.sequence import Sequence, edit_mask


class ScheduledSeq:
    """One sequence's share of a step: tokens ``start .. start + num_new_tokens`` get their KV computed.

    ``samples``: the chunk reaches the sequence's last token, so its logits give the next token (set when
    scheduled; the sequence gains its next token only after the step). The last token may itself still be
    pending (asynchronous scheduling: sampled by the step before, its id not yet on the host). A plain class with ``__slots__``:
    one is built per sequence per step, and a slotted dataclass with ``__post_init__`` costs twice as much."""

    __slots__ = ("seq", "start", "num_new_tokens", "end", "samples")

    def __init__(self, seq: Sequence, start: int, num_new_tokens: int):
        self.seq, self.start, self.num_new_tokens = seq, start, num_new_tokens
        self.end = start + num_new_tokens
        self.samples = self.end == len(seq.token_ids) + seq.num_pending

    def __repr__(self) -> str:
        return f"ScheduledSeq(request {self.seq.request_id!r}, tokens {self.start}..{self.end})"


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


class StepBuffers:
    """Persistent step inputs: one packed int32 staging buffer, filled with NumPy and copied to the device at once.

    Per step the staging buffer holds, back to back: input ids [N], positions [N], slot mapping [N],
    cu_query_lens [B + 1], context lens [B], logits rows [L], block tables [B, W] (W: the step's widest
    table), then the per-token LoRA and ReFT adapter slots [N] each, or [0] when no token of the step is
    edited (``adapter_slots``; ``self.adapter_slots`` holds the step's views and active slots), and the
    pending input tokens' indices and rows of the last step's sampled ids [P] each (asynchronous scheduling). On CUDA it
    is pinned and double-buffered (the next step may fill one while the last copy of the other is in
    flight), and the copy is non-blocking; on CPU the views are the staging buffer itself.

    Block tables are kept per sequence in persistent host rows (``tables``): a row is rewritten only
    when its sequence's table was replaced (admission, preemption), and extended by the blocks
    appended since the last step; the block manager only ever appends to a table or replaces it.
    """

    def __init__(self, max_num_tokens: int, max_num_seqs: int, max_blocks_per_seq: int, block_size: int, device: torch.device):
        self.block_size = block_size
        self.device = device
        self.tables = np.zeros((2 * max_num_seqs, max_blocks_per_seq), dtype=np.int32)  # rows of live sequences, then spares
        self.row_of: dict[int, int] = {}  # seq_id -> row of ``tables``
        self.row_table: list[list[int] | None] = [None] * len(self.tables)  # the block_table list a row was copied from
        self.row_len = [0] * len(self.tables)  # how much of that list the row holds
        self.free_rows = list(range(len(self.tables) - 1, -1, -1))
        self.adapter_slots: tuple[Tensor | None, set[int], Tensor | None, set[int]] | None = None  # of the last step
        self._allocate(5 * max_num_tokens + 5 * max_num_seqs + 1 + max_num_seqs * max_blocks_per_seq)

    def _allocate(self, size: int) -> None:
        pinned = self.device.type == "cuda"
        self.staging = [torch.zeros(size, dtype=torch.int32, pin_memory=pinned) for _ in range(2 if pinned else 1)]
        self.copied = [torch.cuda.Event() for _ in self.staging] if pinned else []  # the copy out of each staging buffer
        self.on_device = torch.zeros(size, dtype=torch.int32, device=self.device) if pinned else self.staging[0]
        self.turn = 0

    def _reserve_rows(self, batch: list[ScheduledSeq]) -> None:
        """Room for every sequence of ``batch``: rows of sequences not in it go back (finished, preempted, waiting)."""
        if len(self.free_rows) >= len(batch):
            return
        if 2 * len(batch) > len(self.tables):
            extra = 2 * len(batch) - len(self.tables)
            self.tables = np.pad(self.tables, ((0, extra), (0, 0)))
            self.row_table += [None] * extra
            self.row_len += [0] * extra
            self.free_rows += range(len(self.tables) - 1, len(self.tables) - 1 - extra, -1)
        live = {item.seq.seq_id for item in batch}
        for seq_id in [i for i in self.row_of if i not in live]:
            row = self.row_of.pop(seq_id)
            self.row_table[row] = None
            self.row_len[row] = 0
            self.free_rows.append(row)

    def _row(self, seq: Sequence) -> int:
        """``seq``'s row of ``tables``, brought up to date with its block table."""
        row = self.row_of.get(seq.seq_id)
        if row is None:
            row = self.row_of[seq.seq_id] = self.free_rows.pop()
        table, written = seq.block_table, self.row_len[row]
        if self.row_table[row] is not table or written > len(table):  # a new table: rewrite the row
            written = 0
            self.row_table[row] = table
        if written < len(table):
            if len(table) > self.tables.shape[1]:
                self.tables = np.pad(self.tables, ((0, 0), (0, len(table) - self.tables.shape[1])))
            self.tables[row, written : len(table)] = table[written:]
            self.row_len[row] = len(table)
        return row

    def fill(
        self, batch: list[ScheduledSeq], sliding_window: int | None, last_sampled: Tensor | None = None
    ) -> tuple[Tensor, Tensor, AttentionMetadata, Tensor]:
        """``(input_ids, positions, attention metadata, logits rows)`` of a step, on the device.

        A sequence whose last token is pending (``seq.num_pending``: asynchronous scheduling) gets it from
        ``last_sampled``, the sampled ids of the step in flight, row ``seq.pending_row``: a gather on the device."""
        num_seqs = len(batch)
        self._reserve_rows(batch)
        input_ids: list[int] = []
        starts, ends, rows, samples = [], [], [], []
        pending_at, pending_row = [], []  # asynchronous scheduling: input tokens still on the device, and where
        for item in batch:
            seq, start, end = item.seq, item.start, item.end
            input_ids += seq.token_ids[start:end]
            if end > len(seq.token_ids):  # its last token was sampled by the step still in flight: read it there
                pending_at.append(len(input_ids))
                pending_row.append(seq.pending_row)
                input_ids.append(0)
            starts.append(start)
            ends.append(end)
            rows.append(self._row(seq))
            samples.append(item.samples)
        starts, ends, rows = np.array(starts), np.array(ends), np.array(rows)
        query_lens = ends - starts
        num_tokens, bs = len(input_ids), self.block_size
        cu_query_lens = np.zeros(num_seqs + 1, dtype=np.int64)
        np.cumsum(query_lens, out=cu_query_lens[1:])
        positions = np.arange(num_tokens) + np.repeat(starts - cu_query_lens[:-1], query_lens)
        token_rows = np.repeat(rows, query_lens)
        slot_mapping = self.tables[token_rows, positions // bs] * bs + positions % bs
        width = -(-int(ends.max()) // bs)
        logits_rows = cu_query_lens[1:][np.array(samples)] - 1
        lora_slots, lora_active, reft_slots, reft_active = adapter_slots(batch, positions, query_lens)

        sizes = (num_tokens, num_tokens, num_tokens, num_seqs + 1, num_seqs, len(logits_rows), num_seqs * width)
        sizes += (len(lora_slots), len(reft_slots), len(pending_at), len(pending_row))
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        if offsets[-1] > len(self.on_device):
            self._allocate(int(offsets[-1]) * 2)
        staging = self.staging[self.turn]
        if self.copied:
            self.copied[self.turn].synchronize()  # its previous copy has left
        host = staging.numpy()
        parts = [host[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        parts[0][:] = input_ids
        parts[1][:] = positions
        parts[2][:] = slot_mapping
        parts[3][:] = cu_query_lens
        parts[4][:] = ends
        parts[5][:] = logits_rows
        tables = parts[6].reshape(num_seqs, width)
        tables[:] = self.tables[rows, :width]
        parts[7][:] = lora_slots
        parts[8][:] = reft_slots
        parts[9][:] = pending_at
        parts[10][:] = pending_row
        device = self.on_device
        if self.copied:
            device[: offsets[-1]].copy_(staging[: offsets[-1]], non_blocking=True)
            self.copied[self.turn].record()
            self.turn = 1 - self.turn
        self.last_packed = (host[: offsets[-1]], sizes, width)  # what tensor-parallel workers are sent (preft.engine.parallel)
        views = [device[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        if pending_at:
            if last_sampled is None:
                raise AssertionError("a step reads pending tokens, but no step's sampled ids are on the device")
            # On the device, in stream order after the step that samples them: no sync, nothing waits for the host.
            # A row that could not be sampled holds -1 (its step fails when collected, and this one is rolled back):
            # clamped, so that the embedding never sees an id outside the vocabulary (a device-side assert on CUDA).
            pending = last_sampled.index_select(0, views[10].long()).clamp(min=0).to(torch.int32)
            views[0].index_copy_(0, views[9].long(), pending)
        meta = AttentionMetadata(
            slot_mapping=views[2],
            cu_query_lens=views[3],
            context_lens=views[4],
            block_tables=views[6].view(num_seqs, width),
            max_query_len=int(query_lens.max()),
            max_context_len=int(ends.max()),
            sliding_window=sliding_window,
            host=(parts[3], parts[4], tables),
        )
        lora, reft = (views[7] if lora_active else None), (views[8] if reft_active else None)
        self.adapter_slots = (lora, lora_active, reft, reft_active) if lora_active or reft_active else None
        return views[0], views[1], meta, views[5]


NO_SLOTS = np.zeros(0, dtype=np.int32)


def adapter_slots(
    batch: list[ScheduledSeq], positions: np.ndarray, query_lens: np.ndarray
) -> tuple[np.ndarray, set[int], np.ndarray, set[int]]:
    """Per-token adapter slots of a step, ``(lora [N], lora active slots, reft [N], reft active slots)``: a token's
    slot where its sequence's adapter edits it (``edit_mask``), else -1; an empty array for a kind no token uses.

    Only sequences whose chunk may hold edited tokens are looked at (not decode tokens of ``prefill`` adapters);
    the mask itself is computed for the whole step at once, from per-sequence values repeated per token."""
    picked, slot, is_lora, num_prompt, edits_generated, first, last = [], [], [], [], [], [], []
    for i, item in enumerate(batch):
        seq = item.seq
        adapter = seq.adapter
        if adapter is None or (adapter.policy == "prefill" and item.start >= seq.num_prompt_tokens):
            continue
        picked.append(i)
        slot.append(-1 if seq.slot is None else seq.slot)
        is_lora.append(adapter.kind == "lora")
        num_prompt.append(seq.num_prompt_tokens)
        edits_generated.append(adapter.policy == "all")
        positions_first, positions_last = adapter.positions or (0, seq.num_prompt_tokens)  # (0, P): every token
        first.append(positions_first)
        last.append(positions_last)
    if not picked:
        return NO_SLOTS, set(), NO_SLOTS, set()

    def per_token(values: list, default) -> np.ndarray:
        per_seq = np.full(len(batch), default, dtype=np.asarray(values).dtype)
        per_seq[picked] = values
        return np.repeat(per_seq, query_lens)

    edited = edit_mask(positions, per_token(num_prompt, 0), per_token(edits_generated, False), per_token(first, 0), per_token(last, 0))
    token_slot = per_token(slot, -1)
    missing = np.flatnonzero(edited & (token_slot < 0))
    if len(missing):
        seq = batch[int(np.repeat(np.arange(len(batch)), query_lens)[missing[0]])].seq
        raise AssertionError(f"sequence of request {seq.request_id!r} is adapted but holds no adapter slot")
    token_slot = np.where(edited, token_slot, -1)
    lora = per_token(is_lora, False)
    lora_slots, reft_slots = np.where(lora, token_slot, -1), np.where(lora, -1, token_slot)
    lora_active, reft_active = set(np.unique(lora_slots).tolist()) - {-1}, set(np.unique(reft_slots).tolist()) - {-1}
    return (lora_slots if lora_active else NO_SLOTS), lora_active, (reft_slots if reft_active else NO_SLOTS), reft_active


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        adapters: AdapterManager,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        max_model_len: int | None = None,
    ):
        """The step-input buffers are sized for ``max_num_seqs`` sequences, ``max_num_batched_tokens`` tokens and
        ``max_model_len`` (default: the model's context) per sequence; a larger step grows them."""
        config = model.config
        self.model = model
        self.adapters = adapters
        self.block_size = block_size
        self.device = next(model.parameters()).device
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv_heads = model.model.layers[0].self_attn.num_kv_heads  # this rank's share under tensor parallelism
        dtype = next(model.parameters()).dtype
        # One block more than the block manager hands out: a scratch block for CUDA-graph padding rows.
        shape = (2, config.num_hidden_layers, num_blocks + 1, block_size, kv_heads, head_dim)
        self.kv_cache = lazy_zeros(shape, dtype) if self.device.type == "cpu" else torch.zeros(shape, dtype=dtype, device=self.device)
        self.num_blocks = num_blocks
        self.sampler = Sampler()
        self.guided: GuidedDecoding | None = None  # set by the engine: structured-output bitmasks
        self.sliding_window = sliding_window(config)
        self.graphs: DecodeGraphs | None = None
        self.triton_attention = triton_usable(self.device)
        max_model_len = max_model_len or getattr(config, "max_position_embeddings", None) or 4096
        self.inputs = StepBuffers(max_num_batched_tokens, max_num_seqs, -(-max_model_len // block_size), block_size, self.device)
        self.parallel: TensorParallel | None = None  # rank 0 of a tensor-parallel engine: the workers each step is sent to
        self.kv_events: list[tuple] = []  # tensor parallel: KV blocks to zero on the workers before the next step
        self.last_sampled: Tensor | None = None  # the last launched step's sampled ids, on the device

    def capture_decode_graphs(self, max_batch: int, max_model_len: int) -> bool:
        """CUDA graphs for decode steps, adapter-free or with `all`-policy adapters (CUDA with Triton only); True if in use."""
        if not self.triton_attention:
            return False
        graphs = DecodeGraphs(
            self.model, self.kv_cache, max_batch, -(-max_model_len // self.block_size), self.num_blocks, self.sliding_window, self.adapters
        )
        self.graphs = graphs if graphs.capture() else None
        return self.graphs is not None

    def zero_kv_blocks(self, blocks: list[int]) -> None:
        """Zero the KV of ``blocks`` (on every rank)."""
        self.kv_cache[:, :, blocks] = 0
        if self.parallel is not None:
            self.kv_events.append(("zero_kv", blocks))

    def _send_step(self, meta: AttentionMetadata, adapters) -> None:
        """Tensor parallel: the step's state changes and inputs to the workers, which then run the same forward."""
        events = [*self.kv_events, *(self.adapters.slot_events or ())]
        self.kv_events.clear()
        if self.adapters.slot_events is not None:
            self.adapters.slot_events.clear()
        slots = None
        if adapters is not None:
            host = lambda t: None if t is None else t.cpu().clone()  # noqa: E731 (a view of the step buffer: its own copy)
            slots = (host(adapters.lora_slot), adapters.lora_active, host(adapters.reft_slot), adapters.reft_active)
        packed, sizes, width = self.inputs.last_packed
        self.parallel.send(
            StepMessage(events, packed, tuple(int(n) for n in sizes), width, meta.max_query_len, meta.max_context_len, slots)
        )

    def prepare(self, batch: list[ScheduledSeq]) -> tuple[Tensor, Tensor, AttentionMetadata, Tensor]:
        """``(input_ids [N], positions [N], attention metadata, logits rows)`` of a step, on the model's device (int32)."""
        return self.inputs.fill(batch, self.sliding_window, self.last_sampled)

    def prepare_adapters(self, batch: list[ScheduledSeq], num_tokens: int):
        """The step's adapter view (per-token slots, filled by ``prepare`` into the packed step buffer: one
        host-to-device copy for everything); None when no token of the step is adapted."""
        slots = self.inputs.adapter_slots
        return None if slots is None else self.adapters.batch(*slots)

    def run(self, batch: list[ScheduledSeq]) -> list[int]:
        """Compute the batch's new tokens' KV; return the next token of every sequence whose chunk reached its end."""
        return self.collect(self.launch(batch))

    @torch.inference_mode()
    def launch(self, batch: list[ScheduledSeq]) -> SampleHandle | None:
        """Queue the step on the device: inputs, forward, sampling, and the copy of the sampled ids to the host.
        On CUDA nothing here waits for the device; ``collect`` does. None when no sequence of the step samples."""
        input_ids, positions, meta, logits_rows = self.prepare(batch)
        adapters = self.prepare_adapters(batch, len(input_ids))
        hidden = None
        if self.parallel is not None:
            self._send_step(meta, adapters)
            try:
                hidden = self.model(input_ids, positions, self.kv_cache, meta, adapters)
            except Exception as e:  # a peer died (gloo), a collective timed out, or rank 0 failed mid-step: ranks out of step
                raise self.parallel.died(e) from e
        if self.graphs is not None and meta.max_query_len == 1:  # decode step: replay (base model, or with `all` adapters)
            hidden = self.graphs.run(input_ids, positions, meta.slot_mapping, meta.block_tables, meta.context_lens, adapters)
        if hidden is None:
            hidden = self.model(input_ids, positions, self.kv_cache, meta, adapters)
        if not len(logits_rows):
            return None
        logits = self.model.logits(hidden[logits_rows])
        seqs = [item.seq for item in batch if item.samples]
        # Rows with NaN or inf logits raise NonFiniteLogitsError in collect (flags ride in the one copy to the host).
        token_bitmask = self.guided.bitmask(seqs) if self.guided is not None else None  # structured outputs
        handle = self.sampler.launch(logits, seqs, token_bitmask)
        self.last_sampled = handle.next_ids  # where the next step reads pending tokens (asynchronous scheduling)
        return handle

    def collect(self, handle: SampleHandle | None) -> list[int]:
        """Wait for a launched step's sampled ids (``launch``) and check them; raises as ``Sampler.collect``."""
        return [] if handle is None else self.sampler.collect(handle)
