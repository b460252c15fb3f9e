"""``python -m experiments.quality_v2.render``: docs/quality.md and the plots, from whatever runs.jsonl holds.

Every number is recomputed from the JSON lines; a cell without runs says "not run yet".
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from experiments.quality_v2 import stats
from experiments.quality_v2.plan import ARMS, PLANS, Plan
from experiments.quality_v2.runner import RESULTS, RUNS_FILE, load_rows, pending
from experiments.quality_v2.workbench import SEGMENTS

DOC = Path("docs/quality.md")
TRAINED = ["LoRA", "LoRA-P", "DiReFT", "DiReFT-P"]
RANKS = [4, 16, 64]
PAIRS = [("LoRA-P", "LoRA"), ("DiReFT-P", "DiReFT")]
NOT_RUN = "not run yet"
NOT_PLANNED = "not in this plan (the gpu plan runs it)"
LENGTH_BUCKETS = {"1-16": (1, 16), "17-64": (17, 64), "65-256": (65, 10_000)}
PARITY_MARGIN = 0.05  # GRPO "parity": the difference's CI lies within +-0.05


# ---- the data, grouped -------------------------------------------------------------------------------


class Cell:
    """The runs of one (task, arm, rank) at its chosen lr: per-seed item scores and metrics."""

    def __init__(self, rows: list[dict]):
        self.rows = sorted(rows, key=lambda r: r["seed"])
        self.lr = rows[0]["config"]["lr"] if rows else None

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.rows]

    def items(self, key: str = "score") -> dict[int, list[float]]:
        return {r["seed"]: r["metrics"]["items"][key] for r in self.rows if key in r["metrics"].get("items", {})}

    def estimate(self, key: str = "score", where=None) -> stats.Estimate | None:
        per_seed = self.items(key)
        if not per_seed:
            return None
        values = stats.item_means(per_seed)
        if where is not None:
            kinds = self.rows[0]["metrics"]["kinds"]
            values = values[[where(k) for k in kinds]]
        return stats.bootstrap_mean(values) if len(values) else None

    def per_seed(self, key: str = "score") -> str:
        """The mean score of each seed, e.g. ``0.46 / 0.40 / 0.45``: the seed-to-seed spread the CIs leave out."""
        return " / ".join(f"{np.mean(v):.2f}" for v in self.items(key).values())

    def metric(self, key: str) -> list[float]:
        return [r["metrics"][key] for r in self.rows if isinstance(r["metrics"].get(key), float)]


REWARD_WINDOW = 5  # 16 sampled rollouts a step give a reward in steps of 1/16: the raw curve is mostly noise


def running_mean(series: list[list[float]], window: int = REWARD_WINDOW) -> list[list[float]]:
    """``[[step, value], ...]`` -> the trailing mean over the last ``window`` points (fewer at the start)."""
    values = [v for _, v in series]
    return [[step, float(np.mean(values[max(0, i + 1 - window) : i + 1]))] for i, (step, _) in enumerate(series)]


def seed_differences(first: Cell, second: Cell) -> str:
    """``first - second`` per shared seed (mean over that seed's items): whether the sign holds seed by seed."""
    a, b = first.items(), second.items()
    return " / ".join(f"{np.mean(a[s]) - np.mean(b[s]):+.2f}" for s in sorted(set(a) & set(b)))


def index(rows: dict[str, dict]) -> dict[tuple, list[dict]]:
    """(task, arm, r, lr) -> rows."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows.values():
        c = row["config"]
        groups[(c["task"], c["arm"], c["r"], c["lr"])].append(row)
    return groups


def chosen(groups: dict[tuple, list[dict]], task: str, arm: str, r: int) -> Cell:
    """The lr with the most seeds (the sweep's winner, once its seeds ran); ties: the best seed-0 validation score."""
    candidates = [rows for (t, a, rr, _), rows in groups.items() if (t, a, rr) == (task, arm, r)]
    if not candidates:
        return Cell([])

    def rank(rows):
        seed0 = next((x for x in rows if x["seed"] == 0), rows[0])
        return (len(rows), seed0["metrics"]["val_score"], -(seed0["metrics"].get("val_loss") or 0.0))

    return Cell(max(candidates, key=rank))


# ---- text helpers -----------------------------------------------------------------------------------


def fmt(e: stats.Estimate | None, digits: int = 2) -> str:
    return NOT_RUN if e is None else e.fmt(digits)


def verdict_difference(diff: stats.Estimate | None, n_seeds: int, worse_is_claim: bool = True, digits: int = 2) -> tuple[str, str]:
    """(verdict, reason) for the claim "the first arm is worse than the second" (or "better", when not ``worse_is_claim``).

    For a loss difference (higher is worse) pass ``worse_is_claim=False``: "supported" then means the CI lies above 0.
    """
    if diff is None:
        return "not run yet", "the runs this claim needs have not finished"
    reason = f"difference {diff.fmt(digits)} over {diff.n} paired prompts, {n_seeds} seed(s)"
    if n_seeds < 3:
        return "inconclusive at this scale", reason + "; fewer than 3 seeds"
    if diff.high < 0:
        return ("supported" if worse_is_claim else "not supported"), reason + "; the CI lies below 0"
    if diff.low > 0:
        return ("not supported" if worse_is_claim else "supported"), reason + "; the CI lies above 0"
    bound = max(-diff.low, diff.high)
    return "inconclusive at this scale", reason + f"; the CI includes 0 (and rules out a gap larger than {bound:.{digits}f} either way)"


def table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(x) + " |" for x in lines]


# ---- sections ---------------------------------------------------------------------------------------


def status_section(plan: Plan, rows: dict[str, dict]) -> list[str]:
    todo = pending(plan, rows)
    wall = sum(r["wall_s"] for r in rows.values()) / 3600
    if todo:
        head = (
            f"**Partial results.** {len(rows)} runs finished ({wall:.1f} h of compute on a shared 2-core CPU, one thread per run); "
            f"{len(todo)} more are pending in the `{plan.name}` plan now (seed runs of an arm are added once its learning-rate sweep "
            "has finished, so this count grows). Every cell below without runs says *not run yet*. Resume with one worker per "
            "free core (workers claim runs, so they never run the same one):"
        )
    else:
        head = (
            f"**The `{plan.name}` plan is complete**: {len(rows)} runs ({wall:.1f} h of compute on a shared 2-core CPU, one thread "
            "per run). Cells marked *not in this plan* belong to the `gpu` plan (the full grid, longer training, every rank and "
            "task for every arm), which has not run: it needs a GPU. The commands:"
        )
    out = [
        "## Status",
        "",
        head,
        "",
        "```",
        f"for i in 1 2; do nohup nice -n 19 env OMP_NUM_THREADS=1 python -m experiments.quality_v2 --plan {plan.name} --render "
        "> experiments/results/quality_v2/run-$i.log 2>&1 & done",
        "python -m experiments.quality_v2.render      # this page and the plots, from experiments/results/quality_v2/runs.jsonl",
        "```",
        "",
    ]
    by_stage: dict[str, list[int]] = {}
    for stage in plan.stages:
        wanted = stage.runs(rows)
        by_stage[stage.name] = [sum(r.run_id in rows for r in wanted), len(wanted)]
    out += table(
        ["stage (priority order)", "question", "finished / wanted now"],
        [[s.name, s.question, f"{d} / {w}"] for s, (d, w) in zip(plan.stages, by_stage.values())],
    )
    if todo:
        out += ["", f"Next: `{todo[0][1].run_id}`."]
    return out + [""]


def planned(plan: Plan, task: str, *cells: tuple[str, int]) -> bool:
    return all(plan.covers(task, arm, r) for arm, r in cells)


def q1_section(groups, task: str, plan: Plan) -> tuple[list[str], list[tuple[str, str, str]]]:
    name = {"A": "task A (personal facts)", "B": "task B (style without instruction)"}[task]
    kinds = {"A": [("one fact", lambda k: k == "one fact"), ("two facts", lambda k: k == "two facts")], "B": []}[task]
    extra = {"A": [], "B": ["style", "correct"]}[task]
    header = (
        ["arm", "rank", "lr", "seeds", "eval score [95% CI]", "per seed"]
        + [k for k, _ in kinds]
        + extra
        + ["eval loss (nats/token)", "val score"]
    )
    n_loss = loss_prompts(groups, task)
    lines = []
    for arm in ["base", "system-prompt"] + TRAINED:
        for r in [0] if ARMS[arm][0] is None else RANKS:
            cell = chosen(groups, task, arm, r)
            if not cell.rows:
                missing = NOT_RUN if plan.covers(task, arm, r) else NOT_PLANNED
                lines.append([arm, str(r or "-"), "", "0", missing] + [""] * (len(kinds) + len(extra) + 3))
                continue
            loss = cell.metric("eval_loss")
            val = cell.metric("val_score")
            lines.append(
                [arm, str(r or "-"), f"{cell.lr:g}" if cell.lr else "-", str(len(cell.seeds)), fmt(cell.estimate()), cell.per_seed()]
                + [fmt(cell.estimate(where=w)) for _, w in kinds]
                + [fmt(cell.estimate(k)) for k in extra]
                + [loss_estimate(cell, n_loss) or (f"{np.mean(loss):.3f}" if loss else ""), f"{np.mean(val):.2f}" if val else ""]
            )
    out = [f"### Q1, {name}", ""] + table(header, lines) + [""]
    if n_loss:
        out += [
            f"The eval loss is teacher-forced on the reference answers of the first {n_loss} eval prompts (per-token mean, CI over prompts).",
            "",
        ]
    else:
        out += [
            "The eval loss is the teacher-forced loss on the reference answers of every eval prompt; these runs kept its mean only, so it has no CI.",
            "",
        ]
    diffs, verdicts = [], []

    def difference(label: str, rank: str, cp: Cell, ca: Cell, is_planned: bool) -> stats.Estimate | None:
        d = stats.paired_difference(cp.items(), ca.items()) if cp.rows and ca.rows else None
        shared = str(len(set(cp.seeds) & set(ca.seeds)))
        if not is_planned:
            diffs.append([label, rank, NOT_PLANNED, "", "", "", shared])
        else:
            loss = loss_gap(cp, ca)
            loss_text = fmt(loss, 3) if loss is not None or not (cp.rows and ca.rows) else "no CI (per-run loss only)"
            diffs.append([label, rank, fmt(d), seed_differences(cp, ca), loss_text, seed_loss_differences(cp, ca), shared])
        return d

    loss_verdicts = []
    for r in RANKS:
        for p, a in PAIRS:
            cp, ca = chosen(groups, task, p, r), chosen(groups, task, a, r)
            is_planned = planned(plan, task, (p, r), (a, r))
            d = difference(f"{p} - {a}", str(r), cp, ca, is_planned)
            shared = len(set(cp.seeds) & set(ca.seeds))
            if r != 16:
                continue
            if not is_planned:
                verdicts.append((f"{task}: {p} is worse than {a} at rank {r} (score)", NOT_PLANNED, ""))
                loss_verdicts.append((f"{task}: {p}'s eval loss is higher than {a}'s at rank {r}", NOT_PLANNED, ""))
                continue
            verdicts.append((f"{task}: {p} is worse than {a} at rank {r} (score)", *verdict_difference(d, shared)))
            loss_verdicts.append((f"{task}: {p}'s eval loss is higher than {a}'s at rank {r}", *loss_verdict(cp, ca)))
    for p, a in PAIRS:  # does the prefill-only arm at a high rank match the all-token arm at a low one?
        difference(
            f"{p} r64 - {a} r4", "64 vs 4", chosen(groups, task, p, 64), chosen(groups, task, a, 4), planned(plan, task, (p, 64), (a, 4))
        )
    verdicts += loss_verdicts
    sp = chosen(groups, task, "system-prompt", 0)
    for arm in ("LoRA-P", "LoRA"):
        c = chosen(groups, task, arm, 16)
        d = difference(f"{arm} - system-prompt", "16", c, sp, True)
        if arm == "LoRA-P":
            v, why = verdict_difference(d, len(set(c.seeds) & set(sp.seeds)), worse_is_claim=False)
            verdicts.append((f"{task}: LoRA-P (r16) beats the same information in the system prompt (Q3)", v, why))
    out += [
        "Paired differences (same prompts, same users; CI over shared seeds and prompts) of the eval score and of the "
        "teacher-forced eval loss on the reference answers (nats/token; higher is worse"
        + ("; task B's over the first 128 eval prompts on the CPU plan" if task == "B" else "")
        + "):",
        "",
    ]
    header = ["difference", "rank", "score [95% CI]", "score per seed", "eval loss [95% CI]", "eval loss per seed", "shared seeds"]
    out += table(header, diffs) + [""]
    for p, a in PAIRS:
        if not planned(plan, task, (p, 4), (a, 4), (p, 64), (a, 64)):
            verdicts.append((f"{task}: a higher rank closes the {p} vs {a} score gap (r4 -> r64)", NOT_PLANNED, ""))
            verdicts.append((f"{task}: a higher rank closes the {p} vs {a} eval-loss gap (r4 -> r64)", NOT_PLANNED, ""))
            continue
        v, why = rank_verdict(groups, task, p, a)
        verdicts.append((f"{task}: a higher rank closes the {p} vs {a} score gap (r4 -> r64)", v, why))
        v, why = rank_verdict(groups, task, p, a, loss=True)
        verdicts.append((f"{task}: a higher rank closes the {p} vs {a} eval-loss gap (r4 -> r64)", v, why))
    return out, verdicts


def rank_verdict(groups, task: str, p: str, a: str, loss: bool = False) -> tuple[str, str]:
    """Does the ``p - a`` gap (score, or eval loss with ``loss``) shrink from rank 4 to rank 64? Needs a gap at rank 4.

    The change of the gap is bootstrapped at two levels like every difference: the seeds both ranks and
    arms share (the same seed is the same user and data), then the prompts. A score gap of a worse ``p`` is
    negative and closes upwards; a loss gap is positive and closes downwards.
    """
    cells = {r: (chosen(groups, task, p, r), chosen(groups, task, a, r)) for r in (4, 64)}
    if not all(cp.rows and ca.rows for cp, ca in cells.values()):
        return "not run yet", f"needs {p} and {a} at ranks 4 and 64"
    shared = sorted(set.intersection(*(set(c.seeds) for pair in cells.values() for c in pair)))
    if not shared:
        return "not run yet", f"{p} and {a} share no seed at ranks 4 and 64"
    if loss:
        items = [loss_items(c) for pair in cells.values() for c in pair]
        if any(x is None for x in items):
            return "inconclusive at this scale", "these runs kept the mean eval loss only (no per-prompt losses), so it has no CI"
        n = min(len(v[s]) for x in items for v in x for s in shared)  # every cell scored the same prompts; B's curves a prefix
        (np4, tok), (na4, _), (np64, _), (na64, _) = items
        gaps = {4: {s: np4[s][:n] - na4[s][:n] for s in shared}, 64: {s: np64[s][:n] - na64[s][:n] for s in shared}}
        tokens = {s: tok[s][:n] for s in shared}  # the same reference answers at every rank
        gap4, gap64 = (stats.two_level_ratio(gaps[r], tokens) for r in (4, 64))
        change = stats.two_level_ratio({s: gaps[64][s] - gaps[4][s] for s in shared}, tokens)
        digits = 3

        def level(x):  # the arm's own loss per token at one rank: which arm moved
            return sum(x[0][s][:n].sum() for s in shared) / sum(x[1][s][:n].sum() for s in shared)

        moved = f"; {p} {level(items[0]):.3f} -> {level(items[2]):.3f}, {a} {level(items[1]):.3f} -> {level(items[3]):.3f}"
    else:
        gaps = {}
        for r, (cp, ca) in cells.items():
            scores_p, scores_a = cp.items(), ca.items()
            gaps[r] = {s: np.asarray(scores_p[s], dtype=float) - np.asarray(scores_a[s], dtype=float) for s in shared}
        gap4, gap64 = stats.two_level_mean(gaps[4]), stats.two_level_mean(gaps[64])
        change = stats.paired_difference(gaps[64], gaps[4])
        digits, moved = 2, ""
    why = f"gap r4 {gap4.fmt(digits)}, r64 {gap64.fmt(digits)}, change {change.fmt(digits)} ({len(shared)} seed(s){moved})"
    if len(shared) < 3:
        return "inconclusive at this scale", why + "; fewer than 3 seeds"
    untuned = [
        f"{arm} r{r} (seed 0: lr {lr:g} validates {val:.2f}, the lr used {used:.2f})"
        for arm, r, lr, val, used in better_lrs(groups, task, (p, a), (4, 64))
    ]
    if untuned:
        return (
            "inconclusive at this scale",
            why + "; the lr these seeds ran at is not the best on validation (its sweep is unfinished) at " + ", ".join(untuned),
        )
    # a worse p: a negative score gap that closes upwards, or a positive loss gap that closes downwards
    has_gap, shrinks, grows = (gap4.low > 0, change.high < 0, change.low > 0) if loss else (gap4.high < 0, change.low > 0, change.high < 0)
    if not has_gap:
        worse = "higher" if loss else "worse"
        return (
            "inconclusive at this scale",
            why + f"; {p} is not established as {worse} at rank 4 (CI includes 0), so there is no gap to close",
        )
    side = ("below", "above") if loss else ("above", "below")
    if shrinks:
        closed = "; at rank 64 the CI of the gap includes 0" if gap64.low <= 0 <= gap64.high else ""
        return "supported", why + f"; the gap shrinks (CI of the change {side[0]} 0){closed}"
    if grows:
        return "not supported", why + f"; the gap grows (CI of the change {side[1]} 0)"
    return "inconclusive at this scale", why + "; the CI of the change includes 0"


def better_lrs(groups, task: str, arms: tuple[str, ...], ranks: tuple[int, ...]) -> list[tuple[str, int, float, float, float]]:
    """(arm, rank, lr, its seed-0 val score, the used lr's seed-0 val score) where another lr validates better on seed 0."""
    out = []
    for arm in arms:
        for r in ranks:
            cell = chosen(groups, task, arm, r)
            used = next((x["metrics"]["val_score"] for x in cell.rows if x["seed"] == 0), None)
            if used is None:
                continue
            for (t, a, rr, lr), rows in groups.items():
                val = next((x["metrics"]["val_score"] for x in rows if x["seed"] == 0), None)
                if (t, a, rr) == (task, arm, r) and lr != cell.lr and val is not None and val > used:
                    out.append((arm, r, lr, val, used))
    return out


def sweep_section(groups) -> list[str]:
    lines, edges = [], []
    for (task, arm, r, lr), rows in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2], kv[0][3])):
        if ARMS[arm][0] is None:
            continue
        seed0 = next((x for x in rows if x["seed"] == 0), None)
        if seed0 is None:
            continue
        m = seed0["metrics"]
        best = chosen(groups, task, arm, r).lr == lr
        tried = sorted(k[3] for k in groups if k[:3] == (task, arm, r))
        edge = best and len(tried) >= 3 and lr in (tried[0], tried[-1])
        if edge:
            edges.append(f"{task} {arm} r{r} ({lr:g})")
        val_loss = f"{m['val_loss']:.3f}" if isinstance(m.get("val_loss"), float) else "-"
        lines.append(
            [
                task,
                arm,
                str(r),
                f"{lr:g}" + (" (chosen, at the edge)" if edge else " (chosen)" if best else ""),
                f"{m['val_score']:.2f}",
                val_loss,
                f"{m['score']:.2f}",
                f"{seed0['wall_s'] / 60:.1f}",
            ]
        )
    out = [
        "## Learning-rate sweeps (seed 0)",
        "",
        "The lr of every arm is chosen on the validation split (its own prompts and phrasings), never on eval.",
        "",
    ]
    return (
        out
        + (table(["task", "arm", "rank", "lr", "val score", "val loss", "eval score", "wall min"], lines) if lines else [NOT_RUN])
        + [""]
        + (
            [f"Chosen at the edge of its sweep (a better lr may lie beyond it): {', '.join(edges)}.", ""]
            if edges
            else ["Every chosen lr lies inside its sweep.", ""]
            if lines
            else []
        )
    )


