"""Tests for spvr_lib.models: specs, builders, parameter counts, collapse and the paper's notation."""
import json

import pytest
import torch
import torchvision
from torch import nn

from spvr_lib import models as M

torch.set_num_threads(1)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _check_counts(spec: dict) -> int:
    """count_params == spec_params, and a JSON round trip of the spec gives the same model size."""
    n = M.count_params(M.build(spec))
    assert M.spec_params(spec) == n
    assert M.count_params(M.build(json.loads(json.dumps(spec)))) == n
    return n


# --------------------------------------------------------------------------- hand-counted specs
def test_vgg_hand_count_and_forward():
    spec = {"arch": "vgg", "cfg": [4, "M", 6], "in_channels": 1, "num_classes": 3}
    expected = (1 * 4 * 9 + 4) + 8 + (4 * 6 * 9 + 6) + 12 + (6 * 3 + 3)
    assert _check_counts(spec) == expected
    assert _forward(M.build(spec), torch.randn(2, 1, 32, 32)).shape == (2, 3)


def test_vgg_without_convs_uses_input_channels():
    spec = {"arch": "vgg", "cfg": ["M"], "in_channels": 2, "num_classes": 3}
    assert _check_counts(spec) == 2 * 3 + 3
    assert _forward(M.build(spec), torch.randn(1, 2, 8, 8)).shape == (1, 3)


def test_vgg_imagenet_head_count():
    spec = {"arch": "vgg", "cfg": [2, "M"], "in_channels": 1, "num_classes": 5, "head": "imagenet"}
    expected = (1 * 2 * 9 + 2) + 4 + (2 * 49 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 5 + 5)
    assert _check_counts(spec) == expected
    assert _forward(M.build(spec), torch.randn(2, 1, 16, 16)).shape == (2, 5)


def test_resnet_basic_hand_count():
    spec = {"arch": "resnet", "block": "basic", "stem": "cifar", "stem_width": 2, "in_channels": 1,
            "num_classes": 3, "stages": [{"name": "layer1", "width": 2, "blocks": 1, "stride": 1},
                                         {"name": "layer2", "width": 3, "blocks": 2, "stride": 2}]}
    stem = 1 * 2 * 9 + 4
    layer1 = (2 * 2 * 9 + 4) * 2  # identity shortcut
    layer2 = (2 * 3 * 9 + 6) + (3 * 3 * 9 + 6) + (2 * 3 + 6) + (3 * 3 * 9 + 6) * 2  # block 0 projects
    assert _check_counts(spec) == stem + layer1 + layer2 + (3 * 3 + 3)
    model = M.build(spec)
    assert model.layer1[0].downsample is None and model.layer2[1].downsample is None
    assert _forward(model, torch.randn(2, 1, 16, 16)).shape == (2, 3)


def test_resnet_bottleneck_hand_count():
    spec = {"arch": "resnet", "block": "bottleneck", "stem": "imagenet", "stem_width": 4, "in_channels": 1,
            "num_classes": 2, "stages": [{"name": "layer1", "width": 1, "blocks": 2, "stride": 1}]}
    stem = 1 * 4 * 49 + 8
    block0 = (4 * 1 + 2) + (1 * 1 * 9 + 2) + (1 * 4 + 8) + 0  # 4 -> 4 channels, stride 1: identity
    block1 = (4 * 1 + 2) + (1 * 1 * 9 + 2) + (1 * 4 + 8)
    assert _check_counts(spec) == stem + block0 + block1 + (4 * 2 + 2)
    assert _forward(M.build(spec), torch.randn(2, 1, 32, 32)).shape == (2, 2)


def test_mlp_hand_count_and_names():
    spec = {"arch": "mlp", "in_features": 5, "hidden": [4, 3], "num_classes": 2}
    assert _check_counts(spec) == (5 * 4 + 4) + (4 * 3 + 3) + (3 * 2 + 2)
    model = M.build(spec)
    assert [n for n, _ in model.named_children()] == ["fc1", "act1", "fc2", "act2", "fc3"]
    assert _forward(model, torch.randn(7, 5)).shape == (7, 2)
    assert M.spec_to_str(spec) == "5-4-3-2"


