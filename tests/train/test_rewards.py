import pytest

from preft.errors import PreftError
from preft.train.rewards import last_number, load_reward, reward_name


def test_exact_compares_the_stripped_completion_with_the_answer_column():
    exact = load_reward("exact")
    assert exact(prompts=["p", "p"], completions=[" yes\n", "no"], answer=["yes", "yes"]) == [1.0, 0.0]


def test_math_compares_the_final_numbers():
    math = load_reward("math")
    completions = ["so 2 + 2 = 4, total 1,234", "answer: 12.50", "no number", "-3"]
    answers = ["#### 1234", "12.5", "7", "3"]
    assert math(prompts=[""] * 4, completions=completions, answer=answers) == [1.0, 1.0, 0.0, 0.0]
    assert last_number("x -0.5 and .25") == 0.25


def test_regex_searches_the_completion():
    reward = load_reward(r"regex:^\d+$")
    assert reward(prompts=["", ""], completions=["123", "12a"]) == [1.0, 0.0]


def test_python_reward_is_loaded_with_trl_signature(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def length_match(prompts, completions, target_len, **kw):\n    return [float(len(c) == t) for c, t in zip(completions, target_len)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward("python:my_rewards:length_match")
    assert reward(prompts=["a", "b"], completions=["xy", "xyz"], target_len=[2, 2]) == [1.0, 0.0]
    assert reward_name("python:my_rewards:length_match") == "length_match"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("bleu", "unknown reward 'bleu'"),
        ("regex:(", "not a valid regular expression"),
        ("python:no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("python:os:no_such_function", "has no function 'no_such_function'"),
    ],
)
def test_bad_reward_specs_are_clear_errors(spec, message):
    with pytest.raises(PreftError, match=message):
        load_reward(spec)


def test_exact_without_answer_column_names_the_column():
    with pytest.raises(PreftError, match="column 'answer'"):
        load_reward("exact")(prompts=["p"], completions=["c"], solution=["c"])
