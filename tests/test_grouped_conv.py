"""Grouped (not depthwise) convolutions in the graph engine: a unit that feeds or leaves a grouped conv loses
the same within-group position of every conv group at once (a slot), so ResNeXt and RegNet prune to exact
budgets and rebuild with the predicted parameter count (ShuffleNet's channel shuffle: tests/test_shufflenet.py)."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spvr_lib import models
from spvr_lib.prune import spvr_prune

sys.path.insert(0, str(Path(__file__).resolve().parent))
from network_checks import (assert_exact_count_for_random_removals, assert_same_scores,  # noqa: E402
                            assert_saved_network_reloads, randomly_ranked)

torch.set_num_threads(1)

D = 2
SIZE = 32
_CACHE: dict = {}


def _calib(n: int = 16, size: int = SIZE):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % 10


def _model(name: str):
    """A randomly initialised torchvision network, its units and a seeded random ranking (network_checks)."""
    return randomly_ranked(name, _calib(), D, _CACHE)


def _grouped(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups != m.out_channels}


@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_y_400mf"])
def test_a_unit_at_a_grouped_conv_is_made_of_slots(name):
    """Each channel of a unit read or written by a grouped conv is one within-group position of every conv
    group: ``groups`` positions j, j + per_group, ..., at that conv."""
    model, _, g, _ = _model(name)
    grouped = _grouped(model)
    assert grouped
    seen = 0
    for u in g.units:
        for s in u.sites:
            conv = grouped.get(s.module)
            if conv is None:
                continue
            per_group = (conv.in_channels if s.where == "input" else conv.out_channels) // conv.groups
            assert u.width == per_group
            for j, pos in enumerate(s.index):
                assert sorted(pos) == [j + k * per_group for k in range(conv.groups)]
            seen += 1
    assert seen >= 2 * len(grouped)          # every grouped conv: its input unit and its output unit


@pytest.mark.parametrize("keep", [0.5, 0.1])
@pytest.mark.parametrize("name", ["resnext50_32x4d", "regnet_y_400mf"])
def test_grouped_networks_prune_to_an_exact_budget(name, keep, tmp_path):
    model, calib, g, ranking = _model(name)
    before = models.count_params(model)
    res = spvr_prune(model, calib, keep, group_size=D, ranking=ranking, progress=False,
                     source={"torchvision": name, "kwargs": {"num_classes": 10}})
    assert res.params_before == before
    assert res.params_after == models.count_params(res.model) <= res.budget == int(np.floor(keep * before))
    assert res.budget - res.params_after <= 0.01 * before           # within 1% of the original count
    # every surviving grouped conv keeps its groups, with the same number of channels in each
    original = _grouped(model)
    pruned = _grouped(res.model)
    assert pruned and set(pruned) <= set(original)
    for n, conv in pruned.items():
        assert conv.groups == original[n].groups
        assert conv.in_channels % conv.groups == 0 and conv.out_channels % conv.groups == 0
        assert conv.weight.shape[1] == conv.in_channels // conv.groups
    assert any(c.out_channels < original[n].out_channels for n, c in pruned.items())
    # what collapsed is a residual branch (a whole block) and is gone from the network
    mods = dict(res.model.named_modules())
    for c in res.collapsed:
        assert c["kind"] in ("branch", "layer") and c["unit"] not in mods
        assert len(res.kept[c["unit"]]) == 0
    if keep == 0.1:
        assert any(c["kind"] == "branch" for c in res.collapsed)
    with torch.no_grad():
        out = res.model.eval()(torch.randn(2, 3, SIZE, SIZE))
    assert out.shape == (2, 10)
    assert_saved_network_reloads(res.model, res.params_after, tmp_path, (2, 3, SIZE, SIZE))


def test_inherited_grouped_conv_holds_the_kept_slots_of_every_group():
    """With inherit=True a pruned grouped conv's weight is the original's rows of its kept output slots (in
    every group) and columns of its kept input slots: Torch-Pruning's grouped in-channel pruning is right
    because every group loses the same positions."""
    model, calib, g, ranking = _model("resnext50_32x4d")
    res = spvr_prune(model, calib, 0.5, group_size=D, ranking=ranking, progress=False, inherit=True)
    original, pruned = _grouped(model), _grouped(res.model)
    checked = 0
    for n, conv in pruned.items():
        src = original[n]
        u_in = next(u for u in g.units if n in u.consumers)
        u_out = next(u for u in g.units if n in u.producers)
        per_out = src.out_channels // src.groups
        site = u_out.out_sites[n]
        rows = sorted(i for c in res.kept[u_out.name] for i in site.index[c])
        assert len(rows) == conv.out_channels and len(rows) % src.groups == 0
        cols = sorted(res.kept[u_in.name])                      # slot j of the input = column j
        assert torch.equal(conv.weight, src.weight[rows][:, cols])
        assert all(sum(r // per_out == k for r in rows) == len(rows) // src.groups for k in range(src.groups))
        checked += conv.weight.shape[1] < src.weight.shape[1]
    assert checked >= 1                                         # some grouped conv lost input slots


def test_exact_count_equals_the_rebuilt_network_for_random_removals():
    """NetworkGraph.count == count_params of the rebuilt network with slots of grouped convs removed."""
    assert_exact_count_for_random_removals(_model("regnet_y_400mf")[2], np.random.default_rng(0), repeats=3)



def test_fast_ranking_equals_naive_at_grouped_convs():
    """The fast path masks slots (one within-group position of every conv group) at ResNeXt's grouped convs and
    scores them as the naive path does, to float32 rounding (the first 16 groups of the first two such units)."""
    import warnings

    from spvr_lib.ranking import unit_importance

    model, calib, g, _ = _model("resnext50_32x4d")
    grouped = _grouped(model)
    units = [u for u in g.units if any(s.module in grouped for s in u.sites)][:2]
    assert len(units) == 2
    spec = {u.name: (u.sites, [list(range(i, min(i + D, u.width))) for i in range(0, u.width, D)][:16]) for u in units}
    naive = unit_importance(model, calib[0], spec, method="naive", progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fast ranking cannot run this model")
        fast = unit_importance(model, calib[0], spec, method="fast", progress=False)
    assert_same_scores(naive, fast)
    assert any(v.unique().numel() > 1 for v in naive.values())
