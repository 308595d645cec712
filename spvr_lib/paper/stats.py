"""The one noise rule of every comparison, and mean/std over seeds."""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

NOISE_RULE = "|mean difference| < 2 x pooled std over seeds (fewer than 2 seeds: n/a)"


def within_noise(a: Sequence[float], b: Sequence[float], k: float = 2.0) -> bool | None:
    """True when ``|mean(a) - mean(b)| < k * pooled std`` (sample std, ddof=1, pooled over both);
    None when either has fewer than two values (no spread to compare with)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    return within_noise_summary(a.mean(), a.std(ddof=1), len(a), b.mean(), b.std(ddof=1), len(b), k)


def within_noise_summary(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int,
                         k: float = 2.0) -> bool | None:
    """:func:`within_noise` from each sample's mean, sample std (ddof=1) and size, as the tables print
    them; None when either has fewer than two values or a value is missing."""
    values = (mean_a, std_a, n_a, mean_b, std_b, n_b)
    if any(v is None or not np.isfinite(float(v)) for v in values) or int(n_a) < 2 or int(n_b) < 2:
        return None
    n_a, n_b = int(n_a), int(n_b)
    pooled = math.sqrt(((n_a - 1) * float(std_a) ** 2 + (n_b - 1) * float(std_b) ** 2) / (n_a + n_b - 2))
    return bool(abs(float(mean_a) - float(mean_b)) < k * pooled)


def noise_verdict(spvr: Sequence[float], other: Sequence[float], other_name: str) -> str:
    """"SPvR better", "<other> better", "within noise" or "n/a (< 2 seeds)" by :func:`within_noise`."""
    inside = within_noise(spvr, other)
    if inside is None:
        return "n/a (< 2 seeds)"
    if inside:
        return "within noise"
    return "SPvR better" if np.mean(spvr) > np.mean(other) else f"{other_name} better"


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
