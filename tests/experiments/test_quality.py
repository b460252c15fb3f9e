"""Smoke versions of the quality study (tiny random model, a few steps): the same code as the full runs."""

from __future__ import annotations

import json
import math

import pytest

from experiments import quality
from experiments.common import completion_position_nll, load_base

SMALL = ["--seeds", "0", "--steps", "2", "--train-rows", "16", "--eval-rows", "6", "--batch-size", "4"]


def test_sft_study_smoke_covers_every_arm(tiny_checkpoint, tmp_path):
    argv = ["sft", "--base", str(tiny_checkpoint("llama")), "--out", str(tmp_path), "--ranks", "1", "4", *SMALL]
    assert quality.main(argv) == 0
    result = json.loads((tmp_path / "sft.json").read_text())
    arms = {(r["method"], r["rank"]) for r in result["runs"]}
    assert arms == {(m, r) for m in quality.METHODS for r in (1, 4)}
    assert all(math.isfinite(r["eval_loss"]) for r in result["runs"])
    table = (tmp_path / "sft.md").read_text()
    assert all(f"| {m} |" in table for m in quality.METHODS)
    assert (tmp_path / "sft.png").stat().st_size > 1000


def test_length_study_smoke_scores_every_eval_row(tiny_checkpoint, tmp_path):
    argv = ["length", "--base", str(tiny_checkpoint("llama")), "--out", str(tmp_path), "--ranks", "2", "--max-words", "4"]
    argv += ["--max-new-tokens", "6", "--max-positions", "12", *SMALL]
    assert quality.main(argv) == 0
    result = json.loads((tmp_path / "length.json").read_text())
    assert len(result["runs"]) == 4  # short/long training x LoRA/LoRA-P
    for run in result["runs"]:
        assert len(run["exact"]) == len(result["words"]) == 6
        assert run["count"][0] == 6 and all(c >= 0 for c in run["count"])
    assert (tmp_path / "length.png").stat().st_size > 1000


def test_position_nll_prefill_equals_all_on_the_first_answer_token_only(tiny_checkpoint):
    """PreFT semantics in the length study's scorer: the first answer token comes from the adapted last prompt
    position under both policies; later tokens differ because decode drops the prefill adapter."""
    from preft.adapters import LoraConfig
    from preft.tiny import random_adapter

    model, tokenizer = load_base(tiny_checkpoint("llama"))
    model.add_adapter("u", random_adapter(model.config, LoraConfig(r=4, target_modules="all-linear"), std=0.3))
    rows = quality.synthetic.long_format_rows("upper", 4, seed=0, min_words=2, max_words=3)
    pre_sum, pre_count = completion_position_nll(model, tokenizer, rows, "u", "prefill", 8)
    all_sum, all_count = completion_position_nll(model, tokenizer, rows, "u", "all", 8)
    base_sum, _ = completion_position_nll(model, tokenizer, rows, None, "prefill", 8)
    assert pre_count == all_count and pre_count[0] == 4
    assert pre_sum[0] == pytest.approx(all_sum[0], rel=1e-5)
    assert pre_sum[0] != pytest.approx(base_sum[0], rel=1e-3)
    assert all(p != pytest.approx(a, rel=1e-3) for p, a in zip(pre_sum[1:], all_sum[1:]))


def test_grpo_study_smoke_records_a_reward_curve_per_policy(tiny_checkpoint, tmp_path):
    argv = ["grpo", "--base", str(tiny_checkpoint("llama")), "--out", str(tmp_path), "--seeds", "0", "--steps", "3", "--train-rows", "8"]
    argv += ["--eval-rows", "4", "--num-generations", "2", "--grpo-prompts", "1", "--grpo-max-tokens", "3"]
    assert quality.main(argv) == 0
    result = json.loads((tmp_path / "grpo.json").read_text())
    assert {r["policy"] for r in result["runs"]} == {"all", "prefill"}
    for run in result["runs"]:
        assert [s for s, _ in run["reward"]] == [1, 2, 3] and all(0.0 <= v <= 1.0 for _, v in run["reward"])
    assert (tmp_path / "grpo.png").stat().st_size > 1000
