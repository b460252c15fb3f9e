"""Shared helpers of the engine tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch

from preft.adapters import LoraConfig, ReftConfig
from preft.engine import SamplingParams
from preft.hf import generate

VOCAB = 261
LOGPROB_ATOL = 1e-4  # float32 CPU; measured max |diff| of log-softmax ~2e-6
KINDS = ("lora", "lora_all", "direft", "loreft")
POLICIES = ("prefill", "all")


def adapter_config(kind: str, policy: str, r: int = 4, **kw):
    if kind == "lora":
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "down_proj"], policy=policy, **kw)
    if kind == "lora_all":
        return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", policy=policy, **kw)
    return ReftConfig(kind=kind, r=r, policy=policy, **kw)


def adapter_name(kind: str, policy: str, r: int = 4) -> str:
    return f"{kind}-{policy}-r{r}"


def full_logprobs(completion) -> torch.Tensor:
    """``[n, VOCAB]`` log-probabilities from a completion generated with ``logprobs=VOCAB``."""
    return torch.tensor([[step[t] for t in range(VOCAB)] for step in completion.logprobs])


def assert_matches_reference(llm, ref, prompts, adapters, max_tokens=6, **engine_kw):
    """Greedy engine outputs equal ``preft.hf.generate``'s tokens, log-probs within ``LOGPROB_ATOL``; KV pool empty after."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, logprobs=VOCAB)
    outs = llm.generate(prompts, params, adapter=adapters, use_tqdm=False, **engine_kw)
    expected = generate(ref, prompts, adapters, max_new_tokens=max_tokens, return_logits=True)
    for i, (out, tokens, logits) in enumerate(zip(outs, expected.token_ids, expected.logits)):
        completion = out.outputs[0]
        assert completion.token_ids == tokens, f"row {i} (adapter {adapters[i] if isinstance(adapters, list) else adapters})"
        diff = (full_logprobs(completion) - logits.log_softmax(-1)).abs().max().item()
        assert diff < LOGPROB_ATOL, f"row {i}: max |logprob diff| {diff:.2e}"
    assert llm.engine.stats()["kv_blocks_used"] == 0, "KV blocks leaked"
    assert llm.engine.stats()["adapter_slots_used"] == 0, "adapter slots leaked"
    return outs
