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
    assert type(res.model) is type(model)            # the rebuild keeps the network's class (nothing collapses)
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
    ("hrank", "resnet", 0.5), ("hrank", "vgg", 0.5), ("nisp", "vgg", 0.1), ("nisp", "resnet", 0.5)])
def test_local_methods_land_on_the_budget(method, arch, keep, nets, calib):
    model = nets[arch]
    before = _state(model)
    res = B.prune(method, model, calib, keep, progress=False)
    _check_ok(res, model, calib, keep)
    assert _same_state(model, before) and hasattr(model, "spec")
    # the ratio is tight (one channel more in every unit exceeds the budget), and the last step is split
    # over the units: the result is within one unit's group of the budget, never over it
    units = _units(model, calib)
    flat = {n: torch.zeros(w) for n, w in units.widths.items()}
    assert units.count(B._local_removals(flat, units.widths, res.ratio, 1)) <= res.params_after
    assert units.count(B._local_removals(flat, units.widths, res.ratio - 1e-8, 1)) > res.budget
    assert res.params_after > res.budget - _one_group_step(model, calib, 1)


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


def _metapruner_kept(model, calib, method, ratio, round_to):
    """The (layer name -> kept output-channel weights) of Torch-Pruning's own MetaPruner with ``method``'s
    importance, local selection at ``ratio`` (gradients, where the importance reads them, set as ours are)."""
    theirs = copy.deepcopy(model).eval()
    if method == "tp_taylor":
        B._accumulate_gradients(theirs, *calib, 16, torch.device("cpu"), False)
    classifier = theirs.classifier if hasattr(theirs, "classifier") else theirs.fc
    tp.pruner.MetaPruner(theirs, calib[0][:1], importance=B.tp_importance(method), pruning_ratio=ratio,
                         global_pruning=False, round_to=round_to, ignored_layers=[classifier]).step()
    return theirs


@pytest.mark.parametrize("method", ["tp_l1", "tp_l2", "tp_taylor", "tp_fpgm"])
@pytest.mark.parametrize("arch", ["vgg", "resnet"])
def test_torch_pruning_criteria_keep_the_channels_metapruner_keeps(method, arch, nets, calib):
    """Fast path (our units, scores, local rule) = reference path (Torch-Pruning's MetaPruner), channel for
    channel, for every Torch-Pruning criterion of Table 1 at one ratio."""
    model = nets[arch]
    work = copy.deepcopy(model).eval()
    units = B._Units(work, calib[0][:1])
    if method == "tp_taylor":
        B._accumulate_gradients(work, *calib, 16, torch.device("cpu"), False)
    scores = units.scores(B.tp_importance(method))
    assert all(s is not None for s in scores.values())
    ours = units.apply(B._local_removals(scores, units.widths, 0.4, 2))
    theirs = _metapruner_kept(model, calib, method, 0.4, 2)
    mine, ref = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in mine)
    assert M.count_params(ours) < 0.5 * M.count_params(model)


def test_torch_pruning_taylor_needs_the_calibration_gradients(nets, calib):
    """Taylor's scores come from d(loss)/dw on the calibration data: other labels give another ranking."""
    model = nets["vgg"]
    res = {}
    for name, y in (("true", calib[1]), ("shifted", (calib[1] + 3) % 10)):
        work = copy.deepcopy(model).eval()
        units = B._Units(work, calib[0][:1])
        B._accumulate_gradients(work, calib[0], y, 16, torch.device("cpu"), False)
        res[name] = units.scores(B.tp_importance("tp_taylor"))
    assert any(not torch.equal(torch.argsort(res["true"][n]), torch.argsort(res["shifted"][n])) for n in res["true"])


@pytest.mark.parametrize("method, arch, keep", [("tp_l1", "vgg", 0.1), ("tp_taylor", "resnet", 0.5),
                                                ("tp_fpgm", "resnet", 0.1), ("tp_l2", "vgg", 0.5)])
def test_torch_pruning_methods_land_on_the_budget(method, arch, keep, nets, calib):
    model = nets[arch]
    before = _state(model)
    res = B.prune(method, model, calib, keep, progress=False)
    _check_ok(res, model, calib, keep)
    assert _same_state(model, before) and all(p.grad is None for p in model.parameters())
    assert res.params_after > res.budget - _one_group_step(model, calib, 1)
    assert "Torch-Pruning" in res.notes and B.TP_IMPORTANCES[method][0] in res.notes


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


