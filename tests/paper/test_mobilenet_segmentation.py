"""Sections 5.4 and 5.5 (spvr_lib.paper.mobilenet, spvr_lib.paper.segmentation): the MobileNet budget, SegNet pruning, the IoU table."""
import math

import pytest
import torch

from spvr_lib import models
from spvr_lib.paper import scales
from spvr_lib.prune import budget_step
from spvr_lib.spec_units import SpecGraph
from spvr_lib.prune import spvr_prune
from spvr_lib.paper import base_models, reference, segmentation, mobilenet, trained_runs

torch.set_num_threads(1)

TINY = scales.Scale(
    name="smoke", seeds=(0,),
    models={"resnet50": scales.ModelSetup("resnet50", "fashion-mnist", width=1 / 16, epochs=1, batch_size=16,
                                          lr=0.05, lr_grid=(0.05,), group_size=8, rates=(0.4, 0.8),
                                          calib_per_class=1, train_subset=2, test_subset=1, stem="imagenet")})


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    return tmp_path


# --------------------------------------------------------------------------- Table 4
def test_paper_share_and_widths():
    assert reference.PAPER_MINIMAL_SHARE == models.spec_params(models.mobilenetv3("small-minimal", 1000, 3)) /\
        models.spec_params(models.resnet50(1000, 3, stem="imagenet"))
    assert mobilenet.mobilenet_width(scales.get_scale("paper")) == 1.0     # the paper's own networks
    assert mobilenet.mobilenet_width(scales.get_scale("cpu")) == 0.125     # 1/8-width ResNet50: -minimal at 7.5% of it
    assert mobilenet.mobilenet_width(scales.get_scale("smoke")) == 0.1     # the narrowest: -minimal at 23% of a 1/16 one


@pytest.mark.parametrize("scale", ["smoke", "cpu", "paper"])
def test_budget_is_80_percent_of_minimal_and_below_the_resnet50(scale):
    cfg = scales.get_scale(scale)
    specs = mobilenet.mobilenet_specs(cfg)
    minimal = models.spec_params(specs["MobileNetV3-minimal"])
    budget = mobilenet.mobilenet_budget(cfg)
    assert budget == math.floor(0.8 * minimal)
    assert budget < models.spec_params(base_models.base_spec(cfg.model("resnet50")))
    assert models.spec_params(specs["MobileNetV3-small"]) > minimal
    # the MobileNets take the ResNet50's input and classes, with its stem stride (ImageNet stem: stride 2)
    for spec in specs.values():
        assert spec["small_input"] is False and spec["num_classes"] == (1000 if scale == "paper" else 10)


def test_paper_scale_budget_is_the_papers_1_6M():
    assert mobilenet.mobilenet_budget(scales.get_scale("paper")) / 1e6 == pytest.approx(1.6, abs=0.05)


def test_budget_not_below_resnet50_is_an_error():
    with pytest.raises(ValueError, match="not below"):
        mobilenet.mobilenet_budget(TINY, width=1.0)      # MobileNetV3-minimal at width 1 dwarfs a 1/16-width ResNet50


def test_pruned_resnet50_meets_the_mobilenet_budget(cache):
    budget = mobilenet.mobilenet_budget(TINY)
    rec = mobilenet.pruned_resnet50(TINY, progress=False)
    assert rec["params_after"] <= budget
    assert models.spec_params(rec["spec"]) == rec["params_after"]
    assert rec["spec"]["arch"] == "resnet"
    with pytest.raises(ValueError, match="budget"):
        mobilenet.pruned_resnet50(TINY, budget=10**9, progress=False)


