"""Run a plan piece by piece: one JSON line per finished run in runs.jsonl; finished runs are skipped.

A run killed half-way leaves no line (its training resumes from its last checkpoint next time);
a run that fails is reported and skipped for this pass, so one bad cell never stops the study.
"""

from __future__ import annotations

import json
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from experiments.quality_v2.plan import Plan, Run

RESULTS = Path("experiments/results/quality_v2")
RUNS_FILE = RESULTS / "runs.jsonl"


def load_rows(path: Path = RUNS_FILE) -> dict[str, dict]:
    """run_id -> row of every finished run (a torn last line, from a kill mid-write, is ignored)."""
    rows: dict[str, dict] = {}
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["run_id"]] = row
    return rows


def append_row(row: dict, path: Path = RUNS_FILE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        f.write(("\n" if torn else "") + json.dumps(row) + "\n")  # a torn last line (killed mid-write) must not swallow this row


def pending(plan: Plan, rows: dict[str, dict]) -> list[tuple[str, Run]]:
    """(stage name, run) of every run the plan wants now and has not finished, in priority order."""
    out, seen = [], set(rows)
    for stage in plan.stages:
        for run in stage.runs(rows):
            if run.run_id not in seen:
                seen.add(run.run_id)
                out.append((stage.name, run))
    return out


def execute(
    plan: Plan, run_fn: Callable[[Run], dict], path: Path = RUNS_FILE, max_runs: int | None = None, after: Callable[[], None] | None = None
) -> int:
    """Run what is pending until nothing is (a finished sweep can unlock its seed runs); returns the runs finished.

    ``after`` is called after every finished run (the study renders its page there).
    """
    done, failed = 0, set()
    while max_runs is None or done < max_runs:
        rows = load_rows(path)
        todo = [(s, r) for s, r in pending(plan, rows) if r.run_id not in failed]
        if not todo:
            break
        stage, run = todo[0]
        print(f"[{time.strftime('%H:%M:%S')}] {stage}: {run.run_id} ({len(todo)} pending)", flush=True)
        start = time.time()
        try:
            metrics = run_fn(run)
        except Exception:  # a failed cell is reported and skipped; the study goes on
            traceback.print_exc()
            failed.add(run.run_id)
            continue
        row = {"run_id": run.run_id, "stage": run.stage, "config": run.config(), "seed": run.seed, "wall_s": round(time.time() - start, 1)}
        append_row({**row, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metrics}, path)
        print(f"  done in {row['wall_s']:.0f} s: {summary(metrics)}", flush=True)
        done += 1
        if after is not None:
            after()
    return done


def summary(metrics: dict) -> str:
    keys = ("score", "val_score", "eval_loss", "val_loss")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))
