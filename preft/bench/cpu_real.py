"""preft's engine vs transformers ``generate`` on a real model, on CPU, side by side in one run.

    python -m preft.bench.cpu_real                      # the built-in SmolLM2-135M-Instruct
    python -m preft.bench.cpu_real --model DIR --num-requests 16 --max-tokens 64

Workloads, given to both sides as the same token ids (float32, greedy):

- ``chat``: ``--num-requests`` (64) fixed user questions (``CHAT_QUESTIONS``) rendered with the model's
  chat template, each with its natural output length (EOS stops it; ``--max-tokens`` caps it, 256).
  preft: every request submitted at once to the engine (continuous batching, ``--max-num-seqs``).
  transformers: ``generate`` in static batches of ``--hf-batch-size`` (8), left padding, in order.
- ``decode``: batch 1 and batch 8, exactly ``--decode-tokens`` (32) output tokens per request
  (preft: ``ignore_eos``; transformers: ``min_new_tokens``), output tok/s over the whole call.

Every (side, workload) runs in its own subprocess, so its peak RSS (``VmHWM``) is its own.
The parent writes ``<model>-cpu-<threads>threads-<date>.{json,md,png}`` to ``benchmarks/results/cpu-<date>/`` (or
``--output-dir``): wall time, output tok/s, load time and peak RSS per side, the ratios against
the targets (wall time <= 0.6x, peak RSS <= 1.3x transformers'), how many chat requests got
exactly the same greedy tokens on both sides, and the machine's load average around each run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tqdm.auto import tqdm

# Ordinary questions a chat model is asked: short facts, explanations, advice, small tasks.
CHAT_QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
    "What is photosynthesis?",
    "Can you give me a simple recipe for pancakes?",
    "What is the difference between weather and climate?",
    "How do I boil an egg?",
    "Who wrote Romeo and Juliet?",
    "What are three tips for better sleep?",
    "Explain what a computer virus is.",
    "What is the largest planet in our solar system?",
    "How does a rainbow form?",
    "What should I pack for a weekend camping trip?",
    "What is the boiling point of water at sea level?",
    "Write a short poem about the ocean.",
    "What is the Pythagorean theorem?",
    "How can I save money on groceries?",
    "What causes the seasons on Earth?",
    "What is a healthy breakfast?",
    "How do bees make honey?",
    "What is the difference between a virus and a bacterium?",
    "Give me a fun fact about octopuses.",
    "How do I write a good cover letter?",
    "What is gravity?",
    "Why do leaves change color in autumn?",
    "What is the tallest mountain in the world?",
    "How can I improve my English vocabulary?",
    "What is machine learning?",
    "Suggest a name for a pet goldfish.",
    "What is the water cycle?",
    "How do airplanes stay in the air?",
    "What is the meaning of the word 'ephemeral'?",
    "How many continents are there, and what are they?",
    "What are the benefits of drinking water?",
    "Explain how a battery works.",
    "What is the speed of light?",
    "How do I start learning to play the guitar?",
    "What is democracy?",
    "Why do cats purr?",
    "What is the difference between a lake and a sea?",
    "Give me three ideas for a birthday party.",
    "How does the internet work?",
    "What is an atom made of?",
    "How can I stay focused while studying?",
    "What is the main ingredient in guacamole?",
    "Why do we have day and night?",
    "What is a black hole?",
    "How do I make a cup of green tea?",
    "Translate 'good morning' into Spanish.",
    "What is the role of the heart in the human body?",
    "How do vaccines work?",
    "What is the difference between an ocean and a river?",
    "Write a haiku about winter.",
    "What is the population of the Earth, roughly?",
    "How do I change a flat tire on a bicycle?",
    "What is inflation in economics?",
    "Why is exercise good for you?",
    "What are the primary colors?",
    "How does a refrigerator keep food cold?",
    "What is the longest river in the world?",
    "Describe a cat in two sentences.",
    "What is recycling and why does it matter?",
    "How many days are there in a leap year?",
    "What is a good way to learn a new language?",
)
assert len(CHAT_QUESTIONS) == 64 and len(set(CHAT_QUESTIONS)) == 64

WALL_TIME_TARGET = 0.6  # preft's chat wall time / transformers'
PEAK_RSS_TARGET = 1.3  # preft's chat peak RSS / transformers'
SIDES = ("preft", "transformers")
WORKLOADS = ("chat", "decode")


def chat_prompts(tokenizer, num_requests: int) -> list[list[int]]:
    """Token ids of the first ``num_requests`` questions (cycled) as one user turn with the chat template."""
    prompts = []
    for i in range(num_requests):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_QUESTIONS[i % len(CHAT_QUESTIONS)]}], tokenize=False, add_generation_prompt=True
        )
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB. Both from /proc/self/status where it exists: the kernel
    computes VmHWM as at least VmRSS, whereas ``ru_maxrss`` can lag the current RSS by a few pages."""
    fields = {}
    with contextlib.suppress(OSError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                fields[line.split(":")[0]] = int(line.split()[1]) / 1024
    peak = fields.get("VmHWM", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return fields.get("VmRSS", 0.0), peak


# ---- one side, one workload (runs in a child process) ---------------------------------------


class PreftSide:
    def __init__(self, model_dir: str, args: argparse.Namespace):
        from preft.engine import LLM

        self.llm = LLM(
            model_dir,
            dtype="float32",
            device="cpu",
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            kv_cache_memory_bytes=args.kv_cache_memory_bytes,
        )
        self.tokenizer = self.llm.tokenizer

    def generate(self, prompts: list[list[int]], max_tokens: int, fixed: bool) -> list[dict]:
        from preft.engine import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=fixed)
        outs = self.llm.generate(prompts, params, use_tqdm=len(prompts) > 8)
        return [{"token_ids": o.outputs[0].token_ids, "finish_reason": o.outputs[0].finish_reason} for o in outs]

    def details(self) -> dict:
        engine = self.llm.engine
        return {"engine_stats": engine.stats(), "kv_blocks": engine.block_manager.num_blocks, "block_size": engine.block_size}


class TransformersSide:
    def __init__(self, model_dir: str, args: argparse.Namespace):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.batch_size = args.hf_batch_size
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids)

    def generate(self, prompts: list[list[int]], max_tokens: int, fixed: bool) -> list[dict]:
        import torch

        results = []
        batches = range(0, len(prompts), self.batch_size)
        for start in tqdm(batches, desc="transformers", unit="batch", disable=len(batches) < 2):
            batch = prompts[start : start + self.batch_size]
            width = max(map(len, batch))
            input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in batch])  # left padding
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            with torch.inference_mode():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_tokens,
                    min_new_tokens=max_tokens if fixed else None,
                    do_sample=False,
                    pad_token_id=self.pad_id,
                )
            for row in out[:, width:].tolist():
                ended = next((i + 1 for i, t in enumerate(row) if t in self.eos_ids), len(row))  # up to and with the first EOS
                results.append({"token_ids": row[:ended], "finish_reason": "stop" if row[ended - 1] in self.eos_ids else "length"})
        return results

    def details(self) -> dict:
        return {"batch_size": self.batch_size}


