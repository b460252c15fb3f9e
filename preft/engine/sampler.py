"""Sampling parameters and the sampler: logits of the last position -> next token (+ logprobs).

One step, vectorised over the batch: the per-row knobs become tensors, no tensor work is done per
row, and the sampled ids (with the logprobs, when asked) come to the host in one copy. In order:

1. ``token_bitmask`` (structured outputs) sets the tokens a grammar forbids to -inf;
2. logit processors, each only when some row of the batch uses it: ``min_tokens`` (EOS and
   ``stop_token_ids`` at -inf until that many tokens exist), ``logit_bias``, then the repetition
   (prompt + output tokens), frequency and presence (output tokens) penalties, as in vLLM;
3. ``preft.hf.sample_next``, the sampling maths shared with the reference generator: greedy rows
   argmax, the others draw from ``softmax(logits / T)`` after min-p, top-k and top-p. A draw is a pure
   function of the request's seed, its completion index and the token position (a counter-based
   stream), so a seeded request samples the same tokens whichever requests share its batch, and a
   rerun (preemption, fault isolation) samples them again. Unseeded requests get a random seed when added.

Log-probabilities are the model's own: ``log_softmax`` of the logits before any of the above.

Fault isolation: a row whose logits hold NaN or inf (e.g. a broken adapter) raises ``NonFiniteLogitsError``
naming its sequences, before any logprob is recorded. The check's per-row flags ride in the same device-to-host
copy as the sampled ids (no extra sync per step): on CPU from one row sum (NaN or inf anywhere makes it
non-finite; flagged rows are re-checked exactly), on CUDA from an exact ``isfinite`` pass, so that the logits
need not outlive the launch (under asynchronous scheduling ``collect`` comes a step later).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch
from torch import Tensor

from preft.engine.guided import apply_token_bitmask, check_spec
from preft.engine.sequence import Sequence
from preft.errors import PreftError
from preft.hf.generate import device_tensor, random_seeds, sample_next


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max (0: off)
    presence_penalty: float = 0.0  # [-2, 2], subtracted from tokens the output already holds
    frequency_penalty: float = 0.0  # [-2, 2], times how often the output holds the token
    repetition_penalty: float = 1.0  # [0.01, 100]; prompt and output tokens: logit / p if positive, logit * p if not
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled before this many tokens
    seed: int | None = None  # completion i of the request samples with seed + i
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
        try:
            self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        except (TypeError, ValueError):
            raise PreftError(f"logit_bias must map token ids to numbers, got {self.logit_bias!r}") from None
        bad_bias = {k: v for k, v in self.logit_bias.items() if not -100 <= v <= 100}
        checks = [
            (self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (0.01 <= self.repetition_penalty <= 100, f"repetition_penalty must be in [0.01, 100] (1 = off), got {self.repetition_penalty}"),
            (not bad_bias, f"logit_bias values must be in [-100, 100], got {bad_bias}"),
            (0 <= self.min_tokens <= self.max_tokens, f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}"),
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be None or >= 0, got {self.logprobs}"),
            (all(isinstance(s, str) and s for s in self.stop), f"stop must be non-empty strings, got {self.stop!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise PreftError(message)
        if self.structured is not None:
            check_spec(self.structured)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``PreftError`` if a ``logit_bias`` token id lies outside the model's vocabulary."""
        outside = sorted(t for t in self.logit_bias if not 0 <= t < vocab_size)
        if outside:
            raise PreftError(f"logit_bias token ids {outside[:5]} are outside the vocabulary [0, {vocab_size})")


class SamplingError(PreftError):
    """No token can be drawn for some rows: their probabilities are not finite, or every token is excluded."""


class NonFiniteLogitsError(RuntimeError):
    """Some sequences' logits hold NaN or inf (e.g. a broken adapter); the engine fails only their requests."""

    def __init__(self, seqs: list[Sequence]):
        super().__init__(f"non-finite logits for request(s) {sorted({s.request_id for s in seqs})}")
        self.seqs = seqs