def q2_section(groups, plan: Plan) -> tuple[list[str], list[tuple[str, str, str]]]:
    lines = []
    for arm in ["base"] + TRAINED:
        r = 0 if arm == "base" else 16
        cell = chosen(groups, "C", arm, r)
        missing = NOT_RUN if plan.covers("C", arm, r) else NOT_PLANNED
        lines.append(
            [arm, f"{cell.lr:g}" if cell.lr else "-", str(len(cell.seeds)), fmt(cell.estimate()) if cell.rows else missing, cell.per_seed()]
        )
    out = ["### Q2, task C (GRPO on arithmetic word problems)", ""]
    out += ["Greedy accuracy on 256 held-out problems (templates and names never seen in training); the reward curves in the plot are "
            "the *sampled* training rollouts (temperature 1), a different quantity, plotted separately.", ""]  # fmt: skip
    out += table(["arm", "lr", "seeds", "greedy eval accuracy [95% CI]", "per seed"], lines) + [""]
    signal = []
    for arm in TRAINED:
        rewards = [v for r in chosen(groups, "C", arm, 16).rows for _, v in r["metrics"].get("train", {}).get("reward", [])]
        if rewards:
            signal.append(f"{arm} {np.mean(rewards):.3f} (zero on {np.mean(np.asarray(rewards) == 0):.0%} of steps)")
    if signal:
        out += [
            "Mean sampled training reward: " + ", ".join(signal) + ". A step whose rollouts all score 0 has no GRPO advantage "
            "and so no gradient: at this reward many rollout groups carry no signal, which limits what 20 steps can learn.",
            "",
        ]
    base = chosen(groups, "C", "base", 0)
    diffs, gains = [], {}
    for first, second in [(p, a) for p, a in PAIRS] + [(arm, "base") for arm in TRAINED]:
        c1, c2 = chosen(groups, "C", first, 16), (base if second == "base" else chosen(groups, "C", second, 16))
        if not planned(plan, "C", (first, 16)) or (second != "base" and not planned(plan, "C", (second, 16))):
            continue
        d = stats.paired_difference(c1.items(), c2.items()) if c1.rows and c2.rows else None
        if second == "base":
            gains[first] = d
        diffs.append([f"{first} - {second}", fmt(d), seed_differences(c1, c2), str(len(set(c1.seeds) & set(c2.seeds)))])
    out += ["Paired differences of greedy eval accuracy (same problems; CI over shared seeds and problems):", ""]
    out += table(["difference", "mean [95% CI]", "per seed", "shared seeds"], diffs) + [""]
    verdicts = []
    for p, a in PAIRS:
        cp, ca = chosen(groups, "C", p, 16), chosen(groups, "C", a, 16)
        if not planned(plan, "C", (p, 16), (a, 16)):
            verdicts.append((f"C: GRPO {p} reaches parity with {a}", NOT_PLANNED, ""))
            continue
        if not (cp.rows and ca.rows):
            verdicts.append((f"C: GRPO {p} reaches parity with {a}", "not run yet", "the GRPO runs have not finished"))
            continue
        d = stats.paired_difference(cp.items(), ca.items())
        n = len(set(cp.seeds) & set(ca.seeds))
        why = f"difference {d.fmt()} ({n} seeds, parity margin +-{PARITY_MARGIN})"
        learned = any(g is not None and g.low > 0 for g in (gains.get(p), gains.get(a)))
        if n < 3:
            v = "inconclusive at this scale"
        elif not learned:  # parity between two arms that learned nothing says nothing about PreFT
            v, why = (
                "inconclusive at this scale",
                why + "; neither arm's gain over the base model is established (its CI includes 0), so parity says nothing yet",
            )
        elif -PARITY_MARGIN <= d.low and d.high <= PARITY_MARGIN:
            v = "supported"
        elif d.high < -PARITY_MARGIN or d.low > PARITY_MARGIN:
            v = "not supported"
        else:
            v = "inconclusive at this scale"
        verdicts.append((f"C: GRPO {p} reaches parity with {a}", v, why))
    return out, verdicts


