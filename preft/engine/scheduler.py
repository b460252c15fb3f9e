"""Continuous batching: which sequences compute which tokens in the next step.

Every step has a token budget (``max_num_batched_tokens``). Running sequences go first, in
arrival order: a decoding sequence takes one token, a prefilling one its next prompt chunk
(chunked prefill). Then waiting sequences are admitted first-come first-served while budget,
``max_num_seqs``, KV blocks and adapter slots allow. A request that finds every adapter slot
busy keeps its place and every later adapter request queues behind it, so none starves; only
base-model requests (which need no slot) may start meanwhile. Nobody overtakes a request that
waits for KV blocks. When a running sequence needs a block and
none is free, the most recently admitted sequence is preempted: its blocks are freed and it
is recomputed later (its adapter mask depends only on token indices, so the result is the same).
"""

from __future__ import annotations

from collections import deque

from preft.engine.adapter_manager import AdapterManager
from preft.engine.block_manager import BlockManager
from preft.engine.model_runner import ScheduledSeq
from preft.engine.sequence import RUNNING, Sequence, SequenceStatus
from preft.errors import PreftError


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        adapters: AdapterManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int = 1 << 62,
    ):
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.failed: list[tuple[Sequence, str]] = []  # sequences whose adapter could not be loaded into a slot, and why

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[ScheduledSeq], list[Sequence]]:
        """The next step's work, and sequences finished for lack of KV room (a lone sequence outgrowing the pool)."""
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        out_of_room: list[Sequence] = []
        preempted = False
        running, append_blocks = self.running, self.block_manager.append  # once per step: this loop runs per sequence
        i = 0
        while i < len(running) and budget > 0:
            seq = running[i]
            start = seq.num_computed_tokens
            if seq.num_pending and self._ends_with_pending(seq):
                i += 1  # its pending token is its last (max_tokens, max_model_len): nothing more to compute
                continue
            n = min(len(seq.token_ids) + seq.num_pending - start, budget)
            while not append_blocks(seq, n):  # grows seq's block table unless blocks are short
                victim = running[-1]
                if victim is seq and len(running) == 1:
                    out_of_room.append(seq)
                    break
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if out_of_room:
                break
            if seq.status is not RUNNING:
                continue  # it preempted itself (a status check: `seq in self.running` made each step quadratic)
            batch.append(ScheduledSeq(seq, start, n))
            budget -= n
            i += 1
        waiting_for_slot = False
        admitting = not preempted and budget > 0 and len(running) < self.max_num_seqs
        for seq in list(self.waiting) if admitting else []:  # (the copy only when someone may be admitted)
            if budget <= 0 or len(running) >= self.max_num_seqs:
                break
            if seq.adapter is not None:
                if waiting_for_slot:
                    continue  # later adapter requests queue behind the first one that waits for a slot
                try:
                    seq.slot = self.adapters.acquire(seq.adapter.name)
                except PreftError as e:  # e.g. its files changed on disk: only this request fails (the engine ends it)
                    self.failed.append((seq, str(e)))
                    continue
                if seq.slot is None:
                    waiting_for_slot = True  # it keeps its place; base requests behind it may still start
                    continue
            n = self.block_manager.allocate(seq, budget)
            if n == 0:
                self._release_slot(seq)
                break  # KV blocks short: nobody overtakes
            if not seq.needs_adapter_slot:
                self._release_slot(seq)  # its prompt came whole from the prefix cache
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.append(ScheduledSeq(seq, seq.num_computed_tokens, n))
            budget -= n
        return batch, out_of_room

    def _ends_with_pending(self, seq: Sequence) -> bool:
        num_tokens = len(seq.token_ids) + seq.num_pending
        return num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens or num_tokens >= self.max_model_len

    def take_failed(self) -> list[tuple[Sequence, str]]:
        """The sequences that could not start since the last call, and why (the engine fails their requests)."""
        failed, self.failed = self.failed, []
        return failed

    def advance(self, batch: list[ScheduledSeq]) -> None:
        """The step was launched: its tokens count as computed (the next step is scheduled from there), and prefill
        adapters whose prompt is done give their slot back (a slot reloaded later is written in stream order, after
        the launched step has read it)."""
        for item in batch:
            seq = item.seq
            seq.num_computed_tokens = item.end
            if seq.slot is not None and not seq.needs_adapter_slot:
                self._release_slot(seq)

    def roll_back(self, batch: list[ScheduledSeq]) -> None:
        """The launched step is discarded (a step before it failed, under asynchronous scheduling): undo ``advance``.
        A sequence that gave back an adapter slot it needs again and cannot get one at once is preempted."""
        for item in batch:
            seq = item.seq
            if seq.status is not RUNNING:
                continue
            seq.num_computed_tokens = item.start
            if seq.needs_adapter_slot and seq.slot is None:
                try:
                    seq.slot = self.adapters.acquire(seq.adapter.name)
                except PreftError:
                    seq.slot = None
                if seq.slot is None:
                    self._preempt(seq)

    def complete(self, batch: list[ScheduledSeq]) -> int:
        """The step's results are in: publish its full prompt blocks. Sequences that ended or were preempted
        meanwhile are skipped. Returns how many prompt tokens the step computed."""
        prompt_tokens = 0
        for item in batch:
            seq, start, end = item.seq, item.start, item.end
            if seq.status is not RUNNING or start >= seq.num_prompt_tokens:
                continue
            prompt_tokens += min(end, seq.num_prompt_tokens) - start  # a prefill chunk (only prompt blocks are ever published)
            self.block_manager.register_computed(seq, start, end)
        return prompt_tokens

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (any state): free its blocks and its adapter slot."""
        if seq.is_finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self._release_slot(seq)
        self.block_manager.free_sequence(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free_sequence(seq)
        self._release_slot(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _release_slot(self, seq: Sequence) -> None:
        if seq.slot is not None:
            self.adapters.release(seq.slot)
            seq.slot = None