def test_table4_networks_are_read_on_their_budget_paired_by_seed(cache, monkeypatch):
    import dataclasses

    from spvr_lib import train
    from spvr_lib.paper import convergence, group_size_ablation

    def fit(model, train_set, test_set, recipe, seed=0, task=None, **kwargs):
        # -small: top-1 80 + seed after 8 epochs, 0.1 less after 6 (gain 0.1); -minimal: 1 + seed less (mean gain 1.5)
        small = model_params[0] == small_params
        final = 80.0 + seed - (0.0 if recipe.epochs == 8 else 0.1 if small else 1.0 + seed)
        history = [{"epoch": e, "lr": recipe.lr, "train_loss": 1.0, "test_top1": final - 2.0 * (e <= 5)}
                   for e in range(1, recipe.epochs + 1)]
        return {"top1": final, "top5": 99.0, "loss": 1.0, "history": history, "epochs": recipe.epochs}

    cfg = dataclasses.replace(TINY, seeds=(0, 1), models={
        "resnet50": dataclasses.replace(TINY.model("resnet50"), epochs=8)})
    specs = mobilenet.mobilenet_specs(cfg)
    small_params = models.spec_params(specs["MobileNetV3-small"])
    model_params = [0]
    build = models.build

    def counting_build(spec):
        model_params[0] = models.spec_params(spec)
        return build(spec)

    # build_network (which train_run calls) reads ``build`` where it is defined: patch it there
    from spvr_lib.models import files as model_files
    monkeypatch.setattr(model_files, "build", counting_build)
    monkeypatch.setattr(train, "fit", fit)
    nets = {"MobileNetV3-small": (specs["MobileNetV3-small"], 0.05),
            "MobileNetV3-minimal": (specs["MobileNetV3-minimal"], 0.1)}
    df = convergence.scratch_budget_table(cfg, "resnet50", nets, progress=False).set_index("name")
    assert list(df.index) == ["MobileNetV3-small", "MobileNetV3-minimal"]
    assert (df["epochs"] == 8).all() and (df["shorter epochs"] == 6).all() and (df["seeds"] == 2).all()
    small, minimal = df.loc["MobileNetV3-small"], df.loc["MobileNetV3-minimal"]
    assert (small["top1"], small["top1 at shorter"]) == (80.5, 80.4) and small["lr"] == 0.05
    assert small["gain of last quarter"] == pytest.approx(0.1) and small["plateau on the budget"]
    assert small["gain se"] == pytest.approx(0.0)
    assert minimal["gain of last quarter"] == pytest.approx(1.5) and not minimal["plateau on the budget"]
    assert minimal["gain se"] == pytest.approx(0.5)          # sd 0.707 of (1.0, 2.0) over sqrt(2)
    assert "rise within run" not in df                   # the within-run proxy is gone
    assert small["params"] == small_params
    # the full-budget run is Table 4's own record, not a second training
    spec, lr = nets["MobileNetV3-small"]
    mine = convergence.scratch_with_epochs(cfg, "resnet50", spec, lr, 8, 1, progress=False)
    assert mine["hash"] == trained_runs.train_from_scratch(cfg, "resnet50", spec, 1, lr=lr, progress=False)["hash"]
    assert convergence.scratch_with_epochs(cfg, "resnet50", spec, lr, 6, 1, progress=False)["key"]["recipe"][
        "epochs"] == 6


# --------------------------------------------------------------------------- Section 5.5
def test_segnet_pruned_at_80_percent_meets_budget_and_runs():
    torch.manual_seed(0)
    spec = models.segnet_vgg16(num_classes=3, in_channels=1, width=1 / 16)
    model = models.build(spec).eval()
    x = torch.randn(4, 1, 32, 32)
    masks = torch.randint(0, 3, (4, 32, 32))
    res = spvr_prune(model, (x, masks), keep=0.2, group_size=4, method="naive", progress=False)
    before = models.count_params(model)
    assert res.params_before == before and res.budget == math.floor(0.2 * before)
    assert res.params_after <= res.budget
    pruned = models.build(res.spec)
    assert models.count_params(pruned) == res.params_after
    with torch.no_grad():
        assert pruned.eval()(x).shape == (4, 3, 32, 32)


