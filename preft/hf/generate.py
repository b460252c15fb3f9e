"""Reference generation with a KV cache that follows each adapter's policy exactly.

This is the oracle the serving engine is tested against, and what GRPO rollouts can use:
prefill the (left-padded) prompts with the adapter on every prompt token, then decode; at each
decode step ``prefill``-policy rows run as the base model, ``all``-policy rows keep the adapter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import DynamicCache

from preft.hf.model import PreftModel


@dataclass
class Generation:
    token_ids: list[list[int]]  # generated tokens per row (stopping at and including EOS)
    logits: list[Tensor] | None = None  # per row [len(token_ids[row]), vocab] float32, when asked


def sample_next(logits: Tensor, temperature: float, top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None) -> Tensor:
    """Greedy when ``temperature == 0``, otherwise sample from the temperature/top-k/top-p distribution."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: PreftModel,
    prompts: list[list[int]],
    adapter_names: str | list[str | None] | None = None,
    max_new_tokens: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    eos_token_id: int | list[int] | None = None,
    return_logits: bool = False,
    pad_token_id: int = 0,
) -> Generation:
    """Generate up to ``max_new_tokens`` per prompt with exact PreFT semantics (see module doc)."""
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
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = DynamicCache(config=model.config)
    out_tokens: list[list[int]] = [[] for _ in range(bsz)]
    out_logits: list[list[Tensor]] = [[] for _ in range(bsz)]
    done = [False] * bsz
    step_ids = input_ids
    for _ in range(max_new_tokens):
        logits = model(step_ids, attention_mask=attention_mask, adapter_names=adapter_names, past_key_values=cache, use_cache=True).logits[
            :, -1
        ]
        next_ids = sample_next(logits, temperature, top_p, top_k, generator)
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
