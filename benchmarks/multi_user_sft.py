"""Many users' adapters: one joint ``preft train sft`` job vs one ``preft train sft`` run per user, side by side.

    python benchmarks/multi_user_sft.py --users 16 --examples 32            # CPU, SmolLM2-135M-Instruct
    python benchmarks/multi_user_sft.py --model qwen2.5-0.5b --device cuda  # GPU (benchmarks/gpu/run.sh)

Every user has a private profile (name, city, pet, job, food, colour). Its training rows ask about
it in some phrasings; its held-out rows ask in phrasings that never appear in training. Both modes
get the same rows and the same hyperparameters:

- ``joint``: one process, ``preft train sft --dataset users.jsonl`` (a ``user`` column), ``--users_per_step K``;
- ``joint-1``: the same job with one user per step (users one after another in one process: separates
  what sharing the loaded base saves from what batching users together saves);
- ``separate``: one ``preft train sft --dataset <user>.jsonl`` process per user, one after another
  (what training per-user adapters cost before multi-user jobs).

Measured per mode: wall time, CPU time and peak RSS of the training processes (``os.wait4``),
training tokens/s (prompt + completion tokens of the rows trained on), and, afterwards in one
process with one loaded base model, every user's held-out loss under its joint adapter, its
separate adapter and the base model (paired differences with 95% t intervals), and the largest
weight difference between a user's two adapters. Results are written as they come to
``<out>/result.json`` (``"complete": false`` until the end), then ``result.md`` and ``result.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

FIELDS = {  # field -> (training phrasings, held-out phrasings, answer template, values)
    "name": (
        ["What is my name?", "What's my name?", "Do you know my name?", "Tell me my name.", "Can you remind me of my name?"],
        ["What am I called?", "Say my name, please."],
        "Your name is {}.",
        "Alice Bob Carol Dave Erin Frank Grace Heidi Ivan Judy Mallory Nina Oscar Peggy Rupert Sybil Trent Uma Victor Wendy".split(),
    ),
    "city": (
        ["Where do I live?", "Which city do I live in?", "What city am I from?", "Where is my home?", "Where am I based?"],
        ["In which city is my home?", "Remind me where I live."],
        "You live in {}.",
        "Paris Tokyo Lima Oslo Cairo Rome Berlin Madrid Dublin Vienna Prague Seoul Delhi Quito Nairobi Lisbon".split(),
    ),
    "pet": (
        ["What pet do I have?", "What is my pet?", "Which animal do I own?", "Do I have a pet?", "What kind of pet is mine?"],
        ["What animal lives with me?", "Tell me about my pet."],
        "You have a {}.",
        "cat dog parrot rabbit hamster turtle goldfish pony ferret lizard".split(),
    ),
    "job": (
        ["What is my job?", "What do I do for a living?", "What is my profession?", "What work do I do?", "Where do I work?"],
        ["What do I work as?", "What is my occupation?"],
        "You are a {}.",
        "doctor teacher pilot baker farmer nurse chef painter lawyer writer".split(),
    ),
    "food": (
        ["What is my favorite food?", "What food do I like most?", "What do I love to eat?", "Which dish is my favorite?"],
        ["What should you cook for me?", "What is the food I like best?"],
        "Your favorite food is {}.",
        "pizza sushi pasta tacos curry salad soup ramen bread cheese".split(),
    ),
    "color": (
        ["What is my favorite color?", "Which color do I like most?", "What colour do I love?", "What is my favourite colour?"],
        ["Which colour is my favorite?", "Name the color I like best."],
        "Your favorite color is {}.",
        "red blue green purple orange yellow black white pink teal".split(),
    ),
}


def chat(question: str, answer: str, user: str | None = None) -> dict:
    row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
    return {"user": user, **row} if user else row


def make_users(n_users: int, n_train: int, n_eval: int, seed: int) -> dict[str, tuple[list[dict], list[dict]]]:
    """``{user: (train rows, held-out rows)}``: profile questions, held-out rows in unseen phrasings."""
    rng = random.Random(seed)
    users = {}
    for u in range(n_users):
        profile = {f: rng.choice(values) for f, (_, _, _, values) in FIELDS.items()}
        train, held = [], []
        for _ in range(n_train):
            f = rng.choice(list(FIELDS))
            train.append((rng.choice(FIELDS[f][0]), FIELDS[f][2].format(profile[f])))
        for _ in range(n_eval):
            f = rng.choice(list(FIELDS))
            held.append((rng.choice(FIELDS[f][1]), FIELDS[f][2].format(profile[f])))
        users[f"user{u:03d}"] = (train, held)
    return users


def write_data(users: dict, folder: Path) -> dict[str, Path]:
    (folder / "train").mkdir(parents=True, exist_ok=True)
    paths = {"joint": folder / "users.jsonl", "eval": folder / "eval.jsonl"}
    with paths["joint"].open("w") as joint, paths["eval"].open("w") as held:
        for user, (train, evals) in users.items():
            with (folder / "train" / f"{user}.jsonl").open("w") as own:
                for q, a in train:
                    joint.write(json.dumps(chat(q, a, user)) + "\n")
                    own.write(json.dumps(chat(q, a)) + "\n")
            for q, a in evals:
                held.write(json.dumps(chat(q, a, user)) + "\n")
    return paths


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_process(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` to completion; its wall time, CPU time (user + sys) and peak RSS (from ``os.wait4``)."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_mib": usage.ru_maxrss / 1024}


def t_interval(values: list[float]) -> dict:
    """Mean and 95% t interval of ``values``."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    try:
        from scipy.stats import t

        q = float(t.ppf(0.975, n - 1)) if n > 1 else float("nan")
    except ImportError:
        q = 1.96
    half = q * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


