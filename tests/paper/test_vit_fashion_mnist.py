"""Notebook 14 (spvr_lib.paper.vit_fashion_mnist, vit_tp): exact budgets for SPvR and Torch-Pruning's head and
neuron pruning on a tiny ViT, Torch-Pruning's selection read back equals Torch-Pruning's own pruning, the table's
comparison column is stats.compare of the per-seed values, failed runs are named and never averaged."""
import copy
import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
import torch_pruning as tp

from spvr_lib import models
from spvr_lib.paper import stats, vit_fashion_mnist as vit, vit_tp
from spvr_lib.prune import rank_groups, spvr_prune

torch.set_num_threads(1)

L, H, D, M = 2, 4, 16, 64          # the smoke scale's ViT: 8,090 parameters


def _vit() -> torch.nn.Module:
    torch.manual_seed(0)
    model = vit.build_vit(L, H, D, M)
    torch.nn.init.normal_(model.heads.head.weight, std=0.2)       # torchvision zero-initialises the head
    return model.eval()


def _calib(n: int = 20):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % 10


def test_build_vit_takes_one_channel_and_reinit_is_seeded():
    model = _vit()
    assert model.conv_proj.in_channels == 1 and models.count_params(model) == 8090
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 10)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(3)
    vit.vit_reinit(a)
    torch.manual_seed(3)
    vit.vit_reinit(b)
    sa, sb, s0 = a.state_dict(), b.state_dict(), model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"],
                           s0["encoder.layers.encoder_layer_0.self_attention.in_proj_weight"])
    assert torch.equal(sa["class_token"], torch.zeros_like(sa["class_token"]))


