"""Reference generation with a KV cache that follows each adapter's policy exactly.

This is the oracle the serving engine is tested against, and what GRPO rollouts can use:
prefill the (left-padded) prompts with the adapter on every prompt token, then decode; at each
decode step ``prefill``-policy rows run as the base model, ``all``-policy rows keep the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import DynamicCache

from preft.hf.model import PreftModel


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated tokens per row (stopping at and including EOS)
    logits: list[Tensor] | None = None  # per row [len(token_ids[row]), vocab] float32, when asked


MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x * c mod 2**32`` for ``x`` in ``[0, 2**32)``, in 16-bit halves so no int64 product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _mix32(x: Tensor) -> Tensor:
    """Chris Wellons' ``lowbias32`` integer hash: an invertible avalanche of 32-bit values (held in int64)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def device_tensor(values, dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> Tensor:
    """``torch.tensor(values)`` on ``device`` without a host sync: on CUDA through pinned memory and a non-blocking
    copy (a copy from pageable memory waits for the device's queued work, which would stall an engine that runs
    ahead of it); PyTorch's pinned-memory cache keeps the staging buffer until the copy has run."""
    host = torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def seeded_uniforms(seeds: list[int], steps: list[int], device: torch.device | str = "cpu") -> Tensor:
    """One float64 number in ``[0, 1)`` per row, a pure function of the row's ``(seed, step)`` (a counter-based stream).

    Vectorised integer hashing of the 64-bit seed and the step; a row's number never depends on the
    other rows, the batch order or earlier draws, so seeded sampling is batch-invariant and a rerun
    (preemption, fault isolation) draws the same number again.
    """
    seed64 = [s % 2**64 for s in seeds]
    lo = device_tensor([s & MASK32 for s in seed64], torch.int64, device)
    hi = device_tensor([s >> 32 for s in seed64], torch.int64, device)
    step = device_tensor(steps, torch.int64, device) & MASK32
    key = _mix32(_mix32(_mix32(lo ^ 0x9E3779B9) ^ hi) ^ step)
    a, b = _mix32(key ^ 0x85EBCA6B), _mix32(key ^ 0xC2B2AE35)
    return ((a << 21) | (b >> 11)).double() * 2.0**-53  # 53 random bits: each multiple of 2**-53 in [0, 1) equally likely


def random_seeds(count: int) -> list[int]:
    """Seeds for unseeded rows, from torch's global RNG (so ``torch.manual_seed`` makes a whole run reproducible)."""
    return torch.randint(0, 2**62, (count,)).tolist()


