"""Section 6.2 / Figure 2 (spvr_lib.paper.group_size_ablation): the group-size table and its figure, on tiny networks."""
import math

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from spvr_lib.paper import group_size_ablation, scales
from spvr_lib.paper import base_models
from spvr_lib.paper import stats

torch.set_num_threads(1)

TINY = scales.Scale(
    name="smoke", seeds=(0, 1),
    models={"vgg16": scales.ModelSetup("vgg16_bn", "fashion-mnist", width=1 / 16, epochs=1, batch_size=16,
                                       lr=0.05, lr_grid=(0.05,), group_size=4, rates=(0.5, 0.9),
                                       calib_per_class=1, train_subset=2, test_subset=1)})


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    return tmp_path


def test_one_row_per_d_with_both_methods_and_identical_specs(cache):
    table = group_size_ablation.group_size_table(TINY, {"vgg16": {1: [8], 8: [64], 16: [128]}}, progress=False)
    assert table["d"].tolist() == [1, 8, 16] and table["paper d"].tolist() == ["8", "64", "128"]
    assert not table["status"].str.startswith("failed").any(), table["error"].tolist()
    assert table["status"].iloc[0] == "ok" and table["status"].iloc[1].startswith("not compared: removes 91.08%")
    assert (table["rate"] == 0.9).all()                       # the highest of the setup's rates
    assert table["same spec"].all()
    for d in (1, 8, 16):
        fast, naive = (base_models.spvr_pruned(TINY, "vgg16", 0.9, group_size=d, method=m, progress=False)
                       for m in group_size_ablation.RANKING_METHODS)
        assert fast["spec"] == naive["spec"]
        row = table.set_index("d").loc[d]
        assert row["prune s (fast)"] == fast["prune_s"] and row["prune s (naive)"] == naive["prune_s"]
        assert row["params after"] == fast["params_after"] <= row["budget"] == math.floor(0.1 * row["params before"])
    # identical specs share one training run per seed, so both methods report the same accuracy
    assert table["top1 seeds (fast)"].fillna("").tolist() == table["top1 seeds (naive)"].fillna("").tolist()\
        if "top1 seeds (naive)" in table else True
    assert (table["n seeds (fast)"] <= 2).all()
    for _, row in table.iterrows():        # a d whose removal misses the rate by more than a point: not compared
        meets = abs(row["removed (%)"] - 90.0) <= group_size_ablation.RATE_TOLERANCE
        assert row["meets the rate"] == meets and (row["status"] == "ok") == meets
        assert row["narrowest layer"] and row["classifier inputs"] >= 1


def test_the_grid_is_the_papers_d_scaled_with_the_width():
    grid = group_size_ablation.group_sizes(scales.get_scale("cpu"))
    assert grid == {"vgg16": {1: [2, 4, 8], 2: [16], 4: [32]}, "resnet34": {1: [4, 8], 2: [16], 4: [32]},
                    "resnet50": {1: [8], 2: [16], 4: [32]}}
    assert group_size_ablation.group_sizes(scales.get_scale("paper"))["vgg16"] == {d: [d] for d in (2, 4, 8, 16, 32)}


def test_a_step_that_raises_is_a_failed_row(cache, monkeypatch):
    real = base_models.spvr_pruned

    def flaky(cfg, key, rate, group_size=None, method="fast", **kw):
        if group_size == 16 and method == "naive":
            raise RuntimeError("out of memory")
        return real(cfg, key, rate, group_size=group_size, method=method, **kw)

    monkeypatch.setattr(base_models, "spvr_pruned", flaky)
    rows = group_size_ablation.group_size_rows(TINY, "vgg16", [8, 16], seeds=[0], progress=False)
    assert [r["status"] == "failed" for r in rows] == [False, True]
    assert rows[1]["error"] == "RuntimeError: out of memory" and rows[1]["d"] == 16
    # without the naive ranking at d = 16 the row is complete, its naive columns empty
    rows = group_size_ablation.group_size_rows(TINY, "vgg16", [8, 16], seeds=[0], naive_group_sizes=[8], progress=False)
    assert [r["status"] == "failed" for r in rows] == [False, False]
    assert rows[0]["same spec"] is True and rows[1]["same spec"] is None
    assert math.isnan(rows[1]["prune s (naive)"]) and "top1 (naive)" not in rows[1]


@pytest.mark.parametrize("bad", [[], [0], [4, True], [2.0]])
def test_bad_group_sizes(bad):
    with pytest.raises(ValueError, match="group_sizes"):
        group_size_ablation.group_size_rows(TINY, "vgg16", bad, progress=False)


def test_mean_std():
    assert stats.mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2.0)))
    mean, std = stats.mean_std([5.0, None])
    assert mean == 5.0 and math.isnan(std)
    assert all(math.isnan(v) for v in stats.mean_std([None]))


def test_figure2_draws_the_table():
    table = pd.DataFrame({
        "model": ["vgg16"] * 2 + ["resnet34"] * 2, "rate": [0.98] * 4, "d": [2, 4, 4, 8],
        "status": ["ok", "ok", "ok", "failed"],
        "top1 (fast)": [90.0, 89.0, 60.0, None], "top1 std (fast)": [0.5, 0.4, 1.0, None],
        "top5 (fast)": [99.0, 98.0, 80.0, None], "top5 std (fast)": [0.1, 0.1, 0.2, None],
        "prune s (fast)": [1.0, 0.5, 2.0, None], "prune s (naive)": [10.0, 5.0, 20.0, None]})
    fig = group_size_ablation.figure2(table)
    left, right = fig.axes[0], fig.axes[2]        # VGG16's accuracy axis and its twin (time) axis

    def curves(ax):
        return {c.get_label(): list(c.lines[0].get_ydata()) for c in ax.containers}

    assert curves(left) == {"top-1 accuracy": [90.0, 89.0]}          # no top-5 for VGG16, as Figure 2a
    assert right.get_yscale() == "log"
    assert {line.get_label(): list(line.get_ydata()) for line in right.lines} == {
        "pruning time (fast)": [1.0, 0.5], "pruning time (naive)": [10.0, 5.0]}
    assert curves(fig.axes[1]) == {"top-1 accuracy": [60.0], "top-5 accuracy": [80.0]}   # the failed d=8 left out
