"""``python -m experiments.quality_v2 --plan cpu|gpu``: run (or resume) the quality study; see the package docstring."""

from __future__ import annotations

import argparse

from experiments.quality_v2.plan import PLANS
from experiments.quality_v2.runner import RUNS_FILE, execute, load_rows, pending


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Run or resume the PreFT quality study on SmolLM2-135M-Instruct (one JSON line per run).")
    p.add_argument("--plan", choices=sorted(PLANS), required=True, help="cpu: sized for a small shared CPU; gpu: the full grid")
    p.add_argument("--model", default="default", help="base model: 'default' (SmolLM2-135M-Instruct), a folder or a .gguf file")
    p.add_argument("--device", default=None, help="torch device for training and serving (default: cuda if available, else cpu)")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many finished runs")
    p.add_argument("--list", action="store_true", help="print the runs the plan wants next and exit")
    p.add_argument("--render", action="store_true", help="rewrite docs/quality.md after every finished run")
    args = p.parse_args(argv)
    plan = PLANS[args.plan]()
    if args.list:
        rows = load_rows()
        print(f"{len(rows)} runs finished in {RUNS_FILE}; pending now (seed runs appear once their sweep is done):")
        for stage, run in pending(plan, rows):
            print(f"  {stage}: {run.run_id}")
        return 0
    from experiments.quality_v2.workbench import Workbench

    bench = Workbench(args.model, args.device)

    done = execute(plan, bench.run, max_runs=args.max_runs, after=_render if args.render else None)
    print(f"{done} runs finished; nothing left to run in the {args.plan} plan" if args.max_runs is None else f"{done} runs finished")
    return 0


def _render() -> None:
    from experiments.quality_v2 import render
    from experiments.quality_v2.runner import locked

    try:
        with locked(RUNS_FILE):  # another worker may be appending or rendering
            render.main([])
    except Exception as e:  # rendering must never stop the study
        print(f"render failed: {e!r}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
