"""The runner's persistent step inputs (``StepBuffers``): every field equals a per-token computation from the
sequences, over steps that grow tables, replace them (preemption) and reuse rows; unchanged rows are not rewritten;
everything lies in one packed buffer (one host-to-device copy on CUDA)."""

from __future__ import annotations

import random

import torch

from preft.engine import SamplingParams
from preft.engine.model_runner import ScheduledSeq, StepBuffers
from preft.engine.sequence import Sequence

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
