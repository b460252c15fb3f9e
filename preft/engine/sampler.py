"""Sampling parameters and the sampler: logits of the last position -> next token (+ logprobs).

The distribution maths (temperature, top-k, top-p) is ``preft.hf.sample_next``, shared with the
reference generator; each request with a ``seed`` owns a ``torch.Generator``, so its samples do
not depend on which other requests share the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from preft.engine.guided import apply_token_bitmask, check_spec
from preft.engine.sequence import Sequence
from preft.errors import PreftError
from preft.hf.generate import sample_next


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # number of top logprobs per generated token (plus the sampled token's)
    # structured output: {"json": schema | None} | {"regex": str} | {"choice": [str]} | {"grammar": ebnf} (preft.engine.guided)
    structured: dict | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be None or >= 0, got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PreftError(message)
        if self.structured is not None:
            check_spec(self.structured)


class Sampler:
    """Picks each sequence's next token from its logits row."""

    def __call__(self, logits: Tensor, seqs: list[Sequence], token_bitmask: Tensor | None = None) -> list[int]:
        """``logits [B, V]`` (float32) for ``seqs`` -> next token ids; also appends logprobs where asked.

        ``token_bitmask`` int32 ``[B, ceil(V / 32)]`` (structured outputs, ``preft.engine.guided``): only
        tokens whose bit is set can be sampled; logprobs stay the model's own."""
        allowed = logits if token_bitmask is None else apply_token_bitmask(logits, token_bitmask)
        greedy = [s.params.temperature == 0 for s in seqs]
        tokens = allowed.argmax(-1) if any(greedy) else None
        next_ids = tokens.tolist() if tokens is not None else [0] * len(seqs)
        for i, seq in enumerate(seqs):
            if not greedy[i]:
                p = seq.params
                next_ids[i] = int(sample_next(allowed[i : i + 1], p.temperature, p.top_p, p.top_k, seq.generator)[0])
        for i, seq in enumerate(seqs):
            if seq.logprobs is not None:
                seq.logprobs.append(top_logprobs(logits[i], next_ids[i], seq.params.logprobs))
        return next_ids


def top_logprobs(logits: Tensor, token_id: int, k: int) -> dict[int, float]:
    """The model's log-probabilities (before temperature) of the top ``k`` tokens and of ``token_id``."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    out = {}
    if k:
        values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
        out = dict(zip(ids.tolist(), values.tolist()))
    out[token_id] = float(logprobs[token_id])
    return out


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    return torch.Generator(device=device).manual_seed(seed) if seed is not None else None
