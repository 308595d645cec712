"""Group importance (Eq. 2 / KL by masking): the naive reference against hand computations, and the
fast path against the naive one on every architecture."""
import copy

import pytest
import torch
from torch import nn

from spvr_lib import models
from spvr_lib.ranking import group_importance, mask_output
from spvr_lib.criteria import spvr_loss

torch.set_num_threads(1)


def _randomize_bn(model: nn.Module, seed: int = 1) -> nn.Module:
    """BN with non-trivial statistics and affine parameters (beta != 0), as after training."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64) * 0.3)
    return model


def _model(spec: dict, seed: int = 0) -> nn.Module:
    """A float64 model with trained-like BN and a classifier whose logits are not all ~0."""
    torch.manual_seed(seed)
    model = models.build(spec).double()
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, m.in_features ** -0.5)
    return _randomize_bn(model).eval()


def _pairs(layers, limit: int | None = 2, d: int = 2) -> dict[str, list[list[int]]]:
    """Consecutive channel groups of size d for each layer: all (limit None) or the first and last."""
    groups = {}
    for layer in layers:
        gs = [list(range(i, min(i + d, layer.width))) for i in range(0, layer.width, d)]
        groups[layer.name] = gs if limit is None or len(gs) <= 2 else [gs[0], gs[-1]]
    return groups


def _assert_same(naive: dict, fast: dict) -> None:
    assert list(naive) == list(fast)
    a = torch.cat([naive[k] for k in naive])
    b = torch.cat([fast[k] for k in fast])
    assert a.dtype == b.dtype == torch.float64
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-9), (a - b).abs().max()
    assert torch.equal(torch.argsort(a, stable=True), torch.argsort(b, stable=True))


# --------------------------------------------------------------------------- the reference
def test_naive_mlp_equals_hand_computation():
    """Masking hidden neurons at the ReLU output == zeroing fc1's rows and biases; Eq. 2 by hand."""
    spec = {"arch": "mlp", "in_features": 5, "hidden": [4], "num_classes": 3}
    model = _model(spec)
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    groups = [[0], [1, 3], [2]]
    got = group_importance(model, x, {"fc1": groups}, criterion="spvr", method="naive", progress=False)["fc1"]
    got_kl = group_importance(model, x, {"fc1": groups}, criterion="kl", method="naive", progress=False)["fc1"]
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
        q = p.argmax(1)
        for j, g in enumerate(groups):
            zeroed = copy.deepcopy(model)
            zeroed.fc1.weight[g] = 0
            zeroed.fc1.bias[g] = 0
            pm = torch.softmax(zeroed(x), 1)
            flips = (pm.argmax(1) != q).double()
            expected = sum(float(flips[k]) + abs(float(p[k, q[k]] - pm[k, q[k]])) for k in range(len(x)))
            assert got[j].item() == pytest.approx(expected, rel=1e-12)
            expected_kl = float((p * (p / pm).log()).sum())
            assert got_kl[j].item() == pytest.approx(expected_kl, rel=1e-9)