class Sampler:
    """Picks each sequence's next token from its logits row (see the module doc for the order of operations).

    ``token_bitmask`` is the structured-output hook: an int32 tensor ``[B, ceil(V / 32)]`` in xgrammar's
    layout (bit ``j`` of word ``w`` set: token ``32 * w + j`` allowed), one row per sequence; a row of all
    ones (-1) leaves its sequence unconstrained. It is applied first, so no processor, penalty or filter
    can bring a forbidden token back; logprobs are still the model's own.
    """

    def __call__(self, logits: Tensor, seqs: list[Sequence], token_bitmask: Tensor | None = None) -> list[int]:
        """``logits [B, V]`` for ``seqs`` -> next token ids; appends to ``seq.logprobs`` where asked.

        Raises ``NonFiniteLogitsError`` (naming only those rows' sequences) if some rows' logits are not finite."""
        return self.collect(self.launch(logits, seqs, token_bitmask))

    def launch(self, logits: Tensor, seqs: list[Sequence], token_bitmask: Tensor | None = None) -> SampleHandle:
        """Sample on the device and start the copy of the results to the host; ``collect`` waits for it.

        The draws count the tokens a sequence has generated, including ``num_pending`` ones whose ids are still
        on their way (asynchronous scheduling: the step before this one has not been collected yet)."""
        raw = logits.float()
        if raw.is_cuda:  # exact per-row flags (one pass at memory speed); the logits are not kept until collect
            finite, kept = torch.isfinite(raw).all(-1), None
        else:  # a NaN or inf anywhere in a row makes its sum NaN or inf: one cheap reduction, not an isfinite over [B, V]
            finite, kept = torch.isfinite(raw.sum(-1)), raw
        logits = raw if token_bitmask is None else apply_token_bitmask(raw, token_bitmask)
        params = [s.params for s in seqs]
        steps = [len(s.token_ids) + s.num_pending - s.num_prompt_tokens for s in seqs]  # tokens generated so far: the counter
        logits = apply_min_tokens(logits, seqs, steps)
        logits = apply_logit_bias(logits, params)
        logits = apply_penalties(logits, seqs)
        temperatures = [p.temperature for p in params]
        if any(temperatures):
            top_p, top_k, min_p = [p.top_p for p in params], [p.top_k for p in params], [p.min_p for p in params]
            next_ids = sample_next(logits, temperatures, top_p, top_k, min_p, [s.seed for s in seqs], steps)
        else:
            next_ids = greedy(logits)  # what sample_next does for an all-greedy batch
        asked = [i for i, s in enumerate(seqs) if s.logprobs is not None]
        ks = [seqs[i].params.logprobs for i in asked]
        if not asked:
            packed, k = torch.stack([next_ids, finite.long()]), 0
        else:
            packed, k = pack_logprobs(raw, next_ids, asked, ks, finite)
        return SampleHandle(seqs, kept, next_ids, to_host(packed), asked, ks, k)

    def collect(self, handle: SampleHandle) -> list[int]:
        """Wait for ``handle``'s copy; check it (``NonFiniteLogitsError``, ``SamplingError``); record logprobs; the ids."""
        flat = handle.host.wait().tolist()  # the step's one device-to-host copy, already under way
        seqs = handle.seqs
        if not handle.asked:
            ids, row_sum_finite = flat
            check_finite(row_sum_finite, handle.raw, seqs)
            check_drawn(ids, seqs)
            return ids
        ids, row_sum_finite, top = unpack_logprobs(flat, len(seqs), handle.asked, handle.ks, handle.k)
        check_finite(row_sum_finite, handle.raw, seqs)
        check_drawn(ids, seqs)
        for i, entry in zip(handle.asked, top):
            seqs[i].logprobs.append(entry)
        return ids


class HostCopy:
    """A device tensor on its way to the host: a non-blocking copy into pinned memory on CUDA (``wait`` syncs
    on its event only), the tensor itself on CPU."""

    __slots__ = ("tensor", "event")

    def __init__(self, tensor: Tensor, event: torch.cuda.Event | None = None):
        self.tensor, self.event = tensor, event

    def wait(self) -> Tensor:
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.tensor


def to_host(tensor: Tensor) -> HostCopy:
    if tensor.device.type != "cuda":
        return HostCopy(tensor)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return HostCopy(host, event)


