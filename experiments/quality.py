"""The PreFT quality study at small scale, on preft's own base model.

    nice -n 10 python -m experiments.quality sft      # (1) eval loss vs rank: LoRA, LoRA-P, DiReFT, DiReFT-P, LoReFT-P
    nice -n 10 python -m experiments.quality length   # (3) quality vs output length: where the dropped decode adapter hurts
    nice -n 10 python -m experiments.quality grpo     # (2) GRPO all vs prefill reward curves (needs preft.train's GRPO)

Each writes ``experiments/results/<study>.json`` (every run, every seed), ``<study>.png`` and
``<study>.md`` (the table). ``--smoke`` runs the same code on a tiny random model in seconds
(what tests/experiments runs). Adapters are trained with ``preft.train``'s SFT trainer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from experiments.common import DEFAULT_BASE, RESULTS, completion_position_nll, greedy_answers, load_base, split_rows, train_adapter
from preft import synthetic

# method -> (adapter kind, policy): the paper's five arms.
METHODS = {
    "LoRA": ("lora", "all"),
    "LoRA-P": ("lora", "prefill"),
    "DiReFT": ("direft", "all"),
    "DiReFT-P": ("direft", "prefill"),
    "LoReFT-P": ("loreft", "prefill"),
}
# A personalisation user for the studies (not one of the shipped demo users).
STUDY_USER = synthetic.User(
    "dana", {"name": "Dana", "city": "Oslo", "pet": "ferret", "color": "pink", "job": "baker", "food": "curry"}, "json"
)


def adapter_fields(kind: str, policy: str, r: int, lr: float, steps: int, batch: int, seed: int) -> dict[str, Any]:
    """SFTConfig fields for one arm: LoRA on every linear module (scaling alpha/r = 2), ReFT on every layer."""
    fields = dict(adapter=kind, policy=policy, r=r, learning_rate=lr, max_steps=steps, per_device_train_batch_size=batch, seed=seed)
    if kind == "lora":
        fields.update(lora_alpha=2.0 * r, target_modules=["all-linear"])
    return fields


def mean_and_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


# ---- (1) SFT: eval loss vs rank -------------------------------------------------------------


def run_sft(args: argparse.Namespace) -> dict:
    model, tokenizer = load_base(args.base)
    train_rows = synthetic.user_rows(STUDY_USER, args.train_rows, seed=1)
    eval_rows = synthetic.user_rows(STUDY_USER, args.eval_rows, seed=2)
    runs = []
    grid = [(m, r, s) for m in args.methods for r in args.ranks for s in args.seeds]
    for method, rank, seed in tqdm(grid, desc="sft study"):
        kind, policy = METHODS[method]
        start = time.time()
        fields = adapter_fields(kind, policy, rank, args.lr, args.steps, args.batch_size, seed)
        result = train_adapter(model, tokenizer, args.base, train_rows, eval_rows, args.work / f"sft/{method}-r{rank}-s{seed}", **fields)
        runs.append(
            dict(
                method=method,
                rank=rank,
                seed=seed,
                eval_loss=result.last("eval_loss"),
                train_loss=result.last("loss"),
                seconds=time.time() - start,
            )
        )
        tqdm.write(f"{method:9s} r={rank:<3d} seed={seed}: eval loss {runs[-1]['eval_loss']:.4f}")
    base_loss = base_eval_loss(model, tokenizer, eval_rows)
    return {
        "study": "sft",
        "task": "personalisation (profile facts + JSON answers, no system prompt)",
        "base_eval_loss": base_loss,
        "runs": runs,
    }


def base_eval_loss(model: Any, tokenizer: Any, rows: list[dict]) -> float:
    nll, count = completion_position_nll(model, tokenizer, rows, None, "prefill", max_positions=10_000)
    return sum(nll) / sum(count)


def sft_table(result: dict) -> str:
    methods = list(dict.fromkeys(r["method"] for r in result["runs"]))
    ranks = sorted({r["rank"] for r in result["runs"]})
    lines = ["| method | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---" * (len(ranks) + 1) + "|"]
    for m in methods:
        cells = []
        for rank in ranks:
            losses = [x["eval_loss"] for x in result["runs"] if x["method"] == m and x["rank"] == rank]
            mean, sd = mean_and_spread(losses)
            cells.append(f"{mean:.4f} ± {sd:.4f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines.append(
        f"\nBase model without adapter: eval loss {result['base_eval_loss']:.4f}. Mean ± std over seeds {sorted({r['seed'] for r in result['runs']})}."
    )
    return "\n".join(lines)


def plot_sft(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in result["runs"]):
        ranks = sorted({r["rank"] for r in result["runs"] if r["method"] == method})
        stats = [mean_and_spread([x["eval_loss"] for x in result["runs"] if x["method"] == method and x["rank"] == k]) for k in ranks]
        style = "--" if method.endswith("-P") else "-"
        ax.errorbar(ranks, [s[0] for s in stats], yerr=[s[1] for s in stats], fmt="o" + style, capsize=3, label=method)
    ax.axhline(result["base_eval_loss"], color="grey", lw=0.8, ls=":", label="base, no adapter")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("eval loss (completion tokens)")
    ax.set_title("SFT personalisation: all-token vs prefill-only (-P)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- (3) quality vs output length -------------------------------------------------------------


def run_length(args: argparse.Namespace) -> dict:
    """Adapters that recite 1..N of a user's profile facts, trained on short (1-2 facts) or long (1-N) answers,
    scored per completion position (teacher-forced NLL) and by answer length (greedy exact match)."""
    model, tokenizer = load_base(args.base)
    eval_rows = synthetic.profile_summary_rows(STUDY_USER, args.eval_rows, seed=2, min_facts=1, max_facts=args.max_words)
    train_sets = {"short": (1, 2), "long": (1, args.max_words)}
    arms = []
    for train_name, (lo, hi) in train_sets.items():
        for method in args.methods:
            for rank in args.ranks:
                arms += [(train_name, lo, hi, method, rank, seed) for seed in args.seeds]
    runs = []
    prompts, answers = split_rows(eval_rows)
    words = [a.count(".") for a in answers]  # facts in the answer
    for train_name, lo, hi, method, rank, seed in tqdm(arms, desc="length study"):
        kind, policy = METHODS[method]
        train_rows = synthetic.profile_summary_rows(STUDY_USER, args.train_rows, seed=1, min_facts=lo, max_facts=hi)
        fields = adapter_fields(kind, policy, rank, args.lr, args.steps, args.batch_size, seed)
        work = args.work / f"length/{train_name}-{method}-r{rank}-s{seed}"
        train_adapter(model, tokenizer, args.base, train_rows, None, work, keep=True, adapter_name="study", **fields)
        nll, count = completion_position_nll(model, tokenizer, eval_rows, "study", policy, args.max_positions)
        texts = greedy_answers(model, tokenizer, prompts, "study", max_new_tokens=args.max_new_tokens)
        model.remove_adapter("study")
        runs.append(
            dict(
                train=train_name,
                method=method,
                rank=rank,
                seed=seed,
                nll_sum=nll,
                count=count,
                exact=[t == a for t, a in zip(texts, answers)],
            )
        )
        tqdm.write(f"{train_name:5s} {method:7s} r={rank:<3d} seed={seed}: exact {sum(runs[-1]['exact']) / len(texts):.3f}")
    # The in-context alternative: the base model given the profile in a system prompt.
    instructed = [[{"role": "system", "content": synthetic.profile_system(STUDY_USER.profile)}, *p] for p in prompts]
    base_texts = greedy_answers(model, tokenizer, instructed, None, max_new_tokens=args.max_new_tokens)
    return {
        "study": "length",
        "task": f"'Tell me my <1..{args.max_words} profile fields>', answered from the adapter alone (no system prompt)",
        "words": words,
        "base_with_instruction_exact": [t == a for t, a in zip(base_texts, answers)],
        "runs": runs,
    }


def exact_by_words(exact: list[bool], words: list[int], bins: list[tuple[int, int]]) -> list[float | None]:
    out = []
    for lo, hi in bins:
        picked = [e for e, w in zip(exact, words) if lo <= w <= hi]
        out.append(sum(picked) / len(picked) if picked else None)
    return out


def length_bins(max_words: int) -> list[tuple[int, int]]:
    return [(k, k) for k in range(1, max_words + 1)]


def length_groups(result: dict) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in result["runs"]:
        groups.setdefault((r["train"], r["method"], r["rank"]), []).append(r)
    return groups


def length_table(result: dict) -> str:
    words = result["words"]
    bins = length_bins(max(words))
    head = " | ".join(f"{lo} facts" for lo, hi in bins)
    lines = [f"| trained on | method | rank | {head} |", "|---" * (3 + len(bins)) + "|"]
    for (train, method, rank), runs in length_groups(result).items():
        per_seed = [exact_by_words(r["exact"], words, bins) for r in runs]
        cells = [f"{statistics.fmean(s[i] for s in per_seed):.2f}" if per_seed[0][i] is not None else "-" for i in range(len(bins))]
        lines.append(f"| {train} | {method} | {rank} | " + " | ".join(cells) + " |")
    base = exact_by_words(result["base_with_instruction_exact"], words, bins)
    lines.append("| (system prompt) | base | - | " + " | ".join("-" if b is None else f"{b:.2f}" for b in base) + " |")
    return "Exact match of greedy answers by answer length (mean over seeds).\n\n" + "\n".join(lines)


def plot_length(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    words = result["words"]
    bins = length_bins(max(words))
    for (train, method, rank), runs in length_groups(result).items():
        nll = [sum(r["nll_sum"][j] for r in runs) / max(1, sum(r["count"][j] for r in runs)) for j in range(len(runs[0]["count"]))]
        keep = [j for j in range(len(nll)) if sum(r["count"][j] for r in runs) >= 5]
        style = "--" if method.endswith("-P") else "-"
        label = f"{method} r={rank} ({train})"
        ax1.plot(keep, [nll[j] for j in keep], style, label=label)
        exact = [exact_by_words(r["exact"], words, bins) for r in runs]
        ax2.plot(
            range(len(bins)),
            [statistics.fmean(e[i] for e in exact) if exact[0][i] is not None else float("nan") for i in range(len(bins))],
            "o" + style,
            label=label,
        )
    base = exact_by_words(result["base_with_instruction_exact"], words, bins)
    ax2.plot(range(len(bins)), [float("nan") if b is None else b for b in base], "k:", label="base + profile in system prompt")
    ax1.set_yscale("log")
    ax1.set_xlabel("completion token position")
    ax1.set_ylabel("NLL (teacher-forced)")
    ax1.set_title("loss by position in the answer")
    ax2.set_xticks(range(len(bins)), [str(lo) for lo, hi in bins])
    ax2.set_xlabel("answer length (profile facts, ~25 tokens each)")
    ax2.set_ylabel("exact match (greedy)")
    ax2.set_title("quality vs output length")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- (2) GRPO ------------------------------------------------------------------------------


def run_grpo(args: argparse.Namespace) -> dict:
    """GRPO with exact-match reward on arithmetic, LoRA ``all`` vs ``prefill``: reward curves and held-out greedy accuracy."""
    from experiments.common import write_jsonl
    from preft.train import GRPOConfig
    from preft.train.grpo import GRPOTrainer

    model, tokenizer = load_base(args.base)
    prompts, answers = split_rows(synthetic.instruction_corpus(args.train_rows, seed=3, skills=args.grpo_skills))
    data = write_jsonl([{"messages": p, "answer": a} for p, a in zip(prompts, answers)], args.work / "grpo/prompts.jsonl")
    test_prompts, test_answers = split_rows(synthetic.instruction_corpus(args.eval_rows, seed=4, skills=args.grpo_skills))
    base_exact = statistics.fmean(a == b for a, b in zip(greedy_answers(model, tokenizer, test_prompts, None), test_answers))
    runs = []
    rank = args.ranks[0]
    for method in args.methods:
        kind, policy = METHODS[method]
        for seed in tqdm(args.seeds, desc=f"grpo {method}"):
            fields = adapter_fields(kind, policy, rank, args.lr, args.steps, args.num_generations * args.grpo_prompts, seed)
            config = GRPOConfig(
                output_dir=str(args.work / f"grpo/{method}-s{seed}"), adapter_name="study", device="cpu", bf16=False, disable_tqdm=True,
                reward_funcs=["exact"], num_generations=args.num_generations, max_completion_length=args.grpo_max_tokens, temperature=1.0, **fields,
            )  # fmt: skip
            result = GRPOTrainer(args.base, config, data, model=model, tokenizer=tokenizer).train()
            got = greedy_answers(model, tokenizer, test_prompts, "study")
            model.remove_adapter("study")
            reward = [(m["step"], m["reward"]) for m in result.metrics if "reward" in m]
            exact = statistics.fmean(a == b for a, b in zip(got, test_answers))
            runs.append(dict(method=method, policy=policy, rank=rank, seed=seed, reward=reward, heldout_exact=exact))
            tqdm.write(
                f"{method} seed={seed}: last-10 reward {statistics.fmean(v for _, v in reward[-10:]):.3f}, held-out exact {exact:.3f}"
            )
    return {"study": "grpo", "task": f"{'/'.join(args.grpo_skills)}, exact-match reward", "base_heldout_exact": base_exact, "runs": runs}


def grpo_table(result: dict) -> str:
    lines = ["| method | reward, first 10 steps | reward, last 10 steps | held-out greedy exact |", "|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["method"] == method]
        first = mean_and_spread([statistics.fmean(v for _, v in r["reward"][:10]) for r in runs])
        last = mean_and_spread([statistics.fmean(v for _, v in r["reward"][-10:]) for r in runs])
        exact = mean_and_spread([r["heldout_exact"] for r in runs])
        lines.append(f"| {method} | {first[0]:.3f} ± {first[1]:.3f} | {last[0]:.3f} ± {last[1]:.3f} | {exact[0]:.3f} ± {exact[1]:.3f} |")
    lines.append(f"\nBase model, no adapter: held-out greedy exact {result['base_heldout_exact']:.3f}.")
    return "\n".join(lines)


def plot_grpo(result: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    colors: dict[str, str] = {}
    for r in result["runs"]:
        steps, reward = zip(*r["reward"])
        window = 10  # running mean: single-step rewards of a small group are noisy
        smooth = [statistics.fmean(reward[max(0, i - window + 1) : i + 1]) for i in range(len(reward))]
        color = colors.setdefault(r["method"], f"C{len(colors)}")
        ax.plot(steps, smooth, "-" if r["policy"] == "all" else "--", color=color, label=f"{r['method']} seed {r['seed']}")
    ax.axhline(result["base_heldout_exact"], color="grey", lw=0.8, ls=":", label="base greedy exact")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean reward (running mean of 10 steps)")
    ax.set_title(f"GRPO: all-token vs prefill-only ({result['task']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- driver -----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


STUDIES = {
    "sft": (run_sft, sft_table, plot_sft),
    "length": (run_length, length_table, plot_length),
    "grpo": (run_grpo, grpo_table, plot_grpo),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="PreFT quality study on preft's own base model")
    p.add_argument("study", choices=list(STUDIES))
    p.add_argument("--base", default=DEFAULT_BASE, help="base model directory")
    p.add_argument("--out", type=Path, default=RESULTS, help="where <study>.json/.png/.md go")
    p.add_argument("--work", type=Path, default=None, help="scratch dir for adapters and metrics (default: <out>/runs)")
    p.add_argument("--methods", nargs="+", default=None, choices=list(METHODS))
    p.add_argument("--ranks", nargs="+", type=int, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--train-rows", type=int, default=512)
    p.add_argument("--eval-rows", type=int, default=128)
    p.add_argument("--max-words", type=int, default=6, help="length study: most profile facts in one answer")
    p.add_argument("--max-positions", type=int, default=180, help="length study: completion positions scored")
    p.add_argument("--max-new-tokens", type=int, default=180)
    p.add_argument("--num-generations", type=int, default=8, help="GRPO: completions per prompt")
    p.add_argument("--grpo-prompts", type=int, default=2, help="GRPO: prompts per step")
    p.add_argument("--grpo-max-tokens", type=int, default=10, help="GRPO: longest sampled completion")
    p.add_argument("--grpo-skills", nargs="+", default=["sort_digits"], choices=list(synthetic.SKILLS), help="GRPO: task skills")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    defaults = {"sft": (list(METHODS), [1, 4, 16, 64]), "length": (["LoRA", "LoRA-P"], [4, 16]), "grpo": (["LoRA", "LoRA-P"], [8])}
    args.methods = args.methods or defaults[args.study][0]
    args.ranks = args.ranks or defaults[args.study][1]
    args.work = args.work or args.out / "runs"
    return args


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    run, table, plot = STUDIES[args.study]
    start = time.time()
    result = run(args)
    result["wall_minutes"] = (time.time() - start) / 60
    result["command"] = "python -m experiments.quality " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    result["settings"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.study}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{args.study}.md").write_text(table(result) + "\n")
    plot(result, args.out / f"{args.study}.png")
    print(table(result))
    print(f"wrote {args.out}/{args.study}.json/.md/.png in {result['wall_minutes']:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