# --------------------------------------------------------------------------- global methods: Taylor, CURL
@pytest.mark.parametrize("method, arch, keep", [("taylor", "resnet", 0.5), ("taylor", "vgg", 0.2),
                                                ("curl", "vgg", 0.5), ("curl", "resnet", 0.3)])
def test_global_methods_land_tightly_on_the_budget(method, arch, keep, nets, calib):
    model = nets[arch]
    res = B.prune(method, model, calib, keep, progress=False)
    _check_ok(res, model, calib, keep)
    assert res.params_after > res.budget - _one_group_step(model, calib, 1)      # one channel from the budget
    widths = [m.out_channels for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    assert len(set(widths)) > 1 and 0 < res.ratio < 1
    if method == "curl":                  # CURL's floor: removal stops once a unit keeps < 30% of its channels
        for m, orig in zip(res.model.modules(), model.modules()):
            if isinstance(m, nn.Conv2d):
                assert m.out_channels >= math.floor(0.3 * orig.out_channels)


def test_curl_lowers_its_floor_only_where_the_budget_needs_it(nets, calib):
    res = B.prune("curl", nets["vgg"], calib, 0.05, progress=False)
    _check_ok(res, nets["vgg"], calib, 0.05)
    assert "out of reach with a 30% floor" in res.notes
    easy = B.prune("curl", nets["vgg"], calib, 0.6, progress=False)
    assert "out of reach" not in easy.notes
    impossible = B.prune("curl", nets["vgg"], calib, 0.0005, progress=False)
    assert impossible.status == "failed" and "budget unreachable" in impossible.error


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
    assert "DHSPG" in res.error and "installed torch " + torch.__version__.split("+")[0] in res.error


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
    assert B.BASELINES == ("tp_l1", "tp_l2", "tp_taylor", "tp_fpgm", "rcp", "hrank", "curl", "nisp", "otov2")
    assert B.PRUNE_METHODS == (*B.BASELINES, "l1", "l2", "taylor", "fpgm")
    assert set(B.DISPLAY_NAMES) == set(B.NOTES) == set(B.METHOD_CARDS) == set(B.PRUNE_METHODS)
    assert B.DISPLAY_NAMES["tp_l1"] == "ℓ1" and B.DISPLAY_NAMES["l1"] == "ℓ1 (Li et al.)"
    assert set(B.AUTHORS_VARIANT_OF) == set(B.TP_IMPORTANCES) and set(B.AUTHORS_VARIANT_OF.values()) == \
        set(B.AUTHORS_VARIANTS)


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
    conv1, _bn1, conv2, bn2 = model.features[0][0], model.features[0][1], model.features[2][0], model.features[2][1]
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


# --------------------------------------------------------------------------- each criterion against an
# independent reference computed here, on a small hand-made network
def _kept_rows(orig: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Which output filters of ``orig`` [C, ...] survive in ``pruned`` [k, ...] (matched by value)."""
    return sorted(next(i for i in range(orig.shape[0]) if torch.equal(orig[i, :row.shape[0]], row) or
                       torch.equal(orig[i], row)) for row in pruned)


def test_l1_keeps_the_filters_with_the_largest_sum_abs_w(nets, calib):
    model = nets["vgg"]
    res = B.prune("l1", model, calib, 0.4, progress=False)
    _check_ok(res, model, calib, 0.4)
    orig_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    new_convs = [m for m in res.model.modules() if isinstance(m, nn.Conv2d)]
    checked, prev = 0, None
    for i, (o, n) in enumerate(zip(orig_convs, new_convs)):
        ins = list(range(o.in_channels)) if prev is None else prev      # the previous layer's kept channels
        if n.out_channels == o.out_channels:
            prev = list(range(o.out_channels))
            continue
        norms = o.weight.detach().abs().sum((1, 2, 3))                  # Li et al.: the filter's own L1 norm
        expected = sorted(torch.argsort(norms, descending=True)[:n.out_channels].tolist())
        got = _kept_rows(o.weight.detach()[:, ins], n.weight.detach())
        assert got == expected, i
        prev = got
        checked += 1
    assert checked >= 10


def test_fpgm_uses_raw_filters_so_a_and_minus_a_are_not_redundant():
    conv = nn.Conv2d(1, 3, 1, bias=False)
    a, b = torch.tensor([3.0]), torch.tensor([2.5])
    with torch.no_grad():
        conv.weight[:, 0, 0, 0] = torch.stack([a, -a, b])[:, 0]
    work = nn.Sequential(conv, nn.Flatten(), nn.Linear(3, 2))
    scores = B._filter_scores(work, "fpgm")[conv]
    # distances between raw filters: a-(-a) = 6, a-b = 0.5, -a-b = 5.5
    assert torch.allclose(scores, torch.tensor([6 + 0.5, 6 + 5.5, 0.5 + 5.5], dtype=torch.float64))
    # b is nearest the geometric median and goes first; with squared magnitudes a and -a would coincide
    # (distance 0) and one of them would go first instead
    assert int(scores.argmin()) == 2
    # squared magnitudes would make a and -a identical (distance 0): the sign matters here
    assert scores[0] != scores[1]


def _two_block_resnet():
    spec = {"arch": "resnet", "block": "basic", "in_channels": 1, "num_classes": 3, "stem": "cifar",
            "stem_width": 4, "stages": [{"name": "layer1", "width": 4, "blocks": 2, "stride": 1}]}
    torch.manual_seed(3)
    model = M.build(spec).eval()
    with torch.no_grad():                    # non-trivial BN statistics and affine parameters
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.2, 0.4)
            bn.running_mean.uniform_(-0.1, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model


def test_curl_masks_a_stream_channel_jointly_with_its_kl_direction():
    model = _two_block_resnet()
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    units = B._Units(copy.deepcopy(model), x[:1])
    stream = next(n for n in units.groups if len(units.out_modules(n)) > 2)   # stem conv + both blocks' conv2
    got = B._curl_scores(units.model, units, x, batch_size=4, progress=False)[stream]
    with torch.no_grad():
        p = torch.softmax(model(x).double(), 1)
    for c in range(4):
        masked = copy.deepcopy(model)
        with torch.no_grad():               # CURL: gamma = beta = 0 in the stem BN and every block's last BN
            for bn in (masked.bn1, masked.layer1[0].bn2, masked.layer1[1].bn2):
                bn.weight[c] = 0
                bn.bias[c] = 0
        q = torch.softmax(masked(x).double(), 1)
        expected = (q * (q.log() - p.log())).sum(1).mean()                    # KL(p_masked || p)
        assert torch.isclose(got[c], expected, rtol=1e-6, atol=1e-12), c
    # the sum of branch-only masks (the old scoring) is a different number
    branch_only = 0.0
    for bn_name in ("layer1.0.bn2", "layer1.1.bn2"):
        masked = copy.deepcopy(model)
        with torch.no_grad():
            masked.get_submodule(bn_name).weight[0] = 0
            masked.get_submodule(bn_name).bias[0] = 0
        q = torch.softmax(masked(x).double(), 1)
        branch_only += float((q * (q.log() - p.log())).sum(1).mean().detach())
    assert not math.isclose(branch_only, float(got[0]), rel_tol=1e-3)


def test_hrank_ranks_the_map_after_the_residual_addition():
    model = _two_block_resnet()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    scores = B._hrank_scores(model, x, torch.zeros(5, dtype=torch.long), 5, torch.device("cpu"), False)
    produced, pre_addition = {}, {}
    hooks = [blk.register_forward_hook(lambda m, i, o: produced.__setitem__(m, o)) for blk in model.layer1]
    hooks += [blk.bn2.register_forward_hook(lambda m, i, o: pre_addition.__setitem__(m, o)) for blk in model.layer1]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for block in model.layer1:                 # a block's last BN is scored by the block's output
        expected = torch.linalg.matrix_rank(produced[block]).double().mean(0)
        assert torch.allclose(scores[block.bn2], expected)
    # ... which is not the rank of the BN output before the addition (the old scoring) for some channel
    before = [torch.linalg.matrix_rank(pre_addition[blk.bn2].relu()).double().mean(0) for blk in model.layer1]
    assert any(not torch.equal(scores[blk.bn2], r) for blk, r in zip(model.layer1, before))
    # the stream unit sums the ranks of every map it produces: stem ReLU output + both block outputs
    units = B._Units(model, x[:1])
    stream = next(n for n in units.groups if len(units.out_modules(n)) > 2)
    total = B.ChannelScoreImportance(scores)(units.groups[stream])
    assert torch.allclose(total, scores[model.bn1] + scores[model.layer1[0].bn2] + scores[model.layer1[1].bn2])


def test_taylor_stays_positive_when_the_batch_gradients_cancel():
    spec = {"arch": "vgg", "cfg": [3], "in_channels": 1, "num_classes": 2}
    torch.manual_seed(0)
    model = M.build(spec).eval()
    x = torch.randn(1, 1, 4, 4)
    with torch.no_grad():                      # equal logits at x: p = (1/2, 1/2), so the CE gradients of
        z = model(x)[0]                        # labels 0 and 1 are exact negatives of each other
        model.classifier.bias[0] -= z[0] - z[1]
    xx, yy = torch.cat([x, x]), torch.tensor([0, 1])
    scores = B._taylor_scores(model, xx, yy, 1, torch.device("cpu"), False)
    bn = model.features[0][1]
    expected = torch.zeros(3, dtype=torch.float64)
    whole = None
    for i in range(2):                         # by hand: (gamma * dL/dgamma)^2 per mini-batch, summed
        model.zero_grad()
        nn.functional.cross_entropy(model(xx[i:i + 1]), yy[i:i + 1]).backward()
        g = bn.weight.grad.detach().double()
        gate = bn.weight.detach().double() * g + bn.bias.detach().double() * bn.bias.grad.detach().double()
        expected += gate ** 2
        whole = gate if whole is None else whole + gate
    assert torch.allclose(whole, torch.zeros(3, dtype=torch.float64), atol=1e-7)   # the batches cancel
    assert torch.allclose(scores[bn], expected) and (scores[bn] > 0).all()


def test_taylor_is_the_gate_criterion_beta_term_included():
    """Independent of the gamma/beta identity: a real gate of ones after each BN (as NVlabs/Taylor_pruning's
    GateLayer), its score (gate * dL/dgate)^2 per mini-batch summed, equals ours; and differs from the
    gamma-only score (the beta term counts)."""
    torch.manual_seed(3)
    model = M.build({"arch": "vgg", "cfg": [4, "M", 3], "in_channels": 1, "num_classes": 3}).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.bias.uniform_(-1, 1)
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ours = B._taylor_scores(model, x, y, 3, torch.device("cpu"), False)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    gates = {bn: torch.ones(bn.num_features, dtype=torch.float64, requires_grad=True) for bn in bns}
    hooks = [bn.register_forward_hook(lambda m, i, o: o * gates[m].to(o.dtype)[None, :, None, None]) for bn in bns]
    expected = {bn: torch.zeros(bn.num_features, dtype=torch.float64) for bn in bns}
    gamma_only = {bn: torch.zeros(bn.num_features, dtype=torch.float64) for bn in bns}
    for i in (0, 3):
        model.zero_grad()
        for g in gates.values():
            g.grad = None
        nn.functional.cross_entropy(model(x[i:i + 3]), y[i:i + 3]).backward()
        for bn in bns:
            expected[bn] += (gates[bn].detach() * gates[bn].grad) ** 2
            gamma_only[bn] += (bn.weight.detach().double() * bn.weight.grad.double()) ** 2
    for h in hooks:
        h.remove()
    for bn in bns:
        assert torch.allclose(ours[bn], expected[bn], rtol=1e-5, atol=1e-12)
        assert not torch.allclose(ours[bn], gamma_only[bn], rtol=1e-3)


def test_rcp_picks_the_candidate_its_selection_rule_prefers(nets, calib):
    model, seen = nets["vgg"], []
    preferred = [0.2, 0.9, 0.4]                 # the brief training's validation accuracies, in sampling order

    def short_train(m):
        seen.append([c.out_channels for c in m.modules() if isinstance(c, nn.Conv2d)])
        return preferred[len(seen) - 1]

    res = B.prune("rcp", model, calib, 0.5, n_samples=3, short_train=short_train, seed=4, progress=False)
    _check_ok(res, model, calib, 0.5)
    assert len(seen) == 3 and len({tuple(w) for w in seen}) == 3
    assert [c.out_channels for c in res.model.modules() if isinstance(c, nn.Conv2d)] == seen[1]
    assert "brief training" in res.notes


def test_method_table_has_every_baseline_and_the_repository_read():
    rows = B.method_table()
    assert [r["method"] for r in rows] == [B.DISPLAY_NAMES[m] for m in B.PRUNE_METHODS]
    assert [r["table"] for r in rows].count("Table 1") == len(B.BASELINES)
    for m, r in zip(B.PRUNE_METHODS, rows):
        if m in B.TP_IMPORTANCES:        # the method table names Torch-Pruning's class and its selection
            assert B.TP_IMPORTANCES[m][0] in r["criterion"] and "global_pruning=False" in r["ranking"]
            assert "Torch-Pruning" in r["read from"]
    for r in rows:
        assert set(r) == {"method", "table", "criterion", "ranking", "per-layer constraint", "calibration samples",
                          "differences from the authors' code", "read from"} and all(r.values())
    assert "installed torch " + torch.__version__.split("+")[0] in B.OTOV2_UNAVAILABLE


def test_local_selection_is_exact_where_whole_stages_share_a_width():
    """ResNet50 at 1/8 width, 40% removed, d = 1: one step of the uniform ratio is over a point of the model;
    the split last step lands within a point of the rate (as the cpu-scale protocol requires)."""
    spec = M.preset("resnet50", num_classes=10, in_channels=1, width=1 / 8, stem="imagenet")
    torch.manual_seed(0)
    model = M.build(spec).eval()
    g = torch.Generator().manual_seed(0)
    calib = (torch.randn(20, 1, 32, 32, generator=g), torch.arange(20) % 10)
    res = B.prune("l1", model, calib, 0.6, group_size=1, progress=False)
    removed = 1 - res.params_after / res.params_before
    assert res.params_after <= res.budget and abs(removed - 0.4) < 0.01


def test_taylor_gates_accumulate_the_gate_criterion_and_mask_to_a_target():
    """NVlabs's schedule, its pieces: while training, each mini-batch adds (sum dL/dout * out)^2 per BN channel
    (the gate's criterion, checked against a real gate); a step masks the least important channels until the
    parameter count meets the target; the pruned network computes what the gated one does."""
    torch.manual_seed(5)
    model = M.build({"arch": "vgg", "cfg": [6, "M", 5], "in_channels": 1, "num_classes": 3})
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    reference = copy.deepcopy(model).train()
    gates = B.TaylorGates(model, x[:1])
    model.train()
    expected = {}
    for i in (0, 4):                                 # two mini-batches, by hand with real gates on the copy
        real = {bn: torch.ones(bn.num_features, requires_grad=True) for bn in reference.modules()
                if isinstance(bn, nn.BatchNorm2d)}
        hooks = [bn.register_forward_hook(lambda m, _, o: o * real[m][None, :, None, None]) for bn in real]
        nn.functional.cross_entropy(reference(x[i:i + 4]), y[i:i + 4]).backward()
        for h in hooks:
            h.remove()
        for j, bn in enumerate(real):
            expected[j] = expected.get(j, 0) + real[bn].grad.double() ** 2
        nn.functional.cross_entropy(model(x[i:i + 4]), y[i:i + 4]).backward()
    got = [bn.spvr_gate_score for bn in model.modules() if isinstance(bn, nn.BatchNorm2d)]
    assert all(torch.allclose(got[j], expected[j], rtol=1e-4, atol=1e-10) for j in expected)

    before = gates.count()
    target = before - 40
    count = gates.step(target)
    assert count <= target and gates.count() == count
    removed = gates.removals()
    assert sum(map(len, removed.values())) >= 1 and all(len(v) < gates.units.widths[n] for n, v in removed.items())
    assert all(float(bn.spvr_gate_score.abs().sum()) == 0 for bn in model.modules() if isinstance(bn, nn.BatchNorm2d))
    model.eval()
    with torch.no_grad():
        gated = model(x)
        pruned = gates.pruned().eval()
        assert M.count_params(pruned) == count
        assert torch.allclose(pruned(x), gated, atol=1e-5)
        assert not hasattr(pruned.features[1], "spvr_gate")
    with pytest.raises(ValueError, match="target=10"):
        B.TaylorGates(copy.deepcopy(reference), x[:1]).step(10)
