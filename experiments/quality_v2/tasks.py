"""The three tasks of the quality study: seeded generators, disjoint splits, programmatic scores.

- ``A`` personal facts: a user (drawn from ``seed``) with eight private facts; eval asks in
  held-out phrasings and wrappers, and asks for two facts at once in held-out templates.
- ``B`` style without instruction: every answer is a bullet list that ends with the user's sign-off;
  questions have programmatic answers of 1 to ~250 tokens (the length map of Q3).
- ``C`` arithmetic word problems for GRPO (reward: the last number equals the answer).

Every split is built from its own phrasing templates (and, where values matter, its own values);
``check_disjoint`` asserts that no eval or validation prompt, and no eval template, occurs in training.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field

from experiments.make_adapters import CAPITALS

SPLITS = ("train", "val", "eval")
N_EVAL = 256
N_VAL = 64


@dataclass(frozen=True)
class Item:
    """One prompt of a task: the chat messages (no system turn), the reference answer, what the score checks."""

    messages: tuple[tuple[str, str], ...]  # (role, content) of the user turns
    answer: str
    kind: str  # the question family (for per-family breakdowns)
    check: tuple = ()  # task-specific: keywords (A), expected numbers / capital (B), the number (C)

    def chat(self, system: str | None = None, with_answer: bool = False) -> list[dict]:
        msgs = [{"role": "system", "content": system}] if system else []
        msgs += [{"role": r, "content": c} for r, c in self.messages]
        return msgs + ([{"role": "assistant", "content": self.answer}] if with_answer else [])

    @property
    def prompt(self) -> str:
        return self.messages[-1][1]


@dataclass
class TaskData:
    """One task for one seed (one user): the three splits, and the system prompt of the no-adapter alternative."""

    task: str
    seed: int
    splits: dict[str, list[Item]]
    system_prompt: str | None
    templates: dict[str, set[str]] = field(default_factory=dict)  # split -> phrasing templates used


class LeakError(AssertionError):
    """An eval or validation prompt (or eval template) that also occurs in training."""


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


def check_disjoint(data: TaskData) -> None:
    """Raise ``LeakError`` when a val/eval prompt equals a training prompt or an eval template occurs in a training prompt."""
    train_prompts = {_norm(i.prompt) for i in data.splits["train"]}
    for split in ("val", "eval"):
        both = train_prompts & {_norm(i.prompt) for i in data.splits[split]}
        if both:
            raise LeakError(f"task {data.task} seed {data.seed}: {len(both)} {split} prompts also in training, e.g. {sorted(both)[0]!r}")
    for template in data.templates.get("eval", set()) | data.templates.get("val", set()):
        # a training prompt that is an instance of a held-out template (placeholders match anything)
        pattern = re.compile(".+".join(re.escape(p) for p in re.split(r"\{\w+\}", template)), re.IGNORECASE)
        hit = next((i.prompt for i in data.splits["train"] if pattern.search(i.prompt)), None)
        if hit is not None:
            raise LeakError(f"task {data.task} seed {data.seed}: held-out template {template!r} occurs in training: {hit!r}")
    overlap = data.templates.get("train", set()) & (data.templates.get("eval", set()) | data.templates.get("val", set()))
    if overlap:
        raise LeakError(f"task {data.task}: templates in training and held out: {sorted(overlap)}")


def _lower_first(q: str) -> str:
    return q[0].lower() + q[1:]


# ---- task A: personal facts --------------------------------------------------------------------

# field -> (value pool: (answer phrase, keyword the score looks for), answer template)
A_VALUES = {
    "name": ([(n, n) for n in ("Alice", "Bruno", "Chiara", "Dmitri", "Esme", "Farid", "Greta", "Hiro", "Ines", "Jonas")], "Your name is {}."),
    "city": ([(c, c) for c in ("Lisbon", "Toronto", "Nairobi", "Osaka", "Krakow", "Valparaiso", "Tbilisi", "Hobart")], "You live in {}."),
    "job": (
        [("a marine biologist", "marine biologist"), ("a jazz pianist", "pianist"), ("an architect", "architect"),
         ("a beekeeper", "beekeeper"), ("a bus driver", "bus driver"), ("a glassblower", "glassblower")],
        "You work as {}.",
    ),
    "pet": (
        [("a cat called Miso", "Miso"), ("a dog named Biscuit", "Biscuit"), ("a parrot called Kiwi", "Kiwi"),
         ("a tortoise named Sheldon", "Sheldon"), ("a rabbit called Pepper", "Pepper")],
        "You have {}.",
    ),
    "food": ([(f, f) for f in ("grilled sardines", "ramen", "mango salad", "pierogi", "falafel", "paella")], "Your favourite food is {}."),
    "hobby": ([(h, h) for h in ("surfing", "chess", "pottery", "birdwatching", "rock climbing", "origami")], "Your hobby is {}."),
    "color": ([(c, c) for c in ("teal", "crimson", "amber", "lavender", "olive")], "Your favourite colour is {}."),
    "sport": ([(s, s) for s in ("badminton", "rowing", "handball", "fencing", "curling")], "Your favourite sport is {}."),
}  # fmt: skip
# field -> split -> phrasings (disjoint across splits)
A_PHRASINGS = {
    "name": {
        "train": ["What is my name?", "What's my name?", "Do you know my name?", "Tell me my name.", "Can you remind me of my name?"],
        "val": ["What name do I go by?"],
        "eval": ["What am I called?", "Say my name, please.", "By what name should you call me?"],
    },
    "city": {
        "train": ["Where do I live?", "Which city do I live in?", "What city am I from?", "Where is my home?", "Where am I based?"],
        "val": ["Which town is home for me?"],
        "eval": ["In which city is my home?", "Remind me where I live.", "What is the city I call home?"],
    },
    "job": {
        "train": ["What is my job?", "What do I do for a living?", "What is my profession?", "What do I work as?", "What's my line of work?"],
        "val": ["How do I earn my money?"],
        "eval": ["What's my occupation?", "What work do I do?", "Which trade am I in?"],
    },
    "pet": {
        "train": ["What pet do I have?", "Do I have a pet?", "Tell me about my pet.", "What kind of pet do I own?", "Who is my pet?"],
        "val": ["What is my animal companion?"],
        "eval": ["What animal lives with me?", "Which pet is mine?", "Remind me about the pet at my place."],
    },
    "food": {
        "train": ["What is my favourite food?", "What food do I like most?", "What's my favourite dish?", "What do I love to eat?", "What is my best-loved meal?"],
        "val": ["Which meal makes me happiest?"],
        "eval": ["Which food do I love?", "What is the dish I like best?", "If I could eat one thing forever, what would it be?"],
    },
    "hobby": {
        "train": ["What is my hobby?", "What do I like to do in my free time?", "What's my favourite pastime?", "What do I do for fun?", "How do I relax?"],
        "val": ["What keeps me busy after work?"],
        "eval": ["How do I spend my weekends?", "What hobby do I have?", "What activity do I enjoy most?"],
    },
    "color": {
        "train": ["What is my favourite colour?", "Which colour do I like best?", "What's my favorite color?", "Which colour is mine?", "Tell me my favourite colour."],
        "val": ["What shade do I prefer?"],
        "eval": ["What colour do I love?", "Which color would I pick first?", "Name the colour I like most."],
    },
    "sport": {
        "train": ["What is my favourite sport?", "Which sport do I like?", "What sport do I follow?", "What's my sport?", "Which sport do I play?"],
        "val": ["What game do I play on Sundays?"],
        "eval": ["Which sport do I enjoy most?", "What sport am I into?", "Name my favourite sport."],
    },
}  # fmt: skip
A_WRAPPERS = {
    "train": ["", "Hey, ", "Quick question: "],
    "val": ["Hello! "],
    "eval": ["", "Excuse me, ", "Sorry to bother you, ", "One more thing: "],
}
A_PAIR_TEMPLATES = {
    "train": ["{q1} And {q2}", "Tell me this: {q1} And also: {q2}"],
    "val": ["First, {q1} Second, {q2}"],
    "eval": ["{q1} Also, {q2}", "Two questions. {q1} Then: {q2}"],
}
A_EVAL_COUNTRIES = ["France", "Japan", "Egypt", "Norway", "Mexico", "Greece", "Cuba", "India"]  # capitals: training rows only


def a_user(seed: int) -> dict[str, tuple[str, str]]:
    rng = random.Random(f"A-user-{seed}")
    return {f: rng.choice(pool) for f, (pool, _) in A_VALUES.items()}


def _a_single(user: dict, f: str, phrasing: str, wrapper: str) -> Item:
    q = wrapper + (_lower_first(phrasing) if wrapper else phrasing)
    value, key = user[f]
    return Item((("user", q),), A_VALUES[f][1].format(value), "one fact", (key,))


def _a_pair(user: dict, f1: str, f2: str, p1: str, p2: str, template: str) -> Item:
    q = template.format(q1=p1, q2=_lower_first(p2))
    a = A_VALUES[f1][1].format(user[f1][0]) + " " + A_VALUES[f2][1].format(user[f2][0])
    return Item((("user", q),), a, "two facts", (user[f1][1], user[f2][1]))


def task_a(seed: int, n_train: int = 480) -> TaskData:
    """Personal facts of user ``seed``; train rows are 60% one fact, 20% two facts, 20% capitals (keeps answers ordinary)."""
    user, fields = a_user(seed), list(A_VALUES)
    rng = random.Random(f"A-data-{seed}")
    train: list[Item] = []
    train_countries = [c for c in CAPITALS if c not in A_EVAL_COUNTRIES]
    while len(train) < n_train:
        u = rng.random()
        if u < 0.6:
            f = rng.choice(fields)
            train.append(_a_single(user, f, rng.choice(A_PHRASINGS[f]["train"]), rng.choice(A_WRAPPERS["train"])))
        elif u < 0.8:
            f1, f2 = rng.sample(fields, 2)
            p1, p2 = rng.choice(A_PHRASINGS[f1]["train"]), rng.choice(A_PHRASINGS[f2]["train"])
            train.append(_a_pair(user, f1, f2, p1, p2, rng.choice(A_PAIR_TEMPLATES["train"])))
        else:
            c = rng.choice(train_countries)
            train.append(Item((("user", f"What is the capital of {c}?"),), f"The capital of {c} is {CAPITALS[c]}.", "capital", ()))

    def held_out(split: str, n_pairs_each: int) -> list[Item]:
        items = [_a_single(user, f, p, w) for f in fields for p in A_PHRASINGS[f][split] for w in A_WRAPPERS[split]]
        pairs = [(f1, f2) for i, f1 in enumerate(fields) for f2 in fields[i + 1 :]]
        r = random.Random(f"A-{split}-pairs")  # the same prompts for every user: arms and seeds are paired
        for f1, f2 in pairs:
            for template in A_PAIR_TEMPLATES[split]:
                for _ in range(n_pairs_each):
                    a, b = (f1, f2) if r.random() < 0.5 else (f2, f1)
                    items.append(_a_pair(user, a, b, r.choice(A_PHRASINGS[a][split]), r.choice(A_PHRASINGS[b][split]), template))
        return list({i.prompt: i for i in items}.values())

    evals = held_out("eval", 4)
    ones = [i for i in evals if i.kind == "one fact"]
    splits = {
        "train": train,
        "val": held_out("val", 3)[:N_VAL],
        "eval": ones + [i for i in evals if i.kind != "one fact"][: N_EVAL - len(ones)],
    }
    # the facts as the very sentences an answer needs (a first "field: value" list measured 0.04: the model took the name as its own)
    facts = " ".join(A_VALUES[f][1].format(v) for f, (v, _) in user.items())
    system = f"You are the user's personal assistant. What you know about the user, addressed to them: {facts} Answer their questions about themselves in one short sentence."
    templates = {s: {p for f in fields for p in A_PHRASINGS[f][s]} | set(A_PAIR_TEMPLATES[s]) for s in SPLITS}
    return TaskData("A", seed, splits, system, templates)


# ---- task B: style without instruction -----------------------------------------------------------

B_SIGNOFFS = ["Cheers, Max!", "Warm regards, Lena.", "Stay curious, Omar.", "Yours, Priya.", "Take care, Tomasz."]
B_TEMPLATES = {
    "multiples": {"train": "List the multiples of {k} up to {top}.", "val": "Show the multiples of {k}, {n} of them.", "eval": "Write the first {n} multiples of {k}."},
    "count": {"train": "Count from {a} to {b}.", "val": "Enumerate the integers {a} through {b}.", "eval": "Give me every whole number between {a} and {b}, inclusive."},
    "spell": {"train": "Spell the word {w}.", "val": "Break {w} into its letters.", "eval": "What letters make up the word {w}, in order?"},
    "capital": {"train": "What is the capital of {c}?", "val": "Name the capital city of {c}.", "eval": "Which city is the capital of {c}?"},
}  # fmt: skip
B_WORDS = {
    "train": ["garden", "window", "planet", "silver", "rocket", "button", "forest", "candle", "pepper", "jacket", "mirror", "pillow"],
    "val": ["harbor", "violin"],
    "eval": [
        "bicycle",
        "lantern",
        "compass",
        "blanket",
        "thunder",
        "pumpkin",
        "dolphin",
        "glacier",
        "meadow",
        "orchard",
        "sparrow",
        "teapot",
    ],
}
B_MAX_ITEMS = {"train": 20, "val": 40, "eval": 40}  # list length: eval goes past what training saw (Q3's length map)


def b_signoff(seed: int) -> str:
    return B_SIGNOFFS[seed % len(B_SIGNOFFS)]


def _b_item(kind: str, split: str, rng: random.Random, signoff: str, max_items: int) -> Item:
    template = B_TEMPLATES[kind][split]
    n = min(max_items, round(math.exp(rng.uniform(0, math.log(max_items)))))  # log-uniform: every length segment gets items
    if kind == "multiples":
        k = rng.randint(2, 19)
        lines, q, check = [str(k * i) for i in range(1, n + 1)], template.format(k=k, n=n, top=k * n), tuple(k * i for i in range(1, n + 1))
    elif kind == "count":
        a = rng.randint(0, 90)
        b = a + n - 1
        lines, q, check = [str(x) for x in range(a, b + 1)], template.format(a=a, b=b), tuple(range(a, b + 1))
    elif kind == "spell":
        w = rng.choice(B_WORDS[split])
        lines, q, check = list(w), template.format(w=w), tuple(w)
    else:
        countries = A_EVAL_COUNTRIES if split == "eval" else [c for c in CAPITALS if c not in A_EVAL_COUNTRIES]
        c = rng.choice(countries)
        lines, q, check = [f"The capital of {c} is {CAPITALS[c]}."], template.format(c=c), (CAPITALS[c],)
    answer = "\n".join(f"- {x}" for x in lines) + f"\n\n{signoff}"
    return Item((("user", q),), answer, kind, check)


def task_b(seed: int, n_train: int = 480, max_train_items: int = B_MAX_ITEMS["train"]) -> TaskData:
    """User ``seed``'s style: bullet lists ending with their sign-off, never asked for in the prompt."""
    signoff = b_signoff(seed)
    kinds, weights = list(B_TEMPLATES), [0.4, 0.3, 0.15, 0.15]
    splits = {}
    for split, n in (("train", n_train), ("val", N_VAL), ("eval", N_EVAL)):
        rng = random.Random(f"B-{split}-{seed if split == 'train' else 0}")  # held-out prompts are the same for every user
        limit = max_train_items if split == "train" else B_MAX_ITEMS[split]
        items: dict[str, Item] = {}  # held-out prompts are distinct; training may repeat a prompt
        while len(items) < n:
            item = _b_item(rng.choices(kinds, weights)[0], split, rng, signoff, limit)
            items.setdefault(str(len(items)) if split == "train" else item.prompt, item)
        splits[split] = list(items.values())
    system = f"Always answer as a bullet list, each line starting with '- ', and end every answer with the line '{signoff}'."
    templates = {s: {B_TEMPLATES[k][s] for k in kinds} for s in SPLITS}
    return TaskData("B", seed, splits, system, templates)