@pytest.mark.parametrize("name", sorted(M.PRESETS))
@pytest.mark.parametrize("imagenet", [False, True])
def test_presets_small_width(name, imagenet):
    kw = {"head": "imagenet" if imagenet else "cifar"} if name.startswith("vgg") else \
        {"stem": "imagenet" if imagenet else "cifar"}
    spec = M.preset(name, num_classes=7, in_channels=1, width=1 / 16, **kw)
    _check_counts(spec)
    assert _forward(M.build(spec), torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_width_multiplier_rounding():
    spec = M.vgg16_bn(width=0.01)
    assert spec["cfg"][:3] == [1, 1, "M"] and spec["cfg"][-2:] == [5, "M"]
    r = M.resnet34(width=0.5)
    assert r["stem_width"] == 32 and [s["width"] for s in r["stages"]] == [32, 64, 128, 256]


# --------------------------------------------------------------------------- torchvision equivalence
@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_matches_torchvision(name):
    torch.manual_seed(0)
    ours = M.build(M.preset(name, num_classes=1000, in_channels=3, width=1.0, stem="imagenet"))
    tv = getattr(torchvision.models, name)(weights=None)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in tv.state_dict().items()}
    assert M.count_params(ours) == M.count_params(tv)
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(_forward(ours, x), _forward(tv, x), rtol=0, atol=0)


# --------------------------------------------------------------------------- collapse
VGG_SMALL = {"arch": "vgg", "cfg": [4, "M", 6, 5, "M", 3], "in_channels": 1, "num_classes": 3}


def test_with_widths_vgg_shrink_and_remove_one_conv():
    new = M.with_widths(VGG_SMALL, {("cfg", 0): 2, ("cfg", 2): 0})
    assert new["cfg"] == [2, "M", 5, "M", 3]
    assert VGG_SMALL["cfg"] == [4, "M", 6, 5, "M", 3]  # input untouched
    _check_counts(new)
    assert _forward(M.build(new), torch.randn(1, 1, 16, 16)).shape == (1, 3)


def test_with_widths_vgg_stage_removed_with_its_pool():
    new = M.with_widths(VGG_SMALL, {("cfg", 2): 0, ("cfg", 3): 0})
    assert new["cfg"] == [4, "M", 3]
    assert M.count_params(M.build(new)) == (1 * 4 * 9 + 4) + 8 + (4 * 3 * 9 + 3) + 6 + (3 * 3 + 3)
    last = M.with_widths(M.vgg16_bn(), {("cfg", i): 0 for i in (14, 15, 16)})
    assert M.spec_to_str(last) == '64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M"'


