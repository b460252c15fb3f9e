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
    """``a - b`` over the items and seeds both arms have, or None when they share no seed (see ``two_level_mean``)."""
    shared = sorted(set(a) & set(b))
    if not shared:
        return None
    return two_level_mean({s: np.asarray(a[s], dtype=np.float64) - np.asarray(b[s], dtype=np.float64) for s in shared}, seed, confidence)


def two_level_mean(per_seed: dict[int, list[float]], seed: int = 0, confidence: float = 0.95) -> Estimate:
    """The mean of per-seed item values (every seed scored the same items), bootstrapped at two levels.

    Each resample draws the seeds with replacement, then the items, so the interval covers
    seed-to-seed variation (training noise) as well as prompt sampling. With one seed it is the
    plain bootstrap over items.
    """
    d = np.asarray([per_seed[s] for s in sorted(per_seed)], dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"two_level_mean needs seeds that scored the same non-empty list of items, got shape {d.shape}")
    if len(d) == 1:
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


def two_level_ratio(
    numerators: dict[int, list[float]], denominators: dict[int, list[float]], seed: int = 0, confidence: float = 0.95
) -> Estimate | None:
    """A per-token mean ``sum(num) / sum(den)`` from per-seed, per-item sums, bootstrapped over seeds then items.

    For a loss difference between paired arms: ``numerators`` are per-item NLL differences, ``denominators``
    the items' token counts (the same completions in both arms). None without tokens.
    """
    seeds = sorted(numerators)
    num = np.asarray([numerators[s] for s in seeds], dtype=np.float64)
    den = np.asarray([denominators[s] for s in seeds], dtype=np.float64)
    if num.shape != den.shape or num.ndim != 2:
        raise ValueError(f"two_level_ratio needs per-seed item sums of one shape, got {num.shape} and {den.shape}")
    keep = den.sum(axis=0) > 0
    num, den = num[:, keep], den[:, keep]
    if den.size == 0:
        return None
    rng = np.random.default_rng(seed)
    k, n = num.shape
    pick = rng.integers(0, k, size=(N_RESAMPLES, k))
    items = rng.integers(0, n, size=(N_RESAMPLES, n))
    num_r = np.take_along_axis(num[pick].sum(axis=1), items, axis=1).sum(axis=1)
    den_r = np.take_along_axis(den[pick].sum(axis=1), items, axis=1).sum(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(num_r / den_r, [tail, 100 - tail])
    return Estimate(float(num.sum() / den.sum()), float(low), float(high), int(n))