def run_child(side: str, workload: str, model_dir: str, args: argparse.Namespace) -> dict:
    """Load ``side``, warm it up, run ``workload``; timings, outputs and memory of this process."""
    import torch

    torch.set_num_threads(args.threads)
    load_start = time.perf_counter()
    runner = (PreftSide if side == "preft" else TransformersSide)(model_dir, args)
    load_s = time.perf_counter() - load_start
    rss_after_load, _ = rss_mb()
    prompts = chat_prompts(runner.tokenizer, args.num_requests if workload == "chat" else 8)
    runner.generate(prompts[:1], 4, fixed=True)  # warm-up: first-call costs are not what is measured
    result: dict = {"side": side, "workload": workload, "load_s": load_s, "rss_after_load_mb": rss_after_load}
    runs = []
    if workload == "chat":
        runs.append(("chat", prompts, args.max_tokens, False))
    else:
        runs += [(f"decode_b{b}", prompts[:b], args.decode_tokens, True) for b in (1, 8)]
    for name, batch, max_tokens, fixed in runs:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        outputs = runner.generate(batch, max_tokens, fixed)
        wall = time.perf_counter() - start
        tokens = sum(len(o["token_ids"]) for o in outputs)
        result[name] = {
            "num_requests": len(batch),
            "wall_s": wall,
            "output_tokens": tokens,
            "output_tok_s": tokens / wall,
            "loadavg_1min_before": load_before,
            "loadavg_1min_after": os.getloadavg()[0],
        }
        if name == "chat":
            result[name]["outputs"] = outputs
    result["rss_end_mb"], result["peak_rss_mb"] = rss_mb()
    result.update(runner.details())
    return result


