"""Tests for SegNet (spvr_lib.models) and spvr_lib.tasks (segmentation): mIoU, shapes, widths/collapse, training."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from spvr_lib import models as M
from spvr_lib.criteria import spvr_loss
from spvr_lib.tasks import SEGMENTATION, confusion_matrix, mean_iou
from spvr_lib.train import Recipe, evaluate, fit

torch.set_num_threads(1)

# three encoder stages: E1 = cfg[0], cfg[1]; E2 = cfg[3]; E3 = cfg[5]. decoder[2] feeds the unpool of
# E2 (width 4 = cfg[3]), decoder[5] feeds the unpool of E1 (width 3 = cfg[1]).
S3 = {"arch": "segnet", "cfg": [2, 3, "M", 4, "M", 5, "M"], "decoder": ["U", 6, 4, "U", 7, 3, "U", 8],
      "in_channels": 1, "num_classes": 2}


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _conv_params(c_in: int, c_out: int) -> int:
    return c_in * c_out * 9 + c_out + 2 * c_out  # 3x3 conv with bias, BN weight and bias


# --------------------------------------------------------------------------- mean IoU
def test_mean_iou_hand_made_2x2():
    target = torch.tensor([[[0, 0], [1, 1]]])
    pred = torch.tensor([[[0, 1], [1, 1]]])
    # class 0: intersection 1, union 2; class 1: intersection 2, union 3
    assert mean_iou(pred, target, num_classes=3) == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
    assert confusion_matrix(pred, target, 3).tolist() == [[1, 1, 0], [0, 2, 0], [0, 0, 0]]


def test_mean_iou_ignore_index_and_class_only_predicted():
    target = torch.tensor([[[0, 255], [1, 1]]])
    pred = torch.tensor([[[0, 2], [1, 2]]])  # pixel (0, 1) is ignored; class 2 is predicted once (IoU 0)
    assert mean_iou(pred, target, num_classes=3) == pytest.approx(100 * (1 + 1 / 2 + 0) / 3)
    with pytest.raises(ValueError, match=r"target has class indices outside \[0, 3\)"):
        mean_iou(pred, target, num_classes=3, ignore_index=-1)  # 255 is then a class, out of range
    assert mean_iou(target.clamp(max=1), target.clamp(max=1), num_classes=2) == 100.0


@pytest.mark.parametrize("pred, target, match", [
    (torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long), "same shape"),
    (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), "pred must be an integer tensor"),
    (torch.full((1, 2, 2), 5), torch.zeros(1, 2, 2, dtype=torch.long), r"pred has class indices outside \[0, 3\)"),
    (torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255), "every target pixel is ignore_index"),
])
def test_mean_iou_errors(pred, target, match):
    with pytest.raises(ValueError, match=match):
        mean_iou(pred, target, num_classes=3)


# --------------------------------------------------------------------------- SegNet specs and modules
def test_segnet_hand_count_and_shapes():
    spec = {"arch": "segnet", "cfg": [2, "M", 3, "M"], "decoder": ["U", 2, "U", 4], "in_channels": 1,
            "num_classes": 3}
    expected = _conv_params(1, 2) + _conv_params(2, 3) + _conv_params(3, 2) + _conv_params(2, 4) + (4 * 3 * 9 + 3)
    model = M.build(spec)
    assert M.count_params(model) == M.spec_params(spec) == expected
    assert isinstance(model.encoder[1], nn.MaxPool2d) and isinstance(model.decoder[0], nn.MaxUnpool2d)
    for h, w in ((32, 32), (64, 64), (13, 10)):  # odd sizes unpool back to the pre-pool size
        assert _forward(model, torch.randn(2, 1, h, w)).shape == (2, 3, h, w)


def test_segnet_unpool_puts_values_at_pooled_positions():
    spec = {"arch": "segnet", "cfg": [1, "M"], "decoder": ["U"], "in_channels": 1, "num_classes": 2}
    model = M.build(spec)
    seen = {}
    model.decoder[0].register_forward_hook(lambda m, i, o: seen.setdefault("out", o))
    model.encoder[0].register_forward_hook(lambda m, i, o: seen.setdefault("enc", o))
    _forward(model, torch.randn(1, 1, 4, 4))
    enc, out = seen["enc"], seen["out"]
    # the unpooled map holds each 2x2 window's max at its place and zeros elsewhere
    pooled = nn.functional.max_pool2d(enc, 2)
    assert torch.equal(nn.functional.max_pool2d(out, 2), pooled)
    assert int((out != 0).sum()) <= 4


def test_segnet_vgg16_is_the_paper_segnet():
    spec = M.segnet_vgg16(num_classes=20)
    assert spec["decoder"] == ["U", 512, 512, 512, "U", 512, 512, 256, "U", 256, 256, 128, "U", 128, 64, "U", 64]
    chain = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512,   # encoder
             512, 512, 512, 512, 512, 256, 256, 256, 128, 128, 64, 64]            # decoder
    expected = sum(_conv_params(a, b) for a, b in zip(chain, chain[1:])) + 64 * 20 * 9 + 20
    assert M.spec_params(spec) == expected == 29_454_548  # SegNet: 26 convs, ~29.5M parameters
    small = M.segnet_vgg16(num_classes=5, in_channels=1, width=1 / 16)
    model = M.build(small)
    assert M.count_params(model) == M.spec_params(small)
    assert _forward(model, torch.randn(1, 1, 32, 32)).shape == (1, 5, 32, 32)
    assert M.spec_to_str(S3) == 'encoder: 2, 3, "M", 4, "M", 5, "M"; decoder: "U", 6, 4, "U", 7, 3, "U", 8'


def test_prunable_layers_segnet_refs_and_ties():
    model = M.build(S3)
    layers = M.prunable_layers(model, S3)
    assert [(p.name, p.width, p.ref, p.tie) for p in layers] == [
        ("encoder.0.0", 2, ("enc", 0), None), ("encoder.1.0", 3, ("enc", 1), "pool1"),
        ("encoder.3.0", 4, ("enc", 3), "pool2"), ("encoder.5.0", 5, ("enc", 5), None),
        ("decoder.1.0", 6, ("dec", 1), None), ("decoder.2.0", 4, ("enc", 3), "pool2"),
        ("decoder.4.0", 7, ("dec", 4), None), ("decoder.5.0", 3, ("enc", 1), "pool1"),
        ("decoder.7.0", 8, ("dec", 7), None)]
    modules = dict(model.named_modules())
    for p in layers:
        assert modules[p.name] is p.conv and p.mask_module is p.bn and p.bn.num_features == p.width
    assert model.classifier not in [p.conv for p in layers]


@pytest.mark.parametrize("widths, cfg, decoder", [
    ({("dec", 1): 2, ("dec", 7): 0}, [2, 3, "M", 4, "M", 5, "M"], ["U", 2, 4, "U", 7, 3, "U"]),
    ({("enc", 3): 2}, [2, 3, "M", 2, "M", 5, "M"], ["U", 6, 2, "U", 7, 3, "U", 8]),          # tie follows
    ({("enc", 1): 0}, [2, "M", 4, "M", 5, "M"], ["U", 6, 4, "U", 7, 2, "U", 8]),             # new last conv
    ({("enc", 3): 0}, [2, 3, "M", 5, "M"], ["U", 6, 7, 3, "U", 8]),                         # middle stage
    ({("enc", 5): 0}, [2, 3, "M", 4, "M"], [6, 4, "U", 7, 3, "U", 8]),                      # deepest stage
    ({("enc", 0): 0, ("enc", 1): 0}, [4, "M", 5, "M"], ["U", 6, 4, "U", 7, 8]),             # first stage
    ({("enc", i): 0 for i in (0, 1, 3, 5)}, [], [6, 7, 8]),                                 # whole encoder
])
def test_with_widths_segnet_shrink_and_collapse(widths, cfg, decoder):
    new = M.with_widths(S3, widths)
    assert (new["cfg"], new["decoder"]) == (cfg, decoder)
    assert S3["cfg"] == [2, 3, "M", 4, "M", 5, "M"]  # input untouched
    model = M.build(json.loads(json.dumps(new)))
    assert M.count_params(model) == M.spec_params(new)
    assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == cfg.count("M")
    assert _forward(model, torch.randn(2, 1, 16, 16)).shape == (2, 2, 16, 16)
    assert len(M.prunable_layers(model, new)) == sum(c not in ("M", "U") for c in cfg + decoder)


def test_segnet_vgg16_collapse_of_last_stage():
    spec = M.segnet_vgg16(num_classes=3, in_channels=1, width=1 / 16)  # widths 4, 8, 16, 32, 32
    new = M.with_widths(spec, {("enc", i): 0 for i in (14, 15, 16)})
    assert new["cfg"] == [4, 4, "M", 8, 8, "M", 16, 16, 16, "M", 32, 32, 32, "M"]
    assert new["decoder"] == [32, 32, 32, "U", 32, 32, 16, "U", 16, 16, 8, "U", 8, 4, "U", 4]
    assert _forward(M.build(new), torch.randn(1, 1, 32, 32)).shape == (1, 3, 32, 32)


@pytest.mark.parametrize("widths, match", [
    ({("dec", 2): 1}, r"feeds the unpool of encoder stage 2 and is tied to \('enc', 3\)"),
    ({("dec", 0): 1}, r"unknown ref \('dec', 0\)"),
    ({("enc", 2): 1}, r"unknown ref \('enc', 2\)"),
    ({("cfg", 0): 1}, "expected \\('enc', i\\) or \\('dec', j\\)"),
    ({("enc", 0): 3}, r"width for \('enc', 0\) must be an int in \[0, 2\], got 3"),
])
def test_with_widths_segnet_errors(widths, match):
    with pytest.raises(ValueError, match=match):
        M.with_widths(S3, widths)


@pytest.mark.parametrize("change, match", [
    ({"decoder": ["U", 6, 5, "U", 7, 3, "U", 8]}, r"spec\['decoder'\]\[2\] feeds the unpool of encoder stage 2.*"
                                                  r"spec\['cfg'\]\[3\] = 4, got 5"),
    ({"decoder": ["U", 6, 4, "U", 7, 3]}, r"one \"U\" per \"M\".*\(3\), got 2"),
    ({"decoder": ["U", 6, 4, "U", "U", 8]}, r"spec\['decoder'\]\[4\] \(\"U\"\) must follow a conv"),
    ({"cfg": [2, 3, "M", 4, "M", 5]}, r"spec\['cfg'\] must be encoder stages"),
    ({"cfg": ["M", 4, "M", 5, "M"]}, r"spec\['cfg'\] must be encoder stages"),
    ({"cfg": [2, 0, "M", 4, "M", 5, "M"]}, r"spec\['cfg'\]\[1\].*got 0"),
    ({"decoder": ["U", 6, 4, "U", 7, 3, "M", 8]}, r"spec\['decoder'\]\[6\]"),
])
def test_bad_segnet_spec(change, match):
    with pytest.raises(ValueError, match=match):
        M.build({**S3, **change})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['decoder'\]"):
        M.build({k: v for k, v in S3.items() if k != "decoder"})


# --------------------------------------------------------------------------- importance and training
def test_spvr_loss_sums_over_pixels_of_segnet_output():
    torch.manual_seed(0)            # a pixel whose two logits tie (p = 0.5, 0.5) would not flip: seed it away
    model = M.build(S3)
    x = torch.randn(3, 1, 8, 8)
    p = torch.softmax(_forward(model, x), dim=1)                      # [n, K, H, W]
    assert ((p[:, 0] - p[:, 1]).abs() > 1e-6).all()
    flipped = p.flip(1).unsqueeze(0)                                  # K = 2: every argmax changes
    assert spvr_loss(p, flipped).item() == pytest.approx(3 * 64 + (p.max(1).values - p.min(1).values).sum().item(),
                                                         rel=1e-5)


def _toy_set(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0] > 0).long()
    y[:, 0, 0] = 255  # one ignored pixel per image
    return TensorDataset(x, y)


def test_the_one_loop_trains_segmentation_lowers_loss_and_is_deterministic():
    spec = {"arch": "segnet", "cfg": [4, "M"], "decoder": ["U", 4], "in_channels": 1, "num_classes": 2}
    train, test = _toy_set(16, 0), _toy_set(8, 1)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = M.build(spec)
        before = evaluate(model, test, batch_size=4, device="cpu", task=SEGMENTATION)
        out = fit(model, train, test, Recipe(epochs=4, batch_size=4, lr=0.05, mode="finetune", augment=False),
                  seed=1, progress=False, device="cpu", task=SEGMENTATION)
        runs.append((before, out, model.state_dict()))
    (before, out, state), (_, out2, state2) = runs
    assert out["loss"] < before["loss"] and out["pixel_acc"] > before["pixel_acc"]
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4] and out["history"][0]["lr"] == 0.05
    assert out["history"][-1]["train_loss"] < out["history"][0]["train_loss"]
    assert out == out2 and all(torch.equal(state[k], state2[k]) for k in state)
    assert set(before) == {"miou", "pixel_acc", "loss", "n"} and before["n"] == 8


def test_segmentation_evaluation_errors_and_hand_made_scores():
    model = M.build({"arch": "segnet", "cfg": [], "decoder": [], "in_channels": 1, "num_classes": 2})
    with pytest.raises(ValueError, match="dataset is empty"):
        evaluate(model, _toy_set(0, 0), batch_size=2, task=SEGMENTATION)
    # a "network" that predicts class 1 everywhere, on 1 image with pixels [0, 1, 1, 255]
    logits = torch.tensor([[[[0.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]]])
    target = torch.tensor([[[0, 1], [1, 255]]])
    scores = SEGMENTATION.metrics(SEGMENTATION.eval_sums(logits, target), 2)
    # class 0: IoU 0/1, class 1: IoU 2/3; 2 of 3 scored pixels right
    assert scores["miou"] == pytest.approx(100 * (0 + 2 / 3) / 2) and scores["pixel_acc"] == pytest.approx(200 / 3)
    assert scores["n"] == 1
