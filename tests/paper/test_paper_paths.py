"""Every paper-scale path, end to end, on tiny fixtures in the datasets' real on-disk formats (CIFAR-10 pickle
batches, Tiny ImageNet's official layout, ImageNet class folders, CityScapes' torchvision layout): the paper's
models, stems, data pipeline (DataLoader workers), published ResNet50 weights and quoted ImageNet baselines,
SPvR ranked once and pruned, a baseline, training, latency and segmentation, at width 1/16 and 1 epoch."""
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spvr_lib import data, latency, models
from spvr_lib.paper import accuracy_vs_baselines, base_models, latency_vs_accuracy, scales, segmentation, trained_runs

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_data as fixtures  # noqa: E402  (the writers of the real on-disk formats)


@pytest.fixture(scope="module")
def paper_fixture(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper-data")
    fixtures.write_cifar(root, per_batch=10, test=10)
    fixtures.write_tiny_imagenet(root)
    for split, n in (("train", 2), ("val", 1)):
        for wnid in ("n001", "n002"):
            for j in range(n):
                fixtures.write_jpeg(root / "imagenet" / split / wnid / f"{wnid}_{j}.JPEG",
                                    fixtures.COLORS["n01" if wnid == "n001" else "n02"], size=40)
    for split in ("train", "val"):
        fixtures.write_cityscapes(root / "cityscapes", split)
    for kind in ("leftImg8bit", "gtFine"):                                                 # 20 training images:
        src = root / "cityscapes" / kind / "train" / "frankfurt"                           # the calibration set
        for c in range(9):                                                                 # needs 1 per class x 19
            dst = root / "cityscapes" / kind / "train" / f"city{c}"
            dst.mkdir(parents=True)
            for f in src.iterdir():
                (dst / f.name.replace("frankfurt", f"city{c}")).write_bytes(f.read_bytes())
    mp = pytest.MonkeyPatch()
    mp.setenv("SPVR_DATA", str(root))
    mp.setenv("SPVR_CACHE", str(root / "runs"))
    # the published ResNet50 weights, at the fixture's width and classes (the real file is 98 MB)
    tiny = dataclasses.replace(scales.PAPER.models["resnet50"], width=1 / 16)
    torch.manual_seed(0)
    (root / "pretrained").mkdir()
    torch.save(models.build(base_models.base_spec(tiny)).state_dict(), root / "pretrained" / "resnet50-0676ba61.pth")
    mp.setenv("SPVR_PRETRAINED", str(root / "pretrained"))
    data._fingerprint.cache_clear()
    shrink = dict(width=1 / 16, epochs=1, batch_size=4, lr_grid=(0.05,), calib_per_class=1, train_rates=(0.8,),
                  rates=(0.8,))
    cfg = dataclasses.replace(scales.PAPER, name="paper-fixture", rcp_samples=1, latency_rounds=2, latency_runs_per_round=1,
                              latency_warmup=1,
                              models={k: dataclasses.replace(s, **shrink, num_workers=1 if k == "vgg16" else 0)
                                      for k, s in scales.PAPER.models.items()})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield cfg
    torch.set_num_threads(threads)
    mp.undo()


def test_every_paper_dataset_is_found_in_its_real_layout(paper_fixture):
    assert data.check_datasets(paper_fixture.datasets()) == {}
    assert data.num_classes("imagenet") == 2 and data.num_classes("tiny-imagenet") == 2   # not 1000 / 200


def test_paper_scale_paths_end_to_end(paper_fixture):
    cfg = paper_fixture
    # VGG16 on CIFAR-10 (with a DataLoader worker), ResNet34 on Tiny ImageNet (CIFAR stem): trained bases
    for key in ("vgg16", "resnet34"):
        base = base_models.train_base(cfg, key, progress=False)
        assert base["epochs"] == 1 and 0 <= base["top1"] <= 100 and base["key"]["data_files"]
        pruned = base_models.spvr_pruned(cfg, key, 0.8, progress=False)
        assert pruned["params_after"] <= pruned["budget"]
    # ResNet50 on ImageNet: the published weights, not a training run; baselines quoted, SPvR trained
    base = base_models.train_base(cfg, "resnet50", progress=False)
    assert base["pretrained"] == "torchvision-resnet50-imagenet1k-v1" and base["epochs"] == 0
    assert base_models.base_spec(cfg.model("resnet50"))["stem"] == "imagenet"
    runs = trained_runs.accuracy_runs(cfg, ["resnet50"], ["tp_l1", "tp_taylor", "spvr"], [0], "finetune", progress=False)
    by = runs.set_index("method")
    assert by.loc["tp_l1", "status"] == "quoted" and by.loc["tp_l1", "top1"] == 68.11          # Table 1, ResNet50 at 80%
    assert by.loc["tp_taylor", "status"] == "not reported"                                  # "-" in the paper
    assert by.loc["spvr", "status"] == "ok" and by.loc["spvr", "params"] <= by.loc["spvr", "budget"]
    table = accuracy_vs_baselines.table1(cfg, ["resnet50"], ["tp_l1", "tp_taylor", "spvr"], seeds=[0], runs=runs, progress=False)
    ours = table[(table["source"].str.startswith("ours")) & (table["metric"] == "top1")].iloc[0]
    assert ours["ℓ1"] == "68.11 (quoted)" and ours["Taylor"] == "-"
    # a baseline pruned and fine-tuned on CIFAR-10, RCP's brief training included
    for method in ("tp_l1", "rcp"):
        rec = trained_runs.trained_accuracy(cfg, "vgg16", method, 0.8, 0, "finetune", progress=False)
        # trained (a 1-epoch network on a few images may end at chance: then its status says so)
        assert rec["top1"] is not None and rec["params"] <= rec["budget"], rec["error"]
        assert rec["status"] in ("ok", "failed: at chance")
    # latency of the unpruned and pruned networks at the paper's input size
    lat = latency_vs_accuracy.latency_runs(cfg, ["resnet34"], ["spvr"], rounds=2, runs_per_round=1, warmup=1, batch_sizes=(1,),
                               progress=False)
    assert (lat["status"] == "ok").all() and (lat["median_ms"] > 0).all()
    assert latency.count_macs(models.build(base_models.base_spec(cfg.model("resnet34"))), (3, 64, 64)) > 0


def test_segmentation_on_cityscapes_fixture(paper_fixture):
    settings = {**segmentation.segmentation_settings("paper"), "options": {"size": (32, 64)}, "width": 1 / 16,
                "epochs": 1, "batch_size": 2, "calib_per_class": 1, "name": "paper-fixture"}
    table, records = segmentation.segmentation_table(settings, progress=False)
    assert (table["status"] == "ok").all(), table["error"].tolist()
    assert table["params"].iloc[1] <= table["budget"].iloc[1] and np.isfinite(table["mIoU"]).all()
