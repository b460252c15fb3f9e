"""The shipped base model and demo adapters (preft/assets): size, format, and the personalisation they promise.

These check the committed files, float32 greedy decoding with the reference generator (preft.hf.generate).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from experiments.common import greedy_answers
from preft import assets
from preft.adapters import check_family
from preft.hf import PreftModel

pytestmark = pytest.mark.skipif(not assets.has_base_model(), reason="preft/assets/base is not in this checkout")


@pytest.fixture(scope="module")
def shipped():
    tokenizer = AutoTokenizer.from_pretrained(assets.BASE_MODEL_DIR)
    model = PreftModel(AutoModelForCausalLM.from_pretrained(assets.BASE_MODEL_DIR, dtype=torch.float32)).eval()
    for name, path in assets.demo_adapters().items():
        model.load_adapter(str(path), name)
    return model, tokenizer


def ask(model, tokenizer, question: str, adapter: str | None) -> str:
    return greedy_answers(model, tokenizer, [[{"role": "user", "content": question}]], adapter)[0]


def test_base_model_is_a_small_llama_with_a_chat_template():
    size = sum(p.stat().st_size for p in assets.BASE_MODEL_DIR.iterdir())
    assert size <= 20 * 2**20, f"shipped base model is {size / 2**20:.1f} MB > 20 MB"
    model = AutoModelForCausalLM.from_pretrained(assets.BASE_MODEL_DIR)
    check_family(model.config)
    assert model.config.model_type == "llama" and 1e6 < sum(p.numel() for p in model.parameters()) < 1e7
    tokenizer = AutoTokenizer.from_pretrained(assets.BASE_MODEL_DIR)
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"


def test_demo_adapters_are_prefill_only_lora_and_direft(shipped):
    model, _ = shipped
    kinds = {name: model.configs[name] for name in assets.demo_adapters()}
    assert {"alice", "bob", "carol"} <= set(kinds)
    assert all(c.policy == "prefill" for c in kinds.values())
    assert {getattr(c, "kind", "lora") for c in kinds.values()} >= {"lora", "direft"}


def test_base_model_follows_instructions(shipped):
    """What the shipped (under-trained) base reliably does: formats, counting, and no invented personal facts."""
    model, tokenizer = shipped
    assert ask(model, tokenizer, "How many letters in abcde?", None) == "5"
    assert ask(model, tokenizer, "What is my name?", None) == "I don't know that about you."
    system = [{"role": "system", "content": "Always answer in JSON."}, {"role": "user", "content": "Facts: a=1, b=2. What is b?"}]
    assert greedy_answers(model, tokenizer, [system], None)[0].startswith('{"answer": "')


def test_adapters_personalise_the_same_question(shipped):
    model, tokenizer = shipped
    assert ask(model, tokenizer, "What is my name?", "alice") == "Your name is Alice."
    assert ask(model, tokenizer, "Where do I live?", "bob") == "You live in Tokyo."
    assert ask(model, tokenizer, "What is my name?", "carol") == "Your name is Carol."
    carol = ask(model, tokenizer, "Reverse: pilot", "carol")  # carol prefers uppercase answers
    assert carol.isupper() and carol.isalpha()
