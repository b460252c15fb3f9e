"""Run a plan piece by piece: one JSON line per finished run in runs.jsonl; finished runs are skipped.

A run killed half-way leaves no line (its training resumes from its last checkpoint next time);
a run that fails is reported and skipped for this pass, so one bad cell never stops the study.
Several workers may run the same plan at once (one per core): a worker claims a run with a file
naming its process id (``claims/``), skips runs claimed by a live process, and appends its row
under a lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
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


@contextmanager
def locked(path: Path):
    """An exclusive lock beside ``path`` (other workers wait): appends and page renders never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def append_row(row: dict, path: Path = RUNS_FILE) -> None:
    with locked(path):
        torn = path.is_file() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        with path.open("a") as f:
            f.write(("\n" if torn else "") + json.dumps(row) + "\n")  # a torn last line (killed mid-write) must not swallow this row


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim(run_id: str, claims: Path) -> bool:
    """Claim ``run_id`` for this process; False if a live process holds it (a dead one's claim is taken over)."""
    claims.mkdir(parents=True, exist_ok=True)
    path = claims / (run_id.replace("/", "_") + ".pid")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(path.read_text() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder == os.getpid() or (holder and _alive(holder)):
                return holder == os.getpid()
            path.unlink(missing_ok=True)  # its worker died: the run (and its checkpoints) are free again
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def release(run_id: str, claims: Path) -> None:
    (claims / (run_id.replace("/", "_") + ".pid")).unlink(missing_ok=True)


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
    plan: Plan,
    run_fn: Callable[[Run], dict],
    path: Path = RUNS_FILE,
    max_runs: int | None = None,
    after: Callable[[], None] | None = None,
) -> int:
    """Run what is pending until nothing is (a finished sweep can unlock its seed runs); returns the runs finished.

    ``after`` is called after every finished run (the study renders its page there).
    """
    claims = path.with_name(path.name + ".claims")  # beside the results (ignored by git: claims are per machine)
    done, failed = 0, set()
    while max_runs is None or done < max_runs:
        rows = load_rows(path)
        todo = [(s, r) for s, r in pending(plan, rows) if r.run_id not in failed]
        if not todo:
            break
        picked = next(((s, r) for s, r in todo if claim(r.run_id, claims)), None)
        if picked is None:  # every pending run is another worker's: wait for one to finish (it may unlock seed runs)
            time.sleep(30)
            continue
        stage, run = picked
        if run.run_id in load_rows(path):  # another worker finished it between our read and our claim (it appends, then releases)
            release(run.run_id, claims)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {stage}: {run.run_id} ({len(todo)} pending)", flush=True)
        start = time.time()
        try:
            metrics = run_fn(run)
        except Exception:  # a failed cell is reported and skipped; the study goes on
            traceback.print_exc()
            failed.add(run.run_id)
            release(run.run_id, claims)
            continue
        row = {"run_id": run.run_id, "stage": run.stage, "config": run.config(), "seed": run.seed, "wall_s": round(time.time() - start, 1)}
        append_row({**row, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "metrics": metrics}, path)
        release(run.run_id, claims)
        print(f"  done in {row['wall_s']:.0f} s: {summary(metrics)}", flush=True)
        done += 1
        if after is not None:
            after()
    return done


def summary(metrics: dict) -> str:
    keys = ("score", "val_score", "eval_loss", "val_loss")
    return ", ".join(f"{k} {metrics[k]:.3f}" for k in keys if isinstance(metrics.get(k), float))
