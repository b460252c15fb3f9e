"""Structured outputs (preft.engine.guided): the bitmask layout, spec checks, and on the real model every
constrained output parses and validates while unconstrained rows of the same batch are untouched."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema
import pytest
import torch

from preft.engine.guided import GuidedDecoding, apply_token_bitmask, check_spec
from preft.engine.sampler import SamplingParams
from preft.errors import PreftError

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}, "city": {"type": "string"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
COLORS = {"type": "array", "items": {"type": "string", "enum": ["red", "green", "blue"]}, "minItems": 2, "maxItems": 3}


def test_bitmask_bit_j_of_word_w_allows_token_32w_plus_j_and_ignores_bits_past_the_vocabulary():
    vocab = 40  # not a multiple of 32: the last word has bits past the vocabulary
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[0, 0] = 1 << 3  # token 3
    bitmask[0, 1] = (1 << 5) | (1 << 20)  # token 37, and bit 20 of word 1 = token 52 >= vocab (ignored)
    bitmask[1] = -1  # every token
    logits = torch.randn(2, vocab)
    masked = apply_token_bitmask(logits, bitmask)
    assert torch.isfinite(masked[0]).nonzero().flatten().tolist() == [3, 37]
    assert torch.equal(masked[1], logits[1])


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"json": {"type": "bogus"}}, "invalid json"),
        ({"regex": "(unclosed"}, "invalid regex"),
        ({"choice": []}, "non-empty list"),
        ({"json": {}, "regex": "a"}, "one of"),
        ({"grammar": "root ::= "}, "invalid grammar"),
    ],
)
def test_a_bad_spec_is_a_clear_error_at_sampling_params_time(spec, message):
    with pytest.raises(PreftError, match=message):
        SamplingParams(structured=spec)


def test_check_spec_names_the_parameter_it_was_given():
    with pytest.raises(PreftError, match="^response_format: invalid json"):
        check_spec({"json": {"type": "bogus"}}, "response_format")


def test_the_engine_imports_and_serves_without_xgrammar_and_a_structured_request_says_what_to_install():
    code = (
        "import sys; sys.modules['xgrammar'] = None\n"
        "import preft.engine, preft.engine.llm_engine\n"
        "from preft.engine.sampler import SamplingParams\n"
        "from preft.errors import PreftError\n"
        "SamplingParams(max_tokens=2)\n"
        "try:\n    SamplingParams(structured={'regex': 'a'})\nexcept PreftError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "pip install" in out.stdout and "xgrammar" in out.stdout


def test_bitmask_is_as_wide_as_the_logits_when_the_model_vocabulary_exceeds_the_tokenizers(smollm2_llm):
    tokenizer = smollm2_llm.tokenizer
    vocab = len(tokenizer) + 100  # padded lm_head
    guided = GuidedDecoding(tokenizer, vocab, {tokenizer.eos_token_id})

    class Seq:
        guide = guided.matcher({"choice": ["yes", "no"]})

    bitmask = guided.bitmask([Seq(), type("Free", (), {"guide": None})()])
    assert bitmask.shape == (2, -(-vocab // 32))
    logits = apply_token_bitmask(torch.zeros(2, vocab), bitmask)
    allowed = torch.isfinite(logits[0]).nonzero().flatten().tolist()
    assert allowed and max(allowed) < len(tokenizer)  # padding tokens are never allowed
    assert all("yes".startswith(t) or "no".startswith(t) for t in tokenizer.convert_ids_to_tokens(allowed))
    assert torch.isfinite(logits[1]).all()  # an unconstrained row allows everything


def _chat(llm, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@pytest.mark.real_model
def test_every_structured_output_parses_and_validates_and_a_free_row_in_the_same_batch_is_unchanged(smollm2_llm):
    llm = smollm2_llm
    person, colors, free = _chat(llm, "Describe a person as JSON."), _chat(llm, "Name some colors."), _chat(llm, "Say hello.")
    favourite = _chat(llm, 'Give a JSON object with the key "color" and your favourite color.')
    alone = llm.generate(free, SamplingParams(max_tokens=12), use_tqdm=False)[0].outputs[0].token_ids
    prompts = [person, person, colors, free, free, free, favourite]
    params = [
        SamplingParams(max_tokens=80, structured={"json": PERSON}),
        SamplingParams(max_tokens=80, temperature=1.0, seed=7, n=2, structured={"json": PERSON}),
        SamplingParams(max_tokens=60, temperature=0.8, seed=1, structured={"json": COLORS}),
        SamplingParams(max_tokens=12),  # unconstrained: must equal the same request alone
        SamplingParams(max_tokens=24, structured={"regex": r"[A-Z][a-z]{1,8} [0-9]{3}-[0-9]{4}"}),
        SamplingParams(max_tokens=10, structured={"choice": ["hello there", "goodbye", "maybe"]}),
        SamplingParams(max_tokens=80, structured={"json": None}),  # any JSON (response_format json_object)
    ]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for out in outs[0].outputs + outs[1].outputs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), PERSON)
    jsonschema.validate(json.loads(outs[2].outputs[0].text), COLORS)
    assert outs[3].outputs[0].token_ids == alone
    assert re.fullmatch(r"[A-Z][a-z]{1,8} [0-9]{3}-[0-9]{4}", outs[4].outputs[0].text)
    assert outs[5].outputs[0].text in ("hello there", "goodbye", "maybe") and outs[5].outputs[0].finish_reason == "stop"
    assert isinstance(json.loads(outs[6].outputs[0].text), dict)


@pytest.mark.real_model
def test_a_grammar_is_compiled_once_per_distinct_spec(smollm2_llm):
    guided = smollm2_llm.engine.guided
    spec = {"json": {"type": "object", "properties": {"id": {"type": "integer"}}, "required": ["id"]}}
    guided.matcher(spec)
    compiled = len(guided._cache)
    guided.matcher(json.loads(json.dumps(spec)))  # an equal spec, another object
    assert len(guided._cache) == compiled


@pytest.mark.real_model
def test_structured_output_with_a_prefill_adapter_validates_and_its_first_token_is_adapted(smollm2_llm):
    from preft.assets import demo_adapters

    llm = smollm2_llm
    llm.add_adapter("alice-guided", demo_adapters()["alice"])
    try:
        schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
        prompt = _chat(llm, "Where do I live? Answer in JSON.")
        params = SamplingParams(max_tokens=24, structured={"json": schema})
        adapted, base = llm.generate([prompt, prompt], [params, params], adapter=["alice-guided", None], use_tqdm=False)
    finally:
        llm.remove_adapter("alice-guided")
    for out in (adapted, base):
        jsonschema.validate(json.loads(out.outputs[0].text), schema)
    assert adapted.outputs[0].text != base.outputs[0].text  # the adapter still steers what the grammar allows