# ---- the parent: run every child, compare, write ----------------------------------------------


def spawn(side: str, workload: str, model_dir: str, argv: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "preft.bench.cpu_real",
            *argv,
            "--model",
            model_dir,
            "--child",
            f"{side}:{workload}",
            "--child-output",
            str(out),
        ]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def compare_outputs(ours: list[dict], theirs: list[dict]) -> dict:
    """How many requests produced exactly the same greedy tokens, and where the others first differ."""
    diverged = []
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a["token_ids"] != b["token_ids"]:
            first = next(
                (j for j, (x, y) in enumerate(zip(a["token_ids"], b["token_ids"])) if x != y), min(len(a["token_ids"]), len(b["token_ids"]))
            )
            diverged.append(
                {
                    "request": i,
                    "first_difference_at_token": first,
                    "preft_tokens": len(a["token_ids"]),
                    "transformers_tokens": len(b["token_ids"]),
                }
            )
    return {"num_requests": len(ours), "exact_matches": len(ours) - len(diverged), "diverged": diverged}


def summarize(children: dict[tuple[str, str], dict]) -> dict:
    """Side-by-side metrics and ratios (preft / transformers) from the children's results."""
    sides: dict[str, dict] = {}
    for (side, workload), r in children.items():
        s = sides.setdefault(side, {})
        if workload == "chat":
            s.update(
                chat_wall_s=r["chat"]["wall_s"],
                chat_output_tokens=r["chat"]["output_tokens"],
                chat_output_tok_s=r["chat"]["output_tok_s"],
                chat_peak_rss_mb=r["peak_rss_mb"],
                load_s=r["load_s"],
                rss_after_load_mb=r["rss_after_load_mb"],
            )
        else:
            s.update(
                decode_b1_tok_s=r["decode_b1"]["output_tok_s"],
                decode_b8_tok_s=r["decode_b8"]["output_tok_s"],
                decode_peak_rss_mb=r["peak_rss_mb"],
            )
    summary: dict = {"sides": sides}
    if len(sides) == 2:
        ours, theirs = sides["preft"], sides["transformers"]
        summary["ratios"] = {k: ours[k] / theirs[k] for k in ours if k in theirs and theirs[k]}
        if "chat_wall_s" in summary["ratios"]:
            summary["targets"] = {
                "chat_wall_s": {"target": f"<= {WALL_TIME_TARGET}", "met": summary["ratios"]["chat_wall_s"] <= WALL_TIME_TARGET},
                "chat_peak_rss_mb": {"target": f"<= {PEAK_RSS_TARGET}", "met": summary["ratios"]["chat_peak_rss_mb"] <= PEAK_RSS_TARGET},
            }
        if ("preft", "chat") in children and ("transformers", "chat") in children:
            summary["greedy_agreement"] = compare_outputs(
                children["preft", "chat"]["chat"]["outputs"], children["transformers", "chat"]["chat"]["outputs"]
            )
    return summary


