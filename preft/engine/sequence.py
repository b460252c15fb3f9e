"""A request's state lives here: its tokens, KV blocks, adapter slot, sampling state and output.

One request with ``n > 1`` holds ``n`` sequences (``index`` 0..n-1) with the same prompt.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from preft.adapters import positions_selected

if TYPE_CHECKING:
    from preft.engine.sampler import SamplingParams


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


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


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int]  # all generated so far
    text: str  # all generated so far (a stop string and anything after it excluded)
    finish_reason: str | None  # "stop" | "length" | "abort" | None while running
    logprobs: list[dict[int, float]] | None = None
    new_token_ids: list[int] = field(default_factory=list)  # produced in this step


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: dict = field(default_factory=dict)
    error: str | None = None  # why the request failed (its completions finish with reason "error"), else None


_seq_counter = itertools.count()


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
        self.text = ""  # decoded output, stop string cut when finished
        self.prefix_offset = self.read_offset = 0  # incremental detokenisation window over the completion tokens
        self.new_token_ids: list[int] = []  # since the last RequestOutput
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
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def needs_adapter_slot(self) -> bool:
        """A ``prefill`` adapter is needed while prompt tokens remain to compute; an ``all`` one until the end."""
        if self.adapter is None or self.is_finished:
            return False
        return self.adapter.policy == "all" or self.num_computed_tokens < self.num_prompt_tokens

    def adapter_mask(self, start: int, end: int) -> Tensor | None:
        """Bool ``[end - start]``: which of tokens ``start..end`` the adapter edits (DESIGN §1); None if none.

        ``prefill``: prompt tokens only; ``all``: every token. ReFT ``positions`` further restrict
        prompt tokens to the first/last k. Depends only on token indices, so recomputation after
        preemption and prefix-cache hits reproduce exactly the same edits.
        """
        if self.adapter is None or (self.adapter.policy == "prefill" and start >= self.num_prompt_tokens):
            return None
        index = torch.arange(start, end)
        in_prompt = index < self.num_prompt_tokens
        mask = in_prompt | (self.adapter.policy == "all")
        if self.adapter.positions is not None:
            mask = mask & positions_selected(index, torch.tensor(self.num_prompt_tokens), self.adapter.positions)
        return mask if bool(mask.any()) else None

    def block_cache_key(self, block: int, block_size: int) -> tuple[tuple[int, ...], str]:
        """What a full block's KV depends on besides its prefix: its tokens, adapter identity and edit mask."""
        start, end = block * block_size, (block + 1) * block_size
        mask = self.adapter_mask(start, end)
        adapter = "" if mask is None else self.adapter.identity + ":" + "".join("1" if m else "0" for m in mask.tolist())
        return tuple(self.token_ids[start:end]), adapter

    def num_cacheable_blocks(self, block_size: int) -> int:
        """Full blocks made of prompt tokens only, leaving at least one token to compute for the logits."""
        return min(self.num_prompt_tokens, self.num_tokens - 1) // block_size

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.new_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def completion_output(self, held_back: int = 0) -> CompletionOutput:
        """The output so far; ``held_back`` trailing characters may still become a stop string."""
        text = self.text[: len(self.text) - held_back] if held_back else self.text
        out = CompletionOutput(self.index, self.completion_token_ids, text, self.finish_reason, self.logprobs, self.new_token_ids)
        self.new_token_ids = []
        return out
