"""Prometheus metrics under vLLM's names and labels (``vllm:*`` with ``model_name``), so a vLLM Grafana
dashboard works unchanged; preft's own adapter metrics are ``preft:*``. Exposition by ``prometheus_client``.

Latency histograms and finished-request counts are updated by the engine thread; gauges and engine
counters are read from the engine's ``stats()`` snapshot when ``/metrics`` is scraped. Each ``Metrics``
has its own registry (several servers may live in one process, e.g. in tests).
"""

from __future__ import annotations

import threading

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

prometheus_client.disable_created_metrics()  # no *_created series, as vLLM (they double the exposition)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# vLLM's buckets, so dashboards' quantiles mean the same
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0)
FINISH_REASONS = ("stop", "length", "abort", "error")

# engine stats key -> (metric name, help, kind); counters get "_total" in the exposition
ENGINE_METRICS = {
    "num_running": ("vllm:num_requests_running", "Number of requests in model execution batches.", "gauge"),
    "num_waiting": ("vllm:num_requests_waiting", "Number of requests waiting to be processed.", "gauge"),
    "prompt_tokens": ("vllm:prompt_tokens", "Number of prefill tokens processed.", "counter"),
    "generation_tokens": ("vllm:generation_tokens", "Number of generation tokens processed.", "counter"),
    "num_preemptions": ("vllm:num_preemptions", "Cumulative number of preemptions from the engine.", "counter"),
    "prefix_cache_queries": ("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of queried blocks.", "counter"),
    "prefix_cache_hits": ("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached blocks.", "counter"),
    "kv_blocks_used": ("preft:kv_blocks_used", "Paged KV-cache blocks in use.", "gauge"),
    "kv_blocks_total": ("preft:kv_blocks_total", "Paged KV-cache blocks in all.", "gauge"),
    "adapter_slots_used": ("preft:adapter_slots_used", "Device adapter slots in use.", "gauge"),
    "adapter_slots_total": ("preft:adapter_slots_total", "Device adapter slots in all.", "gauge"),
    "cpu_adapter_hits": ("preft:cpu_adapter_cache_hits", "Adapter loads served from the host cache.", "counter"),
    "cpu_adapter_misses": ("preft:cpu_adapter_cache_misses", "Adapter loads read from disk.", "counter"),
}


class _EngineCollector:
    """Yields the engine's gauges and counters from the snapshot ``Metrics.render`` hands it."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        labels, values = ["model_name"], [self.metrics.model_name]
        stats = self.metrics._stats
        for key, (name, help_text, kind) in ENGINE_METRICS.items():
            if key in stats:
                family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, help_text, labels=labels)
                family.add_metric(values, stats[key])
                yield family
        if stats.get("kv_blocks_total"):
            usage = stats["kv_blocks_used"] / stats["kv_blocks_total"]
            for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):  # the new name and the one older dashboards use
                family = GaugeMetricFamily(name, "KV-cache usage. 1 means 100 percent usage.", labels=labels)
                family.add_metric(values, usage)
                yield family
        family = GaugeMetricFamily("preft:adapters_registered", "Adapters the server can serve.", labels=labels)
        family.add_metric(values, self.metrics._num_adapters)
        yield family


class Metrics:
    """Request counters and latency histograms (thread-safe), and the ``/metrics`` text."""

    def __init__(self, model_name: str = "preft") -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        self._lock = threading.Lock()  # render() hands the collector one snapshot at a time
        self._stats: dict = {}
        self._num_adapters = 0
        labels = ["model_name"]
        self._requests = Counter(
            "vllm:request_success", "Count of finished requests by finish reason.", [*labels, "finished_reason"], registry=self.registry
        )
        self._ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            labels,
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self._tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds.",
            labels,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self._e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of end to end request latency in seconds.",
            labels,
            buckets=E2E_BUCKETS,
            registry=self.registry,
        )
        self._adapter_loads = Counter("preft:adapter_loads", "Runtime adapter loads.", labels, registry=self.registry)
        self._adapter_unloads = Counter("preft:adapter_unloads", "Runtime adapter unloads.", labels, registry=self.registry)
        for reason in FINISH_REASONS:  # present from the start, at 0, as dashboards expect
            self._requests.labels(model_name, reason)
        self._adapter_loads.labels(model_name)
        self._adapter_unloads.labels(model_name)
        self.registry.register(_EngineCollector(self))

    def request_finished(self, reason: str) -> None:
        self._requests.labels(self.model_name, reason).inc()

    @property
    def requests(self) -> dict[str, int]:
        """Finished requests so far, by finish reason."""
        samples = [s for metric in self._requests.collect() for s in metric.samples if s.name.endswith("_total")]
        return {s.labels["finished_reason"]: int(s.value) for s in samples}

    def first_token(self, seconds: float) -> None:
        self._ttft.labels(self.model_name).observe(seconds)

    def later_tokens(self, seconds: float, n: int) -> None:
        """``n`` tokens arrived ``seconds`` after the previous ones: each took ``seconds / n``."""
        histogram = self._tpot.labels(self.model_name)
        for _ in range(n):
            histogram.observe(seconds / n)

    def latency(self, seconds: float) -> None:
        self._e2e.labels(self.model_name).observe(seconds)

    def adapter_event(self, loaded: bool) -> None:
        (self._adapter_loads if loaded else self._adapter_unloads).labels(self.model_name).inc()

    def render(self, engine_stats: dict, num_adapters: int) -> str:
        """The Prometheus text exposition of every metric, with the engine's ``engine_stats`` snapshot."""
        with self._lock:
            self._stats, self._num_adapters = engine_stats, num_adapters
            return generate_latest(self.registry).decode()
