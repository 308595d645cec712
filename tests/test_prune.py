"""The SPvR pruner: grouping per layer, the global budget loop (collapse, ResNet stage ties), the whole
method end to end, weight inheritance, bad input and the command line."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from spvr_lib import models
from spvr_lib.grouping import correlation_matrix, group_neurons
from spvr_lib.prune import PruneResult, budget_step, inherit_weights, network_units, spvr_prune, unit_groups
from spvr_lib.budget import budget_from_keep
from spvr_lib.spec_units import SpecGraph
from spvr_lib.ranking import mask_output

torch.set_num_threads(1)

SMALL_VGG = {"arch": "vgg", "cfg": [3, "M", 4, 5, "M", 6], "in_channels": 1, "num_classes": 4}
SMALL_BASIC = {"arch": "resnet", "block": "basic", "stem": "cifar", "stem_width": 4, "in_channels": 1,
               "num_classes": 4, "stages": [{"name": "layer1", "width": 4, "blocks": 2, "stride": 1},
                                            {"name": "layer2", "width": 6, "blocks": 2, "stride": 2}]}
SMALL_BOTTLENECK = {"arch": "resnet", "block": "bottleneck", "stem": "cifar", "stem_width": 4,
                    "in_channels": 1, "num_classes": 4,
                    "stages": [{"name": "layer1", "width": 4, "blocks": 2, "stride": 1},
                               {"name": "layer2", "width": 3, "blocks": 1, "stride": 2}]}
SMALL_MLP = {"arch": "mlp", "in_features": 6, "hidden": [5, 4], "num_classes": 3}


def _preset(name: str) -> dict:
    kw = {} if name == "vgg16_bn" else {"stem": "imagenet"}
    return models.preset(name, num_classes=10, in_channels=1, width=1 / 16, **kw)


def _setup(spec: dict, d: int = 2, seed: int = 0):
    """Model, its prunable layers, consecutive groups of d channels, random scores in [1, 2)."""
    torch.manual_seed(seed)
    model = models.build(spec)
    layers = models.prunable_layers(model, spec)
    groups = {l.name: [list(range(i, min(i + d, l.width))) for i in range(0, l.width, d)] for l in layers}
    rng = np.random.default_rng(seed)
    scores = {name: 1 + rng.random(len(gs)) for name, gs in groups.items()}
    return model, layers, groups, scores


def _input(spec: dict, n: int = 2) -> torch.Tensor:
    return torch.randn(n, spec["in_features"]) if spec["arch"] == "mlp" else torch.randn(n, 1, 32, 32)


def _check_invariants(spec: dict, decided, budget: int) -> nn.Module:
    """params_after <= budget, >= budget - last step, == the rebuilt model's count; a forward pass runs."""
    assert decided.params_after <= budget
    assert decided.params_after >= budget - decided.last_step
    model = models.build(decided.spec)
    assert models.count_params(model) == decided.params_after
    with torch.no_grad():
        out = model.eval()(_input(decided.spec))
    assert out.shape == (2, spec["num_classes"])
    return model


def apply_budget(spec, layers, groups, scores, budget):
    """The budget step on a spvr_lib spec's description (what spvr_prune runs after the ranking)."""
    return budget_step(SpecGraph(models.build(spec), spec, torch.zeros(1)), groups, scores, budget)


