"""A synthetic instruction corpus, generated from a seed: the data preft's own base model learns from.

Rows are TRL-style chat rows ``{"messages": [...], "skill": name}``. Every skill is a small
function ``skill(rng) -> (system | None, user, assistant)`` with an exactly checkable answer, so
the same generators serve base-model training, adapter training and verifiable rewards (GRPO).

Skills: arithmetic, copying and reversing strings, key-value recall, simple formats (uppercase,
JSON, bullet lists), counting, sorting, and "user profile" questions whose answer is in the
system prompt (or, with no profile, an honest "I don't know"). The last two are what demo
adapters personalise: an adapter internalises a user's profile or preferred format, so the
question alone gets the personal answer.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass

Turn = tuple[str | None, str, str]  # (system prompt or None, user message, assistant answer)

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = (
    "apple river stone cloud green tiger piano orange silver window garden rocket planet candle forest "
    "yellow bridge castle dragon mirror pencil summer winter autumn spring ocean desert island valley "
    "coffee butter cookie melon lemon honey paper music dance light shadow storm sunny quiet happy"
).split()
NAMES = "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Nina Oscar Peggy Rupert Sybil Trent Uma Victor Wendy".split()
CITIES = "Paris Tokyo Lima Oslo Cairo Rome Berlin Madrid Dublin Vienna Prague Seoul Delhi Quito Nairobi Lisbon".split()
PETS = "cat dog parrot rabbit hamster turtle goldfish pony ferret lizard".split()
COLORS = "red blue green purple orange yellow black white pink teal".split()
JOBS = "doctor teacher pilot baker farmer nurse chef painter lawyer writer".split()
FOODS = "pizza sushi pasta tacos curry salad soup ramen bread cheese".split()

# The profile fields a user can have, with the question asked about each and the answer phrasing.
PROFILE_FIELDS = {
    "name": ("What is my name?", "Your name is {}."),
    "city": ("Where do I live?", "You live in {}."),
    "pet": ("What pet do I have?", "You have a {}."),
    "color": ("What is my favorite color?", "Your favorite color is {}."),
    "job": ("What is my job?", "You are a {}."),
    "food": ("What is my favorite food?", "Your favorite food is {}."),
}
PROFILE_UNKNOWN = "I don't know that about you."
PROFILE_CHOICES = {"name": NAMES, "city": CITIES, "pet": PETS, "color": COLORS, "job": JOBS, "food": FOODS}

# Output formats a user can prefer; each is a pure function of the plain answer.
FORMATS: dict[str, tuple[str, Callable[[str], str]]] = {
    "upper": ("Always answer in uppercase.", lambda a: a.upper()),
    "json": ("Always answer in JSON.", lambda a: json.dumps({"answer": a})),
    "bullet": ("Always answer as a bullet point.", lambda a: "- " + a),
    "shout": ("Always end your answer with !!", lambda a: a + " !!"),
}


def _word(rng: random.Random) -> str:
    return rng.choice(WORDS)


def _letters(rng: random.Random, lo: int = 3, hi: int = 10) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _phrase(rng: random.Random, lo: int = 1, hi: int = 4) -> str:
    return " ".join(_word(rng) for _ in range(rng.randint(lo, hi)))


# ---- skills --------------------------------------------------------------------------------


def add(rng: random.Random) -> Turn:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return None, f"What is {a} + {b}?", str(a + b)


def subtract(rng: random.Random) -> Turn:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    a, b = max(a, b), min(a, b)
    return None, f"What is {a} - {b}?", str(a - b)


def copy(rng: random.Random) -> Turn:
    text = _phrase(rng) if rng.random() < 0.5 else _letters(rng)
    return None, f"Repeat: {text}", text


def reverse(rng: random.Random) -> Turn:
    text = _letters(rng, 3, 8)
    return None, f"Reverse: {text}", text[::-1]


def recall(rng: random.Random) -> Turn:
    keys = rng.sample(LETTERS, rng.randint(2, 5))
    values = {k: rng.randint(0, 9) for k in keys}
    facts = ", ".join(f"{k}={v}" for k, v in values.items())
    key = rng.choice(keys)
    return None, f"Facts: {facts}. What is {key}?", str(values[key])


def count(rng: random.Random) -> Turn:
    text = _letters(rng, 1, 9)
    return None, f"How many letters in {text}?", str(len(text))


def sort_digits(rng: random.Random) -> Turn:
    digits = "".join(str(rng.randint(0, 9)) for _ in range(rng.randint(3, 7)))
    return None, f"Sort: {digits}", "".join(sorted(digits))


def uppercase(rng: random.Random) -> Turn:
    text = _phrase(rng)
    return None, f"Uppercase: {text}", text.upper()


def to_json(rng: random.Random) -> Turn:
    keys = rng.sample(["name", "city", "pet", "age", "color"], rng.randint(1, 3))
    pairs = {k: (rng.randint(1, 99) if k == "age" else _word(rng)) for k in keys}
    spec = " ".join(f"{k}={v}" for k, v in pairs.items())
    return None, f"JSON: {spec}", json.dumps(pairs)


def bullets(rng: random.Random) -> Turn:
    items = [_word(rng) for _ in range(rng.randint(2, 4))]
    return None, f"List: {', '.join(items)}", "\n".join(f"- {w}" for w in items)


def random_profile(rng: random.Random, fields: int | None = None) -> dict[str, str]:
    """A random user profile with ``fields`` of the ``PROFILE_FIELDS`` (all when None)."""
    keys = list(PROFILE_FIELDS) if fields is None else rng.sample(list(PROFILE_FIELDS), fields)
    return {k: rng.choice(PROFILE_CHOICES[k]) for k in keys}


def profile_system(profile: dict[str, str]) -> str:
    return "User profile: " + "; ".join(f"{k}={v}" for k, v in profile.items()) + "."


def profile_answer(profile: dict[str, str], field: str) -> str:
    if field not in profile:
        return PROFILE_UNKNOWN
    return PROFILE_FIELDS[field][1].format(profile[field])


def profile_question(rng: random.Random) -> Turn:
    """A personal question answered from the profile in the system prompt (or "I don't know")."""
    field = rng.choice(list(PROFILE_FIELDS))
    if rng.random() < 0.15:
        return None, PROFILE_FIELDS[field][0], PROFILE_UNKNOWN
    profile = random_profile(rng, rng.randint(1, len(PROFILE_FIELDS)))
    if rng.random() < 0.8:
        profile.setdefault(field, rng.choice(PROFILE_CHOICES[field]))
    return profile_system(profile), PROFILE_FIELDS[field][0], profile_answer(profile, field)


# Skills whose plain answer a preferred format can restyle.
FORMATTABLE = ("add", "subtract", "copy", "reverse", "recall", "count", "sort_digits")


def formatted(rng: random.Random) -> Turn:
    """A plain skill answered in the output format the system prompt asks for."""
    name = rng.choice(list(FORMATS))
    _, user, answer = SKILLS[rng.choice(FORMATTABLE)](rng)
    instruction, style = FORMATS[name]
    return instruction, user, style(answer)


SKILLS: dict[str, Callable[[random.Random], Turn]] = {
    "add": add,
    "subtract": subtract,
    "copy": copy,
    "reverse": reverse,
    "recall": recall,
    "count": count,
    "sort_digits": sort_digits,
    "uppercase": uppercase,
    "json": to_json,
    "bullets": bullets,
    "profile": profile_question,
    "formatted": formatted,
}
# Sampling weights: the personalisable skills get more data since adapters build on them.
SKILL_WEIGHTS = {"profile": 3.0, "formatted": 3.0, "add": 1.5, "subtract": 1.0}


def messages(turn: Turn) -> list[dict[str, str]]:
    system, user, assistant = turn
    rows = [{"role": "system", "content": system}] if system else []
    return rows + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def instruction_corpus(n: int, seed: int, skills: list[str] | None = None) -> list[dict]:
    """``n`` chat rows ``{"messages", "skill"}`` drawn from ``skills`` (default: all, weighted)."""
    names = list(skills) if skills is not None else list(SKILLS)
    unknown = [s for s in names if s not in SKILLS]
    if unknown:
        raise ValueError(f"unknown skill(s) {unknown}; choose from {list(SKILLS)}")
    weights = [SKILL_WEIGHTS.get(s, 1.0) for s in names]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        skill = rng.choices(names, weights)[0]
        rows.append({"messages": messages(SKILLS[skill](rng)), "skill": skill})
    return rows


# ---- personalisation tasks (what adapters learn) -------------------------------------------


@dataclass
class User:
    """A user to personalise for: private profile facts and a preferred output format (or None)."""

    name: str
    profile: dict[str, str]
    format: str | None = None


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def profile_rows(user: User, n: int, seed: int) -> list[dict]:
    """Chat rows teaching ``user``'s profile: the question alone (no system prompt), the personal answer."""
    rng = random.Random(seed)
    fields = list(PROFILE_FIELDS)
    return [_chat(PROFILE_FIELDS[f][0], profile_answer(user.profile, f)) for f in (rng.choice(fields) for _ in range(n))]