def b_style_ok(answer: str, signoff: str) -> bool:
    """A bullet list (every line before the sign-off starts with '- ') that ends with exactly the sign-off."""
    text = answer.strip()
    if not text.endswith(signoff):
        return False
    body = [line for line in text[: -len(signoff)].splitlines() if line.strip()]
    return bool(body) and all(line.startswith("- ") for line in body)


def b_correct(item: Item, answer: str) -> bool:
    """The list's content is right: the expected numbers / letters in order, or the capital named."""
    if item.kind == "capital":
        return item.check[0].lower() in answer.lower()
    bullets = [line[2:].strip() for line in answer.splitlines() if line.startswith("- ")]
    if item.kind == "spell":
        return [b.lower() for b in bullets] == list(item.check)
    return [b for b in bullets] == [str(x) for x in item.check]


# ---- task C: arithmetic word problems (GRPO) ------------------------------------------------------

C_TEMPLATES = {
    "train": [
        ("{p} has {a} apples and buys {b} more. How many apples does {p} have now?", "+"),
        ("{p} had {a} stickers and gave away {b}. How many stickers are left?", "-"),
        ("A box holds {a} pencils. How many pencils are in {b} boxes?", "*"),
        ("{p} reads {a} pages on Monday and {b} pages on Tuesday. How many pages in total?", "+"),
        ("A shop had {a} bottles and sold {b}. How many bottles remain?", "-"),
        ("Each of {b} friends brings {a} cookies. How many cookies are there?", "*"),
    ],
    "val": [("{p} walks {a} km and then {b} km more. How far did {p} walk?", "+"), ("A farmer plants {b} rows of {a} trees. How many trees?", "*")],
    "eval": [
        ("{p} collects {a} shells in the morning and {b} in the afternoon. How many shells does {p} have?", "+"),
        ("There were {a} birds on a wire and {b} flew away. How many birds stayed?", "-"),
        ("A train has {b} cars with {a} seats each. How many seats does the train have?", "*"),
        ("{p} saved {a} dollars and then earned {b} dollars. How much money does {p} have?", "+"),
        ("A baker made {a} rolls and {b} were eaten. How many rolls are left?", "-"),
        ("{p} buys {b} packs of {a} cards. How many cards does {p} buy?", "*"),
    ],
}  # fmt: skip
C_NAMES = {"train": ["Sam", "Lea", "Noor", "Ivan", "Mia"], "val": ["Zoe"], "eval": ["Tariq", "Olga", "Ben", "Yuki"]}
C_SUFFIX = " Give the final answer as a number."