def q3_section(groups, plan: Plan) -> tuple[list[str], list[tuple[str, str, str]]]:
    out = ["### Q3, where PreFT breaks: output length and drift from the base model (task B)", ""]
    out += [
        "Teacher-forced along the reference answers of task B's eval prompts (the first 128 on the CPU plan; 10 to ~215 tokens): the NLL per token in each "
        "output segment, and the KL(adapted || base) per token, the drift that a prefill-only adapter can cause only through the "
        "prompt's KV. The system-prompt row is the base model with the user's style written into the system prompt. "
        "Training lists had at most 20 items (~120 tokens), so the last segment also measures length generalisation, equally for every arm.",
        "",
    ]
    header = (
        ["arm (rank 16)"]
        + [f"NLL {s}" for s in SEGMENTS]
        + [f"KL {s}" for s in SEGMENTS]
        + [f"score, answers {b} tokens" for b in LENGTH_BUCKETS]
    )
    lines, verdicts = [], []
    for arm in ["base", "system-prompt"] + TRAINED:
        cell = chosen(groups, "B", arm, 0 if ARMS[arm][0] is None else 16)
        if not cell.rows or "segments" not in cell.rows[0]["metrics"]:
            r = 0 if ARMS[arm][0] is None else 16
            lines.append([arm] + [NOT_RUN if plan.covers("B", arm, r) else NOT_PLANNED] + [""] * (len(header) - 2))
            continue
        row = [arm]
        for key in ("nll", "kl"):
            for s in SEGMENTS:
                row.append(fmt(segment_estimate(cell, s, key), 3))
        for lo, hi in LENGTH_BUCKETS.values():
            e = length_estimate(cell, lo, hi)
            row.append("no such prompts" if e is None else e.fmt())
        lines.append(row)
    out += table(header, lines) + [""]
    for p, a in PAIRS:
        cp, ca = chosen(groups, "B", p, 16), chosen(groups, "B", a, 16)
        if not planned(plan, "B", (p, 16), (a, 16)):
            verdicts.append((f"B: {p}'s NLL gap to {a} grows along the output", NOT_PLANNED, ""))
            continue
        if not (cp.rows and ca.rows):
            verdicts.append((f"B: {p}'s NLL gap to {a} grows along the output", "not run yet", "needs both arms on task B"))
            continue
        first, last = segment_gap(cp, ca, "1-16"), segment_gap(cp, ca, "65-256")
        n = len(set(cp.seeds) & set(ca.seeds))
        why = f"NLL gap ({p} - {a}) tokens 1-16: {fmt(first, 3)}, tokens 65-256: {fmt(last, 3)} ({n} seed(s))"
        if first is None or last is None or n < 3:
            v = "inconclusive at this scale"
        elif last.low > first.high:
            v = "supported"
        elif last.high < first.low:
            v = "not supported"
        else:
            v = "inconclusive at this scale"
        verdicts.append((f"B: {p}'s NLL gap to {a} grows along the output", v, why + ("" if n >= 3 else "; fewer than 3 seeds")))
    return out, verdicts