METRICS = (
    ("chat_wall_s", "chat: wall time (s)", 1),
    ("chat_output_tokens", "chat: output tokens", 0),
    ("chat_output_tok_s", "chat: output tok/s", 1),
    ("chat_peak_rss_mb", "chat: peak RSS (MiB)", 0),
    ("load_s", "load time (s)", 2),
    ("rss_after_load_mb", "RSS after load (MiB)", 0),
    ("decode_b1_tok_s", "decode batch 1, {decode_tokens} tokens: tok/s", 1),
    ("decode_b8_tok_s", "decode batch 8, {decode_tokens} tokens: tok/s", 1),
    ("decode_peak_rss_mb", "decode: peak RSS (MiB)", 0),
)


def markdown(results: dict) -> str:
    summary, cfg = results["summary"], results["config"]
    sides = summary["sides"]
    lines = [
        f"# {results['model']} on CPU: preft engine vs transformers generate ({results['environment']['date']})",
        "",
        f"{cfg['num_requests']} chat requests, natural output lengths capped at {cfg['max_tokens']} tokens, greedy, float32, "
        f"{cfg['threads']} torch threads; preft: all submitted at once (max_num_seqs {cfg['max_num_seqs']}); "
        f"transformers: static batches of {cfg['hf_batch_size']}, left padding.",
        "",
        "| metric | preft | transformers | preft / transformers |",
        "|---|---:|---:|---:|",
    ]
    for key, label, digits in METRICS:
        if not any(key in s for s in sides.values()):
            continue
        values = [f"{sides[side][key]:.{digits}f}" if key in sides.get(side, {}) else "-" for side in SIDES]
        ratio = summary.get("ratios", {}).get(key)
        lines.append(f"| {label.format(**cfg)} | {values[0]} | {values[1]} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    for key, t in summary.get("targets", {}).items():
        lines.append(f"\nTarget {key} ratio {t['target']}: {'met' if t['met'] else 'NOT met'} ({summary['ratios'][key]:.2f}x).")
    agreement = summary.get("greedy_agreement")
    if agreement:
        lines.append(f"\nSame greedy tokens on both sides: {agreement['exact_matches']} of {agreement['num_requests']} chat requests.")
    loads = [f"{c['side']}:{c['workload']} {c['loadavg_1min_before']:.2f}" for c in results["load_averages"]]
    lines.append(f"\nMachine load (1-min load average before each run): {', '.join(loads)}.")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = results["summary"]["sides"]
    panels = [
        ("chat wall time (s)", ["chat_wall_s"]),
        ("output tok/s", ["chat_output_tok_s", "decode_b1_tok_s", "decode_b8_tok_s"]),
        ("peak RSS (MiB)", ["chat_peak_rss_mb", "decode_peak_rss_mb"]),
    ]
    labels = {"chat_wall_s": "chat", "chat_output_tok_s": "chat", "decode_b1_tok_s": "decode b1", "decode_b8_tok_s": "decode b8"}
    labels.update(chat_peak_rss_mb="chat", decode_peak_rss_mb="decode")
    fig, axes = plt.subplots(1, len(panels), figsize=(13, 4.2))
    for ax, (title, keys) in zip(axes, panels):
        keys = [k for k in keys if any(k in s for s in sides.values())]
        width = 0.8 / max(1, len(sides))
        for i, side in enumerate(s for s in SIDES if s in sides):
            xs = [j + i * width for j in range(len(keys))]
            ax.bar(xs, [sides[side].get(k, 0) for k in keys], width, label=side)
        ax.set_xticks([j + width * (len(sides) - 1) / 2 for j in range(len(keys))], [labels[k] for k in keys])
        ax.set_title(title)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle(f"{results['model']} on CPU ({results['config']['threads']} threads, float32): preft engine vs transformers")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_parent(args: argparse.Namespace, argv: list[str]) -> dict:
    from preft.models import resolve_model

    model_dir = str(resolve_model(args.model))
    model_name = "SmolLM2-135M-Instruct" if args.model in (None, "default") else Path(model_dir).name
    date = datetime.date.today().isoformat()
    out_dir = Path(args.output_dir) if args.output_dir else Path("benchmarks") / "results" / f"cpu-{date}"
    children: dict[tuple[str, str], dict] = {}
    for workload in args.workloads:
        for side in args.sides:
            print(f"== {side}: {workload}", flush=True)
            children[side, workload] = spawn(side, workload, model_dir, argv)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    import torch
    import transformers

    results = {
        "model": model_name,
        "model_dir": model_dir,
        "config": {
            k: getattr(args, k)
            for k in (
                "num_requests",
                "max_tokens",
                "decode_tokens",
                "hf_batch_size",
                "max_num_seqs",
                "max_model_len",
                "kv_cache_memory_bytes",
                "threads",
            )
        },
        "environment": {
            "date": date,
            "git_commit": commit,
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "summary": summarize(children),
        "load_averages": [
            {
                "side": s,
                "workload": w,
                "loadavg_1min_before": min(
                    v["loadavg_1min_before"] for k, v in c.items() if isinstance(v, dict) and "loadavg_1min_before" in v
                ),
            }
            for (s, w), c in children.items()
        ],
        "runs": {f"{s}:{w}": c for (s, w), c in children.items()},
        "chat_questions": list(CHAT_QUESTIONS[: args.num_requests]),
    }
    stem = f"{model_name}-cpu-{args.threads}threads-{date}"
    out_dir.mkdir(parents=True, exist_ok=True)
    results["files"] = {ext: str(out_dir / f"{stem}.{ext}") for ext in ("json", "md", "png")}
    Path(results["files"]["json"]).write_text(json.dumps(results, indent=1) + "\n")
    Path(results["files"]["md"]).write_text(markdown(results))
    plot(results, Path(results["files"]["png"]))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m preft.bench.cpu_real", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="model folder or .gguf (default: the built-in SmolLM2-135M-Instruct)")
    parser.add_argument("--num-requests", type=int, default=64, help="chat requests (the fixed questions, cycled)")
    parser.add_argument("--max-tokens", type=int, default=256, help="cap on each chat answer (EOS usually ends it first)")
    parser.add_argument("--decode-tokens", type=int, default=32, help="output tokens of the fixed-length decode runs")
    parser.add_argument("--hf-batch-size", type=int, default=8, help="transformers' static batch size")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="preft's running-sequence limit")
    parser.add_argument("--max-model-len", type=int, default=None, help="preft's context length (default: the model's)")
    parser.add_argument("--kv-cache-memory-bytes", default=None, help="preft's KV pool (default: the engine's)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on each side")
    parser.add_argument("--sides", type=lambda s: s.split(","), default=list(SIDES), help="comma-separated subset of preft,transformers")
    parser.add_argument("--workloads", type=lambda s: s.split(","), default=list(WORKLOADS), help="comma-separated subset of chat,decode")
    parser.add_argument("--output-dir", default=None, help="default benchmarks/results/cpu-<date>/")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    bad = [s for s in args.sides if s not in SIDES] + [w for w in args.workloads if w not in WORKLOADS]
    if bad:
        raise SystemExit(f"unknown side/workload {bad}; sides: {SIDES}, workloads: {WORKLOADS}")
    if args.child:
        side, workload = args.child.split(":")
        Path(args.child_output).write_text(json.dumps(run_child(side, workload, args.model, args)))
        return 0
    results = run_parent(args, argv)
    print(Path(results["files"]["md"]).read_text())
    print(f"wrote {', '.join(results['files'].values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
