"""The runner's persistent step inputs (``StepBuffers``): every field equals a per-token computation from the
sequences, over steps that grow tables, replace them (preemption) and reuse rows; unchanged rows are not rewritten;
everything lies in one packed buffer (one host-to-device copy on CUDA)."""

from __future__ import annotations

import random

import pytest
import torch

from preft.engine import SamplingParams
from preft.engine.model_runner import ScheduledSeq, StepBuffers
from preft.engine.sequence import AdapterRef, Sequence

BS = 4


class Pool:
    def __init__(self, seed: int = 0):
        self.free = list(range(1000))
        random.Random(seed).shuffle(self.free)

    def grow(self, seq: Sequence, end: int) -> None:
        while len(seq.block_table) * BS < end:
            seq.block_table.append(self.free.pop())


def new_seq(pool: Pool, prompt_len: int, cached: int = 0) -> Sequence:
    seq = Sequence("r", [5 + i % 200 for i in range(prompt_len)], SamplingParams(max_tokens=100))
    seq.block_table = []
    pool.grow(seq, cached)
    return seq


def expected(batch: list[ScheduledSeq]) -> dict[str, list]:
    """The step inputs, token by token (what the runner computed in Python before)."""
    ids, pos, slots, cu, ctx, logits = [], [], [], [0], [], []
    for item in batch:
        seq = item.seq
        for p in range(item.start, item.end):
            ids.append(seq.token_ids[p])
            pos.append(p)
            slots.append(seq.block_table[p // BS] * BS + p % BS)
        cu.append(len(ids))
        ctx.append(item.end)
        if item.end == seq.num_tokens:
            logits.append(len(ids) - 1)
    return dict(ids=ids, pos=pos, slots=slots, cu=cu, ctx=ctx, logits=logits)


def check(buffers: StepBuffers, batch: list[ScheduledSeq]) -> None:
    ids, pos, meta, logits = buffers.fill(batch, sliding_window=None)
    want = expected(batch)
    assert ids.tolist() == want["ids"] and pos.tolist() == want["pos"]
    assert meta.slot_mapping.tolist() == want["slots"]
    assert meta.cu_query_lens.tolist() == want["cu"] and meta.context_lens.tolist() == want["ctx"]
    assert logits.tolist() == want["logits"]
    assert meta.max_query_len == max(i.num_new_tokens for i in batch) and meta.max_context_len == max(want["ctx"])
    for row, item in zip(meta.block_tables.tolist(), batch):
        n = -(-item.end // BS)
        assert row[:n] == item.seq.block_table[:n]
    host_cu, host_ctx, host_tables = meta.host
    assert host_cu.tolist() == want["cu"] and host_ctx.tolist() == want["ctx"]
    assert (host_tables == meta.block_tables.numpy()).all()


def test_step_inputs_equal_a_per_token_computation_over_many_steps():
    pool, rng = Pool(), random.Random(1)
    buffers = StepBuffers(max_num_tokens=64, max_num_seqs=4, max_blocks_per_seq=8, block_size=BS, device=torch.device("cpu"))
    running = [new_seq(pool, rng.randint(1, 30), cached=rng.choice([0, 4, 8])) for _ in range(3)]
    for step in range(40):
        batch = []
        for seq in running:
            done = len(seq.block_table) * BS if step == 0 else seq.num_computed_tokens
            done = min(done, seq.num_tokens - 1)
            n = min(seq.num_tokens - done, rng.choice([1, 3, 7, 16]))
            pool.grow(seq, done + n)
            batch.append(ScheduledSeq(seq, done, n))
        check(buffers, batch)
        for item in batch:
            item.seq.num_computed_tokens = item.end
            if item.samples:
                item.seq.token_ids.append(7)
        if step % 7 == 3:  # preemption: the table is replaced, the sequence recomputes from 0
            victim = running[step % len(running)]
            victim.block_table, victim.num_computed_tokens = [], 0
        if step % 5 == 4:  # a sequence finishes, a new one arrives: rows are reused (more sequences than rows over time)
            running[step % len(running)] = new_seq(pool, rng.randint(1, 20))
    assert len(buffers.tables) == 8  # never grown: 2 x max_num_seqs rows were enough


def test_rows_are_rewritten_only_when_a_table_changes():
    pool = Pool()
    buffers = StepBuffers(max_num_tokens=64, max_num_seqs=2, max_blocks_per_seq=8, block_size=BS, device=torch.device("cpu"))
    kept, replaced = new_seq(pool, 6), new_seq(pool, 6)
    for seq in (kept, replaced):
        pool.grow(seq, 6)
    buffers.fill([ScheduledSeq(kept, 0, 6), ScheduledSeq(replaced, 0, 6)], None)
    kept_row, replaced_row = buffers.row_of[kept.seq_id], buffers.row_of[replaced.seq_id]
    buffers.tables[kept_row, 0] = buffers.tables[replaced_row, 0] = -5  # a marker a rewrite would erase
    kept.token_ids += [9, 9, 9]
    pool.grow(kept, 9)  # one block appended
    replaced.block_table = []
    pool.grow(replaced, 6)  # a new table (preempted and readmitted)
    buffers.fill([ScheduledSeq(kept, 6, 3), ScheduledSeq(replaced, 0, 6)], None)
    assert buffers.tables[kept_row, 0] == -5  # untouched
    assert buffers.tables[kept_row, 2] == kept.block_table[2]  # the appended block was written
    assert buffers.tables[replaced_row, :2].tolist() == replaced.block_table  # rewritten


def test_a_step_is_one_packed_buffer_and_a_larger_step_grows_it():
    pool = Pool()
    buffers = StepBuffers(max_num_tokens=4, max_num_seqs=1, max_blocks_per_seq=2, block_size=BS, device=torch.device("cpu"))
    seqs = [new_seq(pool, 20) for _ in range(3)]
    batch = [ScheduledSeq(seq, 0, 20) for seq in seqs]
    for seq in seqs:
        pool.grow(seq, 20)
    check(buffers, batch)  # 60 tokens, 3 sequences of 5 blocks: over every initial size
    ids, _, meta, logits = buffers.fill(batch, None)
    storage = ids.untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == storage for t in (meta.slot_mapping, meta.block_tables, meta.context_lens, logits))
    assert ids.dtype == meta.block_tables.dtype == torch.int32


def test_adapter_slots_ride_in_the_packed_buffer_and_follow_each_sequences_mask():
    """Per-token LoRA / ReFT slots, computed for the whole step at once, equal the per-sequence rule
    (``Sequence.adapter_mask``) for prefill and ``all`` policies, ReFT first/last positions, chunks that cross the
    prompt's end (a recomputation after preemption) and decode tokens; they live in the step's packed buffer."""
    pool = Pool()
    buffers = StepBuffers(max_num_tokens=64, max_num_seqs=8, max_blocks_per_seq=8, block_size=BS, device=torch.device("cpu"))
    adapters = {
        "lora-prefill": AdapterRef("a", "lora", "prefill", "h"),
        "lora-all": AdapterRef("b", "lora", "all", "h"),
        "direft-prefill-f1l2": AdapterRef("c", "direft", "prefill", "h", (1, 2)),
        "loreft-all-f2l1": AdapterRef("d", "loreft", "all", "h", (2, 1)),
    }
    # (adapter, slot, prompt length, generated tokens, chunk start, chunk length)
    plan = [
        (None, None, 5, 0, 0, 5),
        ("lora-prefill", 3, 9, 0, 2, 7),
        ("lora-prefill", None, 4, 2, 5, 1),  # decode of a prefill adapter: slot released, nothing edited
        ("lora-all", 1, 4, 3, 6, 1),  # decode of an `all` adapter
        ("direft-prefill-f1l2", 0, 8, 0, 0, 8),
        ("loreft-all-f2l1", 2, 6, 3, 4, 5),  # recomputed after preemption: crosses the prompt's end
        ("lora-all", 1, 3, 4, 0, 7),
    ]
    batch = []
    for name, slot, prompt_len, generated, start, n in plan:
        seq = Sequence("r", [5 + i for i in range(prompt_len)], SamplingParams(max_tokens=100), adapters.get(name))
        seq.token_ids += [7] * generated
        seq.slot = slot
        pool.grow(seq, start + n)
        batch.append(ScheduledSeq(seq, start, n))
    ids, _, _, _ = buffers.fill(batch, None)
    lora, lora_active, reft, reft_active = buffers.adapter_slots
    want = {"lora": [], "reft": []}
    for item in batch:
        seq, mask = item.seq, item.seq.adapter_mask(item.start, item.end)
        for kind in want:
            mine = seq.adapter is not None and (seq.adapter.kind == "lora") == (kind == "lora")
            want[kind] += [
                seq.slot if mine and mask is not None and m else -1 for m in (mask if mask is not None else [0] * item.num_new_tokens)
            ]
    assert lora.tolist() == want["lora"] and reft.tolist() == want["reft"]
    assert lora_active == {1, 3} and reft_active == {0, 2}
    assert lora.untyped_storage().data_ptr() == reft.untyped_storage().data_ptr() == ids.untyped_storage().data_ptr()
    assert reft.tolist()[14:22] == [0, -1, -1, -1, -1, -1, 0, 0]  # DiReFT: the first 1 and last 2 of 8 prompt tokens
    assert reft.tolist()[22:27] == [-1, 2, 2, 2, 2]  # `all` LoReFT, tokens 4..8 of 6 + 3: the last prompt token, then generated ones

    base_only = [ScheduledSeq(batch[0].seq, 0, 5), ScheduledSeq(batch[2].seq, 5, 1)]
    buffers.fill(base_only, None)
    assert buffers.adapter_slots is None  # no adapted token: the model runs no adapter code

    batch[1].seq.slot = None
    with pytest.raises(AssertionError, match="adapted but holds no adapter slot"):
        buffers.fill(batch, None)