def segment_estimate(cell: Cell, segment: str, key: str) -> stats.Estimate | None:
    num, den = segment_sums(cell, segment, key)
    return stats.bootstrap_ratio(num, den)


def segment_sums(cell: Cell, segment: str, key: str, seeds: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per item, the segment's summed ``key`` and token count, summed over ``seeds``."""
    rows = [r for r in cell.rows if seeds is None or r["seed"] in seeds]
    num = np.sum([r["metrics"]["segments"][segment][key] for r in rows], axis=0)
    den = np.sum([r["metrics"]["segments"][segment]["tokens"] for r in rows], axis=0)
    return num, den


def segment_gap(cp: Cell, ca: Cell, segment: str) -> stats.Estimate | None:
    """``cp - ca`` NLL per token in one output segment, over shared seeds and prompts (two-level)."""
    shared = sorted(set(cp.seeds) & set(ca.seeds))
    if not shared:
        return None
    seg_p = {r["seed"]: r["metrics"]["segments"][segment] for r in cp.rows}
    seg_a = {r["seed"]: r["metrics"]["segments"][segment] for r in ca.rows}
    diff = {s: np.asarray(seg_p[s]["nll"], dtype=float) - np.asarray(seg_a[s]["nll"], dtype=float) for s in shared}
    return stats.two_level_ratio(diff, {s: seg_p[s]["tokens"] for s in shared})


def loss_items(cell: Cell) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]] | None:
    """Per seed, each eval prompt's summed NLL and token count, or None where runs kept only the mean.

    Task A records them as ``eval_nll``; task B's length segments (which cover its whole answers) add up to them.
    """
    if cell.rows and all("eval_nll" in r["metrics"] for r in cell.rows):
        return (
            {r["seed"]: np.asarray(r["metrics"]["eval_nll"]["nll"], dtype=float) for r in cell.rows},
            {r["seed"]: np.asarray(r["metrics"]["eval_nll"]["tokens"], dtype=float) for r in cell.rows},
        )
    if cell.rows and all("segments" in r["metrics"] for r in cell.rows):
        return tuple(
            {r["seed"]: np.sum([r["metrics"]["segments"][g][key] for g in SEGMENTS], axis=0).astype(float) for r in cell.rows}
            for key in ("nll", "tokens")
        )  # type: ignore[return-value]
    return None