class SampleHandle:
    """One step's sampling, launched: ``next_ids`` stay on the device (the next step may read them there, before
    they reach the host); ``Sampler.collect`` turns the handle into token ids."""

    __slots__ = ("seqs", "raw", "next_ids", "host", "asked", "ks", "k")

    def __init__(self, seqs: list[Sequence], raw: Tensor | None, next_ids: Tensor, host: HostCopy, asked: list[int], ks: list[int], k: int):
        self.seqs, self.raw, self.next_ids, self.host, self.asked, self.ks, self.k = seqs, raw, next_ids, host, asked, ks, k


def greedy(logits: Tensor) -> Tensor:
    """Row-wise argmax (the first of ties, as ``torch.argmax``). On CPU through NumPy: torch's CPU argmax is not
    vectorised (0.46 ms vs 0.02 ms for 256 x 1024 float32 on the 2-core CPU, 20x that for a 49k vocabulary)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(-1))
    return logits.argmax(-1)


def check_finite(row_sum_finite: list, raw: Tensor | None, seqs: list[Sequence]) -> None:
    """Raise ``NonFiniteLogitsError`` for the rows whose logits hold NaN or inf. A row sum can also overflow to
    inf when every logit is finite but huge, so the rows it flags are checked element by element (rare); ``raw``
    is None when the flags are exact already (CUDA: the logits are not kept for an extra step)."""
    if all(row_sum_finite):
        return
    flagged = [i for i, ok in enumerate(row_sum_finite) if not ok]
    exact = [False] * len(flagged) if raw is None else torch.isfinite(raw[flagged]).all(-1).tolist()  # None: flags were exact
    bad = [seqs[i] for i, ok in zip(flagged, exact) if not ok]
    if bad:
        raise NonFiniteLogitsError(bad)


def check_drawn(ids: list[int], seqs: list[Sequence]) -> None:
    failed = [(s.request_id, s.params.temperature) for s, t in zip(seqs, ids) if t < 0]
    if failed:
        raise SamplingError(
            f"no token could be sampled for request(s) {failed} (request id, temperature): their probabilities are not "
            "finite (a temperature too small for float32) or every token was excluded"
        )


def pack_logprobs(raw: Tensor, next_ids: Tensor, asked: list[int], ks: list[int], finite: Tensor) -> tuple[Tensor, int]:
    """One float64 tensor with the sampled ids and ``finite`` flags of every row and, for rows ``asked``, the model's
    log-probabilities of their sampled token and of their top ``k`` tokens (computed for all asked rows at once, so
    that one copy brings everything to the host; float64 holds token ids exactly). ``unpack_logprobs`` reads it."""
    rows = device_tensor(asked, torch.long, raw.device)
    logprobs = torch.log_softmax(raw.index_select(0, rows), dim=-1)
    k = min(max(ks), logprobs.shape[-1])
    values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    chosen = logprobs.gather(-1, next_ids.index_select(0, rows)[:, None].clamp(min=0))
    parts = [next_ids.double(), finite.double(), chosen.double().flatten(), top_ids.double().flatten(), values.double().flatten()]
    return torch.cat(parts), k


def unpack_logprobs(flat: list[float], batch: int, asked: list[int], ks: list[int], k: int) -> tuple[list[int], list[float], list[dict]]:
    """``pack_logprobs``'s tensor, on the host as a list -> (ids, finite flags, per asked row ``{token: logprob}``)."""
    count = len(asked)
    ids = [int(t) for t in flat[:batch]]
    flags, flat = flat[batch : 2 * batch], flat[2 * batch :]
    chosen_lp = flat[:count]
    top_flat, value_flat = flat[count : count + count * k], flat[count + count * k :]
    out = []
    for j, (row, want) in enumerate(zip(asked, ks)):
        entry = {int(t): v for t, v in zip(top_flat[j * k : j * k + want], value_flat[j * k : j * k + want])}
        entry[ids[row]] = chosen_lp[j]
        out.append(entry)
    return ids, flags, out


