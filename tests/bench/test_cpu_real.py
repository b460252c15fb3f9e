"""The real-model CPU benchmark's code path on a tiny model: both sides, both workloads, JSON + markdown + PNG."""

from __future__ import annotations

import json

import torch

from preft.bench import cpu_real


def args_for(model_dir, out_dir) -> list[str]:
    return ["--model", str(model_dir), "--num-requests", "3", "--max-tokens", "6", "--hf-batch-size", "2",
            "--decode-tokens", "3", "--threads", "1", "--output-dir", str(out_dir)]  # fmt: skip


def test_cpu_real_benchmark_writes_side_by_side_results(tiny_checkpoint, tmp_path, monkeypatch):
    def in_process(side, workload, model_dir, argv):  # the children's work, without four interpreter start-ups
        return cpu_real.run_child(side, workload, model_dir, cpu_real.build_parser().parse_args(argv))

    monkeypatch.setattr(cpu_real, "spawn", in_process)
    threads = torch.get_num_threads()
    out = tmp_path / "results"
    try:
        assert cpu_real.main(args_for(tiny_checkpoint("llama"), out)) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads(next(out.glob("*.json")).read_text())
    sides = results["summary"]["sides"]
    for side in ("preft", "transformers"):
        s = sides[side]
        assert s["chat_wall_s"] > 0 and s["chat_output_tok_s"] > 0 and s["load_s"] > 0
        assert s["chat_peak_rss_mb"] >= s["rss_after_load_mb"] > 0
        assert s["decode_b1_tok_s"] > 0 and s["decode_b8_tok_s"] > 0
        run = results["runs"][f"{side}:decode"]
        assert run["decode_b1"]["output_tokens"] == 3 and run["decode_b8"]["output_tokens"] == 8 * 3  # fixed lengths
    chats = [results["runs"][f"{side}:chat"]["chat"]["outputs"] for side in ("preft", "transformers")]
    assert all(len(outs) == 3 and all(1 <= len(o["token_ids"]) <= 6 for o in outs) for outs in chats)
    agreement = results["summary"]["greedy_agreement"]
    assert agreement["num_requests"] == 3 and agreement["exact_matches"] == 3  # float32 greedy on both sides: same tokens
    assert set(results["summary"]["targets"]) == {"chat_wall_s", "chat_peak_rss_mb"}
    assert results["chat_questions"] == list(cpu_real.CHAT_QUESTIONS[:3])
    assert next(out.glob("*.md")).read_text().startswith("# ")
    assert next(out.glob("*.png")).stat().st_size > 0


def test_a_child_process_reports_its_own_run(tiny_checkpoint, tmp_path):
    argv = args_for(tiny_checkpoint("llama"), tmp_path)
    result = cpu_real.spawn("preft", "chat", str(tiny_checkpoint("llama")), argv)
    assert result["side"] == "preft" and result["chat"]["num_requests"] == 3
    assert result["peak_rss_mb"] > 0 and result["kv_blocks"] > 0
