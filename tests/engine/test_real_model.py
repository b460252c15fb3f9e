"""The engine on the real built-in model (SmolLM2-135M-Instruct, float32, CPU) against transformers and PEFT.

- base model: the engine's greedy tokens for 8 chat prompts of different lengths, decoded in one
  batch, are the tokens transformers' greedy decoding picks (checked token by token with one
  teacher-forced transformers forward per prompt: each engine token must be transformers' argmax
  given the same prefix, which by induction is transformers' own greedy sequence);
- LoRA-P and DiReFT-P: engine greedy equals preft's reference generator (``preft.hf.generate``);
  LoRA-P also equals an oracle built from PEFT alone: prefill with the adapter enabled, then
  decode the cached KV under ``disable_adapter()``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from preft.adapters import LoraConfig, ReftConfig, save_adapter
from preft.engine import LLM, SamplingParams
from preft.hf import PreftModel, generate
from preft.tiny import random_adapter

pytestmark = pytest.mark.real_model

NEW_TOKENS = 32
ADAPTER_TOKENS = 16  # the adapter checks run transformers-side generation too: shorter, to keep CI fast
QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning' into Spanish, French and German.",
    "I have a list of numbers: 4, 8, 15, 16, 23, 42. What is their sum, and which of them are even? Show your steps.",
    "Here is a short story: a fox found a grape vine, tried to reach the grapes, failed, and walked away saying they "
    "were sour anyway. What is the moral of this story, and where does it come from? Answer briefly.",
]
# Two logits closer than this are a tie that float32 rounding may order either way (measured gaps are reported).
TIE = 1e-4


@pytest.fixture(scope="module")
def real(smollm2_dir, smollm2_llm):
    llm = smollm2_llm
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = llm.tokenizer
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True, add_generation_prompt=True, return_dict=False)
        for q in QUESTIONS
    ]
    return llm, hf, prompts


def engine_greedy(llm: LLM, prompts: list[list[int]], adapter: str | None = None, tokens: int = NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    outs = llm.generate(prompts, params, adapter=adapter, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_engine_greedy_equals_transformers_greedy_on_8_chat_prompts_in_one_batch(real):
    llm, hf, prompts = real
    assert len({len(p) for p in prompts}) == len(prompts), "the prompts must have different lengths"
    generated = engine_greedy(llm, prompts)  # one engine batch: every prompt is admitted at once
    compared = 0
    for prompt, tokens in zip(prompts, generated):
        assert len(tokens) == NEW_TOKENS
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1]
        for i, token in enumerate(tokens):
            top2 = logits[i].topk(2)
            if token != int(top2.indices[0]):
                gap = float(top2.values[0] - logits[i, token])
                assert gap < TIE, (
                    f"prompt of {len(prompt)} tokens, position {i}: engine chose {token}, transformers {int(top2.indices[0])} by {gap:.2e}"
                )
                assert i >= 16, f"a tie flipped already at position {i} (gap {gap:.2e})"
                break  # a true tie: the sequences may legitimately part here
            compared += 1
    assert compared >= 8 * 16
    text = llm.tokenizer.decode(generated[1])
    assert "Paris" in text, text


@pytest.fixture(scope="module")
def adapters(real, tmp_path_factory):
    """A LoRA-P (rank 8, q/k/v/o/gate/up/down) and a DiReFT-P (rank 8, every layer), random but strong enough to change answers."""
    llm, hf, _ = real
    root = tmp_path_factory.mktemp("real-adapters")
    configs = {
        "lora-p": LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", policy="prefill"),
        "direft-p": ReftConfig(kind="direft", r=8, policy="prefill"),
    }
    paths = {}
    for seed, (name, config) in enumerate(configs.items()):
        adapter = random_adapter(hf.config, config, seed=seed, std=0.05)
        paths[name] = save_adapter(adapter, root / name)
        llm.add_adapter(name, paths[name])
    yield paths
    for name in configs:
        llm.remove_adapter(name)


@pytest.mark.parametrize("name", ["lora-p", "direft-p"])
def test_prefill_adapters_engine_greedy_equals_reference_generator(real, adapters, name):
    llm, hf, prompts = real
    prompts = prompts[1:4]
    reference = PreftModel(copy.deepcopy(hf)).eval()
    reference.load_adapter(str(adapters[name]), name)
    expected = generate(reference, prompts, name, max_new_tokens=ADAPTER_TOKENS).token_ids
    got = engine_greedy(llm, prompts, name, ADAPTER_TOKENS)
    assert got == [list(t) for t in expected]
    assert got != engine_greedy(llm, prompts, None, ADAPTER_TOKENS), (
        "the adapter must change what is generated, or this test proves nothing"
    )


def test_lora_prefill_engine_equals_a_peft_only_oracle(real, adapters):
    """PEFT alone, no preft code: adapter on for the prompt's forward, ``disable_adapter()`` for every decode step."""
    from peft import PeftModel
    from transformers import DynamicCache

    from preft.hf.model import cache_argument

    llm, hf, prompts = real
    prompts = prompts[1:4]
    peft_model = PeftModel.from_pretrained(copy.deepcopy(hf), str(adapters["lora-p"])).eval()
    expected = []
    cache_name = cache_argument(hf)  # "cache" from transformers 5.24 on, "past_key_values" before
    with torch.no_grad():
        for prompt in prompts:
            past = DynamicCache(config=hf.config)  # filled in place by every forward
            out = peft_model(input_ids=torch.tensor([prompt]), use_cache=True, **{cache_name: past})
            tokens = [int(out.logits[0, -1].argmax())]
            with peft_model.disable_adapter():
                while len(tokens) < ADAPTER_TOKENS:
                    out = peft_model(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_name: past})
                    tokens.append(int(out.logits[0, -1].argmax()))
            expected.append(tokens)
    assert engine_greedy(llm, prompts, "lora-p", ADAPTER_TOKENS) == expected


def test_async_scheduling_equals_sync_on_the_real_model(real):
    """Asynchronous scheduling (on by default on CUDA) gives the tokens, stops and texts of synchronous steps."""
    llm, _, prompts = real
    params = SamplingParams(max_tokens=24, temperature=0.0)  # EOS ends some answers: stop checks land one step late
    outs = {}
    for mode in (True, False):
        llm.engine.async_scheduling = mode
        try:
            outs[mode] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.engine.async_scheduling = False
    assert [(c.token_ids, c.finish_reason, c.text) for c in outs[True]] == [(c.token_ids, c.finish_reason, c.text) for c in outs[False]]
    assert {c.finish_reason for c in outs[False]} == {"stop", "length"}, "both ways to end must occur, or half is untested"