def test_naive_masks_any_module_output_directly():
    """A user network without a spec: the key is any module name whose output is masked."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()
    x = torch.randn(9, 4, dtype=torch.float64)
    got = group_importance(net, x, {"1": [[0, 2], [5]]}, method="naive", progress=False)["1"]
    with torch.no_grad():
        h = torch.tanh(net[0](x))
        p = torch.softmax(net[2](h), 1)
        for j, g in enumerate([[0, 2], [5]]):
            hm = h.clone()
            hm[:, g] = 0
            assert got[j] == pytest.approx(spvr_loss(p, torch.softmax(net[2](hm), 1)[None])[0].item(), rel=1e-12)


def test_mask_after_bn_is_not_zeroing_the_filter():
    """mask_output's docstring claim: with beta != 0, zeroing a conv's filter (and bias) still lets BN's
    shift beta - gamma * mu / sigma through; masking after BN equals removing the channel, i.e. zeroing
    the next conv's input column."""
    spec = {"arch": "vgg", "cfg": [3, 4], "in_channels": 1, "num_classes": 2}
    model = _model(spec)
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    c = 1
    with torch.no_grad():
        bn = model.features[0][1]
        bn.bias[c], bn.running_mean[c] = 0.7, -0.2     # a zero input leaves BN as beta - gamma*mu/sigma > 0
        with mask_output(bn, [c]):
            masked = model(x)
        filter_zeroed = copy.deepcopy(model)
        filter_zeroed.features[0][0].weight[c] = 0
        filter_zeroed.features[0][0].bias[c] = 0
        removed = copy.deepcopy(model)
        removed.features[1][0].weight[:, c] = 0          # the next layer never sees channel c
        assert (masked - filter_zeroed(x)).abs().max() > 1e-3
        assert torch.allclose(masked, removed(x), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(masked, model(x))      # the hook is gone after the block
        assert torch.equal(model(x), model(x))


# --------------------------------------------------------------------------- fast == naive
SMALL_VGG = {"arch": "vgg", "cfg": [3, "M", 4, 5, "M", 6], "in_channels": 1, "num_classes": 4}
SMALL_BASIC = {"arch": "resnet", "block": "basic", "stem": "cifar", "stem_width": 4, "in_channels": 1,
               "num_classes": 4, "stages": [{"name": "layer1", "width": 4, "blocks": 2, "stride": 1},
                                            {"name": "layer2", "width": 6, "blocks": 2, "stride": 2}]}
SMALL_BOTTLENECK = {"arch": "resnet", "block": "bottleneck", "stem": "imagenet", "stem_width": 4,
                    "in_channels": 1, "num_classes": 4,
                    "stages": [{"name": "layer1", "width": 2, "blocks": 2, "stride": 1},
                               {"name": "layer2", "width": 3, "blocks": 1, "stride": 2}]}
SMALL_MLP = {"arch": "mlp", "in_features": 6, "hidden": [5, 4], "num_classes": 3}


@pytest.mark.parametrize("criterion", ["spvr", "kl"])
@pytest.mark.parametrize("spec", [SMALL_VGG, SMALL_BASIC, SMALL_BOTTLENECK, SMALL_MLP],
                         ids=["vgg", "basic", "bottleneck", "mlp"])
def test_fast_equals_naive_every_group(spec, criterion):
    """Every group of every layer (sizes 1-2, unequal), every block position (inner conv, last conv
    before an identity / a projection / the head)."""
    model = _model(spec)
    shape = (spec["in_features"],) if spec["arch"] == "mlp" else (1, 16, 16)
    x = torch.randn(10, *shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    groups = _pairs(models.prunable_layers(model, spec), limit=None)
    naive = group_importance(model, x, groups, criterion=criterion, method="naive", progress=False)
    fast = group_importance(model, x, groups, criterion=criterion, method="fast", progress=False)
    _assert_same(naive, fast)
    assert model.training is False and all(v.shape == (len(groups[k]),) for k, v in fast.items())


@pytest.mark.parametrize("criterion", ["spvr", "kl"])
@pytest.mark.parametrize("preset", ["vgg16_bn", "resnet34", "resnet50"])
def test_fast_equals_naive_presets(preset, criterion):
    """The paper's three networks at width 1/16: every layer, its first and last groups."""
    kw = {"stem": "imagenet"} if preset != "vgg16_bn" else {}
    spec = models.preset(preset, num_classes=10, in_channels=1, width=1 / 16, **kw)
    model = _model(spec)
    x = torch.randn(6, 1, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    groups = _pairs(models.prunable_layers(model, spec), limit=2)
    naive = group_importance(model, x, groups, criterion=criterion, method="naive", progress=False)
    fast = group_importance(model, x, groups, criterion=criterion, method="fast", progress=False)
    _assert_same(naive, fast)


def test_fast_in_float32_matches_naive():
    model = _model(SMALL_BASIC).float()
    x = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    groups = _pairs(models.prunable_layers(model, SMALL_BASIC), limit=None)
    naive = group_importance(model, x, groups, method="naive", progress=False)
    fast = group_importance(model, x, groups, method="fast", progress=False)
    for k in naive:
        assert torch.allclose(naive[k], fast[k], rtol=1e-4, atol=1e-4)


def test_fast_chunks_samples_and_groups(monkeypatch):
    """Tiny working memory: many sample chunks and one group per batch give the same numbers."""

    model = _model(SMALL_VGG)
    x = torch.randn(7, 1, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    groups = _pairs(models.prunable_layers(model, SMALL_VGG), limit=None)
    whole = group_importance(model, x, groups, method="fast", progress=False)
    from spvr_lib import fast_ranking

    monkeypatch.setattr(fast_ranking, "_MEMORY_BYTES", 1)      # the fast engine's chunks: one sample, one group
    _assert_same(whole, group_importance(model, x, groups, method="fast", progress=False))


def test_keys_by_mask_point_and_any_module():
    model = _model(SMALL_VGG)
    x = torch.randn(5, 1, 16, 16, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    by_conv = group_importance(model, x, {"features.0.0": [[0], [1, 2]]}, method="fast", progress=False)
    by_bn = group_importance(model, x, {"features.0.1": [[0], [1, 2]]}, method="fast", progress=False)
    assert torch.allclose(by_conv["features.0.0"], by_bn["features.0.1"])
    # a ReLU's output is masked directly: zeroing after the ReLU equals zeroing after the BN before it
    relu = group_importance(model, x, {"features.0.2": [[0], [1, 2]]}, method="fast", progress=False)
    assert torch.allclose(relu["features.0.2"], by_conv["features.0.0"])
    # any network, not only spvr_lib's: the general fast path equals the naive one
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    fast = group_importance(net, x.flatten(1)[:, :4], {"1": [[0], [1, 2]]}, method="fast", progress=False)
    naive = group_importance(net, x.flatten(1)[:, :4], {"1": [[0], [1, 2]]}, method="naive", progress=False)
    assert torch.allclose(fast["1"], naive["1"], rtol=1e-9)


def test_training_flag_restored_and_no_grad_needed():
    model = _model(SMALL_MLP).train()
    x = torch.randn(4, 6, dtype=torch.float64)
    out = group_importance(model, x, {"fc1": [[0, 1]]}, progress=False)
    assert model.training and not out["fc1"].requires_grad


@pytest.mark.parametrize("kwargs, match", [
    ({"criterion": "l1"}, "criterion"),
    ({"method": "quick"}, "method"),
    ({"groups": {"nope": [[0]]}}, "nope"),
    ({"groups": {"fc1": []}}, "fc1"),
    ({"groups": {"fc1": [[0, -1]]}}, "fc1"),
    ({"groups": {"fc1": [[0, 9]]}}, "out of range"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_input(kwargs, match):
    model = _model(SMALL_MLP)
    args = {"groups": {"fc1": [[0]]}, "progress": False, "method": "naive", **kwargs}
    groups = args.pop("groups")
    with pytest.raises(ValueError, match=match):
        group_importance(model, torch.randn(3, 6, dtype=torch.float64), groups, **args)
