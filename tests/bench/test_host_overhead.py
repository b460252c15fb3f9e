"""``preft bench host-overhead`` at a tiny size: the JSON schema, the table, the plot, the before/after."""

from __future__ import annotations

import json

from preft.bench.host_overhead import STAGES, StubModel
from preft.cli import main
from preft.engine import model_runner


def test_host_overhead_writes_json_markdown_and_png_with_every_shape(tmp_path, capsys):
    baseline = tmp_path / "before.json"
    before = [{"step": "decode", "batch": 4, "host_ms_median": 9.0, "host_ms_p90": 9.5}]
    baseline.write_text(json.dumps({"commit": "abc1234", "note": "test", "results": before}))
    out = tmp_path / "ho.json"
    argv = ["bench", "host-overhead", "--json", str(out), "--batches", "1,4", "--mixed-decodes", "3", "--mixed-prefill", "32",
            "--steps", "3", "--warmup", "1", "--repeats", "2", "--baseline", str(baseline), "--device-ms", "20", "--overlap-batch", "4"]  # fmt: skip
    adapter_slots = model_runner.adapter_slots
    assert main(argv) == 0
    assert model_runner.adapter_slots is adapter_slots  # the stage timer is unwrapped afterwards
    report = json.loads(out.read_text())
    assert [(r["step"], r["batch"]) for r in report["results"]] == [("decode", 1), ("decode", 4), ("mixed", 4)]
    for row in report["results"]:
        assert set(row) >= {"step", "batch", "host_ms_median", "host_ms_p90", "breakdown_ms"}
        assert set(row["breakdown_ms"]) == set(STAGES)
        assert 0 < row["host_ms_min"] <= row["host_ms_p10"] <= row["host_ms_median"] <= row["host_ms_p90"]
        assert row["cpu_ms_median"] > 0 and len(row["repeat_medians_ms"]) == 2 and row["steps"] == 6
        assert all(row["breakdown_ms"][stage] > 0 for stage in ("schedule", "prepare", "adapters", "sample"))
        assert sum(row["breakdown_ms"].values()) <= row["host_ms_p90"] * 1.5  # parts of one step, not more
    assert report["baseline"]["commit"] == "abc1234"
    # The speed-up itself is a benchmark figure, not asserted here; what holds by construction: a synchronous step
    # launches and then waits for its own 20 ms device step (sleep never returns early).
    (overlap,) = report["overlap"]
    assert overlap["device_ms"] == 20 and overlap["batch"] == 4
    assert overlap["sync_step_ms"] >= 20 and overlap["async_step_ms"] > 0
    assert overlap["speedup"] == overlap["sync_step_ms"] / overlap["async_step_ms"]
    assert out.with_suffix(".png").stat().st_size > 1000
    table = out.with_suffix(".md").read_text()
    assert "decode" in table and "mixed" in table and "abc1234" in table and "simulated device" in table
    assert "abc1234" in capsys.readouterr().out


def test_the_stub_model_returns_fixed_logits_over_1024_tokens():
    import torch
    from transformers import LlamaConfig

    stub = StubModel(LlamaConfig(), torch.device("cpu"))
    logits = stub.logits(stub(torch.zeros(5, dtype=torch.long))[:3])
    assert logits.shape == (3, 1024) and logits.is_contiguous()
    assert torch.equal(logits[0], logits[2]) and int(logits[0].argmax()) == 70
