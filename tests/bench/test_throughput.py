"""``preft bench`` end to end on the tiny model (CPU, CI-sized), and the step bookkeeping on a fake engine."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from preft.bench.cli import run_benchmark
from preft.bench.throughput import MODES, BenchConfig, make_workload, run_requests

RUN_KEYS = {
    "mode", "num_adapters", "num_requests", "prompt_tokens", "output_tokens", "elapsed_s", "output_tok_s", "total_tok_s",
    "ttft_ms", "tpot_ms", "decode_step_ms", "decode_steps", "decode_batch_p50", "roofline", "engine_stats",
    "ratio_to_base", "ratio_to_lora", "repeats_output_tok_s", "repeats_decode_step_ms_p50",
}  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tiny_checkpoint, tmp_path_factory):
    cfg = BenchConfig(
        model=str(tiny_checkpoint("llama")), num_adapters=[1, 8], num_requests=8, prompt_len="4-8", output_len="6",
        rank=4, max_num_seqs=8, warmup_requests=2, device="cpu", dtype="float32",
    )  # fmt: skip
    out = tmp_path_factory.mktemp("bench")
    results, table = run_benchmark(cfg, peer="off", output_dir=str(out))
    return cfg, results, table, out


def test_smoke_json_has_every_mode_at_every_adapter_count(smoke) -> None:
    cfg, results, _, out = smoke
    on_disk = json.loads(next(out.glob("*.json")).read_text())
    assert on_disk["runs"] == json.loads(json.dumps(results["runs"]))
    assert {(r["mode"], r["num_adapters"]) for r in on_disk["runs"]} == {(m, n) for m in MODES for n in (1, 8)}
    for run in on_disk["runs"]:
        assert RUN_KEYS <= set(run), f"missing {RUN_KEYS - set(run)}"
        assert run["output_tokens"] == 8 * 6, "fixed output lengths (ignore_eos): every request makes exactly 6 tokens"
        assert run["output_tok_s"] > 0 and run["total_tok_s"] > run["output_tok_s"]
        assert set(run["ttft_ms"]) == {"p50", "p99", "mean"} and run["ttft_ms"]["p99"] >= run["ttft_ms"]["p50"] > 0
        assert run["decode_steps"] > 0 and run["decode_step_ms"]["p50"] > 0
    assert {"environment", "roofline_model", "flatness", "config", "peer"} <= set(on_disk)
    assert on_disk["environment"]["device"] == "cpu" and on_disk["roofline_model"]["bandwidth_GBps"] > 0


def test_smoke_ratios_are_computed_within_the_run(smoke) -> None:
    _, results, _, _ = smoke
    at = {(r["mode"], r["num_adapters"]): r for r in results["runs"]}
    for (_mode, n), run in at.items():
        assert run["ratio_to_base"] == pytest.approx(run["output_tok_s"] / at[("base", n)]["output_tok_s"])
        assert run["ratio_to_lora"] == pytest.approx(run["output_tok_s"] / at[("lora", n)]["output_tok_s"])
    assert at[("base", 8)]["ratio_to_base"] == pytest.approx(1.0)


def test_smoke_writes_a_png_plot_and_prints_a_table(smoke) -> None:
    _, results, table, out = smoke
    png = next(out.glob("*.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert str(png) == results["files"]["png"]
    for mode in MODES:
        assert f" {mode} " in table
    assert "roofline: base decode step" in table


def test_lora_p_adapters_are_registered_with_policy_prefill_and_lora_with_all(smoke, tiny_checkpoint) -> None:
    # The registry gives lora and lora-p the same weights; only the policy differs (checked on the configs it builds).
    from preft.bench.throughput import adapter_config

    assert adapter_config("lora", 4, ["q_proj"]).policy == "all"
    assert adapter_config("lora-p", 4, ["q_proj"]).policy == "prefill"
    assert adapter_config("direft-p", 4, ["q_proj"]).kind == "direft"
    assert adapter_config("loreft-p", 4, ["q_proj"]).kind == "loreft"
    assert adapter_config("base", 4, ["q_proj"]) is None


# ---- step bookkeeping on a fake engine -----------------------------------------------------------


@dataclass
class _Completion:
    token_ids: list[int]

    @property
    def num_tokens(self) -> int:  # as the engine's CompletionDelta
        return len(self.token_ids)


@dataclass
class _Output:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[_Completion]
    finished: bool


@dataclass
class FakeEngine:
    """Prefills every waiting request in one step (emitting its first token), then decodes one token per step."""

    max_num_seqs: int = 2
    waiting: list = field(default_factory=list)
    running: dict = field(default_factory=dict)
    prompt_tokens: int = 0

    def add_request(self, request_id, prompt, params, adapter=None):
        self.waiting.append((request_id, prompt, params.max_tokens))

    def has_unfinished_requests(self):
        return bool(self.waiting or self.running)

    def stats(self):
        return {"prompt_tokens": self.prompt_tokens, "num_running": len(self.running), "num_waiting": len(self.waiting)}

    def step(self):
        outputs = []
        for rid, (prompt, want, tokens) in list(self.running.items()):
            tokens.append(7)
            outputs.append(_Output(rid, prompt, [_Completion(list(tokens))], len(tokens) >= want))
        while self.waiting and len(self.running) < self.max_num_seqs:
            rid, prompt, want = self.waiting.pop(0)
            self.prompt_tokens += len(prompt)
            self.running[rid] = (prompt, want, [7])
            outputs.append(_Output(rid, prompt, [_Completion([7])], want == 1))
        for out in outputs:
            if out.finished:
                del self.running[out.request_id]
        return outputs


def test_run_requests_counts_only_steps_without_prefill_as_decode_steps() -> None:
    cfg = BenchConfig(num_requests=4, prompt_len="3", output_len="5", num_adapters=[2])
    workload = make_workload(cfg, 2)
    timings = run_requests(FakeEngine(max_num_seqs=2), workload, ["a", "b"])
    # Two waves of two requests (max_num_seqs=2): each is 1 prefill step (first tokens) + 4 decode steps.
    assert timings.output_tokens == 4 * 5
    assert timings.prompt_tokens == 4 * 3
    assert len(timings.decode_step_times) == 2 * 4
    assert timings.decode_batch_sizes == [2] * 8
    assert len(timings.ttft) == 4 and len(timings.tpot) == 4
    assert timings.decode_context_tokens[:4] == [2 * (3 + t) for t in (2, 3, 4, 5)]


def test_run_requests_admits_requests_at_their_arrival_times() -> None:
    cfg = BenchConfig(num_requests=3, prompt_len="2", output_len="2", num_adapters=[1])
    workload = make_workload(cfg, 1)
    for r, arrival in zip(workload, (0.0, 0.03, 0.06)):
        r.arrival = arrival
    timings = run_requests(FakeEngine(max_num_seqs=4), workload, [None])
    assert timings.elapsed >= 0.06, "the last request may not start before it arrives"
    assert timings.output_tokens == 3 * 2 and len(timings.ttft) == 3
    assert all(t >= 0 for t in timings.ttft), "TTFT is measured from the scheduled arrival"
