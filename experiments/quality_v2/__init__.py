"""The PreFT quality study on the real base model (SmolLM2-135M-Instruct), run piece by piece.

    nohup nice -n 19 env OMP_NUM_THREADS=1 python -m experiments.quality_v2 --plan cpu --render \\
        > experiments/results/quality_v2/run-1.log 2>&1 &   # run or resume; one JSON line per finished run
                                                            # (one worker per free core: they claim runs)
    python -m experiments.quality_v2 --plan cpu --list      # what runs next
    python -m experiments.quality_v2.render                 # docs/quality.md and the plots from runs.jsonl

- ``tasks``: seeded generators of tasks A (personal facts), B (style without instruction), C (GRPO
  arithmetic), with train / validation / eval disjoint by construction and asserted;
- ``plan``: the arms, the budgets and the ``cpu`` / ``gpu`` plans in priority order (lr sweep, then seeds);
- ``runner``: the resumable loop over a plan (experiments/results/quality_v2/runs.jsonl);
- ``workbench``: one run on the real model (preft.train in-process, greedy eval with preft.engine.LLM,
  teacher-forced NLL and KL curves);
- ``stats``: paired bootstrap confidence intervals; ``render``: the page and the plots.
"""
