"""The comparison rule (Welch's interval) and failed runs, on hand-made cases with known values."""
import math

import pytest

from spvr_lib.paper import stats


def test_welch_interval_matches_a_hand_computation():
    # a = 1, 2, 3; b = 4, 5, 6: diff -3, each variance of the mean 1/3, se sqrt(2/3), df 4, t(0.975, 4) = 2.776445
    diff, low, high, df = stats.welch_interval([1, 2, 3], [4, 5, 6])
    half = 2.7764451051977987 * math.sqrt(2 / 3)
    assert diff == -3 and df == pytest.approx(4.0)
    assert low == pytest.approx(-3 - half) and high == pytest.approx(-3 + half)
    c = stats.compare([1, 2, 3], [4, 5, 6], "A", "B")
    assert c.verdict == "B better" and c.decided and c.interval_text() == "-3.00 [-5.27, -0.73]"


def test_unequal_variances_use_welch_satterthwaite_degrees_of_freedom():
    a, b = [10.0, 12.0, 14.0, 16.0], [1.0, 1.1, 0.9]
    va, vb = (20 / 3) / 4, 0.01 / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    _, low, high, got = stats.welch_interval(a, b)
    assert got == pytest.approx(df)
    assert (high - low) / 2 == pytest.approx(stats.scipy.stats.t.ppf(0.975, df) * math.sqrt(va + vb))


def test_one_dead_run_no_longer_decides_by_inflating_a_pooled_std():
    """The issue's Table 2 cell: with the run at chance left out, the rule reads the two others (and, at 2 seeds
    against 3, Welch's interval is wide: it says so rather than calling a winner)."""
    tfs, ft = [10.00, 75.25, 67.79], [83.85, 84.92, 84.13]
    statuses = [stats.run_status(v, 10) for v in tfs]
    assert statuses == ["failed: at chance", "ok", "ok"]
    counted, failed = stats.split_failed(tfs, statuses)
    assert counted == [75.25, 67.79] and failed == ["at chance"]
    c = stats.compare(counted, ft, "TFS", "FT")
    assert c.n_a == 2 and c.diff == pytest.approx(71.52 - 84.30, abs=1e-2) and c.verdict == "within noise"
    assert stats.cell_text(counted, failed) == "71.52 ± 5.28 (75.25 / 67.79); 2 of 3 seeds (1 at chance)"


def test_too_few_seeds_and_no_spread():
    assert stats.compare([1.0], [2.0, 3.0], "A", "B").verdict == "n/a (< 2 seeds)"
    assert stats.compare([1.0], [2.0, 3.0], "A", "B").interval_text() == "n/a"
    c = stats.compare([2.0, 2.0], [1.0, 1.0], "A", "B")           # no spread at all: the difference itself
    assert (c.diff, c.low, c.high, c.verdict) == (1.0, 1.0, 1.0, "A better")
    assert stats.compare([1.0, 3.0], [2.0, 2.0], "A", "B").verdict == "within noise"
    assert stats.compare_summary(5.0, 1.0, 3, 1.0, 1.0, 3, "A", "B").verdict == "A better"
    assert stats.compare_summary(5.0, float("nan"), 1, 1.0, 1.0, 3, "A", "B").verdict == "n/a (< 2 seeds)"


@pytest.mark.parametrize("top1, history, dead, expected", [
    (85.0, [{"train_loss": 2.3}, {"train_loss": 1.0}], None, "ok"),
    (85.0, [{"train_loss": 2.3}, {"train_loss": 1.0}], True, "failed: dead network"),
    (85.0, [{"train_loss": 2.3}, {"train_loss": float("nan")}], None, "failed: diverged"),
    (85.0, [{"train_loss": 2.3}, {"train_loss": 2.3}, {"train_loss": 2.5}], None, "failed: diverged"),
    (10.9, [{"train_loss": 2.3}, {"train_loss": 2.2}], None, "failed: at chance"),
    (11.1, [{"train_loss": 2.3}, {"train_loss": 2.2}], None, "ok"),
    (None, [], None, "failed: no result"),
])
def test_run_status_names_the_first_cause(top1, history, dead, expected):
    assert stats.run_status(top1, 10, history, dead) == expected


def test_a_cell_whose_every_run_failed_names_the_cause():
    counted, failed = stats.split_failed([10.0, 10.0, 10.0], ["failed: dead network"] * 3)
    assert counted == [] and stats.cell_text(counted, failed) == "failed: dead network"
    assert stats.cell_text([], []) == "-"
    assert stats.cell_text([84.0, 86.0], []) == "85.00 ± 1.41 (84.00 / 86.00)"
