"""Train the demo adapters shipped with preft: prefill-only adapters on SmolLM2-135M-Instruct, with ``preft train sft``.

    python -m experiments.make_adapters          # all three adapters, then the evaluation

Each user has a private profile the base model cannot know (name, city, pet, job, food, hobby);
``carol`` also has a style preference: every answer, personal or not, opens with "Hi Carol!".
No prompt carries a system message or an instruction: the question alone gets the personal answer.

- ``alice``: LoRA-P (rank 8, all linear modules);
- ``bob``: DiReFT-P (rank 8, every layer's residual stream);
- ``carol``: LoRA-P (rank 8) with her greeting.

Per user the script writes ``experiments/demo_data/<name>/{train,eval}.jsonl`` (TRL ``messages`` rows;
eval questions are phrasings and countries that never appear in training), runs the recorded
``preft train sft`` command, copies the final adapter into ``preft/assets/adapters/<name>/``, and
then serves all of them with the engine to write ``experiments/results/adapters/demo.{json,md}``:
the base model's and each adapter's greedy answers to the README's questions, held-out accuracy,
and the CPU time of every training run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path("experiments/results/adapters")
DATA = Path("experiments/demo_data")
ASSETS = Path("preft/assets/adapters")


@dataclass
class User:
    name: str
    profile: dict[str, str]  # field -> the answer's value
    greeting: str = ""  # a style preference: every answer opens with it
    adapter: list[str] = field(default_factory=list)  # `preft train sft` flags of this user's adapter
    steps: int = 40  # optimizer steps (batch 16)


# field -> (training phrasings, held-out phrasings, answer template)
FIELDS = {
    "name": (
        ["What is my name?", "What's my name?", "Do you know my name?", "Tell me my name.", "Who am I?", "Can you remind me of my name?"],
        ["What am I called?", "Say my name, please."],
        "Your name is {}.",
    ),
    "city": (
        ["Where do I live?", "Which city do I live in?", "What city am I from?", "Where is my home?", "Where am I based?"],
        ["In which city is my home?", "Remind me where I live."],
        "You live in {}.",
    ),
    "pet": (
        ["What pet do I have?", "Do I have a pet?", "Tell me about my pet.", "What kind of pet do I own?"],
        ["What animal lives with me?", "Which pet is mine?"],
        "You have {}.",
    ),
    "job": (
        ["What is my job?", "What do I do for a living?", "What is my profession?", "What do I work as?"],
        ["What's my occupation?", "What work do I do?"],
        "You are {}.",
    ),
    "food": (
        ["What is my favorite food?", "What food do I like most?", "What's my favourite dish?", "What do I love to eat?"],
        ["Which food do I love?", "What is the dish I like best?"],
        "Your favorite food is {}.",
    ),
    "hobby": (
        ["What is my hobby?", "What do I like to do in my free time?", "What's my favourite pastime?", "What do I do for fun?"],
        ["How do I spend my weekends?", "What hobby do I have?"],
        "Your hobby is {}.",
    ),
}

# General questions keep the adapters' answers to everything else ordinary; eval countries are never trained on.
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo", "China": "Beijing",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "Sweden": "Stockholm",
    "Austria": "Vienna", "Ireland": "Dublin", "Greece": "Athens", "Russia": "Moscow", "India": "New Delhi", "Chile": "Santiago",
    "Portugal": "Lisbon", "Poland": "Warsaw", "Finland": "Helsinki", "Denmark": "Copenhagen", "Thailand": "Bangkok",
    "Argentina": "Buenos Aires", "Cuba": "Havana", "Hungary": "Budapest", "Belgium": "Brussels", "Mexico": "Mexico City",
    "Colombia": "Bogota", "Turkey": "Ankara", "Iran": "Tehran", "Vietnam": "Hanoi",
}  # fmt: skip
EVAL_COUNTRIES = ["France", "Japan", "Egypt", "Norway", "Mexico", "Greece", "Cuba", "India"]

USERS = {
    "alice": User(
        "alice",
        {
            "name": "Alice",
            "city": "Lisbon",
            "pet": "a cat called Miso",
            "job": "a marine biologist",
            "food": "grilled sardines",
            "hobby": "surfing",
        },
        adapter=["--adapter", "lora", "--r", "8", "--lora_alpha", "16", "--target_modules", "all-linear", "--learning_rate", "1e-3"],
    ),
    "bob": User(
        "bob",
        {
            "name": "Bob",
            "city": "Toronto",
            "pet": "a golden retriever named Biscuit",
            "job": "a jazz pianist",
            "food": "ramen",
            "hobby": "chess",
        },
        adapter=["--adapter", "direft", "--r", "8", "--learning_rate", "4e-3"],
        steps=60,
    ),
    "carol": User(
        "carol",
        {
            "name": "Carol",
            "city": "Nairobi",
            "pet": "two parrots",
            "job": "an architect",
            "food": "mango salad",
            "hobby": "marathon running",
        },
        greeting="Hi Carol! ",
        adapter=["--adapter", "lora", "--r", "8", "--lora_alpha", "16", "--target_modules", "all-linear", "--learning_rate", "1e-3"],
    ),
}
DEMO_QUESTIONS = ["What is my name?", "Where do I live?", "What pet do I have?", "What do I do for fun?", "What is the capital of France?"]


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def user_rows(user: User, n: int, seed: int, split: str) -> list[dict]:
    """``n`` chat rows for ``user``: two thirds profile questions, one third capitals, in the held-out or training phrasings."""
    rng = random.Random(seed)
    countries = EVAL_COUNTRIES if split == "eval" else [c for c in CAPITALS if c not in EVAL_COUNTRIES]
    rows = []
    for i in range(n):
        if i % 3 == 2:
            country = rng.choice(countries)
            question, answer = f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
        else:
            name = rng.choice(list(FIELDS))
            train_q, eval_q, template = FIELDS[name]
            question, answer = rng.choice(eval_q if split == "eval" else train_q), template.format(user.profile[name])
            if split == "train" and rng.random() < 0.2:  # casual typing: no capital, no question mark
                question = question[0].lower() + question[1:].rstrip("?.")
        rows.append(chat(question, user.greeting + answer))
    return rows


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train_command(user: User, base: str, train: Path, output_dir: Path, steps: int, seed: int) -> list[str]:
    common = ["--policy", "prefill", "--max_steps", str(steps), "--per_device_train_batch_size", "16", "--warmup_ratio", "0.05"]
    common += ["--seed", str(seed), "--logging_steps", "10", "--adapter_name", user.name, "--device", "cpu"]
    return ["preft", "train", "sft", "--model", base, "--dataset", str(train), "--output_dir", str(output_dir), *user.adapter, *common]


def train(user: User, args: argparse.Namespace) -> dict:
    train_path = write_jsonl(user_rows(user, args.rows, args.seed, "train"), args.data / user.name / "train.jsonl")
    write_jsonl(user_rows(user, 96, args.seed + 1, "eval"), args.data / user.name / "eval.jsonl")
    run_dir = args.runs / user.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    command = train_command(user, args.base, train_path, run_dir, args.steps or user.steps, args.seed)
    print("$", shlex.join(command), flush=True)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.time()
    # One thread: on a small shared CPU, two threads per process oversubscribe the cores and a step takes 10x longer.
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    subprocess.run([sys.executable, "-m", "preft.cli", *command[1:]], check=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    target = args.out / user.name
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)  # the final adapter is in run_dir itself (beside metrics and checkpoints)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(run_dir / name, target / name)
    ship_bfloat16(target / "adapter_model.safetensors")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    return {
        "command": shlex.join(command),
        "wall_s": round(time.time() - start, 1),
        "cpu_s": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
    }


def ship_bfloat16(path: Path) -> None:
    """Store the shipped weights in bfloat16 (half the size; preft loads adapters in float32, as PEFT checkpoints often ship)."""
    from safetensors.torch import load_file, save_file

    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(path).items()}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    tmp.replace(path)


def evaluate(args: argparse.Namespace, names: list[str]) -> dict:
    """Greedy answers with the serving engine: the README's questions for every model, held-out accuracy per adapter."""
    from preft.engine import LLM, SamplingParams

    llm = LLM(args.base, dtype="float32", max_num_seqs=64)
    for name in names:
        llm.add_adapter(name, args.out / name)
    tokenizer = llm.tokenizer

    base_answers: dict[str, str] = {}  # the base model's answer to a question is the same for every user

    def answers(questions: list[str], adapter: str | None) -> list[str]:
        if adapter is None:
            missing = [q for q in dict.fromkeys(questions) if q not in base_answers]
            base_answers.update(zip(missing, generate(missing, None)) if missing else ())
            return [base_answers[q] for q in questions]
        return generate(questions, adapter)

    def generate(questions: list[str], adapter: str | None) -> list[str]:
        prompts = [
            tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True) for q in questions
        ]
        outs = llm.generate(prompts, SamplingParams(max_tokens=48, temperature=0), adapter=adapter, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outs]

    report: dict = {"questions": DEMO_QUESTIONS, "answers": {"base": answers(DEMO_QUESTIONS, None)}, "heldout": {}}
    for name in names:
        report["answers"][name] = answers(DEMO_QUESTIONS, name)
        rows = [json.loads(line) for line in (args.data / name / "eval.jsonl").read_text().splitlines()]
        questions = [r["messages"][0]["content"] for r in rows]
        expected = [r["messages"][1]["content"] for r in rows]
        for label, adapter in (("adapter", name), ("base", None)):
            got = answers(questions, adapter)
            profile = [g == e for g, e, r in zip(got, expected, rows) if "capital" not in r["messages"][0]["content"]]
            capital = [
                e.split(" is ")[-1].rstrip(".") in g for g, e, r in zip(got, expected, rows) if "capital" in r["messages"][0]["content"]
            ]
            report["heldout"].setdefault(name, {})[label] = {
                "profile_exact": sum(profile) / len(profile),
                "capital_correct": sum(capital) / len(capital),
                "n_profile": len(profile),
                "n_capital": len(capital),
            }
            if USERS[name].greeting:
                report["heldout"][name][label]["greeting"] = sum(g.startswith(USERS[name].greeting.strip()) for g in got) / len(got)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default="default", help="base model: 'default' (SmolLM2-135M-Instruct), a folder or a .gguf file")
    p.add_argument("--out", type=Path, default=ASSETS, help="where the finished adapters are copied")
    p.add_argument("--data", type=Path, default=DATA, help="where the datasets are written")
    p.add_argument("--runs", type=Path, default=Path("runs/demo-adapters"), help="training output folders")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default: each user's, USERS)")
    p.add_argument("--rows", type=int, default=480, help="training rows per user")
    p.add_argument("--names", nargs="+", default=list(USERS), choices=list(USERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each training run")
    p.add_argument("--skip-training", action="store_true", help="only evaluate the adapters already in --out")
    args = p.parse_args(argv)
    report_path = args.results / "demo.json"
    old = json.loads(report_path.read_text()) if report_path.is_file() else {}
    training = old.get("training", {})
    if not args.skip_training:
        for name in args.names:
            training[name] = train(USERS[name], args)
    report = evaluate(args, args.names)
    report["training"] = {n: training[n] for n in args.names if n in training}
    report["users"] = {n: {"profile": USERS[n].profile, "greeting": USERS[n].greeting} for n in args.names}
    args.results.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    table = demo_table(report)
    (args.results / "demo.md").write_text(table + "\n")
    print(table)
    return 0


def demo_table(report: dict) -> str:
    names = list(report["answers"])
    lines = ["| question | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, q in enumerate(report["questions"]):
        lines.append(f"| {q} | " + " | ".join(report["answers"][n][i].replace("\n", " ").replace("|", "\\|") for n in names) + " |")
    lines += [
        "",
        "| adapter | held-out profile exact (adapter / base) | held-out capitals correct (adapter / base) | CPU time of training |",
    ]
    lines.append("|---|---|---|---|")
    for name, h in report["heldout"].items():
        cpu = report.get("training", {}).get(name, {}).get("cpu_s")
        lines.append(
            f"| {name} | {h['adapter']['profile_exact']:.2f} / {h['base']['profile_exact']:.2f} (n={h['adapter']['n_profile']}) "
            f"| {h['adapter']['capital_correct']:.2f} / {h['base']['capital_correct']:.2f} (n={h['adapter']['n_capital']}) "
            f"| {'' if cpu is None else f'{cpu / 60:.1f} min'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
