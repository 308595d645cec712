"""The one comparison rule of every table and claim, and what makes a run count.

Comparison rule (:data:`RULE`): the difference of two means with its 95% confidence interval from Welch's t
(per-seed values, unequal variances); "A better" only where the interval excludes 0, else "within noise".

A run counts only when it did not fail (:func:`run_status`): a run that ends at chance, diverges or starts from a
dead network is named as such and never averaged into a mean (:func:`split_failed`).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats

LEVEL = 0.95
RULE = ("difference of the two means with its 95% confidence interval (Welch's t from the per-seed values); "
        "'X better' only where the interval excludes 0, else 'within noise'; fewer than 2 counted seeds on "
        "either side: n/a; failed runs (at chance, diverged, dead network) are never counted")
CHANCE_MARGIN = 1.0        # points: a top-1 within this of 100 / classes is at chance
DEAD_SPREAD = 1e-6         # a network whose logits spread less than this over the calibration set is dead


@dataclass(frozen=True)
class Comparison:
    """``mean(a) - mean(b)`` with its Welch interval and the verdict of :data:`RULE`.

    diff, low, high: points (None when either side has fewer than 2 values); df: Welch's degrees of freedom."""

    name_a: str
    name_b: str
    n_a: int
    n_b: int
    diff: float | None
    low: float | None
    high: float | None
    df: float | None
    verdict: str

    @property
    def decided(self) -> bool:
        """Whether the interval excludes 0 (one side better beyond the noise)."""
        return self.verdict.endswith(" better")

    def interval_text(self) -> str:
        """"+1.24 [+0.51, +1.97]" (the difference and its 95% interval), or "n/a"."""
        if self.diff is None:
            return "n/a"
        return f"{self.diff:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def welch_interval(a: Sequence[float], b: Sequence[float], level: float = LEVEL
                   ) -> tuple[float, float, float, float] | None:
    """(mean(a) - mean(b), low, high, df): Welch's ``level`` confidence interval of the difference of the means
    from the samples' variances (ddof=1); None when either has fewer than 2 values.  Where both samples have
    no spread the interval is the difference itself (df inf)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return None
    return welch_interval_summary(a.mean(), a.std(ddof=1), len(a), b.mean(), b.std(ddof=1), len(b), level)


def welch_interval_summary(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int,
                           level: float = LEVEL) -> tuple[float, float, float, float] | None:
    """:func:`welch_interval` from each sample's mean, sample std (ddof=1) and size; None when a size is
    below 2 or a value is missing."""
    values = (mean_a, std_a, n_a, mean_b, std_b, n_b)
    if any(v is None or not np.isfinite(float(v)) for v in values) or int(n_a) < 2 or int(n_b) < 2:
        return None
    n_a, n_b = int(n_a), int(n_b)
    va, vb = float(std_a) ** 2 / n_a, float(std_b) ** 2 / n_b
    diff = float(mean_a) - float(mean_b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        return diff, diff, diff, math.inf
    df = (va + vb) ** 2 / (va ** 2 / (n_a - 1) + vb ** 2 / (n_b - 1))     # Welch-Satterthwaite
    half = float(scipy.stats.t.ppf(0.5 + level / 2, df)) * se
    return diff, diff - half, diff + half, df


def compare(a: Sequence[float], b: Sequence[float], name_a: str, name_b: str, level: float = LEVEL) -> Comparison:
    """:data:`RULE` applied to the per-seed values ``a`` and ``b`` (failed runs already left out)."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    return _verdict(welch_interval(a, b, level), len(a), len(b), name_a, name_b)


def compare_summary(mean_a: float, std_a: float, n_a: int, mean_b: float, std_b: float, n_b: int, name_a: str,
                    name_b: str, level: float = LEVEL) -> Comparison:
    """:func:`compare` from each side's mean, sample std and number of seeds, as a table prints them."""
    ok = all(v is not None and np.isfinite(float(v)) for v in (n_a, n_b))
    return _verdict(welch_interval_summary(mean_a, std_a, n_a, mean_b, std_b, n_b, level),
                    int(n_a) if ok else 0, int(n_b) if ok else 0, name_a, name_b)


def _verdict(interval: tuple[float, float, float, float] | None, n_a: int, n_b: int, name_a: str,
             name_b: str) -> Comparison:
    if interval is None:
        return Comparison(name_a, name_b, n_a, n_b, None, None, None, None, "n/a (< 2 seeds)")
    diff, low, high, df = (round(v, 4) if math.isfinite(v) else v for v in interval)
    verdict = f"{name_a} better" if low > 0 else f"{name_b} better" if high < 0 else "within noise"
    return Comparison(name_a, name_b, n_a, n_b, diff, low, high, df, verdict)


# --------------------------------------------------------------------------- failed runs
def run_status(top1: float | None, num_classes: int, history: Sequence[Mapping[str, Any]] = (),
               dead: bool | None = None) -> str:
    """"ok", or "failed: <cause>" for a run that must not be averaged:

    * "dead network": its starting network's outputs do not depend on the input (``dead``, checked before
      training: logits with no spread over the calibration set, :data:`DEAD_SPREAD`);
    * "diverged": a non-finite training loss, or a loss that never falls below its first epoch's;
    * "at chance": top-1 within :data:`CHANCE_MARGIN` points of 100 / ``num_classes``;
    * "no result": no top-1 at all.
    The first cause that applies is named, in this order."""
    if dead:
        return "failed: dead network"
    losses = [h.get("train_loss") for h in history if h.get("train_loss") is not None]
    if any(not math.isfinite(float(v)) for v in losses) or (len(losses) > 1 and min(losses[1:]) >= losses[0]):
        return "failed: diverged"
    if top1 is None or not math.isfinite(float(top1)):
        return "failed: no result"
    if abs(float(top1) - 100.0 / num_classes) <= CHANCE_MARGIN:
        return "failed: at chance"
    return "ok"


def split_failed(values: Sequence[float | None], statuses: Sequence[str]) -> tuple[list[float], list[str]]:
    """(the values of the runs that count, the failure causes of the others) from per-seed values and their
    :func:`run_status`."""
    counted = [float(v) for v, s in zip(values, statuses) if s == "ok" and v is not None]
    failed = [s.removeprefix("failed: ") for s in statuses if s != "ok"]
    return counted, failed


def seeds_note(n_counted: int, failed: Sequence[str]) -> str:
    """"" when no run failed, else "2 of 3 seeds (1 diverged)"; "failed: dead network" when every run failed."""
    if not failed:
        return ""
    causes = ", ".join(f"{failed.count(c)} {c}" for c in dict.fromkeys(failed))
    if n_counted == 0:
        return "failed: " + ", ".join(dict.fromkeys(failed))
    return f"{n_counted} of {n_counted + len(failed)} seeds ({causes})"


def cell_text(values: Sequence[float], failed: Sequence[str] = ()) -> str:
    """A compared cell: "85.27 ± 0.56 (84.61 / 85.50 / 85.70)" over the counted seeds, with the failed ones
    named ("… ; 2 of 3 seeds (1 diverged)"); "failed: <cause>" when none counts; "-" when there is nothing."""
    if not values:
        return seeds_note(0, failed) if failed else "-"
    mean, std = mean_std(values)
    per_seed = " / ".join(f"{v:.2f}" for v in values)
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if np.isfinite(std) else "") + f" ({per_seed})"
    note = seeds_note(len(values), failed)
    return f"{text}; {note}" if note else text


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """(mean, sample std with ddof=1) of the values that are not None; nan where undefined."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return float("nan"), float("nan")
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan")