@pytest.mark.parametrize("method", vit_tp.TP_METHODS)
@pytest.mark.parametrize("keep", [0.6, 0.4])
def test_torch_pruning_meets_the_budget_within_one_head(method, keep):
    model, calib = _vit(), _calib()
    before = models.count_params(model)
    budget = int(math.floor(keep * before))
    removed, ratio, params = vit_tp.select(model, calib, budget, method, H)
    assert params <= budget and 0 < ratio <= 1
    # the local rule moves a whole head (or a neuron) of one layer at a time: the gap is under one head's
    # parameters (q, k, v rows and biases, out-projection columns: 4 * 4 * 16 + 12)
    head = 4 * (D // H) * D + 3 * (D // H)
    assert budget - params < head
    for unit, idx in removed.items():            # never a whole layer: Torch-Pruning cannot empty one
        width = H if unit.endswith("self_attention") else M
        assert 0 < len(idx) < width and idx == sorted(set(idx))


def test_spvr_meets_the_budget_within_one_percent():
    model, calib = _vit(), _calib()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranking = rank_groups(copy.deepcopy(model), calib, 1, method="naive", progress=False)
    for keep in (0.6, 0.4):
        res = spvr_prune(copy.deepcopy(model), calib, keep, group_size=1, ranking=ranking, progress=False,
                         source={"model_file": f"{vit.__file__}:build_vit",
                                 "kwargs": {"num_layers": L, "num_heads": H, "hidden_dim": D, "mlp_dim": M}})
        assert res.params_after == models.count_params(res.model) <= res.budget
        assert res.budget - res.params_after <= 0.01 * res.params_before


def test_the_read_selection_is_what_torch_pruning_prunes():
    """MetaPruner's own pruning of the view at one ratio gives the network the graph engine builds from the
    indices read out of its interactive step: same parameter count, same outputs."""
    model, (x, y) = _vit(), _calib()
    sel = vit_tp._HeadNeuronSelector(model, (x, y), "tp_l2", H)
    removed = sel.removed(0.5)
    assert {len(v) for k, v in removed.items() if k.endswith("self_attention")} == {2}      # ceil(0.5 * 4)
    assert {len(v) for k, v in removed.items() if k.endswith("mlp.0")} == {32}
    g = vit_tp.graph_of(model, x)
    ours = g.build(vit_tp._masks(g, removed)).eval()
    view = vit_tp.tp_view(model)
    attns = [m for m in view.modules() if isinstance(m, vit_tp.LinearAttention)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(view, x[:1], tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                                      head_pruning_ratio=0.5, num_heads={a.qkv: H for a in attns},
                                      prune_num_heads=True, prune_head_dims=False,
                                      ignored_layers=[view.conv_proj, view.heads.head])
        pruner.step()
    for a in attns:
        a.num_heads = pruner.num_heads[a.qkv]
    assert models.count_params(view) == models.count_params(ours) == g.count(vit_tp._masks(g, removed))
    with torch.no_grad():
        assert torch.allclose(view(x), ours(x), atol=1e-5)


def test_collapsed_and_kept_text_read_the_plan():
    cfg = vit.setup("smoke")
    plan = {"removed": {"encoder.layers.encoder_layer_1.self_attention": [0, 1, 2, 3],
                        "encoder.layers.encoder_layer_0.mlp.0": list(range(10))}}
    assert vit.collapsed_text(cfg, plan) == "attention 1"
    assert vit.kept_text(cfg, plan) == "4/54, 0/64"
    assert vit.collapsed_text(cfg, {"removed": {}}) == "none"


def _runs(values: dict, statuses: dict | None = None) -> pd.DataFrame:
    rows = []
    for (keep, method), tops in values.items():
        for seed, top1 in enumerate(tops):
            st = (statuses or {}).get((keep, method, seed), "ok")
            rows.append({"keep": keep, "method": method, "seed": seed, "mode": vit.MODES[method], "top1": top1,
                         "status": st, "params": 100, "budget": 101, "params_before": 200, "collapsed": "none",
                         "kept": "4/64"})
    return pd.DataFrame(rows)


def test_comparison_column_is_stats_compare_of_the_per_seed_values_and_failed_runs_are_not_averaged():
    values = {(0.5, "spvr"): [80.0, 81.0, 82.5], (0.5, "tp_l2"): [70.0, 71.5, 10.0],
              (0.5, "tp_taylor"): [79.0, 83.0, 80.0]}
    runs = _runs(values, {(0.5, "tp_l2", 2): "failed: at chance"})
    table = vit.comparison_table(runs).set_index("method")
    spvr = [80.0, 81.0, 82.5]
    for method, counted in (("tp_l2", [70.0, 71.5]), ("tp_taylor", [79.0, 83.0, 80.0])):
        cmp = stats.compare(counted, spvr, vit.NAMES[method], "SPvR")
        row = table.loc[vit.NAMES[method]]
        assert row["method - SPvR (95% interval)"] == cmp.interval_text() and row["verdict"] == cmp.verdict
    l2 = table.loc[vit.NAMES["tp_l2"]]
    assert l2["top1"] == stats.cell_text([70.0, 71.5], ["at chance"]) and l2["top1"].startswith("70.75 ")
    assert l2["failed runs"] == "2 of 3 seeds (1 at chance)"
    assert table.loc[vit.NAMES["tp_l2"], "verdict"] == "SPvR better"       # 10.0 left out: diff -10.67
    assert table.loc["SPvR", "verdict"] is None and table.loc["SPvR", "failed runs"] is None


def test_check_budgets_flags_a_network_over_its_budget():
    runs = _runs({(0.5, "spvr"): [80.0, 81.0]})
    assert vit.check_budgets(runs)["at or under"].all()
    runs.loc[:, "params"] = 102
    assert not vit.check_budgets(runs)["at or under"].any()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method='l1'"):
        vit.pruned(vit.setup("smoke"), "l1", 0.5)
    with pytest.raises(ValueError, match="keep=1.5"):
        vit.pruned(vit.setup("smoke"), "spvr", 1.5)
    with pytest.raises(ValueError, match="method='fpgm'"):
        vit_tp._HeadNeuronSelector(_vit(), _calib(), "fpgm", H)
    assert np.isfinite(vit_tp._rule_removes(0.5, 4, True)) and vit_tp._rule_removes(0.5, 4, True) == 2