def format_rows(format_name: str, n: int, seed: int, skills: tuple[str, ...] = FORMATTABLE) -> list[dict]:
    """Chat rows teaching a preferred output format without the system instruction that asks for it."""
    if format_name not in FORMATS:
        raise ValueError(f"unknown format {format_name!r}; choose from {list(FORMATS)}")
    style = FORMATS[format_name][1]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        _, question, answer = SKILLS[rng.choice(skills)](rng)
        rows.append(_chat(question, style(answer)))
    return rows


def user_rows(user: User, n: int, seed: int) -> list[dict]:
    """The personalisation task: ``user``'s profile questions and, if they have one, tasks in their format (half each)."""
    if user.format is None:
        return profile_rows(user, n, seed)
    rows = profile_rows(user, n - n // 2, seed) + format_rows(user.format, n // 2, seed + 1)
    random.Random(seed).shuffle(rows)
    return rows


def long_format_rows(format_name: str, n: int, seed: int, min_words: int, max_words: int) -> list[dict]:
    """``Repeat: <k words>`` answered in a preferred format, ``k`` uniform in ``[min_words, max_words]``.

    The format must hold for the whole answer, so the completion length is the knob for asking
    how long a prefill-only adapter's influence lasts once decode runs as the base model.
    """
    style = FORMATS[format_name][1]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        text = " ".join(_word(rng) for _ in range(rng.randint(min_words, max_words)))
        rows.append(_chat(f"Repeat: {text}", style(text)))
    return rows


DEMO_USERS = {
    "alice": User("alice", {"name": "Alice", "city": "Paris", "pet": "cat", "color": "green", "job": "pilot", "food": "sushi"}),
    "bob": User("bob", {"name": "Bob", "city": "Tokyo", "pet": "turtle", "color": "purple", "job": "chef", "food": "tacos"}),
    "carol": User("carol", {"name": "Carol", "city": "Lima", "pet": "parrot", "color": "teal", "job": "doctor", "food": "ramen"}, "upper"),
}


def profile_summary_rows(user: User, n: int, seed: int, min_facts: int, max_facts: int) -> list[dict]:
    """``Tell me my name, city and pet.`` answered with every asked fact of ``user``'s profile, in order.

    The number of facts is the answer-length knob of the length study: under the prefill policy
    every fact after the first is written by the base model, which only sees the adapted prompt KV.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        fields = rng.sample(list(user.profile), rng.randint(min_facts, min(max_facts, len(user.profile))))
        asked = fields[0] if len(fields) == 1 else ", ".join(fields[:-1]) + " and " + fields[-1]
        rows.append(_chat(f"Tell me my {asked}.", " ".join(profile_answer(user.profile, f) for f in fields)))
    return rows