def test_segmentation_table_format(cache):
    s = segmentation.segmentation_settings("smoke")
    s.update(n_train=12, n_test=4, batch_size=4)
    table, records = segmentation.segmentation_table(s, progress=False)
    assert table["status"].tolist() == ["ok", "ok"], table["error"].tolist()
    assert table["model"].tolist() == ["SegNet", "SegNet, 80% removed by SPvR"]
    assert table["paper mIoU (CityScapes)"].tolist() == [51.2, 46.5]
    assert table["removed (%)"].iloc[0] == 0.0 and table["removed (%)"].iloc[1] >= 80.0
    assert table["params"].iloc[1] <= table["budget"].iloc[1]
    assert ((table["mIoU"] >= 0) & (table["mIoU"] <= 100)).all()
    assert table["n seeds"].tolist() == [1, 1]
    curves = segmentation.segmentation_curves(records)
    assert list(curves.columns) == ["model", "seed", "epoch", "test mIoU (%)"] and len(curves) == 2
    # a run scored every other epoch gives only its scored epochs
    sparse = {"SegNet": [{"key": {"seed": 0}, "history": [{"epoch": 1, "train_loss": 1.0},
                                                          {"epoch": 2, "train_loss": 0.9, "test_miou": 40.0}]}]}
    assert segmentation.segmentation_curves(sparse)[["epoch", "test mIoU (%)"]].values.tolist() == [[2, 40.0]]


def test_segnet_lr_is_searched_on_held_out_training_scenes_and_used_by_every_segnet(cache, monkeypatch):
    from spvr_lib import train

    log = []

    def fit(model, train_set, test_set, recipe, seed=0, task=None, **kwargs):     # best mIoU at lr 0.1
        log.append((recipe.lr, len(train_set), len(test_set), task.name))
        miou = {0.05: 40.0, 0.1: 60.0, 0.2: 60.0}.get(recipe.lr, 10.0)
        history = [{"epoch": 1, "lr": recipe.lr, "train_loss": 1.0, "test_miou": miou}]
        return {"miou": miou, "pixel_acc": 90.0, "loss": 1.0, "history": history, "epochs": recipe.epochs}

    monkeypatch.setattr(train, "fit", fit)
    s = segmentation.segmentation_settings("smoke")
    s.update(n_train=20, n_test=4, lr_grid=(0.05, 0.1, 0.2), val_fraction=0.1)
    lr, scores = segmentation.segnet_lr(s, progress=False)
    assert lr == 0.1 and scores == {0.05: 40.0, 0.1: 60.0, 0.2: 60.0}   # the tie goes to the smaller lr
    # each trial trains on 18 scenes and scores the 2 held out of the 20 training scenes, never the 4 test ones
    assert sorted(log) == [(0.05, 18, 2, "segmentation"), (0.1, 18, 2, "segmentation"), (0.2, 18, 2, "segmentation")]
    log.clear()
    rec = segmentation.train_segnet(segmentation.segnet_spec(s), s, 0, tag="base", progress=False)
    assert rec["key"]["recipe"]["lr"] == 0.1 and log == [(0.1, 20, 4, "segmentation")]   # trials are cached
    one = dict(s, lr_grid=(0.05,))
    assert segmentation.segnet_lr(one, progress=False) == (0.05, {0.05: None})          # a one-value grid: untrained