def _per_row(value: float | list[float], rows: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * rows
    if len(values) != rows:
        raise ValueError(f"{len(values)} per-row values for {rows} rows")
    return values


def filter_logits(
    logits: Tensor, top_k: list[int] | None = None, top_p: list[float] | None = None, min_p: list[float] | None = None
) -> Tensor:
    """Temperature-scaled ``logits [B, V]`` with the tokens that min-p, then top-k, then top-p exclude set to -inf
    (vLLM's order). Each filter is ``None`` (off) or a per-row list whose neutral value (0, 1.0, 0.0) leaves that row alone.

    min-p keeps tokens with ``p >= min_p * p_max``; top-k keeps the ``k`` most likely (and ties of the k-th);
    top-p keeps the smallest most-likely prefix (of the top-k ones) whose mass reaches ``top_p``.
    """
    vocab, device = logits.shape[-1], logits.device
    if min_p is not None:
        floor = device_tensor(min_p, logits.dtype, device).log()  # p >= min_p p_max  <=>  logit >= max + log(min_p)
        logits = logits.masked_fill(logits < logits.amax(-1, keepdim=True) + floor[:, None], float("-inf"))
    if top_k is not None:
        top_k = [k if 0 < k < vocab else vocab for k in top_k]  # 0 (off) keeps the whole vocabulary
    if top_p is not None:
        return _top_k_top_p(logits, top_k or [vocab] * logits.shape[0], top_p)
    if top_k is not None:
        kmax = max(k for k in top_k if k < vocab)
        k = device_tensor([min(k, kmax) for k in top_k], None, device)
        kth = logits.topk(kmax, dim=-1).values.gather(-1, k[:, None] - 1)
        kth = kth.masked_fill(device_tensor([k == vocab for k in top_k], None, device)[:, None], float("-inf"))
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


# CPU: top-p first looks at this many likeliest tokens (a top-k, much cheaper than sorting the vocabulary on a
# CPU) and sorts the whole vocabulary only for a batch where they may not hold the kept set.
TOP_P_HEAD = 1024


def _top_k_top_p(logits: Tensor, top_k: list[int], top_p: list[float]) -> Tensor:
    """Top-k (``vocab`` = off), then top-p on the renormalised rest, over the tokens sorted by logit."""
    rows, vocab = logits.shape
    device = logits.device
    k_off = device_tensor([k == vocab for k in top_k], None, device)
    p = device_tensor(top_p, logits.dtype, device)
    head = TOP_P_HEAD if device.type == "cpu" and vocab > TOP_P_HEAD and all(k <= TOP_P_HEAD or k == vocab for k in top_k) else vocab
    while True:
        values, order = logits.topk(head, dim=-1) if head < vocab else logits.sort(-1, descending=True)
        kth = values.gather(-1, device_tensor([min(k, head) for k in top_k], None, device)[:, None] - 1)
        values = values.masked_fill(values < kth.masked_fill(k_off[:, None], float("-inf")), float("-inf"))
        norm = values.logsumexp(-1)
        if head < vocab:  # rows without top-k renormalise over the whole vocabulary, not the head
            norm = torch.where(k_off, logits.logsumexp(-1), norm)
        probs = (values - norm[:, None]).exp()
        # Exact when every row's kept set lies in the head: a top-k row's does; another's when the head holds more than top_p.
        if head == vocab or bool((~k_off | (probs.sum(-1) > p + 1e-4)).all()):
            break
        head = vocab
    drop = probs.cumsum(-1) - probs > p[:, None]  # keep the smallest prefix whose mass reaches top_p
    base = logits if head == vocab else torch.full_like(logits, float("-inf"))
    return base.scatter(-1, order, values.masked_fill(drop, float("-inf")))


DRAW_BLOCK = 256  # tokens per block of the two-level cumulative sum in ``draw``


def draw(probs: Tensor, uniforms: Tensor) -> Tensor:
    """Inverse-CDF draw: per row the token whose cumulative-probability interval holds ``uniforms[row]``.

    Two-level cumulative sums, float32 inside blocks of ``DRAW_BLOCK`` tokens and float64 across blocks:
    near float64 precision at float32 cost. A token of probability 0 (filtered out) has an empty interval
    and is never drawn. A row whose probabilities are not finite, or all 0, gets -1 (the caller decides).
    """
    rows, vocab = probs.shape
    blocks = -(-vocab // DRAW_BLOCK)
    padded = probs.float() if vocab == blocks * DRAW_BLOCK else F.pad(probs.float(), (0, blocks * DRAW_BLOCK - vocab))
    inner = padded.view(rows, blocks, DRAW_BLOCK).cumsum(-1)
    mass = inner[..., -1].double()
    outer = mass.cumsum(-1)
    total = outer[:, -1]
    target = (uniforms.to(outer.device) * total)[:, None]  # < total: uniforms < 1
    block = torch.searchsorted(outer, target, right=True).clamp(max=blocks - 1)  # first block ending above target
    start = torch.cat([outer.new_zeros(rows, 1), outer[:, :-1]], dim=-1).gather(-1, block)  # <= target
    cdf = inner.gather(1, block[:, :, None].expand(-1, -1, DRAW_BLOCK)).squeeze(1)
    last = (cdf < cdf[:, -1:]).sum(-1, keepdim=True)  # the block's last token of positive probability
    inside = torch.minimum(torch.searchsorted(cdf, (target - start).float(), right=True), last)
    ids = (block * DRAW_BLOCK + inside).squeeze(-1)
    return torch.where(torch.isfinite(total) & (total > 0), ids, -1)


def sample_next(
    logits: Tensor,
    temperature: float | list[float] = 0.0,
    top_p: float | list[float] = 1.0,
    top_k: int | list[int] = 0,
    min_p: float | list[float] = 0.0,
    seed: int | list[int] | None = None,
    step: int | list[int] = 0,
) -> Tensor:
    """The next token of each row of ``logits [B, V]``: argmax where ``temperature == 0``, else a draw from
    ``softmax(logits / temperature)`` restricted by min-p, top-k and top-p (``filter_logits``).

    Each knob is one value for every row or a list of per-row values. A row's draw is a pure function of
    its logits, knobs, ``seed`` and ``step`` (``seeded_uniforms``), so it does not depend on the other rows;
    ``seed=None`` draws random seeds from torch's global RNG. This is the one definition of the sampling
    maths: the reference generator calls it directly, the engine's ``Sampler`` after its logit processors.
    """
    rows = logits.shape[0]
    temps = _per_row(temperature, rows)
    if not any(temps):
        return logits.argmax(-1)
    device = logits.device
    scale = device_tensor([t if t > 0 else 1.0 for t in temps], torch.float32, device)
    scaled = logits.float() / scale[:, None]
    knobs = {"top_k": _per_row(top_k, rows), "top_p": _per_row(top_p, rows), "min_p": _per_row(min_p, rows)}
    used = {
        "top_k": any(0 < k < logits.shape[-1] for k in knobs["top_k"]),
        "top_p": any(p < 1.0 for p in knobs["top_p"]),
        "min_p": any(p > 0.0 for p in knobs["min_p"]),
    }
    scaled = filter_logits(scaled, **{name: values if used[name] else None for name, values in knobs.items()})
    seeds = random_seeds(rows) if seed is None else _per_row(seed, rows)
    sampled = draw(scaled.softmax(-1), seeded_uniforms(seeds, _per_row(step, rows), device))
    if all(temps):
        return sampled
    greedy = device_tensor([t == 0 for t in temps], None, device)
    return torch.where(greedy, logits.argmax(-1), sampled)


@torch.no_grad()
def generate(
    model: PreftModel,
    prompts: list[list[int]],
    adapter_names: str | list[str | None] | None = None,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    return_logits: bool = False,
    pad_token_id: int = 0,
) -> Generation:
    """Generate up to ``max_new_tokens`` per prompt with exact PreFT semantics (see module doc).

    Sampling (``temperature > 0``) is ``sample_next``: row ``i`` uses seed ``seed + i`` (random when ``seed`` is
    None) and its step counter, so it samples what an engine request with that seed samples.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    bsz, longest = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((bsz, longest), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros(bsz, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, longest - len(p) :] = torch.tensor(p, device=device)
        attention_mask[i, longest - len(p) :] = 1
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    seeds = random_seeds(bsz) if seed is None else [seed + i for i in range(bsz)]  # row i: the engine's seed + completion index
    cache = DynamicCache(config=model.config)
    out_tokens: list[list[int]] = [[] for _ in range(bsz)]
    out_logits: list[list[Tensor]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    step_ids = input_ids
    for step in range(max_new_tokens):
        logits = model(step_ids, attention_mask=attention_mask, adapter_names=adapter_names, past_key_values=cache, use_cache=True).logits[
            :, -1
        ]
        next_ids = sample_next(logits, temperature, top_p, top_k, min_p, seeds, step)
        for i in range(bsz):
            if done[i]:
                continue
            out_tokens[i].append(int(next_ids[i]))
            if return_logits:
                out_logits[i].append(logits[i].float().cpu())
            done[i] = int(next_ids[i]) in eos
        if all(done):
            break
        step_ids = next_ids[:, None]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(bsz, 1)], dim=1)
    logits_out = [torch.stack(rows) for rows in out_logits] if return_logits else None
    return Generation(out_tokens, logits_out)
