"""Tests for the MobileNetV3 specs of spvr_lib.models (paper Table 4)."""
import json

import pytest
import torch
import torchvision
from torch import nn

from spvr_lib import models as M

torch.set_num_threads(1)


def test_small_is_torchvision_mobilenet_v3_small():
    spec = M.mobilenetv3("small", num_classes=1000)
    torch.manual_seed(0)
    ours, tv = M.build(spec), torchvision.models.mobilenet_v3_small(weights=None)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in tv.state_dict().items()}
    assert M.count_params(ours) == M.spec_params(spec) == 2_542_856  # torchvision's published num_params
    ours.load_state_dict(tv.state_dict(), strict=True)
    ours.eval(), tv.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)


def test_small_minimal_matches_timm_count_and_has_no_se_or_hardswish():
    spec = M.mobilenetv3("small-minimal", num_classes=1000)
    model = M.build(spec)
    n = M.count_params(model)
    assert n == M.spec_params(spec) == 2_044_736
    assert n == pytest.approx(2.04e6, rel=0.02)  # timm tf_mobilenetv3_small_minimal_100: 2.04M
    kinds = {type(m) for m in model.modules()}
    assert nn.Hardswish not in kinds and nn.Hardsigmoid not in kinds
    assert torchvision.ops.SqueezeExcitation not in kinds
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 11 and all(m.kernel_size == (3, 3) for m in depthwise)
    small_depthwise = [m.kernel_size for m in M.build(M.mobilenetv3("small")).modules()
                       if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert small_depthwise.count((5, 5)) == 8


@pytest.mark.parametrize("variant", ["small", "small-minimal"])
def test_small_input_grey_forward(variant):
    spec = M.mobilenetv3(variant, num_classes=10, in_channels=1, small_input=True)
    model = M.build(spec)
    stem = model.features[0][0]
    assert (stem.in_channels, stem.stride) == (1, (1, 1))
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 32, 32)).shape == (1, 10)
        assert model.features(torch.randn(1, 1, 32, 32)).shape[-2:] == (2, 2)  # total stride 16
    assert M.spec_params(spec) == M.count_params(model)
    assert M.count_params(M.build(json.loads(json.dumps(spec)))) == M.count_params(model)
    stride2 = M.build(M.mobilenetv3(variant, num_classes=10, in_channels=1))
    assert stride2.features[0][0].stride == (2, 2)


def test_width_multiplier_and_notation():
    half = M.mobilenetv3("small", width=0.5)
    assert M.count_params(M.build(half)) == M.count_params(torchvision.models.mobilenet_v3_small(width_mult=0.5))
    assert M.spec_to_str(M.mobilenetv3("small")) == "MobileNetV3-small (width 1.0)"
    assert M.spec_to_str(M.mobilenetv3("small-minimal", width=0.75, small_input=True)) == \
        "MobileNetV3-small-minimal (width 0.75, stride-1 stem)"


def test_reinitialize_is_seeded():
    spec = M.mobilenetv3("small-minimal", num_classes=10, width=0.25)
    torch.manual_seed(3)
    a = M.build(spec)
    torch.manual_seed(3)
    b = M.build(spec)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    assert torch.equal(a.classifier[-1].bias, torch.zeros(10))


@pytest.mark.parametrize("change, match", [
    ({"variant": "large"}, r"spec\['variant'\] must be one of \['small', 'small-minimal'\]"),
    ({"width": 0}, r"spec\['width'\].*got 0"),
    ({"width": True}, r"spec\['width'\]"),
    ({"small_input": 1}, r"spec\['small_input'\] must be True or False, got 1"),
    ({"in_channels": 0}, r"spec\['in_channels'\]"),
    ({"head": "x"}, r"unknown key\(s\) \['head'\]"),
])
def test_bad_spec(change, match):
    with pytest.raises(ValueError, match=match):
        M.build({**M.mobilenetv3("small"), **change})


def test_not_prunable():
    spec = M.mobilenetv3("small", num_classes=10, width=0.25)
    with pytest.raises(ValueError, match=r"'mobilenetv3' is not prunable"):
        M.prunable_layers(M.build(spec), spec)
    with pytest.raises(ValueError, match="is not prunable"):
        M.with_widths(spec, {})