def test_with_widths_resnet_stage_removed():
    spec = M.resnet34(num_classes=5, in_channels=1, width=1 / 16)  # stage widths 4, 8, 16, 32
    new = M.with_widths(spec, {("stage", "layer2"): 0, ("stage", "layer3"): 6})
    assert [(s["name"], s["width"], s["stride"]) for s in new["stages"]] == \
        [("layer1", 4, 1), ("layer3", 6, 2), ("layer4", 32, 2)]
    model = M.build(new)
    assert not hasattr(model, "layer2")
    shortcut = model.layer3[0].downsample[0]
    assert (shortcut.in_channels, shortcut.out_channels, shortcut.stride) == (4, 6, (2, 2))
    assert model.layer3[0].conv1.in_channels == 4
    _check_counts(new)
    assert _forward(model, torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert M.spec_to_str(new) == "[4, 4] × 3, [6, 6] × 6, [32, 32] × 3"


def test_with_widths_all_resnet_stages_removed():
    spec = M.resnet50(num_classes=5, in_channels=1, width=1 / 16)
    new = M.with_widths(spec, {("stage", f"layer{i}"): 0 for i in range(1, 5)})
    assert new["stages"] == []
    model = M.build(new)
    assert model.fc.in_features == spec["stem_width"] == 4
    assert _check_counts(new) == (1 * 4 * 9 + 8) + (4 * 5 + 5)
    assert _forward(model, torch.randn(2, 1, 16, 16)).shape == (2, 5)


def test_with_widths_mlp():
    spec = {"arch": "mlp", "in_features": 5, "hidden": [4, 3], "num_classes": 2}
    assert M.with_widths(spec, {("hidden", 0): 0, ("hidden", 1): 2})["hidden"] == [2]


@pytest.mark.parametrize("widths, match", [
    ({("cfg", 1): 2}, r"unknown ref \('cfg', 1\)"),  # index 1 is an "M"
    ({("cfg", 9): 2}, "unknown ref"),
    ({("stage", "layer1"): 2}, "unknown ref"),
    ({("cfg", 0): -1}, r"width for \('cfg', 0\) must be an int in \[0, 4\], got -1"),
    ({("cfg", 0): 5}, r"in \[0, 4\], got 5"),
    ({("cfg", 0): 2.0}, "got 2.0"),
])
def test_with_widths_errors(widths, match):
    with pytest.raises(ValueError, match=match):
        M.with_widths(VGG_SMALL, widths)


# --------------------------------------------------------------------------- prunable layers
def test_prunable_layers_vgg():
    model = M.build(VGG_SMALL)
    layers = M.prunable_layers(model, VGG_SMALL)
    modules = dict(model.named_modules())
    assert [(p.name, p.width, p.ref, p.tie) for p in layers] == [
        ("features.0.0", 4, ("cfg", 0), None), ("features.2.0", 6, ("cfg", 2), None),
        ("features.3.0", 5, ("cfg", 3), None), ("features.5.0", 3, ("cfg", 5), None)]
    for p in layers:
        assert modules[p.name] is p.conv and isinstance(p.bn, nn.BatchNorm2d)
        assert p.mask_module is p.bn and p.bn.num_features == p.width


def test_prunable_layers_resnet():
    spec = M.resnet50(in_channels=1, width=1 / 16)
    model = M.build(spec)
    layers = M.prunable_layers(model, spec)
    assert len(layers) == 3 * (3 + 4 + 6 + 3)  # not the stem, not the shortcuts
    assert [p.name for p in layers[:4]] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.0.conv3", "layer1.1.conv1"]
    assert [p.width for p in layers[:3]] == [4, 4, 16]  # conv3 is expanded x4
    assert {p.tie for p in layers} == {"layer1", "layer2", "layer3", "layer4"}
    assert all(p.ref == ("stage", p.tie) for p in layers)
    modules = dict(model.named_modules())
    assert all(modules[p.name] is p.conv and p.mask_module is p.bn for p in layers)


def test_prunable_layers_mlp_masks_activation():
    spec = {"arch": "mlp", "in_features": 5, "hidden": [4], "num_classes": 2}
    model = M.build(spec)
    (layer,) = M.prunable_layers(model, spec)
    assert (layer.name, layer.width, layer.ref, layer.bn) == ("fc1", 4, ("hidden", 0), None)
    assert layer.conv is model.fc1 and layer.mask_module is model.act1


def test_prunable_layers_rejects_other_spec():
    model = M.build(VGG_SMALL)
    with pytest.raises(ValueError, match="was not built from spec"):
        M.prunable_layers(model, M.with_widths(VGG_SMALL, {("cfg", 0): 2}))


# --------------------------------------------------------------------------- notation, sizes, init
def test_spec_to_str_paper_tables():
    assert M.spec_to_str(M.vgg16_bn(width=1)) == \
        '64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"'
    assert M.spec_to_str(M.resnet34()) == "[64, 64] × 3, [128, 128] × 4, [256, 256] × 6, [512, 512] × 3"
    assert M.spec_to_str(M.resnet50()) == \
        "[64, 64, 64] × 3, [128, 128, 128] × 4, [256, 256, 256] × 6, [512, 512, 512] × 3"


def test_model_size_mb_is_about_four_bytes_per_param():
    model = M.build(M.vgg16_bn(num_classes=10, width=1.0, head="cifar"))
    n = M.count_params(model)
    widths = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    convs = sum(c_in * c_out * 9 + c_out + 2 * c_out for c_in, c_out in zip([3] + widths, widths))
    assert n == convs + 512 * 10 + 10
    assert M.model_size_mb(model) == pytest.approx(4 * n / 1e6, rel=0.01)


def test_reinitialize_is_seeded_and_resets_everything():
    spec = {"arch": "vgg", "cfg": [4, "M", 6], "in_channels": 1, "num_classes": 3}
    a, b = M.build(spec), M.build(spec)
    with torch.no_grad():
        for p in b.parameters():
            p.fill_(3.0)
    b.features[0][1].running_mean.fill_(5.0)
    torch.manual_seed(1)
    M.reinitialize(a)
    torch.manual_seed(1)
    M.reinitialize(b)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.equal(b.features[0][1].weight, torch.ones(4)) and torch.equal(b.features[0][1].running_mean,
                                                                                torch.zeros(4))
    assert torch.equal(b.classifier.bias, torch.zeros(3)) and torch.equal(b.features[2][0].bias, torch.zeros(6))
    # any module: a bare Linear gets PyTorch's default init (zero-mean, bound 1/sqrt(fan_in)), in place
    lin = nn.Linear(4, 2)
    with torch.no_grad():
        lin.weight.fill_(7.0)
    assert M.reinitialize(lin) is lin and lin.weight.abs().max() <= 0.5
    with pytest.raises(ValueError, match="expected an nn.Module"):
        M.reinitialize("vgg")


# --------------------------------------------------------------------------- errors
def test_unknown_preset():
    with pytest.raises(ValueError, match=r"unknown preset name 'vgg19'.*resnet50"):
        M.preset("vgg19")
    with pytest.raises(ValueError, match="width"):
        M.preset("resnet18", width=0)


@pytest.mark.parametrize("change, match", [
    ({"arch": "alexnet"}, r"spec\['arch'\] must be one of"),
    ({"cfg": [4, 0]}, r"spec\['cfg'\]\[1\].*got 0"),
    ({"cfg": [4, -2]}, r"spec\['cfg'\]\[1\].*got -2"),
    ({"cfg": [4.5]}, r"spec\['cfg'\]\[0\].*got 4.5"),
    ({"cfg": [4, "m"]}, r"spec\['cfg'\]\[1\]"),
    ({"head": "tiny"}, r"spec\['head'\] must be one of"),
    ({"num_classes": 0}, r"spec\['num_classes'\]"),
    ({"depth": 16}, r"unknown key\(s\) \['depth'\]"),
])
def test_bad_vgg_spec(change, match):
    with pytest.raises(ValueError, match=match):
        M.build({**VGG_SMALL, **change})


def test_bad_resnet_spec():
    spec = M.resnet18(width=1 / 16)
    with pytest.raises(ValueError, match=r"spec\['block'\] must be one of"):
        M.build({**spec, "block": "wide"})
    with pytest.raises(ValueError, match=r"spec\['stem'\]"):
        M.build({**spec, "stem": "big"})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['stem_width'\]"):
        M.build({k: v for k, v in spec.items() if k != "stem_width"})
    bad_width = [dict(spec["stages"][0], width=0)]
    with pytest.raises(ValueError, match=r"spec\['stages'\]\[0\]\['width'\].*got 0"):
        M.build({**spec, "stages": bad_width})
    dup = [spec["stages"][0], spec["stages"][0]]
    with pytest.raises(ValueError, match=r"spec\['stages'\]\[1\]\['name'\]"):
        M.build({**spec, "stages": dup})
    with pytest.raises(ValueError, match=r"spec\['stages'\]\[0\]\['name'\]"):
        M.build({**spec, "stages": [dict(spec["stages"][0], name="fc")]})
    with pytest.raises(ValueError, match=r"spec must be a dict"):
        M.spec_params([1, 2])
