"""``python -m experiments.quality_v2.backfill``: add per-prompt eval losses to finished task-A runs.

Runs before this field existed kept only task A's mean eval loss, so the loss gap between arms had no
CI. For every finished task-A row without ``eval_nll`` this recomputes the teacher-forced NLL of each
eval prompt's reference answer: on the base model (no-adapter arms), from the run's saved adapter,
or (``--retrain``, where the adapter folder is gone) from the adapter retrained with the run's own
config and seed. The recomputed mean must match the recorded ``eval_loss`` (``--tolerance``), which
shows it is the same adapter; the check is stored with the losses. Several processes may run it at
once (runs are claimed like the study's), beside the study's workers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from experiments.quality_v2 import tasks
from experiments.quality_v2.plan import ARMS, Budget, Run
from experiments.quality_v2.runner import RUNS_FILE, claim, load_rows, locked, release


def run_of(row: dict) -> Run:
    c = dict(row["config"])
    budget = c.pop("budget", None)
    return Run(**c, budget=Budget(**budget) if budget else None)


def wanted(rows: dict[str, dict]) -> list[dict]:
    """Finished task-A rows without per-prompt eval losses."""
    return [r for r in rows.values() if r["config"]["task"] == "A" and "eval_nll" not in r["metrics"]]


def update_row(run_id: str, fields: dict, path: Path = RUNS_FILE) -> None:
    """Merge ``fields`` into one row's metrics and rewrite the file atomically, under the study's lock."""
    with locked(path):
        lines = path.read_text().splitlines()
        out = []
        for line in lines:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn line from a killed writer: nothing to keep
            if row["run_id"] == run_id:
                row["metrics"].update(fields)
            out.append(json.dumps(row))
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text("".join(line + "\n" for line in out))
        os.replace(tmp, path)


def backfill_one(bench, row: dict, retrain: bool, tolerance: float) -> dict | None:
    from experiments.quality_v2.workbench import ADAPTER, RUN_DIRS, log

    run = run_of(row)
    data = tasks.build(run.task, run.seed)
    kind, policy = ARMS[run.arm]
    eval_items = data.splits["eval"]
    retrained = False
    if kind is None:
        system = data.system_prompt if run.arm == "system-prompt" else None
        nll, tokens = bench.item_nll(eval_items, None, "all", system)
    else:
        out = RUN_DIRS / run.run_id.replace("/", "_")
        if not (out / "adapter_config.json").is_file():
            if not retrain:
                log(f"skip {run.run_id}: its adapter folder {out} is gone (pass --retrain to retrain it from its seed)")
                return None
            log(f"retraining {run.run_id} (its adapter folder is gone)")
            bench.train_sft(run, data, out, kind, policy)
            for checkpoint in out.glob("checkpoint-*"):  # as after a study run: the adapter stays, optimizer states go
                shutil.rmtree(checkpoint)
            retrained = True
        bench.model.load_adapter(str(out), ADAPTER)
        try:
            nll, tokens = bench.item_nll(eval_items, ADAPTER, policy, None)
        finally:
            bench.model.remove_adapter(ADAPTER)
    recomputed = sum(nll) / sum(tokens)
    recorded = row["metrics"]["eval_loss"]
    check = {"recorded_eval_loss": recorded, "recomputed_eval_loss": recomputed, "retrained": retrained}
    if abs(recomputed - recorded) > tolerance * abs(recorded):
        log(f"{run.run_id}: recomputed eval loss {recomputed:.5f} differs from the recorded {recorded:.5f}; not stored")
        return None
    return {"eval_nll": {"nll": [round(x, 4) for x in nll], "tokens": tokens, "backfill": check}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Add per-prompt eval losses to finished task-A runs of the quality study.")
    p.add_argument("--retrain", action="store_true", help="retrain runs whose adapter folder is gone (same config and seed)")
    p.add_argument("--tolerance", type=float, default=0.02, help="largest relative gap between recomputed and recorded eval loss")
    p.add_argument("--runs", type=Path, default=RUNS_FILE)
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = p.parse_args(argv)
    from experiments.quality_v2.workbench import Workbench, log

    todo = wanted(load_rows(args.runs))
    if not todo:
        print("every task-A run has per-prompt eval losses")
        return 0
    todo.sort(key=lambda r: ARMS[r["config"]["arm"]][0] is not None)  # the cheap no-adapter arms first
    bench = Workbench(args.model, args.device)
    claims = args.runs.with_name(args.runs.name + ".backfill-claims")
    done = 0
    for row in todo:
        if not claim(row["run_id"], claims):
            continue
        try:
            fields = backfill_one(bench, row, args.retrain, args.tolerance)
            if fields is not None:
                update_row(row["run_id"], fields, args.runs)
                check = fields["eval_nll"]["backfill"]
                log(f"{row['run_id']}: eval loss {check['recomputed_eval_loss']:.5f} (recorded {check['recorded_eval_loss']:.5f})")
                done += 1
        finally:
            release(row["run_id"], claims)
    print(f"{done} runs backfilled")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
