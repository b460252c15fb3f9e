"""experiments/make_adapters.py at tiny size: datasets disjoint by construction, the recorded command trains, the adapters ship."""

from __future__ import annotations

import json

from experiments import make_adapters
from preft.adapters import load_adapter


def test_eval_questions_and_countries_never_appear_in_training():
    for user in make_adapters.USERS.values():
        train = {r["messages"][0]["content"].lower().rstrip("?.") for r in make_adapters.user_rows(user, 480, 0, "train")}
        held_out = {r["messages"][0]["content"].lower().rstrip("?.") for r in make_adapters.user_rows(user, 96, 1, "eval")}
        assert held_out and not train & held_out
        answers = [r["messages"][1]["content"] for r in make_adapters.user_rows(user, 30, 0, "train")]
        assert all(a.startswith(user.greeting) for a in answers)


def test_make_adapters_smoke_trains_ships_and_reports(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama")
    out, results = tmp_path / "adapters", tmp_path / "results"
    argv = ["--base", str(base), "--out", str(out), "--results", str(results), "--data", str(tmp_path / "data")]
    argv += ["--runs", str(tmp_path / "runs"), "--steps", "2", "--rows", "16", "--names", "alice", "bob"]
    assert make_adapters.main(argv) == 0
    report = json.loads((results / "demo.json").read_text())
    assert set(report["answers"]) == {"base", "alice", "bob"} and len(report["answers"]["alice"]) == len(make_adapters.DEMO_QUESTIONS)
    assert report["training"]["alice"]["command"].startswith("preft train sft --model ")
    assert report["training"]["bob"]["cpu_s"] > 0
    for name, kind in (("alice", "lora"), ("bob", "direft")):
        adapter = load_adapter(out / name)
        assert adapter.kind == kind and adapter.config.policy == "prefill"
    assert "| alice |" in (results / "demo.md").read_text()
