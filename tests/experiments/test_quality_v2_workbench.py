"""The quality study's workbench on the real model (SmolLM2-135M-Instruct, float32, CPU): its teacher-forced losses."""

from __future__ import annotations

import pytest

from experiments.quality_v2 import tasks

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def bench(smollm2_dir):
    from experiments.quality_v2.workbench import Workbench

    return Workbench(str(smollm2_dir), device="cpu")


def test_per_prompt_losses_do_not_depend_on_batching_and_add_up_to_the_mean(bench):
    items = tasks.build("A", 0).splits["eval"][:6]
    nll, tokens = bench.item_nll(items, None, "all")
    alone = [bench.item_nll([item], None, "all") for item in items]
    assert tokens == [t[0] for _, t in alone] and all(t > 0 for t in tokens)
    assert nll == pytest.approx([n[0] for n, _ in alone], rel=1e-4)  # padding in a batch of 6 changes nothing
    assert bench.mean_nll(items, None, "all") == pytest.approx(sum(nll) / sum(tokens), rel=1e-9)
    data = tasks.build("A", 0)
    with_facts, _ = bench.item_nll(items, None, "all", data.system_prompt)
    assert sum(with_facts) < sum(nll)  # the user's facts in the system prompt make the right answers likelier


def test_curves_of_the_base_model_have_no_drift_and_their_segments_add_up(bench):
    items = tasks.build("B", 0).splits["eval"][:3]
    out = bench.curves(items, None, "all", None)
    assert max(out["kl_by_position"]) == pytest.approx(0.0, abs=1e-5)  # the base model against itself
    nll, tokens = bench.item_nll(items, None, "all")
    seg_nll = sum(sum(s["nll"]) for s in out["segments"].values())
    seg_tokens = sum(sum(s["tokens"]) for s in out["segments"].values())
    assert seg_tokens == sum(tokens)  # the segments cover every answer token (answers are under 256 tokens)
    assert seg_nll == pytest.approx(sum(nll), rel=1e-3) and out["eval_loss"] == pytest.approx(sum(nll) / sum(tokens), rel=1e-3)
