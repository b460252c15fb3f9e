"""A request's state lives here: its tokens, KV blocks, adapter slot, sampling state and output.

One request with ``n > 1`` holds ``n`` sequences (``index`` 0..n-1) with the same prompt.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

import numpy as np

from preft.adapters import positions_selected

if TYPE_CHECKING:
    from preft.engine.sampler import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


# Hot loops compare against these: looking a member up on the Enum class costs ~0.1 us, per sequence per step.
RUNNING, FINISHED = SequenceStatus.RUNNING, SequenceStatus.FINISHED


@dataclass(frozen=True)
class AdapterRef:
    """What a sequence needs to know of its adapter: identity (for prefix hashes), policy, ReFT positions."""

    name: str
    kind: str
    policy: str
    content_hash: str
    positions: tuple[int, int] | None = None

    @property
    def identity(self) -> str:
        return f"{self.name}:{self.content_hash}"


@dataclass(slots=True)
class CompletionDelta:
    """What one step added to one completion (the engine emits deltas; it never copies the output so far)."""

    index: int
    new_token_ids: list[int]  # sampled in this step (more than one only for a caller that skipped outputs)
    finish_reason: str | None  # "stop" | "length" | "abort" | "error" | None while running
    num_tokens: int  # generated so far
    new_logprobs: list[dict[int, float]] | None = None  # one per new token, when the request asked for logprobs
    _tokens: list[int] = field(default_factory=list, repr=False)  # the sequence's token list (prompt + completion), not a copy
    _num_prompt_tokens: int = field(default=0, repr=False)
    _logprobs: list[dict[int, float]] | None = field(default=None, repr=False)

    @property
    def token_ids(self) -> list[int]:
        """Every generated token as of this step (a copy made when read)."""
        start = self._num_prompt_tokens
        return self._tokens[start : start + self.num_tokens]

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        return None if self._logprobs is None else self._logprobs[: self.num_tokens]


@dataclass
class CompletionOutput:
    """One finished (or aborted) completion as ``LLM.generate`` returns it: tokens and their text."""

    index: int
    token_ids: list[int]
    text: str  # a stop string and anything after it excluded
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionDelta] | list[CompletionOutput]  # deltas from LLMEngine.step, full outputs from LLM.generate
    finished: bool
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # why the request failed (its completions finish with reason "error"), else None


_seq_counter = itertools.count()


def edit_mask(index: np.ndarray, num_prompt_tokens, edits_generated, first, last) -> np.ndarray:
    """DESIGN §1's mask rule: which token indices an adapter edits. Element-wise, so the arguments may be
    per-sequence scalars or per-token arrays (a whole step at once, ``ModelRunner.prepare_adapters``).

    Prompt tokens are edited, generated ones only when ``edits_generated`` (the ``all`` policy); ReFT
    ``positions`` ``(first, last)`` further keep the first/last k prompt tokens; ``(0, num_prompt_tokens)``
    keeps every token. Depends only on indices, so recomputation after preemption and prefix-cache hits
    reproduce exactly the same edits.
    """
    return ((index < num_prompt_tokens) | edits_generated) & positions_selected(index, num_prompt_tokens, (first, last))


class Sequence:
    """One generated continuation of one request (see module doc)."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        index: int = 0,
        seed: int = 0,
    ):
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.index = index
        self.token_ids = list(prompt_token_ids)
        self._prompt_token_ids = prompt_token_ids if isinstance(prompt_token_ids, list) else list(prompt_token_ids)  # never mutated
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.adapter = adapter
        self.seed = seed  # the random draws are a function of (seed, tokens generated so far): preft.hf.sample_next
        self.min_tokens_stop_ids: tuple[int, ...] = ()  # EOS and stop token ids kept from sampling until params.min_tokens
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.num_cached_tokens = 0  # of those, how many came from prefix-cache hits at admission
        self.block_table: list[int] = []
        self.slot: int | None = None  # device adapter slot held, if any
        self.finish_reason: str | None = None
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.guide = None  # structured output: this sequence's grammar matcher (preft.engine.guided), if any
        self.new_token_ids: list[int] = []  # since the last delta
        # Asynchronous scheduling: tokens sampled in launched steps whose ids have not reached the host yet (0 or 1 when
        # a step is scheduled), and the row of the last launched step's sampled ids that holds the newest of them.
        self.num_pending = 0
        self.pending_row = 0
        self.num_preemptions = 0
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        """The prompt (shared, not a copy: do not mutate)."""
        return self._prompt_token_ids

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is FINISHED

    @property
    def needs_adapter_slot(self) -> bool:
        """A ``prefill`` adapter is needed while prompt tokens remain to compute; an ``all`` one until the end."""
        if self.adapter is None or self.is_finished:
            return False
        return self.adapter.policy == "all" or self.num_computed_tokens < self.num_prompt_tokens

    def adapter_mask(self, start: int, end: int) -> np.ndarray | None:
        """Bool ``[end - start]``: which of tokens ``start..end`` the adapter edits (``edit_mask``); None if none."""
        adapter, num_prompt = self.adapter, self.num_prompt_tokens
        if adapter is None or (adapter.policy == "prefill" and start >= num_prompt):
            return None
        first, last = adapter.positions or (0, num_prompt)
        mask = edit_mask(np.arange(start, end), num_prompt, adapter.policy == "all", first, last)
        return mask if mask.any() else None

    def block_cache_keys(self, first: int, last: int, block_size: int) -> list[tuple[tuple[int, ...], str]]:
        """What full blocks ``first .. last - 1``'s KV depends on besides its prefix: per block its tokens, and
        the adapter identity with the block's edit mask (``""`` when the adapter edits none of its tokens)."""
        start = first * block_size
        mask = self.adapter_mask(start, last * block_size)  # once for the range: it costs a few NumPy calls
        bits = "" if mask is None else (mask.view(np.uint8) + ord("0")).tobytes().decode()
        keys = []
        for offset in range(0, (last - first) * block_size, block_size):
            block_bits = bits[offset : offset + block_size]
            adapter = self.adapter.identity + ":" + block_bits if "1" in block_bits else ""
            keys.append((tuple(self.token_ids[start + offset : start + offset + block_size]), adapter))
        return keys

    def num_cacheable_blocks(self, block_size: int) -> int:
        """Full blocks made of prompt tokens only, leaving at least one token to compute for the logits."""
        return min(self.num_prompt_tokens, self.num_tokens - 1) // block_size

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.new_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def delta(self) -> CompletionDelta:
        """The tokens sampled since the last delta (handed over, not copied), and the finish reason."""
        new, self.new_token_ids = self.new_token_ids, []
        num = self.num_tokens - self.num_prompt_tokens
        new_logprobs = None if self.logprobs is None else self.logprobs[num - len(new) :]
        return CompletionDelta(
            self.index, new, self.finish_reason, num, new_logprobs, self.token_ids, self.num_prompt_tokens, self.logprobs
        )
