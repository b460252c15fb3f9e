"""The quality study's machinery (experiments/quality_v2): data, statistics, resumable runner, renderer.

No model is loaded: the runner is driven by a stub run function and the renderer by fake rows.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from experiments.quality_v2 import render, stats, tasks
from experiments.quality_v2.plan import CPU_BUDGET, PLANS, Plan, Run, Stage, best_lr, sweep_then_seeds
from experiments.quality_v2.runner import execute, load_rows, pending


@pytest.mark.parametrize("task", ["A", "B", "C"])
def test_generators_are_deterministic_per_seed_and_differ_across_users(task):
    first, again, other = tasks.build(task, 0), tasks.build(task, 0), tasks.build(task, 1)
    assert first.splits == again.splits
    assert first.splits["train"] != other.splits["train"]
    # held-out prompts are the same for every user: arms and seeds are paired item by item
    assert [i.prompt for i in first.splits["eval"]] == [i.prompt for i in other.splits["eval"]]


@pytest.mark.parametrize("task", ["A", "B", "C"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_held_out_prompts_and_templates_never_occur_in_training(task, seed):
    data = tasks.build(task, seed)  # build() asserts; check the property again directly
    train = {i.prompt.lower() for i in data.splits["train"]}
    for split in ("val", "eval"):
        assert not train & {i.prompt.lower() for i in data.splits[split]}
    assert not data.templates["train"] & data.templates["eval"]
    assert not data.templates["train"] & data.templates["val"]


def test_check_disjoint_catches_a_leaked_prompt_and_a_leaked_template():
    data = tasks.build("A", 0)
    leaked = tasks.TaskData("A", 0, {**data.splits, "train": data.splits["train"] + [data.splits["eval"][0]]}, None, data.templates)
    with pytest.raises(tasks.LeakError, match="eval prompts also in training"):
        tasks.check_disjoint(leaked)
    rng = random.Random(0)
    eval_template_row = tasks._b_item("count", "eval", rng, "Cheers, Max!", 5)  # an eval template with training's values
    b = tasks.build("B", 0)
    leaked = tasks.TaskData("B", 0, {**b.splits, "train": b.splits["train"] + [eval_template_row]}, None, b.templates)
    with pytest.raises(tasks.LeakError, match="template"):
        tasks.check_disjoint(leaked)


@pytest.mark.parametrize("task", ["A", "B", "C"])
def test_every_task_has_at_least_256_distinct_eval_prompts(task):
    data = tasks.build(task, 0)
    assert len({i.prompt for i in data.splits["eval"]}) >= 256
    assert len(data.splits["val"]) >= 32


def test_task_b_eval_answers_span_every_length_segment():
    items = [len(i.answer.splitlines()) - 2 for i in tasks.build("B", 0).splits["eval"]]  # list items (a few tokens each)
    assert min(items) == 1 and 30 <= max(items) <= tasks.B_MAX_ITEMS["eval"]
    assert sum(n <= 3 for n in items) > 25 and sum(n >= 20 for n in items) > 25  # segments 1-16 ... 65-256 all populated


def test_scores_accept_right_answers_and_reject_wrong_ones():
    a = tasks.build("A", 0)
    item = next(i for i in a.splits["eval"] if i.kind == "two facts")
    assert tasks.score(a, item, item.answer)["score"] == 1.0
    assert tasks.score(a, item, item.answer.split(".")[0] + ".")["score"] == 0.0  # only one of the two facts
    b = tasks.build("B", 2)
    item = next(i for i in b.splits["eval"] if i.kind == "count")
    assert tasks.score(b, item, item.answer) == {"score": 1.0, "style": 1.0, "correct": 1.0}
    no_signoff = item.answer.rsplit("\n\n", 1)[0]
    assert tasks.score(b, item, no_signoff) == {"score": 0.0, "style": 0.0, "correct": 1.0}
    c = tasks.build("C", 0)
    item = c.splits["eval"][0]
    assert tasks.score(c, item, f"So the answer is {item.answer}.")["score"] == 1.0
    assert tasks.score(c, item, f"{int(item.answer) + 1}")["score"] == 0.0


def test_bootstrap_ci_of_a_known_case():
    # 0/1 scores with mean 0.5 over 400 items: the 95% CI is about +-1.96 * sqrt(0.25 / 400) = +-0.049
    e = stats.bootstrap_mean([0, 1] * 200)
    assert e.mean == 0.5 and e.n == 400
    assert 0.44 < e.low < 0.46 and 0.54 < e.high < 0.56
    assert stats.bootstrap_mean([1.0] * 50).low == 1.0  # no spread, no interval
    assert stats.bootstrap_mean([0, 1] * 200) == e  # seeded: the same interval every time


def test_paired_difference_cancels_item_difficulty():
    rng = np.random.default_rng(0)
    difficulty = rng.random(300)
    a = {0: list(difficulty + 0.1)}
    b = {0: list(difficulty)}
    d = stats.paired_difference(a, b)
    assert abs(d.mean - 0.1) < 1e-9 and d.high - d.low < 1e-9  # an unpaired CI would be ~0.07 wide
    assert stats.paired_difference(a, {1: list(difficulty)}) is None  # no shared seed


def test_paired_difference_interval_covers_seed_to_seed_noise():
    """Seeds that disagree in sign (+0.14 / -0.14 / +0.14, as a collapsed GRPO run gives) must widen the interval
    well beyond what the items alone would give; seeds that agree leave it narrow."""
    rng = np.random.default_rng(1)
    base = rng.random(256)
    agree = {s: list(base + 0.05) for s in range(3)}
    split = {s: list(base + shift) for s, shift in enumerate([0.14, -0.14, 0.14])}
    ref = {s: list(base) for s in range(3)}
    narrow, wide = stats.paired_difference(agree, ref), stats.paired_difference(split, ref)
    assert narrow.high - narrow.low < 1e-9 and abs(narrow.mean - 0.05) < 1e-9
    assert wide.low < -0.1 and wide.high > 0.1  # an items-only CI of the seed-averaged difference would be a point
    assert stats.paired_difference(split, ref) == wide  # seeded


def test_bootstrap_ratio_is_a_per_token_mean():
    e = stats.bootstrap_ratio([2.0, 6.0, 0.0], [1, 3, 0])
    assert e.mean == 2.0 and e.n == 2


def _stub_plan() -> Plan:
    return Plan(
        "stub", CPU_BUDGET, [Stage("sweep", "Q1", sweep_then_seeds("A", ["LoRA", "LoRA-P"], 16, (1e-3, 3e-3), CPU_BUDGET, "s"))], []
    )


def _stub_metrics(run: Run) -> dict:
    return {
        "val_score": 0.5 + run.lr * 10 * (run.arm == "LoRA"),
        "val_loss": 1.0,
        "score": 0.5,
        "items": {"score": [1, 0]},
        "kinds": ["x", "x"],
    }


def test_runner_skips_finished_runs_and_resumes_where_it_stopped(tmp_path):
    path, calls = tmp_path / "runs.jsonl", []

    def run_fn(run):
        calls.append(run.run_id)
        return _stub_metrics(run)

    assert execute(_stub_plan(), run_fn, path, max_runs=3) == 3
    assert len(load_rows(path)) == 3
    with path.open("a") as f:
        f.write('{"run_id": "torn')  # a kill mid-write leaves a torn line: ignored
    first = list(calls)
    # the rest: the 4 sweep runs, then seeds 1 and 2 of each arm at its best lr (unlocked by the sweep)
    assert execute(_stub_plan(), run_fn, path) == 5
    assert len(set(calls)) == len(calls) == 8, "no run ran twice"
    assert calls[:3] == first
    rows = load_rows(path)
    assert {r["config"]["lr"] for r in rows.values() if r["config"]["arm"] == "LoRA" and r["seed"] > 0} == {3e-3}
    assert all({"config", "seed", "metrics", "wall_s"} <= set(r) for r in rows.values())
    assert execute(_stub_plan(), run_fn, path) == 0 and not pending(_stub_plan(), rows)


def test_a_run_another_worker_finishes_between_our_read_and_our_claim_is_not_run_again(tmp_path, monkeypatch):
    """The race that ran A/LoRA-P/r64/lr0.0003/s0 twice: the other worker appends its row and releases its claim
    after this worker read runs.jsonl but before it claimed; the claim succeeds, so the row must be re-read."""
    from experiments.quality_v2 import runner
    from experiments.quality_v2.runner import append_row

    path, calls, real_claim = tmp_path / "runs.jsonl", [], runner.claim
    first = pending(_stub_plan(), {})[0][1]

    def claim_after_the_other_worker_finished(run_id, claims):
        if run_id == first.run_id and not calls:
            append_row(
                {
                    "run_id": run_id,
                    "stage": first.stage,
                    "config": first.config(),
                    "seed": 0,
                    "wall_s": 1.0,
                    "metrics": _stub_metrics(first),
                },
                path,
            )
        return real_claim(run_id, claims)

    def run_fn(run):
        calls.append(run.run_id)
        return _stub_metrics(run)

    monkeypatch.setattr(runner, "claim", claim_after_the_other_worker_finished)
    execute(_stub_plan(), run_fn, path, max_runs=1)
    assert calls and first.run_id not in calls
    assert [json.loads(line)["run_id"] for line in path.read_text().splitlines()].count(first.run_id) == 1
    assert not list((tmp_path / "runs.jsonl.claims").glob("*.pid"))  # the claim it took back was released


def test_a_failing_run_is_skipped_and_the_study_goes_on(tmp_path):
    path = tmp_path / "runs.jsonl"

    def run_fn(run):
        if run.arm == "LoRA" and run.lr == 1e-3:
            raise RuntimeError("boom")
        return _stub_metrics(run)

    assert execute(_stub_plan(), run_fn, path) == 5  # 3 sweep runs + LoRA-P's 2 seeds; LoRA waits for its sweep
    assert best_lr(load_rows(path), Run("A", "LoRA", 0, 16, budget=CPU_BUDGET), (1e-3, 3e-3)) is None


def _fake_row(task: str, arm: str, seed: int, r: int, lr: float, p: float, rng) -> dict:
    data = tasks.build(task, seed)
    items = data.splits["eval"]
    scores = [int(rng.random() < p) for _ in items]
    run = Run(task, arm, seed, r, lr, "fake", CPU_BUDGET)
    seg = {s: {"nll": [1.0] * len(items), "kl": [0.1] * len(items), "tokens": [4] * len(items)} for s in ("1-16", "17-64", "65-256")}
    metrics = {
        "score": float(np.mean(scores)), "val_score": p, "val_loss": 1.0, "eval_loss": 1.0,
        "items": {"score": scores, **({"style": scores, "correct": scores} if task == "B" else {})},
        "kinds": [i.kind for i in items], "reference_tokens": [len(i.answer) // 4 for i in items],
        "segments": seg, "kl_by_position": [0.1] * 10, "nll_by_position": [1.0] * 10,
        "train": {"loss": [[1, 2.0], [2, 1.0]], "eval_loss": [[2, 1.2]], "reward": [[1, 0.2], [2, 0.4]]},
    }  # fmt: skip
    if not run.trains:
        run = Run(task, arm, seed, stage="fake")
    return {"run_id": run.run_id, "stage": "fake", "config": run.config(), "seed": seed, "wall_s": 60.0, "metrics": metrics}


def test_renderer_writes_the_page_and_plots_from_a_small_fake_runs_file(tmp_path):
    rng = random.Random(0)
    rows = [_fake_row("A", "base", s, 0, 0.0, 0.0, rng) for s in range(3)]
    rows += [_fake_row("A", "LoRA", s, 16, 1e-3, 0.9, rng) for s in range(3)]
    rows += [_fake_row("A", "LoRA-P", s, 16, 1e-3, 0.6, rng) for s in range(3)]
    rows += [_fake_row("B", "LoRA-P", 0, 16, 1e-3, 0.5, rng), _fake_row("C", "LoRA", 0, 16, 1e-4, 0.3, rng)]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc, out = tmp_path / "quality.md", tmp_path / "plots"
    assert render.main(["--runs", str(runs), "--doc", str(doc), "--out", str(out)]) == 0
    text = doc.read_text()
    assert "Partial results" in text and "not run yet" in text
    assert "| A: LoRA-P is worse than LoRA at rank 16 (score) | **supported** |" in text  # 0.6 vs 0.9 over 304 paired prompts
    assert "| A: DiReFT-P is worse than DiReFT at rank 16 (score) | **not run yet**" in text  # in the cpu plan, no runs yet
    assert "| B: DiReFT-P is worse than DiReFT at rank 16 (score) | **not in this plan" in text  # only the gpu plan has it
    assert {p.name for p in out.glob("*.png")} == {"loss.png", "rank.png", "reward.png", "length_kl.png"}


def test_both_plans_start_with_the_headline_runs():
    for name in ("cpu", "gpu"):
        first_trained = next(r for _, r in pending(PLANS[name](), {}) if r.trains)
        assert (first_trained.task, first_trained.arm, first_trained.seed) == ("A", "LoRA", 0)


@pytest.mark.parametrize("name", ["cpu", "gpu"])
def test_every_trained_cell_of_both_plans_starts_with_a_sweep_of_at_least_3_lrs(name):
    plan = PLANS[name]()
    cells: dict[tuple, set[float]] = {}
    for _, run in pending(plan, {}):  # nothing finished: only the seed-0 sweeps are wanted
        if run.trains:
            assert run.seed == 0
            cells.setdefault((run.task, run.arm, run.r), set()).add(run.lr)
    assert cells and all(len(lrs) >= 3 for lrs in cells.values()), cells
    assert {c for c in cells if c[1] == "LoRA-P" and c[0] == "A"} == {("A", "LoRA-P", r) for r in (4, 16, 64)}


@pytest.mark.parametrize(
    ("val_by_lr", "then_wanted", "seeds_at"),
    [
        ({3e-4: 0.4, 1e-3: 0.6, 3e-3: 0.5}, [], 1e-3),  # the winner inside: no extension, seeds at once
        ({3e-4: 0.4, 1e-3: 0.5, 3e-3: 0.6, 9e-3: 0.55}, [9e-3], 3e-3),  # top edge won: 9e-3 tried, lost
        ({3e-4: 0.7, 1e-3: 0.5, 3e-3: 0.4, 9e-5: 0.6}, [9e-5], 3e-4),  # bottom edge won: 9e-5 tried, lost
        ({3e-4: 0.4, 1e-3: 0.5, 3e-3: 0.6, 9e-3: 0.7, 2.7e-2: 0.8}, [9e-3, 2.7e-2], 2.7e-2),  # out of extensions: stands
    ],
)
def test_a_sweep_whose_winner_is_at_an_end_is_extended_past_it_before_any_seed_runs(val_by_lr, then_wanted, seeds_at):
    stage = sweep_then_seeds("A", ["LoRA"], 16, (1e-3, 3e-4, 3e-3), CPU_BUDGET, "s")
    rows = {}
    wanted = [(r.lr, r.seed) for r in stage(rows)]
    assert wanted == [(1e-3, 0), (3e-4, 0), (3e-3, 0)]  # nothing finished: the planned sweep only
    for lr in (1e-3, 3e-4, 3e-3, *then_wanted):  # finish the sweep run by run, as workers would
        assert (lr, 0) in [(r.lr, r.seed) for r in stage(rows)]
        assert not [r for r in stage(rows) if r.seed > 0], "seeds wait for the sweep, extensions included"
        run = Run("A", "LoRA", 0, 16, lr, "s", CPU_BUDGET)
        rows[run.run_id] = {"run_id": run.run_id, "metrics": {"val_score": val_by_lr[lr], "val_loss": 1.0}}
    final = stage(rows)
    assert sorted(r.lr for r in final if r.seed == 0) == sorted((1e-3, 3e-4, 3e-3, *then_wanted))
    assert {(r.lr, r.seed) for r in final if r.seed > 0} == {(seeds_at, 1), (seeds_at, 2)}


def test_two_workers_never_take_the_same_run_and_a_dead_workers_claim_is_taken_over(tmp_path):
    from experiments.quality_v2.runner import claim, release

    claims = tmp_path / "claims"
    assert claim("A/LoRA/r16", claims) and claim("A/LoRA/r16", claims)  # this process: its own claim holds
    other = tmp_path / "other"
    (other).mkdir()
    (other / "A_LoRA_r16.pid").write_text("1")  # pid 1 is alive: another worker's run
    assert not claim("A/LoRA/r16", other)
    (other / "A_LoRA_r16.pid").write_text(str(2**22 + 7))  # no such process: its worker died
    assert claim("A/LoRA/r16", other) and (other / "A_LoRA_r16.pid").read_text() == str(__import__("os").getpid())
    release("A/LoRA/r16", claims)
    assert not (claims / "A_LoRA_r16.pid").exists()


@pytest.mark.parametrize(
    ("low", "high", "seeds", "expected"),
    [
        (-0.08, -0.02, 3, "supported"),  # CI below 0: the first arm is worse
        (0.01, 0.05, 3, "not supported"),  # CI above 0: the first arm is better
        (-0.05, 0.02, 3, "inconclusive at this scale"),
        (-0.08, -0.02, 2, "inconclusive at this scale"),  # too few seeds, whatever the CI says
    ],
)
def test_verdict_rules_for_a_paired_difference(low, high, seeds, expected):
    verdict, why = render.verdict_difference(stats.Estimate((low + high) / 2, low, high, 256), seeds)
    assert verdict == expected
    assert f"{seeds} seed(s)" in why
    if expected == "inconclusive at this scale" and seeds >= 3:
        assert "rules out a gap larger than 0.05" in why  # the informative half of a null result


@pytest.mark.parametrize(("base_p", "expected"), [(0.1, "supported"), (0.6, "inconclusive at this scale")])
def test_grpo_parity_counts_only_when_an_arm_learned_something(tmp_path, base_p, expected):
    """LoRA and LoRA-P answer every problem alike (parity); that supports the claim only if GRPO beat the base model."""
    rows = []
    for s in range(3):
        rows.append(_fake_row("C", "base", s, 0, 0.0, base_p, random.Random(100 + s)))
        rows += [_fake_row("C", arm, s, 16, 1e-4, 0.6, random.Random(s)) for arm in ("LoRA", "LoRA-P")]
    runs = tmp_path / "runs.jsonl"
    runs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = tmp_path / "quality.md"
    assert render.main(["--runs", str(runs), "--doc", str(doc), "--out", str(tmp_path / "plots")]) == 0
    text = doc.read_text()
    assert f"| C: GRPO LoRA-P reaches parity with LoRA | **{expected}** |" in text
    assert ("parity says nothing yet" in text) == (expected != "supported")
    assert "| LoRA-P - LoRA | 0.00 [0.00, 0.00] | +0.00 / +0.00 / +0.00 | 3 |" in text  # per-seed differences shown


def test_reward_running_mean_is_trailing_and_keeps_the_steps():
    series = [[1, 0.0], [2, 0.5], [3, 1.0], [4, 0.0]]
    assert render.running_mean(series, window=2) == [[1, 0.0], [2, 0.25], [3, 0.75], [4, 0.5]]


@pytest.mark.parametrize(("best_lr", "edge"), [(3e-3, True), (1e-3, False)])
def test_sweep_table_flags_an_lr_chosen_at_the_edge_of_its_sweep(best_lr, edge):
    rng = random.Random(0)
    rows = [_fake_row("A", "LoRA", 0, 16, lr, 0.9 if lr == best_lr else 0.5, rng) for lr in (3e-4, 1e-3, 3e-3)]
    text = "\n".join(render.sweep_section(render.index({r["run_id"]: r for r in rows})))
    assert (f"| {best_lr:g} (chosen, at the edge) |" in text) == edge
    assert ("Every chosen lr lies inside its sweep." in text) == (not edge)


def test_two_level_ratio_weights_tokens_and_covers_seed_noise():
    tokens = {s: [1.0, 3.0] * 100 for s in range(3)}
    same = stats.two_level_ratio({s: [0.1, 0.3] * 100 for s in range(3)}, tokens)
    assert abs(same.mean - 0.1) < 1e-12 and same.high - same.low < 1e-9  # 0.1 nats on every token, every seed
    split = stats.two_level_ratio({s: [x * sign for x in [0.2, 0.6] * 100] for s, sign in enumerate([1, -1, 1])}, tokens)
    assert split.low < -0.1 and split.high > 0.1  # seeds disagree in sign: the interval spans both
    one = stats.two_level_ratio({0: [2.0, 6.0, 0.0]}, {0: [1, 3, 0]})
    assert one.mean == 2.0 and one.n == 2  # one seed: the items-only per-token mean; items without tokens drop out


def _rows_for_rank_study(gap_r4: float, gap_r64: float) -> list[dict]:
    rows = []
    for s in range(3):
        for r, gap in ((4, gap_r4), (64, gap_r64)):
            rows.append(_fake_row("A", "LoRA", s, r, 1e-3, 0.9, random.Random(s)))
            rows.append(_fake_row("A", "LoRA-P", s, r, 1e-3, 0.9, random.Random(s)))
            p_items = rows[-1]["metrics"]["items"]["score"]
            for i in range(int(gap * len(p_items))):  # the prefill-only arm misses a fixed share of the prompts
                p_items[i] = 0
    return rows


@pytest.mark.parametrize(
    ("gap_r4", "gap_r64", "expected", "reason"),
    [
        (0.3, 0.0, "supported", "the gap shrinks"),
        (0.0, 0.3, "inconclusive at this scale", "there is no gap to close"),  # nothing to close at rank 4
        (0.1, 0.3, "not supported", "the gap grows"),
    ],
)
def test_rank_verdict_needs_a_gap_at_rank_4_and_a_change_whose_ci_excludes_0(gap_r4, gap_r64, expected, reason):
    groups = render.index({r["run_id"]: r for r in _rows_for_rank_study(gap_r4, gap_r64)})
    verdict, why = render.rank_verdict(groups, "A", "LoRA-P", "LoRA")
    assert verdict == expected and reason in why and "(3 seed(s))" in why


def _with_eval_nll(row: dict, per_token: float) -> dict:
    n = len(row["metrics"]["items"]["score"])
    row["metrics"]["eval_nll"] = {"nll": [per_token * 5] * n, "tokens": [5] * n}
    row["metrics"]["eval_loss"] = per_token
    return row


def test_loss_verdict_uses_per_prompt_losses_and_says_when_a_run_kept_only_the_mean():
    rng = random.Random(0)
    lora = render.Cell([_with_eval_nll(_fake_row("A", "LoRA", s, 16, 1e-3, 0.9, rng), 0.05) for s in range(3)])
    lora_p = render.Cell([_with_eval_nll(_fake_row("A", "LoRA-P", s, 16, 1e-3, 0.9, rng), 0.10 + 0.01 * s) for s in range(3)])
    verdict, why = render.loss_verdict(lora_p, lora)
    assert verdict == "supported" and "difference 0.060 [0.050, 0.070]" in why  # higher loss: the claim holds
    assert render.seed_loss_differences(lora_p, lora) == "+0.050 / +0.060 / +0.070"
    for row in lora_p.rows + lora.rows:  # runs from before per-prompt losses were recorded (A has no length segments)
        del row["metrics"]["eval_nll"], row["metrics"]["segments"]
    verdict, why = render.loss_verdict(lora_p, lora)
    assert verdict == "inconclusive at this scale" and "no CI" in why and "+0.050 / +0.060 / +0.070" in why


@pytest.mark.parametrize(
    ("gap_r4", "gap_r64", "expected", "reason"),
    [
        (0.05, 0.0, "supported", "the gap shrinks (CI of the change below 0); at rank 64 the CI of the gap includes 0"),
        (0.0, 0.05, "inconclusive at this scale", "LoRA-P is not established as higher at rank 4"),
        (0.02, 0.06, "not supported", "the gap grows (CI of the change above 0)"),
    ],
)
def test_rank_verdict_on_eval_loss_closes_downwards(gap_r4, gap_r64, expected, reason):
    """The loss gap of a worse prefill-only arm is positive: it closes when the change r4 -> r64 is below 0."""
    rows = _rows_for_rank_study(0.0, 0.0)  # equal scores: only the losses differ
    for row in rows:
        c = row["config"]
        gap = {4: gap_r4, 64: gap_r64}[c["r"]] if c["arm"] == "LoRA-P" else 0.0
        _with_eval_nll(row, 0.05 + gap + 0.005 * (row["seed"] - 1) * (c["arm"] == "LoRA-P"))  # seeds disagree a little
    groups = render.index({r["run_id"]: r for r in rows})
    verdict, why = render.rank_verdict(groups, "A", "LoRA-P", "LoRA", loss=True)
    assert verdict == expected and reason in why, why
    assert f"(3 seed(s); LoRA-P {0.05 + gap_r4:.3f} -> {0.05 + gap_r64:.3f}, LoRA 0.050 -> 0.050)" in why  # which arm moved
    assert render.rank_verdict(groups, "A", "LoRA-P", "LoRA")[0] == "inconclusive at this scale"  # the scores tie


def test_backfill_stores_per_prompt_losses_only_when_they_reproduce_the_recorded_mean(tmp_path):
    from experiments.quality_v2 import backfill

    rows = [_fake_row("A", "base", s, 0, 0.0, 0.0, random.Random(s)) for s in range(2)]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"torn')  # a torn last line is dropped, not kept
    assert [r["run_id"] for r in backfill.wanted(load_rows(path))] == ["A/base/s0", "A/base/s1"]

    class Bench:  # stands in for the workbench: every prompt's answer has 4 tokens at ``per_token`` nats each
        def __init__(self, per_token):
            self.per_token = per_token

        def item_nll(self, items, adapter, policy, system=None):
            return [4 * self.per_token] * len(items), [4] * len(items)

    assert backfill.backfill_one(Bench(1.5), rows[0], retrain=False, tolerance=0.02) is None  # recorded 1.0: not the same run
    fields = backfill.backfill_one(Bench(1.0), rows[0], retrain=False, tolerance=0.02)
    assert fields["eval_nll"]["backfill"] == {"recorded_eval_loss": 1.0, "recomputed_eval_loss": 1.0, "retrained": False}
    backfill.update_row("A/base/s0", fields, path)
    after = load_rows(path)
    assert [r["run_id"] for r in backfill.wanted(after)] == ["A/base/s1"]  # the other row is untouched
    assert after["A/base/s1"] == rows[1] and len(after["A/base/s0"]["metrics"]["eval_nll"]["nll"]) == len(
        rows[0]["metrics"]["items"]["score"]
    )
    assert render.loss_items(render.Cell([after["A/base/s0"]]))[1][0].sum() == 4 * len(rows[0]["metrics"]["items"]["score"])


def test_rank_verdict_is_undecided_while_another_lr_validates_better_than_the_one_with_seeds():
    rows = _rows_for_rank_study(0.3, 0.0)  # would be "supported" (the gap shrinks)
    check = _fake_row("A", "LoRA-P", 0, 4, 3e-3, 0.9, random.Random(0))
    check["metrics"]["val_score"] = 0.95  # its sweep is unfinished: a seed-0 run beats the lr with 3 seeds (val 0.9)
    groups = render.index({r["run_id"]: r for r in rows + [check]})
    assert render.chosen(groups, "A", "LoRA-P", 4).lr == 1e-3  # the lr with 3 seeds stays the one reported
    verdict, why = render.rank_verdict(groups, "A", "LoRA-P", "LoRA")
    assert verdict == "inconclusive at this scale"
    assert "not the best on validation (its sweep is unfinished) at LoRA-P r4 (seed 0: lr 0.003 validates 0.95, the lr used 0.90)" in why