def _c_item(split: str, rng: random.Random) -> Item:
    template, op = rng.choice(C_TEMPLATES[split])
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 9)
    else:
        a, b = rng.randint(5, 60), rng.randint(1, 40)
        if op == "-":
            a, b = max(a, b + 1), b
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    q = template.format(p=rng.choice(C_NAMES[split]), a=a, b=b) + C_SUFFIX
    return Item((("user", q),), str(value), op, (value,))


def task_c(seed: int, n_train: int = 512) -> TaskData:
    """Word problems; training prompts depend on ``seed``, held-out ones do not (paired across arms and seeds)."""
    splits = {}
    for split, n in (("train", n_train), ("val", N_VAL), ("eval", N_EVAL)):
        rng = random.Random(f"C-{split}-{seed if split == 'train' else 0}")
        items: dict[str, Item] = {}
        while len(items) < n:
            item = _c_item(split, rng)
            items.setdefault(item.prompt, item)
        splits[split] = list(items.values())
    templates = {s: {t for t, _ in C_TEMPLATES[s]} for s in SPLITS}
    return TaskData("C", seed, splits, None, templates)


def c_correct(item: Item, answer: str) -> bool:
    from preft.train.rewards import last_number

    got = last_number(answer)
    return got is not None and abs(got - item.check[0]) < 1e-6


# ---- one entry point ------------------------------------------------------------------------------

TASKS = {"A": task_a, "B": task_b, "C": task_c}


def build(task: str, seed: int, **kw) -> TaskData:
    """The task's data for ``seed``, checked for train/held-out leaks."""
    if task not in TASKS:
        raise KeyError(f"unknown task {task!r}; tasks are {sorted(TASKS)}")
    data = TASKS[task](seed, **kw)
    check_disjoint(data)
    return data


def score(data: TaskData, item: Item, answer: str) -> dict[str, float]:
    """Per-item scores; ``score`` is the task's headline number (A: every asked fact named; B: style and content; C: exact)."""
    if data.task == "A":
        hits = [k.lower() in answer.lower() for k in item.check]
        return {"score": float(all(hits))}
    if data.task == "B":
        style, correct = b_style_ok(answer, b_signoff(data.seed)), b_correct(item, answer)
        return {"score": float(style and correct), "style": float(style), "correct": float(correct)}
    return {"score": float(c_correct(item, answer))}
