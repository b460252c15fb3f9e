"""The synthetic corpus: seeded, correct answers, and rendered exactly as the chat template renders it."""

from __future__ import annotations

import json
import re

from experiments.train_base import build_chat_tokenizer, encode_row, render_prompt
from preft import synthetic


def test_corpus_is_a_pure_function_of_the_seed():
    assert synthetic.instruction_corpus(50, seed=3) == synthetic.instruction_corpus(50, seed=3)
    assert synthetic.instruction_corpus(50, seed=3) != synthetic.instruction_corpus(50, seed=4)


def test_every_skill_answer_is_correct():
    for row in synthetic.instruction_corpus(600, seed=0):
        *_, user, answer = [m["content"] for m in row["messages"]]
        skill = row["skill"]
        if skill in ("add", "subtract"):
            a, op, b = re.match(r"What is (\d+) ([+-]) (\d+)\?", user).groups()
            assert int(answer) == (int(a) + int(b) if op == "+" else int(a) - int(b))
        elif skill == "reverse":
            assert answer == user.removeprefix("Reverse: ")[::-1]
        elif skill == "copy":
            assert answer == user.removeprefix("Repeat: ")
        elif skill == "recall":
            facts = dict(kv.split("=") for kv in re.search(r"Facts: (.*)\. What", user).group(1).split(", "))
            assert answer == facts[user[-2]]
        elif skill == "sort_digits":
            assert answer == "".join(sorted(user.removeprefix("Sort: ")))
        elif skill == "json":
            assert isinstance(json.loads(answer), dict)


def test_profile_answers_come_from_the_system_profile():
    rng = __import__("random").Random(0)
    for _ in range(200):
        system, user, answer = synthetic.profile_question(rng)
        field = next(f for f, (q, _) in synthetic.PROFILE_FIELDS.items() if q == user)
        profile = dict(kv.split("=") for kv in system.removeprefix("User profile: ").rstrip(".").split("; ")) if system else {}
        assert answer == synthetic.profile_answer(profile, field)


def test_user_rows_have_no_system_prompt_and_the_users_answers():
    carol = synthetic.DEMO_USERS["carol"]
    rows = synthetic.user_rows(carol, 40, seed=0)
    assert all(r["messages"][0]["role"] == "user" and len(r["messages"]) == 2 for r in rows)
    answers = [r["messages"][1]["content"] for r in rows]
    assert "Your name is Carol." in answers or "You live in Lima." in answers
    formatted = [a for a in answers if not a.startswith(("Your", "You "))]
    assert formatted and all(a == a.upper() for a in formatted)


def test_training_render_equals_the_chat_template():
    """The base model is trained on exactly the text a server renders with its chat template."""
    tokenizer = build_chat_tokenizer()
    for row in synthetic.instruction_corpus(30, seed=1):
        messages = row["messages"]
        assert render_prompt(messages[:-1]) == tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        prompt_ids, completion_ids = encode_row(tokenizer, row)
        assert completion_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") == tokenizer.eos_token_id
        assert tokenizer.decode(completion_ids[:-1]) == messages[-1]["content"]
