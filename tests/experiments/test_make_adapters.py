"""experiments/make_adapters.py at tiny size: it ships prefill-only adapters that reproduce the recorded answers."""

from __future__ import annotations

import json

from experiments import make_adapters
from experiments.common import greedy_answers, load_base


def test_make_adapters_smoke_ships_adapters_that_reproduce_the_demo_answers(tiny_checkpoint, tmp_path):
    base = tiny_checkpoint("llama")
    out, results = tmp_path / "adapters", tmp_path / "results"
    argv = ["--base", str(base), "--out", str(out), "--results", str(results), "--steps", "2", "--rows", "16", "--names", "alice", "carol"]
    assert make_adapters.main(argv) == 0
    report = json.loads((results / "demo.json").read_text())
    assert set(report["answers"]) == {"base", "alice", "carol"}
    model, tokenizer = load_base(base)
    questions = [[{"role": "user", "content": q}] for q in make_adapters.DEMO_QUESTIONS]
    for name, kind in (("alice", "lora"), ("carol", "direft")):
        adapter = model.load_adapter(str(out / name), name)
        assert adapter.kind == kind and adapter.policy == "prefill"
        assert greedy_answers(model, tokenizer, questions, name) == report["answers"][name]
    assert "| alice | lora-P |" in (results / "demo.md").read_text()
