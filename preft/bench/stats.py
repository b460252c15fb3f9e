"""Small statistics for the benchmark: percentiles, summaries, popularity and arrival processes."""

from __future__ import annotations

import math
import random


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) with linear interpolation (numpy's default); None when empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(values: list[float], scale: float = 1.0) -> dict:
    """``{"p50", "p99", "mean"}`` of ``values`` times ``scale`` (e.g. 1e3 for seconds -> ms)."""
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    return {
        "p50": percentile(values, 50) * scale,
        "p99": percentile(values, 99) * scale,
        "mean": sum(values) / len(values) * scale,
    }


def zipf_weights(n: int, s: float = 1.0) -> list[float]:
    """Normalised Zipf popularity: item ``i`` (0-based) has weight proportional to ``1 / (i + 1) ** s``."""
    if n < 1:
        raise ValueError(f"need at least one item for a Zipf distribution, got {n}")
    raw = [1.0 / (i + 1) ** s for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def choose_adapters(num_requests: int, num_adapters: int, popularity: str, rng: random.Random, zipf_s: float = 1.0) -> list[int]:
    """The adapter index of each request: ``uniform`` cycles through every adapter in random order, ``zipf`` samples."""
    if popularity == "uniform":
        # Every adapter is used when there are enough requests (512 adapters means 512 distinct ones).
        order = [i % num_adapters for i in range(num_requests)]
        rng.shuffle(order)
        return order
    if popularity == "zipf":
        return rng.choices(range(num_adapters), weights=zipf_weights(num_adapters, zipf_s), k=num_requests)
    raise ValueError(f"popularity must be 'uniform' or 'zipf', got {popularity!r}")


def poisson_arrivals(num_requests: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival times (seconds) of a Poisson process with ``rate`` requests/s; ``inf`` = all at time 0 (offline)."""
    if math.isinf(rate):
        return [0.0] * num_requests
    if rate <= 0:
        raise ValueError(f"request rate must be > 0 (or inf for offline), got {rate}")
    t, times = 0.0, []
    for _ in range(num_requests):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def parse_lengths(spec: str) -> tuple[int, int]:
    """``"128"`` -> (128, 128); ``"64-256"`` -> (64, 256) (uniform, inclusive)."""
    try:
        lo, _, hi = spec.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"length {spec!r} must be an integer like '128' or a range like '64-256'") from None
    if not 1 <= lo <= hi:
        raise ValueError(f"length {spec!r} must satisfy 1 <= low <= high")
    return lo, hi


def sample_lengths(spec: str, n: int, rng: random.Random) -> list[int]:
    lo, hi = parse_lengths(spec)
    return [rng.randint(lo, hi) for _ in range(n)]