def loss_prompts(groups, task: str) -> int | None:
    """How many eval prompts every run of ``task`` with per-prompt losses has them for (the same first prompts in all)."""
    sizes = [len(loss_items(Cell(rows))[1][rows[0]["seed"]]) for (t, *_), rows in groups.items() if t == task and loss_items(Cell(rows))]
    return min(sizes) if sizes else None


def loss_estimate(cell: Cell, n: int | None) -> str | None:
    """The cell's eval loss per token over the first ``n`` prompts (seeds pooled), with its CI over prompts."""
    e = loss_value(cell, n)
    return None if e is None else fmt(e, 3)


def loss_value(cell: Cell, n: int | None) -> stats.Estimate | None:
    items = loss_items(cell)
    if items is None or not n:
        return None
    return stats.bootstrap_ratio(np.sum([v[:n] for v in items[0].values()], axis=0), np.sum([v[:n] for v in items[1].values()], axis=0))


def loss_gap(cp: Cell, ca: Cell) -> stats.Estimate | None:
    """``cp - ca`` eval loss per token over shared seeds and prompts (two-level), or None without per-prompt losses."""
    lp, la = loss_items(cp), loss_items(ca)
    shared = sorted(set(cp.seeds) & set(ca.seeds))
    if lp is None or la is None or not shared:
        return None
    n = min(
        len(x) for x in (*lp[0].values(), *la[0].values())
    )  # the no-adapter arms scored every eval prompt, the CPU plan's B curves the first 128
    return stats.two_level_ratio({s: lp[0][s][:n] - la[0][s][:n] for s in shared}, {s: lp[1][s][:n] for s in shared})