def _flat_rows(lists: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    """``lists[i]`` -> (row index of each item, the items) as int64 tensors, flattened: no per-row tensor work."""
    rows = [i for i, x in enumerate(lists) for _ in x]
    both = device_tensor([rows, list(chain.from_iterable(lists))], torch.long, device)  # one copy, no sync (device_tensor)
    return both[0], both[1]


def apply_min_tokens(logits: Tensor, seqs: list[Sequence], steps: list[int]) -> Tensor:
    """EOS ids (unless ``ignore_eos``) and ``stop_token_ids`` at -inf for rows that have fewer than ``min_tokens``."""
    if not any(s.params.min_tokens for s in seqs):
        return logits
    blocked = [list(s.min_tokens_stop_ids) if step < s.params.min_tokens else [] for s, step in zip(seqs, steps)]
    if not any(blocked):
        return logits
    rows, ids = _flat_rows(blocked, logits.device)
    return logits.index_put((rows, ids), logits.new_full((), float("-inf")))


def apply_logit_bias(logits: Tensor, params: list[SamplingParams]) -> Tensor:
    if not any(p.logit_bias for p in params):
        return logits
    rows, ids = _flat_rows([list(p.logit_bias) for p in params], logits.device)
    bias = device_tensor(list(chain.from_iterable(p.logit_bias.values() for p in params)), logits.dtype, logits.device)
    return logits.index_put((rows, ids), bias, accumulate=True)


def apply_penalties(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    """vLLM's penalties: repetition over prompt + output tokens, then frequency and presence over output tokens.

    Works on the (row, token) pairs that occur, not on ``[B, V]`` count tensors: the cost follows the
    number of tokens, not the vocabulary size.
    """
    params = [s.params for s in seqs]
    if not any(p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty for p in params):
        return logits
    repetition = [p.repetition_penalty != 1.0 for p in params]
    counted = [bool(p.frequency_penalty or p.presence_penalty) for p in params]
    if not any(repetition) and not any(counted):
        return logits
    vocab, device = logits.shape[-1], logits.device
    flat = logits.flatten().clone()
    if any(repetition):
        rows, ids = _flat_rows([s.token_ids if used else [] for s, used in zip(seqs, repetition)], device)
        seen = torch.unique(rows * vocab + ids)
        penalty = device_tensor([p.repetition_penalty for p in params], flat.dtype, device)[seen // vocab]
        values = flat[seen]
        flat[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if any(counted):
        rows, ids = _flat_rows([s.completion_token_ids if used else [] for s, used in zip(seqs, counted)], device)
        index, counts = torch.unique(rows * vocab + ids, return_counts=True)
        frequency = device_tensor([p.frequency_penalty for p in params], flat.dtype, device)[index // vocab]
        presence = device_tensor([p.presence_penalty for p in params], flat.dtype, device)[index // vocab]
        flat.index_add_(0, index, -(frequency * counts + presence))
    return flat.view_as(logits)


def request_seed(seed: int | None) -> int:
    """The seed a request samples with: its own, or a random one drawn when it is added."""
    return random_seeds(1)[0] if seed is None else seed


# generation_config.json fields that set sampling defaults (vLLM's list; the same names in SamplingParams)
GENERATION_DEFAULTS = {k: k for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}


def generation_defaults(source: str, model_dir: str | Path) -> dict[str, float]:
    """Sampling defaults from a ``generation_config.json``, as vLLM's ``--generation-config``: ``"auto"`` reads
    the model's, ``"vllm"`` none (vLLM's own defaults), any other value is a folder holding the file."""
    if source == "vllm":
        return {}
    folder = Path(model_dir) if source == "auto" else Path(source)
    path = folder / "generation_config.json"
    if not path.is_file():
        if source == "auto":
            return {}
        raise PreftError(f"--generation-config {source!r}: no generation_config.json in that folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PreftError(f"generation_config.json is not readable JSON: {e}") from None
    values = {name: config.get(key) for key, name in GENERATION_DEFAULTS.items()}
    defaults = {name: v for name, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    if "top_k" in defaults:
        defaults["top_k"] = max(int(defaults["top_k"]), 0)  # -1 (vLLM) and 0 both mean off
    return defaults
