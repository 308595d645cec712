"""Baselines: every method lands on the SPvR parameter budget (or fails with a reason), keeps weights, leaves the
input model alone; bisection, Inf-FS, NISP and HRank checked on small hand-made cases."""
import copy
import math

import numpy as np
import pytest
import scipy.stats
import torch
import torch_pruning as tp
from torch import nn

from spvr_lib import baselines as B
from spvr_lib import models as M
from spvr_lib import budget

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 1, 32, 32, generator=g), torch.randint(0, 10, (40,), generator=g)


@pytest.fixture(scope="module")
def nets():
    torch.manual_seed(0)
    return {"vgg": M.build(M.vgg16_bn(num_classes=10, in_channels=1, width=1 / 16)),
            "resnet": M.build(M.resnet34(num_classes=10, in_channels=1, width=1 / 16))}


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


def _units(model, calib):
    return B._Units(copy.deepcopy(model).eval(), calib[0][:1])


def _one_group_step(model, calib, group_size):
    """Upper bound on the parameters one group of one unit costs in any pruned version of ``model``."""
    units = _units(model, calib)
    full = units.count({})
    return max(full - units.count({n: range(min(group_size, w))}) for n, w in units.widths.items())


def _check_ok(res, model, calib, keep):
    assert res.status == "ok", res.error
    assert res.error is None and res.notes
    assert res.params_before == M.count_params(model)
    assert res.budget == math.floor(keep * res.params_before)
    assert res.params_after == M.count_params(res.model) <= res.budget
    assert not hasattr(res.model, "spec")
    with torch.no_grad():
        assert res.model.eval()(calib[0][:3]).shape == (3, 10)


# --------------------------------------------------------------------------- bisection
def test_bisect_budget_on_a_monotone_step_function():
    def count(x):                                          # 37 steps of 20 parameters: 1000 -> 260
        return 1000 - 20 * math.floor(37 * x)
    x, c = B.bisect_budget(count, 500, tol=1e-9)
    assert c == count(x) == 500 and 25 / 37 <= x <= 25 / 37 + 1e-9
    assert count(x - 2e-9) > 500                           # one step less pruned exceeds the budget
    x, c = B.bisect_budget(count, 509)                     # between steps: the first step that fits
    assert c == 500 and count(x - 2e-9) == 520
    assert B.bisect_budget(count, 1000) == (0.0, 1000)     # nothing to prune
    with pytest.raises(B._MethodFailure, match="unreachable.*260 parameters > budget 259"):
        B.bisect_budget(count, 259)


# --------------------------------------------------------------------------- local (uniform-ratio) methods
@pytest.mark.parametrize("method, arch, keep", [
    ("l1", "vgg", 0.5), ("l1", "resnet", 0.1), ("l2", "resnet", 0.5), ("fpgm", "vgg", 0.1),
    ("taylor", "resnet", 0.5), ("hrank", "vgg", 0.5), ("nisp", "vgg", 0.1), ("nisp", "resnet", 0.5)])
def test_local_methods_land_on_the_budget(method, arch, keep, nets, calib):
    model = nets[arch]
    before = _state(model)
    res = B.prune(method, model, calib, keep, progress=False)
    _check_ok(res, model, calib, keep)
    assert _same_state(model, before) and hasattr(model, "spec")
    # tight: the ratio one bisection tolerance smaller (one channel more per unit) exceeds the budget
    units = _units(model, calib)
    flat = {n: torch.zeros(w) for n, w in units.widths.items()}
    assert units.count(B._local_removals(flat, units.widths, res.ratio, 1)) == res.params_after
    assert units.count(B._local_removals(flat, units.widths, res.ratio - 1e-8, 1)) > res.budget