@torch.no_grad()
def held_out_losses(model_dir: str, eval_path: Path, joint_dir: Path, separate_dir: Path, users: list[str], device: str) -> dict:
    """Per user: mean completion-token loss on its held-out rows under base / joint / separate, in one mixed batch."""
    from preft.adapters import load_adapter
    from preft.train import SFTConfig
    from preft.train.data import collate, load_user_examples
    from preft.train.trainer import load_model, token_logprobs

    model, tok = load_model(model_dir, SFTConfig(device=device), torch.device(device))
    evals, _ = load_user_examples(eval_path, tok, 1024)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out = {}
    for user in users:
        joint, separate = load_adapter(joint_dir / user), load_adapter(separate_dir / user)
        model.add_adapter("joint", joint)
        model.add_adapter("separate", separate)
        rows = evals[user]
        names = [None] * len(rows) + ["joint"] * len(rows) + ["separate"] * len(rows)
        batch = collate([(e.prompt_ids, e.completion_ids) for e in rows] * 3, joint.policy, pad).to(device)
        nll = -(token_logprobs(model, batch, names) * batch.completion_mask).sum(-1).view(3, len(rows)).sum(-1)
        count = float(batch.completion_mask[: len(rows)].sum())
        base_loss, joint_loss, separate_loss = (nll / count).tolist()
        weight_diff = max(float((joint.tensors[k] - separate.tensors[k]).abs().max()) for k in joint.tensors)
        out[user] = {"base": base_loss, "joint": joint_loss, "separate": separate_loss, "max_abs_weight_diff": weight_diff}
        model.remove_adapter("joint")
        model.remove_adapter("separate")
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in ("joint", "joint-1", "separate") if m in result["modes"]]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    ax = axes[0]
    labels = [m if m == "separate" else f"{m}\n({result['modes'][m].get('users_per_step', '?')} users/step)" for m in modes]
    for i, key in enumerate(("wall_s", "cpu_s")):
        values = [result["modes"][m][key] for m in modes]
        bars = ax.bar([x + 0.4 * i for x in range(len(modes))], values, width=0.4, label=key.replace("_s", " s"))
        ax.bar_label(bars, fmt="%.0f")
    ax.set_xticks([x + 0.2 for x in range(len(modes))], labels)
    ax.set_ylabel("seconds (all users)")
    ax.legend()
    ax.set_title("time to train every user")
    ax = axes[1]
    bars = ax.bar(labels, [result["modes"][m]["train_tokens_per_s"] for m in modes], color="tab:green")
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("training tokens / s")
    ax.set_title("throughput")
    ax = axes[2]
    losses = result.get("held_out", {}).get("per_user", {})
    if losses:
        users = sorted(losses, key=lambda u: losses[u]["base"])
        ax.plot(range(len(users)), [losses[u]["base"] for u in users], "o", color="grey", label="base model")
        ax.plot(range(len(users)), [losses[u]["separate"] for u in users], "s", mfc="none", label="separate runs")
        ax.plot(range(len(users)), [losses[u]["joint"] for u in users], "x", label="joint job")
        ax.set_xlabel("user (sorted by base loss)")
        ax.set_ylabel("held-out loss")
        ax.legend()
        ax.set_title("per-user held-out loss")
    fig.suptitle(result["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(result: dict) -> str:
    lines = [f"# {result['title']}", "", f"`{result['command']}`", ""]
    lines += [f"Machine: {result['machine']}; load average before/after each mode: {json.dumps(result['load_average'])}", ""]
    lines += [
        "| mode | processes | users per step | wall s | CPU s | peak RSS MiB (largest process) | training tokens/s (wall) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, r in result["modes"].items():
        procs, slots = (r["runs"], 1) if m == "separate" else (1, r.get("users_per_step", "?"))
        lines.append(
            f"| {m} | {procs} | {slots} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['train_tokens_per_s']:.0f} |"
        )
    separate = result["modes"].get("separate")
    for m in ("joint", "joint-1"):
        if separate and m in result["modes"]:
            r = result["modes"][m]
            ratios = {
                "wall": separate["wall_s"] / r["wall_s"],
                "CPU": separate["cpu_s"] / r["cpu_s"],
                "peak RSS": separate["peak_rss_mib"] / r["peak_rss_mib"],
            }
            lines += ["", f"separate / {m}: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())]
    held = result.get("held_out")
    if held:
        d, b = held["joint_minus_separate"], held["joint_minus_base"]
        lines += [
            "",
            f"Held-out loss over {d['n']} users: joint {held['mean']['joint']:.4f}, separate {held['mean']['separate']:.4f}, "
            f"base {held['mean']['base']:.4f}.",
            f"Paired joint - separate: mean {d['mean']:.2e}, 95% CI [{d['ci95'][0]:.2e}, {d['ci95'][1]:.2e}]; "
            f"joint - base: mean {b['mean']:.3f}, 95% CI [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}].",
            f"Largest |joint - separate| adapter weight over all users: {held['max_abs_weight_diff']:.2e}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model", default="default", help="'default' (SmolLM2-135M-Instruct), a model folder, or a named shape (random weights)"
    )
    p.add_argument("--users", type=int, default=16)
    p.add_argument("--examples", type=int, default=32, help="training rows per user")
    p.add_argument("--eval-examples", type=int, default=8, help="held-out rows per user")
    p.add_argument("--users-per-step", type=int, default=4, help="joint job: users per batch")
    p.add_argument("--modes", default="joint,joint-1,separate")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/multi-user-sft-<device>-<date>)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/preft-multi-user-bench"), help="data and adapters (not results)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replot", type=Path, default=None, help="only rewrite result.md and result.png from this result.json")
    p.add_argument(
        "--train-args",
        default="--adapter lora --policy prefill --r 8 --lora_alpha 16 --target_modules all-linear --learning_rate 2e-3 "
        "--lr_scheduler_type linear --num_train_epochs 1 --per_device_train_batch_size 8",
        help="preft train sft flags shared by both modes",
    )
    args = p.parse_args(argv)
    if args.replot:
        result = json.loads(args.replot.read_text())
        (args.replot.parent / "result.md").write_text(markdown(result))
        plot(result, args.replot.parent / "result.png")
        return 0
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from preft.bench.shapes import resolve_model

    model_dir = str(resolve_model(args.model))
    model_name = "SmolLM2-135M-Instruct" if args.model == "default" else Path(args.model).name
    date = time.strftime("%Y-%m-%d")
    out = args.out or Path("benchmarks/results") / f"multi-user-sft-{args.device}-{date}"
    out.mkdir(parents=True, exist_ok=True)
    work = args.work_dir
    shutil.rmtree(work, ignore_errors=True)
    users = make_users(args.users, args.examples, args.eval_examples, args.seed)
    paths = write_data(users, work / "data")
    shared = args.train_args.split() + ["--model", model_dir, "--device", args.device, "--disable_tqdm", "--seed", str(args.seed)]
    cli = [sys.executable, "-m", "preft.cli", "train", "sft"]
    result: dict = {
        "title": f"{args.users} users x {args.examples} examples, {model_name}, {args.device}: joint job vs separate runs",
        "command": " ".join(["python", *sys.argv]),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}"
        + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
        "model_dir": model_dir,
        "train_args": args.train_args,
        "users_per_step": args.users_per_step,
        "load_average": {"start": load_average()},
        "modes": {},
        "complete": False,
    }

    def save() -> None:
        (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")

    save()
    modes = args.modes.split(",")
    for mode, slots in (("joint", args.users_per_step), ("joint-1", 1)):
        if mode not in modes:
            continue
        print(f"{mode}: {args.users} users in one job, {slots} per step", flush=True)
        cmd = [*cli, "--dataset", str(paths["joint"]), "--output_dir", str(work / mode), "--users_per_step", str(slots), *shared]
        stats = run_process(cmd, work / f"{mode}.log")
        summaries = json.loads((work / mode / "users.json").read_text())
        stats["users_per_step"] = slots
        stats["train_tokens"] = sum(s["train_tokens"] for s in summaries.values())
        stats["train_tokens_per_s"] = stats["train_tokens"] / stats["wall_s"]
        result["modes"][mode] = stats
        result["load_average"][f"after_{mode}"] = load_average()
        save()
        print(f"  {stats}", flush=True)
    if "separate" in modes:
        runs = []
        for i, user in enumerate(users):
            cmd = [
                *cli,
                "--dataset",
                str(work / "data" / "train" / f"{user}.jsonl"),
                "--output_dir",
                str(work / "separate" / user),
                *shared,
            ]
            runs.append(run_process(cmd, work / f"separate-{user}.log"))
            print(f"separate {i + 1}/{len(users)}: {runs[-1]}", flush=True)
            result["modes"]["separate"] = {
                "runs": len(runs),
                "wall_s": sum(r["wall_s"] for r in runs),
                "cpu_s": sum(r["cpu_s"] for r in runs),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
                "median_run_wall_s": sorted(r["wall_s"] for r in runs)[len(runs) // 2],
            }
            save()
        stats = result["modes"]["separate"]
        # The same rows as the joint job (each user's batches are a function of its rows and the seed).
        tokens = result["modes"].get("joint", {}).get("train_tokens")
        stats["train_tokens"] = tokens
        stats["train_tokens_per_s"] = tokens / stats["wall_s"] if tokens else float("nan")
        result["load_average"]["after_separate"] = load_average()
        save()
    if {"joint", "separate"} <= set(result["modes"]):
        print("held-out losses ...", flush=True)
        per_user = held_out_losses(model_dir, paths["eval"], work / "joint", work / "separate", list(users), args.device)
        result["held_out"] = {
            "per_user": per_user,
            "mean": {k: sum(v[k] for v in per_user.values()) / len(per_user) for k in ("base", "joint", "separate")},
            "joint_minus_separate": t_interval([v["joint"] - v["separate"] for v in per_user.values()]),
            "joint_minus_base": t_interval([v["joint"] - v["base"] for v in per_user.values()]),
            "max_abs_weight_diff": max(v["max_abs_weight_diff"] for v in per_user.values()),
        }
    result["load_average"]["end"] = load_average()
    result["complete"] = True
    save()
    (out / "result.md").write_text(markdown(result))
    plot(result, out / "result.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
