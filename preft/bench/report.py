"""Benchmark output: a printed table, a JSON file and a PNG plot, named by model, device and date."""

from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

RESULTS_ROOT = Path("benchmarks") / "results"


def device_tag(device: torch.device) -> str:
    """``cpu`` or the GPU's name as a slug (``nvidia-h100-80gb-hbm3``)."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def environment(device: torch.device) -> dict:
    """Where and with what the numbers were taken."""
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("transformers", "triton", "peft"):
        try:
            versions[name] = __import__(name).__version__
        except ImportError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(),
        "git_commit": commit,
        "versions": versions,
    }


def results_paths(out_dir: str | Path | None, model: str, device: torch.device) -> tuple[Path, Path]:
    """``(json, png)`` paths: ``benchmarks/results/<device>-<date>/<model>-<device>-<date>.{json,png}`` by default."""
    tag, date = device_tag(device), datetime.date.today().isoformat()
    folder = Path(out_dir) if out_dir else RESULTS_ROOT / f"{tag}-{date}"
    stem = f"{Path(model).name}-{tag}-{date}"
    return folder / f"{stem}.json", folder / f"{stem}.png"


def _fmt(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: dict) -> str:
    """One row per (adapter count, mode): throughput, latency percentiles and the ratios."""
    header = f"{'adapters':>8} {'mode':>9} {'out tok/s':>10} {'tot tok/s':>10} {'TTFT p50/p99 ms':>16} {'TPOT p50/p99 ms':>16} {'decode ms':>9} {'x base':>7} {'x lora':>7}"
    lines = [header, "-" * len(header)]
    for r in sorted(results["runs"], key=lambda r: r["num_adapters"]):
        ttft, tpot = r["ttft_ms"], r["tpot_ms"]
        lines.append(
            f"{r['num_adapters']:>8} {r['mode']:>9} {r['output_tok_s']:>10.1f} {r['total_tok_s']:>10.1f} "
            f"{_fmt(ttft['p50']) + '/' + _fmt(ttft['p99']):>16} {_fmt(tpot['p50'], 2) + '/' + _fmt(tpot['p99'], 2):>16} "
            f"{_fmt(r['decode_step_ms']['p50'], 2):>9} {_fmt(r['ratio_to_base'], 2):>7} {_fmt(r['ratio_to_lora'], 2):>7}"
        )
    for p in results.get("peer", []):
        lines.append(
            f"{p['num_adapters']:>8} {p['mode']:>9} {p['output_tok_s']:>10.1f} {p['total_tok_s']:>10.1f} "
            f"{'(static batches of ' + str(p['batch_size']) + ')':>69} {_fmt(p.get('ratio_to_lora'), 2):>7}"
        )
    roof = results["roofline_model"]
    base = [r for r in results["runs"] if r["mode"] == "base" and r["roofline"]["fraction_of_floor"] is not None]
    if base:
        rl = base[-1]["roofline"]
        lines.append(
            f"roofline: base decode step {rl['measured_ms_p50']:.3f} ms vs floor {rl['floor_ms_p50']:.3f} ms "
            f"({rl['bytes_per_step_p50'] / 1e9:.3f} GB at {roof['bandwidth_GBps']:.0f} GB/s) = {100 * rl['fraction_of_floor']:.1f}% of the floor"
            f" [{roof['bandwidth_note']}]"
        )
    for mode, flat in results.get("flatness", {}).items():
        line = f"decode step of {mode} across adapter counts: max deviation {100 * flat['max_relative_deviation']:.1f}%"
        if "max_relative_deviation_vs_base" in flat:
            line += f", {100 * flat['max_relative_deviation_vs_base']:.1f}% relative to base at the same point"
        lines.append(line)
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str) -> None:
    """Output tok/s and the median decode step vs number of adapters, one line per mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tput, ax_step) = plt.subplots(1, 2, figsize=(12, 4.5))
    modes = list(dict.fromkeys(r["mode"] for r in results["runs"]))
    for mode in modes:
        points = sorted((r["num_adapters"], r["output_tok_s"], r["decode_step_ms"]["p50"]) for r in results["runs"] if r["mode"] == mode)
        xs = [p[0] for p in points]
        ax_tput.plot(xs, [p[1] for p in points], marker="o", label=mode)
        if all(p[2] is not None for p in points):
            ax_step.plot(xs, [p[2] for p in points], marker="o", label=mode)
    peer = sorted((p["num_adapters"], p["output_tok_s"]) for p in results.get("peer", []))
    if peer:
        ax_tput.plot([p[0] for p in peer], [p[1] for p in peer], marker="s", linestyle="--", label="transformers+PEFT")
    for ax, ylabel in ((ax_tput, "output tokens / s"), (ax_step, "decode step p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("number of adapters")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    ax_step.set_ylim(bottom=0)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(results: dict, json_path: Path, png_path: Path, title: str) -> None:
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, png_path, title)
