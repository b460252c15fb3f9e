"""/metrics under vLLM's names and labels (preft.server.metrics), so a vLLM Grafana dashboard works."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from preft.server.metrics import Metrics

# The series vLLM's example Grafana dashboard queries (its PromQL names), each with a model_name label.
VLLM_DASHBOARD = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:gpu_cache_usage_perc",
    "vllm:kv_cache_usage_perc",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count",
}
STATS = dict(
    num_running=2, num_waiting=1, kv_blocks_used=5, kv_blocks_total=20, adapter_slots_used=1, adapter_slots_total=4,
    cpu_adapter_hits=3, cpu_adapter_misses=1, prompt_tokens=70, generation_tokens=9, num_preemptions=0,
    prefix_cache_hits=2, prefix_cache_queries=6,
)  # fmt: skip


def scrape(metrics: Metrics) -> list:
    return [s for family in text_string_to_metric_families(metrics.render(STATS, 3)) for s in family.samples]


def test_every_series_a_vllm_dashboard_queries_is_there_with_the_model_name_label():
    metrics = Metrics("SmolLM2-135M-Instruct")
    metrics.first_token(0.05)
    metrics.later_tokens(0.2, 4)
    metrics.latency(1.2)
    metrics.request_finished("stop")
    samples = scrape(metrics)
    assert VLLM_DASHBOARD <= {s.name for s in samples}
    assert {s.labels["model_name"] for s in samples} == {"SmolLM2-135M-Instruct"}
    assert not any(s.name.endswith("_created") for s in samples)


def test_values_follow_the_engine_stats_and_the_observations():
    metrics = Metrics("m")
    metrics.later_tokens(0.2, 4)  # four tokens in 0.2 s: four observations of 0.05 s
    metrics.request_finished("length")
    metrics.request_finished("length")
    metrics.adapter_event(loaded=True)
    values = {(s.name, s.labels.get("finished_reason")): s.value for s in scrape(metrics)}
    assert values["vllm:time_per_output_token_seconds_count", None] == 4
    assert abs(values["vllm:time_per_output_token_seconds_sum", None] - 0.2) < 1e-9
    assert values["vllm:request_success_total", "length"] == 2 and values["vllm:request_success_total", "stop"] == 0
    assert values["vllm:kv_cache_usage_perc", None] == 0.25 and values["vllm:num_requests_running", None] == 2
    assert values["vllm:prompt_tokens_total", None] == 70 and values["vllm:prefix_cache_hits_total", None] == 2
    assert values["preft:adapter_loads_total", None] == 1 and values["preft:adapters_registered", None] == 3
    assert metrics.requests == {"stop": 0, "length": 2, "abort": 0, "error": 0}


def test_two_servers_in_one_process_keep_separate_counts():
    first, second = Metrics("a"), Metrics("b")
    first.request_finished("stop")
    counts = {s.labels["model_name"]: s.value for s in scrape(second) if s.name == "vllm:request_success_total"}
    assert counts == {"b": 0}
