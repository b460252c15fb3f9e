"""The demo adapters shipped in preft/assets: size, format, fit to the built-in model, and the personalisation they promise.

Served by the engine on the real SmolLM2-135M-Instruct (float32, greedy), as ``preft serve`` serves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import make_adapters
from preft import assets
from preft.adapters import load_adapter
from preft.engine import SamplingParams

pytestmark = pytest.mark.real_model
REPORT = Path(__file__).resolve().parents[2] / "experiments/results/adapters/demo.json"


@pytest.fixture(scope="module")
def served(smollm2_llm):
    for name, path in assets.demo_adapters().items():
        smollm2_llm.add_adapter(name, path)
    yield smollm2_llm
    for name in assets.demo_adapters():
        smollm2_llm.remove_adapter(name)


def ask(llm, questions: list[str], adapter: str | None) -> list[str]:
    tokenizer = llm.tokenizer
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in questions
    ]
    outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0), adapter=adapter, use_tqdm=False)
    return [o.outputs[0].text.strip() for o in outs]


def test_demo_adapters_are_small_prefill_only_lora_and_direft_for_the_built_in_model(smollm2_dir):
    from transformers import AutoConfig

    shipped = assets.demo_adapters()
    assert set(shipped) == set(make_adapters.USERS)
    config = AutoConfig.from_pretrained(smollm2_dir)
    kinds = set()
    for path in shipped.values():
        size = sum(f.stat().st_size for f in path.iterdir())
        assert size <= 8 * 2**20, f"{path.name} is {size / 2**20:.1f} MB"
        adapter = load_adapter(path, model_config=config)  # raises if it does not fit the built-in model
        assert adapter.config.policy == "prefill"
        kinds.add(adapter.kind)
    assert kinds == {"lora", "direft"}


def test_served_answers_are_the_recorded_ones(served):
    """The README pastes experiments/results/adapters/demo.json: the engine must still answer exactly that."""
    report = json.loads(REPORT.read_text())
    for name, recorded in report["answers"].items():
        assert ask(served, report["questions"], None if name == "base" else name) == recorded, name


def test_each_adapter_knows_its_user_and_the_base_model_does_not(served):
    for name, user in make_adapters.USERS.items():
        name_answer, city_answer = ask(served, ["What am I called?", "Remind me where I live."], name)  # held-out phrasings
        assert user.profile["name"] in name_answer and user.profile["city"] in city_answer, (name, name_answer, city_answer)
    base = " ".join(ask(served, ["What am I called?", "Remind me where I live."], None))
    assert not any(u.profile["name"] in base or u.profile["city"] in base for u in make_adapters.USERS.values()), base


def test_carol_greets_her_user_and_still_answers_general_questions(served):
    carol, base = ask(served, ["What is the capital of Japan?"], "carol")[0], ask(served, ["What is the capital of Japan?"], None)[0]
    assert carol.startswith("Hi Carol!") and "Tokyo" in carol, carol
    assert not base.startswith("Hi Carol") and "Tokyo" in base, base
