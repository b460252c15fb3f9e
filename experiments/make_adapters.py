"""Train the demo adapters shipped with the base model (prefill-only LoRA and DiReFT), with ``preft.train``.

    nice -n 10 python -m experiments.make_adapters

- ``alice`` (LoRA-P): Alice's private profile (name, city, pet, colour, job, food);
- ``bob`` (DiReFT-P): Bob's profile;
- ``carol`` (DiReFT-P): Carol's profile and her preferred format: every answer in uppercase.

No adapter sees a system prompt: the question alone gets the personal answer. The script also
writes ``experiments/results/adapters/demo.{json,md}``: the base model's and each adapter's greedy
answers to the same questions, and each adapter's exact-match accuracy on its own held-out rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from experiments.common import DEFAULT_BASE, RESULTS, greedy_answers, load_base, split_rows, train_adapter
from preft import synthetic
from preft.adapters import load_adapter

# name -> (adapter kind, rank, steps): every demo adapter has the prefill policy. DiReFT-P needs more steps
# than LoRA-P to put the facts into the prompt's KV (150 steps at rank 8: 0.56 vs LoRA-P's 1.00 held-out exact).
DEMO_ADAPTERS = {"alice": ("lora", 8, 150), "bob": ("direft", 16, 400), "carol": ("direft", 16, 400)}
DEMO_QUESTIONS = [
    "What is my name?",
    "Where do I live?",
    "What pet do I have?",
    "What is my favorite food?",
    "What is 12 + 30?",
    "Reverse: pilot",
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=DEFAULT_BASE)
    p.add_argument("--out", type=Path, default=Path("preft/assets/adapters"))
    p.add_argument("--results", type=Path, default=RESULTS / "adapters")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default: per adapter, DEMO_ADAPTERS)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--names", nargs="+", default=list(DEMO_ADAPTERS), choices=list(DEMO_ADAPTERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    model, tokenizer = load_base(args.base)
    report: dict = {"base": args.base, "questions": DEMO_QUESTIONS, "adapters": {}}
    for name in args.names:
        kind, rank, steps = DEMO_ADAPTERS[name]
        user = synthetic.DEMO_USERS[name]
        fields = dict(
            adapter=kind,
            policy="prefill",
            r=rank,
            learning_rate=args.lr,
            max_steps=args.steps or steps,
            per_device_train_batch_size=16,
            seed=args.seed,
        )
        if kind == "lora":
            fields.update(lora_alpha=2.0 * rank, target_modules=["all-linear"])
        work = args.results / "runs" / name
        train_rows = synthetic.user_rows(user, args.rows, seed=args.seed + 1)
        eval_rows = synthetic.user_rows(user, 64, seed=args.seed + 2)
        result = train_adapter(model, tokenizer, args.base, train_rows, eval_rows, work, keep=True, adapter_name=name, **fields)
        target = args.out / name
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(result.adapter_path, target)
        load_adapter(target, model_config=model.config)  # the shipped copy loads and fits the base model
        prompts, answers = split_rows(eval_rows)
        got = greedy_answers(model, tokenizer, prompts, name)
        report["adapters"][name] = {
            "kind": kind,
            "policy": "prefill",
            "rank": rank,
            "profile": user.profile,
            "format": user.format,
            "eval_loss": result.last("eval_loss"),
            "heldout_exact": sum(g == a for g, a in zip(got, answers)) / len(answers),
        }
    questions = [[{"role": "user", "content": q}] for q in DEMO_QUESTIONS]
    report["answers"] = {"base": greedy_answers(model, tokenizer, questions, None)}
    for name in args.names:
        report["answers"][name] = greedy_answers(model, tokenizer, questions, name)
    report["wall_minutes"] = (time.time() - start) / 60
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "demo.json").write_text(json.dumps(report, indent=1))
    table = demo_table(report)
    (args.results / "demo.md").write_text(table + "\n")
    print(table)
    return 0


def demo_table(report: dict) -> str:
    names = list(report["answers"])
    lines = ["| question | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, q in enumerate(report["questions"]):
        lines.append(f"| {q} | " + " | ".join(report["answers"][n][i].replace("\n", " ").replace("|", "\\|") for n in names) + " |")
    lines.append("")
    lines.append("| adapter | kind | rank | held-out exact match | eval loss |")
    lines.append("|---|---|---|---|---|")
    for name, a in report["adapters"].items():
        lines.append(f"| {name} | {a['kind']}-P | {a['rank']} | {a['heldout_exact']:.2f} | {a['eval_loss']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
