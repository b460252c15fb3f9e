"""Prometheus metrics, written by hand in the text exposition format (no client library needed).

Counters and histograms are updated by the engine thread; gauges are read from the engine's
``stats()`` snapshot. ``/metrics`` renders both.
"""

from __future__ import annotations

import threading
from bisect import bisect_left

TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

# engine stats key -> (metric name, help, type)
ENGINE_GAUGES = {
    "num_running": ("preft_num_requests_running", "Requests in the running batch.", "gauge"),
    "num_waiting": ("preft_num_requests_waiting", "Requests waiting to be scheduled.", "gauge"),
    "kv_blocks_used": ("preft_kv_blocks_used", "Paged KV-cache blocks in use.", "gauge"),
    "kv_blocks_total": ("preft_kv_blocks_total", "Paged KV-cache blocks in all.", "gauge"),
    "adapter_slots_used": ("preft_adapter_slots_used", "Device adapter slots in use.", "gauge"),
    "adapter_slots_total": ("preft_adapter_slots_total", "Device adapter slots in all.", "gauge"),
    "cpu_adapter_hits": ("preft_cpu_adapter_cache_hits_total", "Adapter loads served from the host cache.", "counter"),
    "cpu_adapter_misses": ("preft_cpu_adapter_cache_misses_total", "Adapter loads read from disk.", "counter"),
    "prompt_tokens": ("preft_prompt_tokens_total", "Prompt tokens prefilled.", "counter"),
    "generation_tokens": ("preft_generation_tokens_total", "Tokens generated.", "counter"),
}


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)  # last bucket: +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            lines.append(f'{self.name}_bucket{{le="{le}"}} {cumulative}')
        lines += [f"{self.name}_sum {self.sum}", f"{self.name}_count {self.count}"]
        return lines


class Metrics:
    """Request counters and latency histograms; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # finish reason ("stop", "length", "abort", "error") -> count
        self.adapter_loads = 0
        self.adapter_unloads = 0
        self.ttft = Histogram("preft_time_to_first_token_seconds", "Time from arrival to the first generated token.", TTFT_BUCKETS)
        self.tpot = Histogram("preft_time_per_output_token_seconds", "Time between generated tokens, after the first.", TPOT_BUCKETS)
        self.e2e = Histogram("preft_request_latency_seconds", "Time from arrival to the last generated token.", E2E_BUCKETS)

    def request_finished(self, reason: str) -> None:
        with self._lock:
            self.requests[reason] = self.requests.get(reason, 0) + 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def later_tokens(self, seconds: float, n: int) -> None:
        """``n`` tokens arrived ``seconds`` after the previous ones: each took ``seconds / n``."""
        with self._lock:
            self.tpot.observe(seconds / n, times=n)

    def latency(self, seconds: float) -> None:
        with self._lock:
            self.e2e.observe(seconds)

    def adapter_event(self, loaded: bool) -> None:
        with self._lock:
            if loaded:
                self.adapter_loads += 1
            else:
                self.adapter_unloads += 1

    def render(self, engine_stats: dict, num_adapters: int) -> str:
        with self._lock:
            lines = ["# HELP preft_requests_total Finished requests by finish reason.", "# TYPE preft_requests_total counter"]
            for reason in sorted({"stop", "length", "abort", "error", *self.requests}):
                lines.append(f'preft_requests_total{{finish_reason="{reason}"}} {self.requests.get(reason, 0)}')
            for key, (name, help_text, kind) in ENGINE_GAUGES.items():
                if key in engine_stats:
                    lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {engine_stats[key]}"]
            lines += ["# HELP preft_adapters_registered Adapters the server can serve.", "# TYPE preft_adapters_registered gauge"]
            lines.append(f"preft_adapters_registered {num_adapters}")
            lines += ["# HELP preft_adapter_loads_total Runtime adapter loads.", "# TYPE preft_adapter_loads_total counter"]
            lines.append(f"preft_adapter_loads_total {self.adapter_loads}")
            lines += ["# HELP preft_adapter_unloads_total Runtime adapter unloads.", "# TYPE preft_adapter_unloads_total counter"]
            lines.append(f"preft_adapter_unloads_total {self.adapter_unloads}")
            for hist in (self.ttft, self.tpot, self.e2e):
                lines += hist.render()
        return "\n".join(lines) + "\n"
