"""95% bootstrap confidence intervals over eval items (percentile method, fixed seed).

Arms are paired: every arm answers the same eval prompts (per seed), so a difference between
two arms is bootstrapped over the per-item differences, which cancels the prompts' difficulty.
With several seeds, a difference resamples the seeds both arms share as well as the items, so its
interval also covers training noise; a single arm's estimate averages each item over its seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_RESAMPLES = 10_000


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int  # items the interval is over

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def fmt(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def bootstrap_mean(values, seed: int = 0, confidence: float = 0.95) -> Estimate:
    """The mean of ``values`` with a percentile bootstrap interval (resampling the values)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"bootstrap_mean needs a non-empty 1-d list of numbers, got shape {x.shape}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(N_RESAMPLES, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size))


def item_means(per_seed: dict[int, list[float]], seeds: list[int] | None = None) -> np.ndarray:
    """Per-item mean over ``seeds`` (default: every seed given) of per-seed item scores."""
    seeds = sorted(per_seed) if seeds is None else seeds
    lengths = {len(per_seed[s]) for s in seeds}
    if len(lengths) != 1:
        raise ValueError(f"seeds scored different numbers of items: {sorted(lengths)}")
    return np.mean([per_seed[s] for s in seeds], axis=0)


def paired_difference(a: dict[int, list[float]], b: dict[int, list[float]], seed: int = 0, confidence: float = 0.95) -> Estimate | None:
    """``a - b`` over the items and seeds both arms have, or None when they share no seed.

    Two-level bootstrap: each resample draws the shared seeds with replacement, then the items, so the
    interval covers seed-to-seed variation (training noise) as well as prompt sampling. With one shared
    seed it is the plain bootstrap over items.
    """
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    d = np.asarray([a[s] for s in shared], dtype=np.float64) - np.asarray([b[s] for s in shared], dtype=np.float64)
    if len(shared) == 1:
        return bootstrap_mean(d[0], seed, confidence)
    rng = np.random.default_rng(seed)
    k, n = d.shape
    per_item = d[rng.integers(0, k, size=(N_RESAMPLES, k))].mean(axis=1)  # [R, n]: seeds resampled
    means = np.take_along_axis(per_item, rng.integers(0, n, size=(N_RESAMPLES, n)), axis=1).mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(d.mean()), float(low), float(high), int(n))


def bootstrap_ratio(numerators, denominators, seed: int = 0, confidence: float = 0.95) -> Estimate | None:
    """``sum(numerators) / sum(denominators)`` (a per-token mean from per-item sums), resampling items; None without tokens."""
    num, den = np.asarray(numerators, dtype=np.float64), np.asarray(denominators, dtype=np.float64)
    keep = den > 0
    num, den = num[keep], den[keep]
    if den.size == 0:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, den.size, size=(N_RESAMPLES, den.size))
    ratios = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(ratios, [tail, 100 - tail])
    return Estimate(float(num.sum() / den.sum()), float(low), float(high), int(den.size))
