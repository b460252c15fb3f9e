"""Reward functions for GRPO, with TRL's signature ``f(prompts=, completions=, **columns) -> list[float]``.

Given on the command line as (several are summed):

- ``exact``: 1.0 when the stripped completion equals the row's ``answer`` column, else 0.0.
- ``math``: 1.0 when the last number in the completion equals the last number in ``answer``.
- ``regex:PATTERN``: 1.0 when ``re.search(PATTERN, completion)`` matches (anchor with ^ and $).
- ``python:module:function`` or TRL's ``package.module.function``: any importable function with TRL's
  keyword signature (the current directory is importable, as in TRL's script).

Every dataset column other than the prompt is passed as a keyword list aligned with ``completions``.
As in TRL, a conversational prompt gets conversational completions (``[{"role": "assistant", "content": ...}]``);
the built-in rewards read either. ``--reward_weights`` weights them (default 1 each); the metrics log
each one unweighted as ``rewards/<name>/mean`` (``reward_names``) and the weighted sum as ``reward``.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Callable

from preft.errors import PreftError

RewardFunc = Callable[..., list[float]]
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def _answers(columns: dict, n: int, reward: str) -> list:
    if "answer" not in columns:
        raise PreftError(
            f"reward {reward!r} compares with the dataset column 'answer', which the prompts file lacks (columns: {sorted(columns)})"
        )
    return columns["answer"]


def completion_text(completion: str | list) -> str:
    """The text of a completion: a string, or the content of a conversational completion's messages."""
    if isinstance(completion, list):
        return "".join(str(m.get("content", "")) for m in completion)
    return str(completion)


def exact_reward(prompts: list, completions: list, **columns) -> list[float]:
    answers = _answers(columns, len(completions), "exact")
    return [float(completion_text(c).strip() == str(a).strip()) for c, a in zip(completions, answers)]


def last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands commas allowed), or None."""
    found = NUMBER.findall(str(text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def math_reward(prompts: list, completions: list, **columns) -> list[float]:
    answers = _answers(columns, len(completions), "math")
    out = []
    for c, a in zip(completions, answers):
        got, want = last_number(completion_text(c)), last_number(a)
        out.append(float(got is not None and want is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))))
    return out


def regex_reward(pattern: str) -> RewardFunc:
    try:
        compiled = re.compile(pattern, re.DOTALL)
    except re.error as e:
        raise PreftError(f"reward 'regex:{pattern}' is not a valid regular expression: {e}") from None

    def reward(prompts: list, completions: list, **columns) -> list[float]:
        return [float(compiled.search(completion_text(c)) is not None) for c in completions]

    reward.__name__ = f"regex:{pattern}"
    return reward


def python_reward(spec: str) -> RewardFunc:
    module_name, _, func_name = spec.rpartition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not func_name:
        raise PreftError(f"reward 'python:{spec}' must look like python:package.module:function")
    if os.getcwd() not in sys.path:  # TRL's script imports reward modules from the current directory
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise PreftError(f"reward 'python:{spec}': cannot import module {module_name!r} ({e})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise PreftError(f"reward 'python:{spec}': module {module_name!r} has no function {func_name!r}")
    return func


def load_reward(spec: str) -> RewardFunc:
    """A reward function from its command-line spec (see module doc)."""
    if spec == "exact":
        return exact_reward
    if spec == "math":
        return math_reward
    if spec.startswith("regex:"):
        return regex_reward(spec[len("regex:") :])
    if spec.startswith("python:"):
        return python_reward(spec[len("python:") :])
    if "." in spec:  # TRL: a dotted import path, package.module.function
        return python_reward(spec)
    raise PreftError(f"unknown reward {spec!r}; use exact, math, regex:PATTERN, python:module:function or package.module.function")


def reward_name(spec: str) -> str:
    """A reward's name in the metrics (``rewards/<name>/mean``): the function's name, as TRL logs it."""
    if spec.startswith("python:") or (":" not in spec and "." in spec):
        return re.split(r"[:.]", spec)[-1]
    return spec.split(":")[0]


def reward_names(specs: list[str]) -> list[str]:
    """``reward_name`` of each spec, numbered from the second on when two share one (``regex``, ``regex_2``)."""
    names: list[str] = []
    for spec in specs:
        name, k = reward_name(spec), 2
        while name in names:
            name, k = f"{reward_name(spec)}_{k}", k + 1
        names.append(name)
    return names