@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_local_widths_match_torch_pruning_metapruner(arch, nets, calib):
    model = nets[arch]
    units = _units(model, calib)
    scores = units.scores(tp.importance.MagnitudeImportance(p=1))
    ours = units.apply(B._local_removals(scores, units.widths, 0.5, 2))
    theirs = copy.deepcopy(model).eval()
    classifier = theirs.classifier if arch == "vgg" else theirs.fc
    tp.pruner.MetaPruner(theirs, calib[0][:1], importance=tp.importance.MagnitudeImportance(p=1),
                         pruning_ratio=0.5, round_to=2, ignored_layers=[classifier]).step()
    widths = {n: m.weight.shape for n, m in ours.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert widths == {n: m.weight.shape for n, m in theirs.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert M.count_params(ours) == M.count_params(theirs) < M.count_params(model) / 3


def test_group_size_rounds_every_pruned_unit(nets, calib):
    res = B.prune("l2", nets["vgg"], calib, 0.3, group_size=4, progress=False)
    _check_ok(res, nets["vgg"], calib, 0.3)
    convs = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c % 4 == 0 for c in convs) and sum(convs) < sum(
        m.out_channels for m in nets["vgg"].modules() if isinstance(m, nn.Conv2d))


def test_pruned_weights_are_the_kept_channels(nets, calib):
    model = nets["vgg"]
    res = B.prune("l1", model, calib, 0.5, progress=False)
    first, pruned_first = model.features[0][0], res.model.features[0][0]
    units = _units(model, calib)
    scores = units.scores(tp.importance.MagnitudeImportance(p=1))["features.0.0"]
    kept = sorted(torch.argsort(scores, stable=True)[first.out_channels - pruned_first.out_channels:].tolist())
    assert torch.equal(pruned_first.weight, first.weight[kept])


# --------------------------------------------------------------------------- CURL, RCP, OTOv2
@pytest.mark.parametrize("arch, keep, group_size", [("vgg", 0.5, 1), ("resnet", 0.1, 2)])
def test_curl_global_ranking_with_floor(arch, keep, group_size, nets, calib):
    model = nets[arch]
    res = B.prune("curl", model, calib, keep, group_size=group_size, progress=False)
    _check_ok(res, model, calib, keep)
    assert res.params_after > res.budget - _one_group_step(model, calib, group_size)
    for (name, m), orig in zip(res.model.named_modules(), model.modules()):
        if isinstance(m, nn.Conv2d):
            assert m.out_channels >= math.ceil(0.1 * orig.out_channels), name
    widths = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(set(widths)) > 1 and 0 < res.ratio < 1


def test_curl_reports_an_unreachable_budget(nets, calib):
    res = B.prune("curl", nets["vgg"], calib, 0.01, group_size=4, progress=False)
    assert res.status == "failed" and res.model is None and res.params_after is None
    assert "budget unreachable" in res.error and "CURL keeps at least 10%" in res.error


def test_rcp_keeps_the_best_short_trained_candidate(nets, calib):
    model, seen = nets["resnet"], []

    def short_train(m):                                    # "accuracy" = size: the largest candidate wins
        seen.append(M.count_params(m))
        return float(seen[-1])

    res = B.prune("rcp", model, calib, 0.5, n_samples=2, short_train=short_train, seed=1, progress=False)
    _check_ok(res, model, calib, 0.5)
    assert len(seen) == 2 and res.params_after == max(seen)
    assert res.params_after > res.budget - _one_group_step(model, calib, 1)
    again = B.prune("rcp", model, calib, 0.5, n_samples=2, short_train=lambda m: 0.0, seed=1, progress=False)
    assert again.params_after == seen[0]                   # same seed, same first sample; ties keep the first


def test_rcp_proxy_without_short_train(nets, calib):
    res = B.prune("rcp", nets["vgg"], calib, 0.1, n_samples=2, progress=False)
    _check_ok(res, nets["vgg"], calib, 0.1)
    assert "proxy" in res.notes


def test_otov2_fails_with_its_reason(nets, calib):
    res = B.prune("otov2", nets["vgg"], calib, 0.5, progress=False)
    assert res.status == "failed" and res.model is None and res.ratio is None
    assert "DHSPG" in res.error and "torch 2.15" in res.error


def test_unreachable_budget_is_a_failed_result(nets, calib):
    res = B.prune("l1", nets["resnet"], calib, 100, progress=False)
    assert res.status == "failed" and res.budget == 100
    assert res.error.startswith("budget unreachable") and "> budget 100" in res.error


def test_nisp_on_a_generic_module_fails_with_reason(calib):
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    res = B.prune("nisp", model, calib, 0.7, progress=False)
    assert res.status == "failed" and "VGG and ResNet" in res.error
    ok = B.prune("l1", model, calib, 0.7, progress=False)     # torch-pruning methods take any module
    _check_ok(ok, model, calib, 0.7)


# --------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("keep", [0, -3, 0.0, 1.5, True, "0.5", None])
def test_bad_keep_raises(keep, nets, calib):
    with pytest.raises(ValueError, match="keep"):
        B.prune("l1", nets["vgg"], calib, keep, progress=False)


def test_bad_arguments_raise(nets, calib):
    n = M.count_params(nets["vgg"])
    with pytest.raises(ValueError, match=rf"\[1, {n}\]"):
        B.prune("l1", nets["vgg"], calib, n + 1, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        B.prune("spvr", nets["vgg"], calib, 0.5)
    with pytest.raises(ValueError, match="unknown keyword.*n_samples"):
        B.prune("l1", nets["vgg"], calib, 0.5, n_samples=3)
    with pytest.raises(ValueError, match="calib"):
        B.prune("l1", nets["vgg"], (calib[0], calib[1].float()), 0.5)
    with pytest.raises(ValueError, match="group_size"):
        B.prune("l1", nets["vgg"], calib, 0.5, group_size=0)
    with pytest.raises(ValueError, match="floor_fraction"):
        B.prune("curl", nets["vgg"], calib, 0.5, floor_fraction=1.0)
    with pytest.raises(ValueError, match="short_train"):
        B.prune("rcp", nets["vgg"], calib, 0.5, short_train=3)
    assert B.budget_from_keep(7, 10) == 7 and B.budget_from_keep(0.55, 10) == 5 and B.budget_from_keep(1.0, 10) == 10
    assert B.budget_from_keep is budget.budget_from_keep


def test_names():
    assert B.BASELINES == ("l1", "l2", "taylor", "fpgm", "rcp", "hrank", "curl", "nisp", "otov2")
    assert set(B.DISPLAY_NAMES) == set(B.NOTES) == set(B.BASELINES) and B.DISPLAY_NAMES["l1"] == "ℓ1"


# --------------------------------------------------------------------------- importances on hand-made cases
def test_inf_fs_matches_a_direct_computation():
    g = torch.Generator().manual_seed(3)
    f = torch.randn(30, 5, generator=g) * torch.tensor([1.0, 2.0, 0.5, 3.0, 1.0])
    f[:, 4] = f[:, 0] * 2 + 0.1 * f[:, 4]                  # a feature correlated with feature 0
    x = f.numpy().astype(np.float64)
    std = x.std(axis=0, ddof=1)
    sigma = np.maximum.outer(std, std)
    sigma = (sigma - sigma.min()) / (sigma.max() - sigma.min())
    rho = scipy.stats.spearmanr(x).statistic
    a = 0.5 * sigma + 0.5 * (1 - np.abs(rho))
    s = np.linalg.inv(np.eye(5) - 0.9 / np.linalg.eigvalsh(a).max() * a).sum(axis=1)
    assert np.allclose(B.inf_fs(f).numpy(), s)
    perm = torch.tensor([3, 1, 4, 0, 2])
    assert torch.allclose(B.inf_fs(f[:, perm]), B.inf_fs(f)[perm])


def test_nisp_propagates_abs_weights_back_from_the_final_layer():
    spec = {"arch": "vgg", "cfg": [3, "M", 2], "in_channels": 1, "num_classes": 2}
    torch.manual_seed(1)
    model = M.build(spec).eval()
    with torch.no_grad():
        for bn in (model.features[0][1], model.features[2][1]):
            bn.weight.uniform_(-2, 2)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(20, 1, 8, 8)
    scores = B._nisp_scores(model, x, torch.zeros(20, dtype=torch.long), 7, torch.device("cpu"), False)
    conv1, bn1, conv2, bn2 = model.features[0][0], model.features[0][1], model.features[2][0], model.features[2][1]
    with torch.no_grad():
        frl = model.pool(model.features(x)).flatten(1)
    s2 = B.inf_fs(frl)
    scale2 = (bn2.weight / (bn2.running_var + bn2.eps).sqrt()).abs().double()
    s1 = conv2.weight.detach().abs().sum((2, 3)).double().T @ (s2 * scale2)
    assert torch.allclose(scores[conv2], s2) and torch.allclose(scores[conv1], s1)
    assert set(scores) == {conv1, conv2}


def test_hrank_scores_are_feature_map_ranks():
    spec = {"arch": "vgg", "cfg": [3], "in_channels": 1, "num_classes": 2}
    model = M.build(spec).eval()
    conv, bn = model.features[0][0], model.features[0][1]
    with torch.no_grad():
        conv.weight[0] = 0                                 # channel 0: a constant map, ReLU(0) = 0: rank 0
        conv.bias[0] = 0
        conv.weight[1] = 0
        conv.weight[1, 0, 1, 1] = 1                        # channel 1: ReLU of a standardised copy of the input
    x = torch.randn(6, 1, 5, 5)
    x[:3, :, 2:] = 0                                       # images 0-2 have rank <= 2 (two non-zero rows)
    ranks = B._hrank_scores(model, x, torch.zeros(6, dtype=torch.long), 4, torch.device("cpu"), False)[bn]
    bn_out = bn(conv(x)).relu()
    expected = torch.linalg.matrix_rank(bn_out).double().mean(0)
    assert ranks[0] == 0 and torch.allclose(ranks, expected) and ranks[1] > 0


def test_channel_score_importance_sums_a_residual_stream(nets, calib):
    model = copy.deepcopy(nets["resnet"]).eval()
    units = B._Units(model, calib[0][:1])
    stream = next(n for n in units.groups if len(units.out_modules(n)) > 2)   # stem conv + blocks of layer1
    members = units.out_modules(stream)
    convs = [m for m in members if isinstance(m, nn.Conv2d)]
    scores = {m: torch.arange(m.out_channels, dtype=torch.float64) * (i + 1) for i, m in enumerate(convs)}
    got = B.ChannelScoreImportance(scores)(units.groups[stream])
    assert torch.equal(got, sum(scores.values()))


# --------------------------------------------------------------------------- Table 3
def test_reinitialize_works_on_a_pruned_copy(nets, calib):
    res = B.prune("l1", nets["vgg"], calib, 0.5, progress=False)
    pruned = res.model
    with torch.no_grad():
        for bn in (m for m in pruned.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.fill_(3)
            bn.running_mean.fill_(1)
    old = copy.deepcopy(pruned)
    assert M.reinitialize(pruned) is pruned
    for m, o in zip(pruned.modules(), old.modules()):
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0) and torch.all(m.running_mean == 0)
            assert torch.all(m.running_var == 1)
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape == o.weight.shape and not torch.equal(m.weight, o.weight)
            assert torch.all(m.bias == 0)
    assert torch.all(pruned.classifier.bias == 0) and pruned.classifier.weight.std() < 0.05   # VGG: N(0, 0.01)
    assert M.count_params(pruned) == res.params_after
    class Scale(nn.Module):                     # parameters without reset_parameters(): refused, named
        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="Scale"):
        M.reinitialize(nn.Sequential(nn.Linear(3, 3), Scale()))