def seed_loss_differences(cp: Cell, ca: Cell) -> str:
    """``cp - ca`` eval loss per shared seed, over the prompts both scored."""
    lp, la = loss_items(cp), loss_items(ca)
    if lp is not None and la is not None:
        n = min(len(x) for x in (*lp[0].values(), *la[0].values()))
        a = {s: lp[0][s][:n].sum() / lp[1][s][:n].sum() for s in lp[0]}
        b = {s: la[0][s][:n].sum() / la[1][s][:n].sum() for s in la[0]}
    else:
        a = {r["seed"]: r["metrics"].get("eval_loss") for r in cp.rows}
        b = {r["seed"]: r["metrics"].get("eval_loss") for r in ca.rows}
    return " / ".join(f"{a[s] - b[s]:+.3f}" for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None)


def loss_verdict(cp: Cell, ca: Cell) -> tuple[str, str]:
    if not (cp.rows and ca.rows):
        return "not run yet", "the runs this claim needs have not finished"
    shared = len(set(cp.seeds) & set(ca.seeds))
    gap = loss_gap(cp, ca)
    if gap is None:
        return "inconclusive at this scale", (
            f"per seed {seed_loss_differences(cp, ca)} nats/token; these runs kept the mean eval loss only (no per-prompt losses), so it has no CI"
        )
    return verdict_difference(gap, shared, worse_is_claim=False, digits=3)


def length_estimate(cell: Cell, lo: int, hi: int) -> stats.Estimate | None:
    ref = np.asarray(cell.rows[0]["metrics"]["reference_tokens"])
    keep = (ref >= lo) & (ref <= hi)
    values = stats.item_means(cell.items())[keep]
    return stats.bootstrap_mean(values) if values.size else None


def runs_section(rows: dict[str, dict]) -> list[str]:
    """Every finished run with its wall time (a shared 2-core CPU: read the times as what this machine did, under load)."""
    lines = [[r["run_id"], r.get("finished", ""), f"{r['wall_s'] / 60:.1f}", f"{r['metrics']['score']:.3f}"] for r in rows.values()]
    out = [
        "## Finished runs",
        "",
        "Wall time of each run on the shared 2-core CPU (one thread, `nice -n 19`, other jobs running); a run that resumed "
        "from a checkpoint after its worker was killed counts only its last piece.",
        "",
    ]
    return out + (table(["run", "finished (UTC)", "wall min", "eval score"], lines) if lines else [NOT_RUN]) + [""]


# ---- plots -----------------------------------------------------------------------------------------