# --------------------------------------------------------------------------- grouping
def test_a_spvr_lib_network_s_units_are_its_prunable_layers_grouped_at_their_mask_point():
    torch.manual_seed(0)
    model = models.build(SMALL_BOTTLENECK).eval()
    x = torch.randn(12, 1, 16, 16)
    g = network_units(model, x)
    assert isinstance(g, SpecGraph) and g.ties == {u.name: u.name.split(".")[0] for u in g.units}
    groups = unit_groups(model, g, x, group_size=3, batch_size=5)
    layers = models.prunable_layers(model, SMALL_BOTTLENECK)
    assert list(groups) == [l.name for l in layers]
    for l in layers:
        assert sorted(c for g in groups[l.name] for c in g) == list(range(l.width))
        assert [len(g) for g in groups[l.name]][:-1] == [3] * (len(groups[l.name]) - 1)
    assert len(groups["layer1.0.conv3"]) == 6                   # 16 channels (4w), grouped like any layer
    out = []
    bn = model.layer1[1].bn2
    handle = bn.register_forward_hook(lambda m, i, o: out.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    assert groups["layer1.1.conv2"] == group_neurons(correlation_matrix(out[0]), 3)


# --------------------------------------------------------------------------- the budget loop
def _late_layers_weakest(layers, scores):
    """Scores that decrease with depth, so that besides the victims only the last layers shrink."""
    return {l.name: scores[l.name] + 2 * (len(layers) - pos) for pos, l in enumerate(layers)}


def test_vgg_layer_collapses_when_its_groups_rank_last():
    spec = _preset("vgg16_bn")
    _, layers, groups, scores = _setup(spec)
    scores = _late_layers_weakest(layers, scores)
    victim = "features.4.0"                                        # cfg[4], the second conv of stage 2
    scores[victim] = np.full(len(groups[victim]), 1e-6)
    budget = int(0.88 * models.spec_params(spec))
    decided = apply_budget(spec, layers, groups, scores, budget)
    assert decided.kept[victim] == [] and all(decided.removed[victim])
    assert sum(c != "M" for c in decided.spec["cfg"]) == 12 and decided.spec["cfg"].count("M") == 5
    _check_invariants(spec, decided, budget)


def test_vgg_stage_collapses_with_its_pool():
    spec = _preset("vgg16_bn")
    _, layers, groups, scores = _setup(spec)
    scores = _late_layers_weakest(layers, scores)
    for victim in ("features.3.0", "features.4.0"):               # the whole second stage [8, 8, "M"]
        scores[victim] = np.full(len(groups[victim]), 1e-6)
    budget = int(0.88 * models.spec_params(spec))
    decided = apply_budget(spec, layers, groups, scores, budget)
    assert decided.spec["cfg"].count("M") == 4 and sum(c != "M" for c in decided.spec["cfg"]) == 11
    assert decided.spec["cfg"][:3] == [4, 4, "M"] and decided.spec["cfg"][3] != "M"
    _check_invariants(spec, decided, budget)


def test_resnet_stage_collapses_and_neighbours_are_joined():
    spec = _preset("resnet34")
    _, layers, groups, scores = _setup(spec)
    scores = _late_layers_weakest(layers, scores)
    for l in layers:
        if l.tie == "layer2":
            scores[l.name] = np.full(len(groups[l.name]), 1e-6)
    budget = int(0.88 * models.spec_params(spec))
    decided = apply_budget(spec, layers, groups, scores, budget)
    assert [st["name"] for st in decided.spec["stages"]][:2] == ["layer1", "layer3"]
    assert all(decided.kept[l.name] == [] for l in layers if l.tie == "layer2")
    model = _check_invariants(spec, decided, budget)
    assert model.layer3[0].downsample is not None                # layer1 -> layer3 by a projection


def test_resnet_tie_rule_one_step():
    """Discarding layer1.0.conv1's weakest group discards the weakest group of every other layer of the
    stage: every layer keeps its most significant group, and the stage width drops by d = 2."""
    _, layers, groups, scores = _setup(SMALL_BASIC)
    scores = {name: np.array([2.0, 3.0]) if name.startswith("layer1") else 5 + s for name, s in scores.items()}
    scores["layer1.0.conv1"] = np.array([4.0, 1.0])               # the global minimum: group 1 of the first conv
    scores["layer1.1.conv2"] = np.array([3.0, 2.5])
    params = models.spec_params(SMALL_BASIC)
    decided = apply_budget(SMALL_BASIC, layers, groups, scores, params - 1)
    assert decided.steps == 1
    assert decided.spec["stages"][0]["width"] == 2 and decided.spec["stages"][1]["width"] == 6
    assert decided.kept["layer1.0.conv1"] == [0, 1]
    assert decided.kept["layer1.0.conv2"] == [2, 3] and decided.kept["layer1.1.conv1"] == [2, 3]
    assert decided.kept["layer1.1.conv2"] == [0, 1]
    assert decided.removed["layer1.0.conv1"] == [False, True] and decided.removed["layer1.1.conv2"] == [False, True]
    assert decided.order["layer1.0.conv1"][1] == 0
    _check_invariants(SMALL_BASIC, decided, params - 1)


def test_bottleneck_conv3_loses_four_groups_per_step():
    _, layers, groups, scores = _setup(SMALL_BOTTLENECK)
    for name in scores:
        if name.startswith("layer1"):
            scores[name] = 10 + np.arange(len(groups[name]), dtype=float)   # group 0 the weakest
    scores["layer1.0.conv3"][5] = 0.5                                    # trigger: a conv3 group
    params = models.spec_params(SMALL_BOTTLENECK)
    decided = apply_budget(SMALL_BOTTLENECK, layers, groups, scores, params - 1)
    assert decided.steps == 1 and decided.spec["stages"][0]["width"] == 2
    assert decided.kept["layer1.0.conv3"] == [6, 7, 8, 9, 12, 13, 14, 15]    # trigger 5 and groups 0, 1, 2 gone
    assert decided.kept["layer1.1.conv3"] == list(range(8, 16))               # its 4 weakest groups gone
    assert decided.kept["layer1.0.conv1"] == [2, 3] and decided.kept["layer1.1.conv2"] == [2, 3]
    _check_invariants(SMALL_BOTTLENECK, decided, params - 1)


def test_uneven_groups_stage_width_is_the_minimum():
    """d = 2 does not divide the stage width 5: groups [0, 1], [2, 3], [4]. Losing the size-1 group in
    one layer and a size-2 group in its partners leaves min(4, 3) = 3 channels in every layer."""
    spec = copy.deepcopy(SMALL_BASIC)
    spec["stages"][0]["width"] = 5
    _, layers, groups, scores = _setup(spec)
    for name in scores:
        if name.startswith("layer1"):
            scores[name] = np.array([3.0, 2.0, 4.0])                  # [2, 3] is each layer's weakest
    scores["layer1.0.conv1"] = np.array([3.0, 2.0, 0.1])              # [4] is the trigger
    decided = apply_budget(spec, layers, groups, scores, models.spec_params(spec) - 1)
    assert decided.spec["stages"][0]["width"] == 3
    assert decided.kept["layer1.0.conv1"] == [0, 1, 2]             # [0, 1] (3.0) then the best of [2, 3]
    assert decided.kept["layer1.0.conv2"] == [0, 1, 4]             # [4] (4.0) then [0, 1] (3.0)
    assert all(len(k) == 3 for name, k in decided.kept.items() if name.startswith("layer1"))


def test_equal_scores_break_ties_by_layer_then_group():
    spec = SMALL_VGG
    _, layers, groups, _ = _setup(spec)
    scores = {name: np.zeros(len(gs)) for name, gs in groups.items()}
    decided = apply_budget(spec, layers, groups, scores, models.spec_params(spec) - 1)
    flat = [r for l in layers for r in decided.order[l.name]]
    assert flat == list(range(len(flat)))
    assert decided.removed["features.0.0"][0] and not any(decided.removed["features.0.0"][1:])


@pytest.mark.parametrize("preset", ["vgg16_bn", "resnet18", "resnet34", "resnet50"])
@pytest.mark.parametrize("removed", [0.0, 1e-4, 0.5, 0.98])
def test_budgets_on_every_preset(preset, removed):
    spec = _preset(preset)
    _, layers, groups, scores = _setup(spec, seed=3)
    params = models.spec_params(spec)
    budget = budget_from_keep(1.0 - removed, params)
    decided = apply_budget(spec, layers, groups, scores, budget)
    if removed == 0.0:
        assert decided.spec == spec and decided.steps == 0 and decided.params_after == params
    _check_invariants(spec, decided, budget)
    for l in layers:                       # kept channels are exactly the non-removed groups (VGG) or
        kept = decided.kept[l.name]        # the stage's width times the expansion (ResNet)
        assert kept == sorted(set(kept)) and all(0 <= c < l.width for c in kept)
        if spec["arch"] == "vgg":
            assert kept == sorted(c for g, r in zip(groups[l.name], decided.removed[l.name]) if not r for c in g)


def test_budget_below_smallest_network_raises():
    _, layers, groups, scores = _setup(SMALL_VGG)
    with pytest.raises(ValueError, match="smallest network"):
        apply_budget(SMALL_VGG, layers, groups, scores, 5)


@pytest.mark.parametrize("change, match", [
    (lambda g, s: s.update({"features.0.0": np.array([1.0])}), "2 groups"),
    (lambda g, s: s.update({"features.0.0": np.array([1.0, np.nan])}), "NaN"),
    (lambda g, s: g.update({"features.0.0": [[0, 1], [1, 2]]}), "partition"),
    (lambda g, s: g.pop("features.0.0"), "features.0.0"),
])
def test_apply_budget_bad_groups_or_scores(change, match):
    _, layers, groups, scores = _setup(SMALL_VGG)
    change(groups, scores)
    with pytest.raises(ValueError, match=match):
        apply_budget(SMALL_VGG, layers, groups, scores, 100)


# --------------------------------------------------------------------------- the whole method
def _calib(spec: dict, n_per_class: int = 3, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = n_per_class * spec["num_classes"]
    shape = (spec["in_features"],) if spec["arch"] == "mlp" else (1, size, size)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % spec["num_classes"]


@pytest.mark.parametrize("spec", [SMALL_VGG, SMALL_BASIC, SMALL_BOTTLENECK, SMALL_MLP],
                         ids=["vgg", "basic", "bottleneck", "mlp"])
def test_spvr_prune_end_to_end(spec):
    torch.manual_seed(0)
    model = models.build(spec).eval()
    calib = _calib(spec)
    res = spvr_prune(model, calib, keep=0.6, group_size=2, progress=False)
    assert isinstance(res, PruneResult)
    assert res.params_before == models.count_params(model)
    assert res.budget == int(0.6 * res.params_before)
    assert res.params_after <= res.budget and res.params_after >= res.budget - res.last_step
    assert res.params_after == models.count_params(res.model) == models.spec_params(res.spec)
    assert list(res.scores.columns) == ["layer", "group", "channels", "size", "importance", "order", "removed"]
    assert sorted(res.scores["order"]) == list(range(len(res.scores)))
    assert res.scores["removed"].any() and not res.scores["removed"].all()
    for name, gs in res.groups.items():
        rows = res.scores[res.scores["layer"] == name]
        assert [list(c) for c in rows["channels"]] == gs
        for g, removed in zip(gs, rows["removed"]):
            assert removed == (not set(g) & set(res.kept[name]))
    with torch.no_grad():
        assert res.model.eval()(calib[0][:2]).shape == (2, spec["num_classes"])
    naive = spvr_prune(model, calib, keep=0.6, group_size=2, method="naive", progress=False)
    assert naive.spec == res.spec and naive.kept == res.kept
    pd.testing.assert_series_equal(naive.scores["order"], res.scores["order"])


def test_spvr_prune_segnet_with_masks_keeps_tied_widths():
    """Segmentation (Section 5.5): masks as calibration labels, Eq. 2 over pixels (naive ranking), and
    the tie rule on SegNet's encoder conv / decoder conv pairs that feed the same unpool."""
    spec = models.segnet_vgg16(num_classes=3, in_channels=1, width=1 / 32)
    torch.manual_seed(0)
    model = models.build(spec).eval()
    x, masks = torch.randn(4, 1, 32, 32), torch.randint(0, 3, (4, 32, 32))
    res = spvr_prune(model, (x, masks), keep=0.5, group_size=2, method="naive", progress=False)
    assert res.params_after <= res.budget and res.params_after == models.count_params(res.model)
    layers = models.prunable_layers(model, spec)
    for tie in {l.tie for l in layers if l.tie}:
        assert len({len(res.kept[l.name]) for l in layers if l.tie == tie}) == 1
    with torch.no_grad():
        assert res.model.eval()(x[:1]).shape == (1, 3, 32, 32)


# --------------------------------------------------------------------------- weight inheritance
def _decided_result(model: nn.Module, spec: dict, keep_fraction: float, seed: int = 0) -> PruneResult:
    _, layers, groups, scores = _setup(spec, seed=seed)
    layers = models.prunable_layers(model, spec)
    decided = apply_budget(spec, layers, groups, scores, int(keep_fraction * models.spec_params(spec)))
    return PruneResult(spec=decided.spec, model=models.build(decided.spec), scores=pd.DataFrame(),
                       params_before=models.spec_params(spec), params_after=decided.params_after, budget=0,
                       kept=decided.kept, groups=groups, original_spec=copy.deepcopy(spec))


@pytest.mark.parametrize("spec", [{**SMALL_VGG, "cfg": [6, "M", 8, 8, "M", 10]}, SMALL_MLP], ids=["vgg", "mlp"])
def test_inherited_weights_equal_the_masked_original(spec):
    """Without residuals, removing channels IS masking them: the inherited network computes exactly
    what the original computes with every removed channel masked."""
    torch.manual_seed(0)
    model = models.build(spec).double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.5, 0.5)
    res = _decided_result(model, spec, 0.8)
    assert all(res.kept.values()) and res.spec != spec
    new = inherit_weights(model, res).double().eval()
    x = _calib(spec)[0].double()
    layers = {l.name: l for l in models.prunable_layers(model, spec)}
    with torch.no_grad(), torch.autograd.graph.save_on_cpu():
        hooks = [mask_output(layers[n].mask_module, sorted(set(range(layers[n].width)) - set(k)))
                 for n, k in res.kept.items()]
        for h in hooks:
            h.__enter__()
        try:
            expected = model(x)
        finally:
            for h in hooks:
                h.__exit__(None, None, None)
        assert torch.allclose(new(x), expected, rtol=1e-10, atol=1e-12)


def test_inherited_resnet_uses_one_channel_set_per_stage():
    torch.manual_seed(0)
    model = models.build(SMALL_BOTTLENECK).eval()
    res = _decided_result(model, SMALL_BOTTLENECK, 0.8)
    assert all(res.kept.values())
    new = inherit_weights(model, res)
    S = res.kept["layer1.1.conv3"]                       # the stream of layer1: its last conv's channels
    k1 = res.kept["layer1.0.conv1"]
    assert torch.equal(new.layer1[0].conv1.weight, model.layer1[0].conv1.weight[k1])      # stem not pruned
    assert torch.equal(new.layer1[0].conv3.weight, model.layer1[0].conv3.weight[S][:, res.kept["layer1.0.conv2"]])
    assert torch.equal(new.layer1[0].downsample[0].weight, model.layer1[0].downsample[0].weight[S])
    assert torch.equal(new.layer1[1].conv1.weight, model.layer1[1].conv1.weight[res.kept["layer1.1.conv1"]][:, S])
    S2 = res.kept["layer2.0.conv3"]
    assert torch.equal(new.layer2[0].downsample[0].weight, model.layer2[0].downsample[0].weight[S2][:, S])
    assert torch.equal(new.fc.weight, model.fc.weight[:, S2])
    with torch.no_grad():
        assert new.eval()(torch.randn(2, 1, 16, 16)).shape == (2, 4)


def test_inherit_weights_refuses_collapsed_layers():
    spec = _preset("vgg16_bn")
    model = models.build(spec)
    res = _decided_result(model, spec, 0.02)
    assert not all(res.kept.values())
    with pytest.raises(ValueError, match="collapsed"):
        inherit_weights(model, res)


# --------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def vgg_and_calib():
    torch.manual_seed(0)
    return models.build(SMALL_VGG).eval(), _calib(SMALL_VGG)


@pytest.mark.parametrize("keep", [0, -3, 0.0, 1.5, True, "0.5", 10 ** 9])
def test_bad_keep(vgg_and_calib, keep):
    model, calib = vgg_and_calib
    with pytest.raises(ValueError, match="keep"):
        spvr_prune(model, calib, keep=keep, progress=False)


@pytest.mark.parametrize("kwargs, match", [
    ({"group_size": 0}, "group_size"), ({"group_size": 1.5}, "group_size"),
    ({"criterion": "l2"}, "criterion"), ({"method": "quick"}, "method"),
])
def test_bad_options(vgg_and_calib, kwargs, match):
    model, calib = vgg_and_calib
    with pytest.raises(ValueError, match=match):
        spvr_prune(model, calib, keep=0.5, progress=False, **kwargs)


def test_missing_class_is_named(vgg_and_calib):
    model, (x, y) = vgg_and_calib
    y = y.clone()
    y[y == 2] = 1
    with pytest.raises(ValueError, match=r"class\(es\) \[2\]"):
        spvr_prune(model, (x, y), keep=0.5, progress=False)


def test_unsupported_networks_are_named(vgg_and_calib):
    import torchvision

    _, calib = vgg_and_calib        # 1-channel images: a 3-channel torchvision network cannot run them
    with pytest.raises(ValueError, match="ResNet.*could not be traced"):
        spvr_prune(torchvision.models.resnet18(num_classes=4), calib, keep=0.5, progress=False)
    model = models.build(SMALL_VGG)
    model.features[0][2] = nn.GELU()
    with pytest.raises(ValueError, match=r"'features.0.2' is a GELU"):
        spvr_prune(model, calib, keep=0.5, progress=False)


# --------------------------------------------------------------------------- command line
def _fashion_mnist_or_skip():
    from spvr_lib import data

    try:
        data.ensure_fashion_mnist()
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not available on this machine")


def _checkpoint(tmp_path, spec: dict, wrap: str | None = "model"):
    torch.manual_seed(0)
    model = models.build(spec)
    path = tmp_path / "base.pt"
    state = model.state_dict()
    torch.save({wrap: state} if wrap else state, path)
    return path


def test_cli_prune_end_to_end(tmp_path, monkeypatch):
    from spvr_lib.__main__ import main

    _fashion_mnist_or_skip()
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "cache"))
    spec = models.preset("vgg16_bn", num_classes=10, in_channels=1, width=1 / 16)
    ckpt = _checkpoint(tmp_path, spec)
    out = tmp_path / "out"
    rc = main(["prune", "--model", "vgg16_bn", "--width", "0.0625", "--checkpoint", str(ckpt),
               "--data", "fashion-mnist", "--keep", "0.3", "--group-size", "4", "--out", str(out),
               "--calib-per-class", "2", "--no-progress"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "model.pt.json", "scores.csv", "spec.json",
                                                              "summary.json"]
    new_spec = json.loads((out / "spec.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    new = models.build(new_spec)
    new.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)
    assert summary["params_after"] == models.count_params(new) <= summary["budget"]
    assert summary["params_before"] == models.spec_params(spec) and summary["n_calib"] == 20
    assert summary["architecture"] == models.spec_to_str(new_spec)
    scores = pd.read_csv(out / "scores.csv")
    assert len(scores) == summary["groups"] == sum(-(-l.width // 4) for l in
                                                   models.prunable_layers(models.build(spec), spec))
    # the same run from the spec file gives the same architecture
    (tmp_path / "base_spec.json").write_text(json.dumps(spec))
    rc = main(["prune", "--spec", str(tmp_path / "base_spec.json"), "--checkpoint", str(ckpt),
               "--data", "fashion-mnist", "--keep", "0.3", "--group-size", "4", "--out", str(tmp_path / "o2"),
               "--calib-per-class", "2", "--no-progress"])
    assert rc == 0 and json.loads((tmp_path / "o2" / "spec.json").read_text()) == new_spec


@pytest.mark.parametrize("args, match", [
    (["--keep", "0"], "--keep"),
    (["--keep", "2.0"], "--keep"),
    (["--group-size", "0"], "--group-size"),
    (["--checkpoint", "missing.pt"], "--checkpoint"),
    (["--width", "0.5"], "--checkpoint"),                  # weights of a width-1/16 net do not fit
    (["--model", "vgg19"], "--model"),
    (["--data", "mnist"], "--data"),
    (["--calib-per-class", "0"], "--calib-per-class"),
    (["--stem", "imagenet"], "--stem"),                     # a VGG has no stem to choose
    (["--device", "tpu"], "--device"),
])
def test_cli_bad_input_exits_2(tmp_path, capsys, args, match):
    from spvr_lib.__main__ import main

    spec = models.preset("vgg16_bn", num_classes=10, in_channels=1, width=1 / 16)
    ckpt = _checkpoint(tmp_path, spec, wrap=None)
    base = {"--model": "vgg16_bn", "--width": "0.0625", "--checkpoint": str(ckpt), "--data": "fashion-mnist",
            "--keep": "0.5", "--group-size": "2", "--out": str(tmp_path / "out")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = str(tmp_path / value) if flag == "--checkpoint" else value
    argv = ["prune", *[t for kv in base.items() for t in kv], "--no-progress"]
    assert main(argv) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_unparsable_keep_is_a_usage_error(tmp_path, capsys):
    from spvr_lib.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["prune", "--model", "vgg16_bn", "--checkpoint", "x.pt", "--data", "fashion-mnist",
              "--keep", "half", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--keep" in capsys.readouterr().err


def test_one_ranking_serves_every_budget():
    """rank_groups once, then spvr_prune per budget with ranking=: the same result as ranking each time."""
    spec = models.preset("vgg16_bn", num_classes=10, in_channels=1, width=1 / 16)
    torch.manual_seed(0)
    model = models.build(spec).eval()
    g = torch.Generator().manual_seed(1)
    calib = (torch.randn(20, 1, 32, 32, generator=g), torch.arange(20) % 10)
    from spvr_lib import GroupRanking, rank_groups
    ranking = rank_groups(model, calib, group_size=2, progress=False)
    again = GroupRanking.from_dict(json.loads(json.dumps(ranking.to_dict())))       # through the run cache's JSON
    for keep in (0.5, 0.1):
        direct = spvr_prune(model, calib, keep, group_size=2, progress=False)
        shared = spvr_prune(model, calib, keep, group_size=2, progress=False, ranking=again)
        assert shared.spec == direct.spec and shared.params_after == direct.params_after <= shared.budget
    with pytest.raises(ValueError, match="group_size=2.*group_size=4"):
        spvr_prune(model, calib, 0.5, group_size=4, progress=False, ranking=ranking)
    # the device argument: the user's model is never moved, the ranking is the same (up to float32 noise: on this
    # machine two identical calls already differ by ~1e-8 in a score, which the default atol=1e-8 rejects)
    cpu = rank_groups(model, calib, group_size=2, progress=False, device="cpu")
    assert all(torch.allclose(cpu.scores[k], ranking.scores[k], rtol=1e-5, atol=1e-6) for k in ranking.scores)
    assert next(model.parameters()).device.type == "cpu"


def test_cli_stem_builds_the_imagenet_stem_resnet(tmp_path):
    from spvr_lib.__main__ import main

    spec = models.preset("resnet18", num_classes=10, in_channels=1, width=1 / 16, stem="imagenet")
    ckpt = _checkpoint(tmp_path, spec)
    rc = main(["prune", "--model", "resnet18", "--width", "0.0625", "--stem", "imagenet", "--checkpoint", str(ckpt),
               "--data", "fashion-mnist", "--keep", "0.5", "--group-size", "2", "--out", str(tmp_path / "out"),
               "--calib-per-class", "2", "--no-progress"])
    assert rc == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["params_before"] == models.spec_params(spec)                # the 7x7 stem's parameters
    assert json.loads((tmp_path / "out" / "spec.json").read_text())["stem"] == "imagenet"


def test_a_step_far_under_the_budget_is_skipped_and_the_sweep_goes_on():
    """global_discard with fill_back: three units a, b, c of one group each (importance 0, 1, 2) costing 50, 10 and
    10 parameters of 100; budget 85.  Removing a (least important) lands at 50, 35 under: skipped, and the sweep
    removes b (90), then c (80 <= 85, 5 under): a is kept.  Without fill_back the first fit (a removed, 50) is
    taken; where no later step ends closer, the first far fit is taken too (budget 55: b and c give 80, 70 is
    never reached, so a's removal, 50, stands)."""
    from spvr_lib.budget import global_discard

    cost = {"a": 50, "b": 10, "c": 10}
    names, widths = ["a", "b", "c"], {n: 1 for n in cost}
    groups, scores = {n: [[0]] for n in cost}, {"a": [0.0], "b": [1.0], "c": [2.0]}

    def params_of(kept):
        return 30 + sum(cost[n] for n in names if kept[n])

    close = global_discard(names, widths, groups, scores, 85, params_of, fill_back=10)
    assert close.kept == {"a": [0], "b": [], "c": []} and close.params_after == 80
    first = global_discard(names, widths, groups, scores, 85, params_of)
    assert first.kept == {"a": [], "b": [0], "c": [0]} and first.params_after == 50
    far = global_discard(names, widths, groups, scores, 55, params_of, fill_back=1)
    assert far.params_after == 50 and far.kept["a"] == []