def test_the_unpruned_segnet_is_read_on_its_budget_paired_by_seed(cache, monkeypatch):
    from spvr_lib import train
    from spvr_lib.paper import convergence

    def fit(model, train_set, test_set, recipe, seed=0, task=None, **kwargs):
        # mIoU 60 + seed after 8 epochs, 0.2 + seed less after 6: gains 0.2 and 1.2 (mean 0.7) over the last quarter
        final = 60.0 + seed - (0.0 if recipe.epochs == 8 else 0.2 + seed)
        history = [{"epoch": e, "lr": recipe.lr, "train_loss": 1.0, "test_miou": final - 1.0 * (e <= 5)}
                   for e in range(1, recipe.epochs + 1)]
        return {"miou": final, "pixel_acc": 90.0, "loss": 1.0, "history": history, "epochs": recipe.epochs}

    monkeypatch.setattr(train, "fit", fit)
    s = segmentation.segmentation_settings("smoke")
    s.update(n_train=12, n_test=4, epochs=8, seeds=(0, 1))
    row = convergence.segnet_convergence_table(s, progress=False).iloc[0]
    assert (row["epochs"], row["shorter epochs"], row["seeds"]) == (8, 6, 2)
    assert (row["mIoU"], row["mIoU at shorter"]) == (60.5, 59.8)
    assert row["gain of last quarter"] == pytest.approx(0.7) and not row["plateau on the budget"]
    assert row["gain se"] == pytest.approx(0.5)                  # sd 0.707 of (0.2, 1.2) over sqrt(2)
    assert "rise within run" not in row
    # the full-budget run is notebook 11's own unpruned SegNet, not a second training
    base = segmentation.train_segnet(segmentation.segnet_spec(s), s, 1, tag="base", progress=False)
    assert convergence.segnet_with_epochs(s, 8, 1, progress=False)["hash"] == base["hash"]
    assert convergence.segnet_with_epochs(s, 6, 1, progress=False)["key"]["recipe"]["epochs"] == 6
    one = convergence.segnet_convergence_table(dict(s, epochs=1), progress=False).iloc[0]
    assert one["shorter epochs"] == 1 and one["gain of last quarter"] is None and one["plateau on the budget"] is None


def test_segmentation_settings_errors():
    with pytest.raises(ValueError, match="scale"):
        segmentation.segmentation_settings("gpu")
    s = segmentation.segmentation_settings("cpu")
    s["width"] = 0.5                                     # a copy: the module's settings are unchanged
    assert scales.CPU.segmentation["width"] == 1 / 8


def test_segnet_budget_discards_tied_partner_groups_by_hand():
    """The budget step (prune.budget_step) on SegNet's pool ties: the encoder conv and the decoder conv feeding its unpool."""
    spec = {"arch": "segnet", "cfg": [4, "M", 4, "M"], "decoder": ["U", 4, "U", 4], "in_channels": 1, "num_classes": 2}
    model = models.build(spec)
    layers = models.prunable_layers(model, spec)
    # encoder.0.0 and decoder.1.0 (feeding the unpool of pool 1) share a width: tie "pool1"
    assert [(la.name, la.tie) for la in layers] == [("encoder.0.0", "pool1"), ("encoder.2.0", None),
                                                   ("decoder.1.0", "pool1"), ("decoder.3.0", None)]
    groups = {la.name: [[0, 1], [2, 3]] for la in layers}
    scores = {"encoder.0.0": torch.tensor([5.0, 1.0]), "encoder.2.0": torch.tensor([3.0, 8.0]),
              "decoder.1.0": torch.tensor([6.0, 7.0]), "decoder.3.0": torch.tensor([4.0, 9.0])}
    step1 = models.with_widths(spec, {("enc", 0): 2})                 # least important: encoder.0.0's group 1
    decided = budget_step(SpecGraph(models.build(spec), spec, torch.zeros(1)), groups, scores, models.spec_params(step1))
    new, kept, rank = decided.spec, decided.kept, decided.order
    assert new == step1 and new["decoder"] == ["U", 2, "U", 4]
    assert kept == {"encoder.0.0": [0, 1], "encoder.2.0": [0, 1, 2, 3], "decoder.1.0": [2, 3],  # partner: its g0 (6)
                    "decoder.3.0": [0, 1, 2, 3]}
    assert rank["encoder.0.0"] == [3, 0] and rank["encoder.2.0"] == [1, 6]
    step2 = models.with_widths(spec, {("enc", 0): 2, ("enc", 2): 2})  # next: encoder.2.0's group 0
    decided = budget_step(SpecGraph(models.build(spec), spec, torch.zeros(1)), groups, scores,
                          models.spec_params(step1) - 1)
    assert decided.spec == step2 and decided.kept["encoder.2.0"] == [2, 3]
    with pytest.raises(ValueError):
        budget_step(SpecGraph(models.build(spec), spec, torch.zeros(1)), groups, scores, 1)