def plots(groups, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    colors = {"LoRA": "C0", "LoRA-P": "C1", "DiReFT": "C2", "DiReFT-P": "C3", "system-prompt": "C4", "base": "C7"}

    def save(fig, name):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(name)

    # loss curves
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, task in zip(axes, "AB"):
        for arm in TRAINED:
            cell = chosen(groups, task, arm, 16)
            for key, style in (("loss", "-"), ("eval_loss", "--")):
                series = [r["metrics"]["train"][key] for r in cell.rows if r["metrics"].get("train", {}).get(key)]
                if series:
                    band(ax, series, colors[arm], f"{arm} {'train' if key == 'loss' else 'val'} (lr {cell.lr:g})", style)
        ax.set(title=f"task {task}, rank 16: loss (band: min-max over seeds)", xlabel="step", ylabel="nats/token", yscale="log")
        legend(ax)
    save(fig, "loss.png")

    # accuracy vs rank (tasks A and B), and task A's eval loss vs rank: where the prefill-only gap shows
    def by_rank(ax, estimates: list[tuple[int, stats.Estimate | None]], arm: str, title: str, ylabel: str) -> None:
        pts = [(r, e) for r, e in estimates if e is not None]
        if pts:
            es = [e for _, e in pts]
            low, high = [e.mean - e.low for e in es], [e.high - e.mean for e in es]
            ax.errorbar([r for r, _ in pts], [e.mean for e in es], yerr=[low, high], color=colors[arm], marker="o", capsize=3, label=arm)
        ax.set(title=title, xlabel="rank", ylabel=ylabel)
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_xticks(RANKS, [str(r) for r in RANKS])

    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    n_loss = loss_prompts(groups, "A")
    for arm in TRAINED:
        loss = [(r, loss_value(chosen(groups, "A", arm, r), n_loss)) for r in RANKS]
        by_rank(axes[2], loss, arm, "task A: eval loss vs rank (95% CI; lower is better)", "nats/token")
        for ax, task in zip(axes, "AB"):
            cells = [(r, chosen(groups, task, arm, r)) for r in RANKS]
            by_rank(
                ax,
                [(r, c.estimate() if c.rows else None) for r, c in cells],
                arm,
                f"task {task}: eval score vs rank (95% CI)",
                "eval score",
            )
    for ax, task in zip(axes, "AB"):
        for arm in ("base", "system-prompt"):
            cell = chosen(groups, task, arm, 0)
            if cell.rows:
                ax.axhline(cell.estimate().mean, color=colors[arm], ls=":", label=arm)
        ax.set_ylim(-0.02, 1.02)
    for ax in axes:
        legend(ax)
    save(fig, "rank.png")
    # reward curves (sampled rollouts), and the greedy eval accuracy they should lead to
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    labels, means, errs, cols = [], [], [[], []], []
    for arm in ["base"] + TRAINED:
        cell = chosen(groups, "C", arm, 0 if arm == "base" else 16)
        series = [running_mean(r["metrics"]["train"]["reward"]) for r in cell.rows if r["metrics"].get("train", {}).get("reward")]
        if series:
            band(ax, series, colors[arm], f"{arm} (lr {cell.lr:g}, {len(series)} seed{'s' * (len(series) > 1)})", "-")
        e = cell.estimate() if cell.rows else None
        if e is not None:
            (
                labels.append(arm),
                means.append(e.mean),
                errs[0].append(e.mean - e.low),
                errs[1].append(e.high - e.mean),
                cols.append(colors[arm]),
            )
    ax.set(
        title=f"task C: GRPO training reward (sampled, T=1; mean of {REWARD_WINDOW} steps; band: seeds)",
        xlabel="step",
        ylabel="mean reward",
    )
    legend(ax)
    bars.bar(labels, means, yerr=errs, color=cols, capsize=4)
    bars.set(
        title="task C: greedy eval accuracy (95% CI)",
        ylabel="accuracy",
        ylim=(0, max([m + e for m, e in zip(means, errs[1])] + [0.1]) * 1.15),
    )
    save(fig, "reward.png")
    # length map and KL curve
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for arm in ["base", "system-prompt"] + TRAINED:
        cell = chosen(groups, "B", arm, 0 if ARMS[arm][0] is None else 16)
        if not cell.rows or "segments" not in cell.rows[0]["metrics"]:
            continue
        es = [segment_estimate(cell, s, "nll") for s in SEGMENTS]
        axes[0].errorbar(
            range(3),
            [e.mean for e in es],
            yerr=[[e.mean - e.low for e in es], [e.high - e.mean for e in es]],
            color=colors[arm],
            marker="o",
            capsize=3,
            label=arm,
        )
        ls = [length_estimate(cell, lo, hi) for lo, hi in LENGTH_BUCKETS.values()]
        axes[1].errorbar(
            range(3),
            [e.mean if e else math.nan for e in ls],
            yerr=[[e.mean - e.low if e else 0 for e in ls], [e.high - e.mean if e else 0 for e in ls]],
            color=colors[arm],
            marker="o",
            capsize=3,
            label=arm,
        )
        kls = [r["metrics"]["kl_by_position"] for r in cell.rows]
        counts = [r["metrics"].get("tokens_by_position") or [1] * len(k) for r, k in zip(cell.rows, kls)]
        n = min(map(len, kls))
        kl, count = np.mean([k[:n] for k in kls], axis=0), np.mean([c[:n] for c in counts], axis=0)
        if arm != "base":  # the base model's KL to itself is 0
            # Positions in doubling bins (1, 2, 3-4, 5-8, ...), each the token-weighted mean: few answers reach the far
            # positions, so single positions there are noise.
            edges = [e for e in (1, 2, 3, 5, 9, 17, 33, 65, 129, 257) if e <= n] + [n + 1]
            bins = [(a, b) for a, b in zip(edges, edges[1:]) if b > a]
            centres = [np.sqrt(a * (b - 1)) for a, b in bins]
            means = [float(np.average(kl[a - 1 : b - 1], weights=count[a - 1 : b - 1] + 1e-12)) for a, b in bins]
            axes[2].plot(centres, means, "o-", color=colors[arm], label=arm)
    axes[0].set(title="task B: NLL per output segment (95% CI)", xlabel="completion tokens", ylabel="nats/token")
    axes[1].set(title="task B: eval score by answer length (95% CI)", xlabel="reference answer tokens", ylabel="score", ylim=(-0.02, 1.02))
    for ax, labels in ((axes[0], list(SEGMENTS)), (axes[1], list(LENGTH_BUCKETS))):
        ax.set_xticks(range(3), labels)
    axes[2].set(
        title="task B: KL(model || base) along the completion",
        xlabel="completion position (doubling bins)",
        ylabel="nats/token",
        xscale="log",
        yscale="log",
    )
    for ax in axes:
        legend(ax)
    save(fig, "length_kl.png")
    return made


def legend(ax) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty panel (no runs yet) gets no legend
        ax.legend(fontsize=7)


def band(ax, series: list[list[list[float]]], color: str, label: str, style: str) -> None:
    """Mean line and min-max band of ``[[step, value], ...]`` curves over seeds (steps as in the first seed)."""
    steps = [s for s, _ in series[0]]
    values = [[v for _, v in s][: len(steps)] for s in series if len(s) >= len(steps)]
    arr = np.asarray(values)
    ax.plot(steps, arr.mean(0), style, color=color, label=label)
    if len(values) > 1:
        ax.fill_between(steps, arr.min(0), arr.max(0), color=color, alpha=0.2)


# ---- the page --------------------------------------------------------------------------------------

INTRO = """# Quality: the PreFT claims on SmolLM2-135M-Instruct

This page is generated by `python -m experiments.quality_v2.render` from
`experiments/results/quality_v2/runs.jsonl` (one JSON line per finished run: config, seed, metrics,
wall time); the study is run, or resumed, by `python -m experiments.quality_v2 --plan cpu|gpu`.
Do not edit it by hand.

The paper (PreFT, arXiv 2605.14217) claims: (Q1) with SFT, a prefill-only adapter (the adapter acts on the
prompt only) is worse than the same adapter on every token at equal rank, and a higher rank closes the
gap; (Q2) with GRPO, prefill-only reaches parity. Q3 is ours: where does PreFT break along the output, and
is it better than simply writing the same information into the system prompt of the base model?
"""

METHOD = """## Method

- **Base model**: SmolLM2-135M-Instruct, preft's built-in default, float32 on CPU. Adapters are trained with
  `preft.train` (SFT and GRPO trainers, in-process) and evaluated by greedy generation through preft's
  serving engine (`preft.engine.LLM`, adapters loaded from their saved folders, as a user serves them).
- **Arms**: LoRA (all tokens) vs LoRA-P (prefill only), all linear modules, alpha = 2r; DiReFT vs DiReFT-P on
  every layer's residual stream; *base* (no adapter: the floor); *system-prompt* (no adapter, the user's facts
  or style written into the system prompt: the cheapest alternative a user has).
- **Tasks** (`experiments/quality_v2/tasks.py`, seeded generators; the seed also picks the user):
  - **A, personal facts**: eight private facts per user; no fact is ever in the prompt. Training: 480 rows in
    5 phrasings per fact x 3 wrappers, two-fact questions in 2 templates, and capitals (to keep ordinary
    answers ordinary). Eval: 256 prompts (96 one-fact in 3 held-out phrasings x 4 held-out wrappers, 160 two-fact in 2
    held-out templates); score = every asked fact named in the answer.
  - **B, style without instruction**: every answer is a bullet list ending with the user's sign-off, and the
    prompt never asks for it. Questions with programmatic answers (multiples, counting, spelling, capitals);
    eval: 256 prompts in held-out templates (and words and countries), 1 to 40 items (up to ~215 tokens);
    score = style (bullets + sign-off) and content both right.
  - **C, arithmetic word problems for GRPO**: reward 1 when the last number of the answer is right; eval: 256
    problems in 6 held-out templates with held-out names.
  - Train, validation and eval are disjoint by construction and asserted (`tasks.check_disjoint`: no held-out
    prompt occurs in training, and no training prompt is an instance of a held-out template).
- **Learning rate**: per arm a sweep of 3 values on seed 0, chosen on the validation split (a winner at an end of
  the sweep adds the next lr past that end, at the sweep's ratio, up to twice); then seeds 1 and 2 at that lr. **CIs**: 95% percentile bootstrap (10,000 resamples). A difference between arms is paired (every arm
  answers the same prompts) and two-level: each resample draws the seeds both arms share, then the prompts, so its
  CI covers training noise as well as prompt sampling; the verdicts rest on these. So are the loss
  differences (per-token means: resampled per-prompt NLL sums over resampled token counts), the per-segment NLL
  gaps and the change of a gap with rank (the same seed is the same user and data at every rank). A single arm's
  CI resamples prompts only (items averaged over seeds); the *per seed* columns and the loss bands show the
  seed-to-seed spread. With 3 seeds the seed level is coarse: read the per-seed
  columns too.
"""

APPENDIX = """## Appendix: the earlier toy study

The first quality study ran on a 1.7M-parameter toy base model (now `experiments/toy_base/`, code in
`experiments/quality.py`, results in `experiments/results/{sft,grpo,length}.*`). It cannot carry the paper's
claims: one learning rate for every arm, half its eval rows appeared verbatim in training, half the eval set
was a floor no arm could learn, GRPO parity rested on 2 seeds, and its length study measured memorisation.
Its conclusions are withdrawn; this page replaces them.
"""


def render(rows: dict[str, dict], plan: Plan, out_dir: Path = RESULTS, doc: Path = DOC) -> str:
    groups = index(rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = plots(groups, out_dir) if rows else []
    rel = Path("..") / out_dir
    lines = [INTRO] + status_section(plan, rows) + [METHOD, "### Cuts of the CPU plan, and why", ""]
    lines += [f"- {c}" for c in PLANS["cpu"]().cuts] + [""]
    verdicts: list[tuple[str, str, str]] = []
    lines += ["## Results", ""]
    for task in "AB":
        section, v = q1_section(groups, task, plan)
        lines += section
        verdicts += v
    section, v = q2_section(groups, plan)
    lines += section
    verdicts += v
    section, v = q3_section(groups, plan)
    lines += section
    verdicts += v
    for name, caption in (
        ("loss.png", "Loss curves"),
        ("rank.png", "Eval score vs rank, and task A's eval loss vs rank"),
        ("reward.png", "GRPO reward"),
        ("length_kl.png", "Length map and KL"),
    ):
        if name in images:
            lines += [f"![{caption}]({rel / name})", ""]
    lines += [
        "## Verdicts",
        "",
        "Computed from the CIs above by fixed rules (`experiments/quality_v2/render.py`); a negative or inconclusive result is a result.",
        "",
    ]
    lines += table(["claim", "verdict", "why"], [[c, f"**{v}**", w] for c, v, w in verdicts]) + [""]
    lines += sweep_section(groups) + runs_section(rows) + [APPENDIX]
    text = "\n".join(lines)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Render docs/quality.md and the plots from the study's runs.jsonl")
    p.add_argument("--runs", type=Path, default=RUNS_FILE)
    p.add_argument("--plan", choices=sorted(PLANS), default="cpu", help="the plan whose progress the page reports")
    p.add_argument("--doc", type=Path, default=DOC)
    p.add_argument("--out", type=Path, default=RESULTS, help="folder of the plots")
    args = p.parse_args(argv)
    render(load_rows(args.runs), PLANS[args.plan](), args.out, args.doc)
    print(f"wrote {args.doc} and plots in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
