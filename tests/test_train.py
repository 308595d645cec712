"""Tests of spvr_lib.train: exact metrics, learning, bit-exact resume, determinism, the train command, DDP, cache."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ddp_worker  # noqa: E402
from ddp_worker import BlobDataset  # noqa: E402
from spvr_lib import models as real_models
from spvr_lib import __main__ as cli  # noqa: E402
from spvr_lib import train  # noqa: E402
from spvr_lib.train import Recipe, evaluate, fit, state_dict_digest  # noqa: E402

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


class SmallNet(nn.Module):
    """MLP with BatchNorm and Dropout, so buffers and the global RNG matter for exactness."""

    def __init__(self, in_features: int = 4, classes: int = 3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Dropout(0.2), nn.Linear(16, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


RECIPE = Recipe(epochs=3, batch_size=8, lr=0.1)


# --------------------------------------------------------------------------- Recipe
@pytest.mark.parametrize("field,value", [("epochs", 0), ("batch_size", 2.5), ("lr", -0.1), ("lr", float("nan")),
                                         ("momentum", 1.0), ("weight_decay", -1e-4), ("mode", "prune"),
                                         ("num_workers", -1), ("amp", 1)])
def test_recipe_rejects_bad_fields_naming_them(field, value):
    kwargs = {"epochs": 1, "batch_size": 4, "lr": 0.1, field: value}
    with pytest.raises(ValueError, match=rf"Recipe\.{field}="):
        Recipe(**kwargs)


def test_recipe_to_dict_is_canonical():
    d = Recipe(epochs=2, batch_size=4, lr=1).to_dict()
    assert d == Recipe(epochs=2, batch_size=4, lr=1.0).to_dict()
    assert isinstance(d["lr"], float)
    assert d == {"epochs": 2, "batch_size": 4, "lr": 1.0, "momentum": 0.9, "weight_decay": 5e-4,
                 "mode": "scratch", "num_workers": 0, "augment": True, "amp": False, "optimizer": "sgd",
                 "schedule": "cosine", "channels_last": False}


# --------------------------------------------------------------------------- evaluate
class Logits(nn.Module):
    """The input IS the logits: lets the test choose them by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_evaluate_exact_top1_top5_loss():
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5, 6],   # label 0 ranked 1st      -> top1, top5
        [0.0, 1, 2, 3, 4, 5, 6],   # label 4 ranked 3rd      -> top5 only
        [0.0, 1, 2, 3, 4, 5, 6],   # label 0 ranked 7th      -> neither
        [6.0, 5, 4, 3, 2, 1, 0],   # label 4 ranked 5th      -> top5 only
        [1.0, 0, 0.5, 0.2, 0.1, 0.3, 0.4],  # label 6 ranked 3rd -> top5 only
    ])
    labels = torch.tensor([0, 4, 0, 4, 6])
    model = Logits().eval()
    out = evaluate(model, TensorDataset(logits, labels), batch_size=2, device="cpu")
    lse = np.log(np.exp(logits.double().numpy()).sum(axis=1))
    expected_loss = float(np.mean(lse - logits.double().numpy()[np.arange(5), labels.numpy()]))
    assert out["top1"] == 20.0 and out["top5"] == 80.0 and out["n"] == 5
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert not model.training  # mode restored


def test_evaluate_top5_is_none_with_five_classes_or_fewer():
    logits = torch.tensor([[0.0, 2, 1], [3.0, 2, 1], [0.0, 1, 2]])
    model = Logits().train()
    out = evaluate(model, TensorDataset(logits, torch.tensor([1, 2, 2])), device="cpu")
    assert out["top1"] == pytest.approx(200 / 3) and out["top5"] is None and out["n"] == 3
    assert model.training


def test_evaluate_leaves_the_global_rng_alone():
    data = TensorDataset(torch.randn(6, 7), torch.arange(6))
    state = torch.get_rng_state()
    evaluate(Logits(), data, batch_size=4, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)


# --------------------------------------------------------------------------- fit
def test_fit_lowers_loss_and_follows_cosine_schedule():
    train_set, test_set = BlobDataset(20, seed=0, augment=True), BlobDataset(10, seed=1, augment=False)
    torch.manual_seed(0)
    model = SmallNet()
    recipe = Recipe(epochs=4, batch_size=8, lr=0.1, mode="finetune")
    before = evaluate(model, test_set, device="cpu")
    out = fit(model, train_set, test_set, recipe, seed=0, progress=False, device="cpu")
    assert out["loss"] < 0.5 * before["loss"]
    assert out["top1"] >= 90.0 and out["top5"] is None  # 3 well-separated blobs
    losses = [h["train_loss"] for h in out["history"]]
    assert losses[-1] < losses[0]
    assert [h["epoch"] for h in out["history"]] == [1, 2, 3, 4]
    expected_lr = [0.1 * (1 + math.cos(math.pi * e / 4)) / 2 for e in range(4)]  # per-epoch cosine
    assert [h["lr"] for h in out["history"]] == pytest.approx(expected_lr, rel=1e-12)
    assert out["loss"] == out["history"][-1]["test_loss"]
    assert out["loss"] == pytest.approx(evaluate(model, test_set, device="cpu")["loss"], rel=1e-12)


def test_fit_scratch_reinitialises_finetune_keeps_weights():
    train_set, test_set = BlobDataset(5, seed=0, augment=False), BlobDataset(3, seed=1, augment=False)
    tiny = {"epochs": 1, "batch_size": 5, "lr": 1e-12, "momentum": 0.0, "weight_decay": 0.0}
    torch.manual_seed(1)
    model = SmallNet()
    start = [p.detach().clone() for p in model.parameters()]
    fit(model, train_set, test_set, Recipe(**tiny, mode="finetune"), progress=False, device="cpu")
    assert all(torch.allclose(p, q, atol=1e-9) for p, q in zip(model.parameters(), start))
    fit(model, train_set, test_set, Recipe(**tiny, mode="scratch"), progress=False, device="cpu")
    assert not torch.allclose(model.net[1].weight, start[0], atol=1e-3)


def test_fit_is_deterministic_given_the_seed():
    train_set, test_set = BlobDataset(12, seed=0, augment=True), BlobDataset(4, seed=1, augment=False)

    def run(seed: int, init_seed: int) -> nn.Module:
        torch.manual_seed(init_seed)  # scratch mode re-initialises: the incoming weights must not matter
        model = SmallNet()
        # the same dataset object each time: its augmentation generator must be re-seeded by fit
        fit(model, train_set, test_set, Recipe(epochs=2, batch_size=8, lr=0.1), seed=seed, device="cpu",
            progress=False)
        return model

    a = run(seed=0, init_seed=100)
    assert states_equal(a, run(seed=0, init_seed=200))
    assert not states_equal(a, run(seed=1, init_seed=100))


def test_resume_after_interruption_is_bit_identical(tmp_path):
    test_set = BlobDataset(4, seed=1, augment=False)
    reference = SmallNet()
    ref = fit(reference, BlobDataset(12, seed=0, augment=True), test_set, RECIPE, seed=3,
              checkpoint=tmp_path / "ref.pt", progress=False, device="cpu")

    def interrupt(entry):
        if entry["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(SmallNet(), BlobDataset(12, seed=0, augment=True), test_set, RECIPE, seed=3,
            checkpoint=tmp_path / "run.pt", progress=False, device="cpu", on_epoch_end=interrupt)
    assert torch.load(tmp_path / "run.pt", weights_only=True)["epoch"] == 1
    torch.manual_seed(999)  # a fresh process would not share the global RNG state either
    np.random.seed(999)
    seen = []
    resumed = SmallNet()
    out = fit(resumed, BlobDataset(12, seed=0, augment=True), test_set, RECIPE, seed=3,
              checkpoint=tmp_path / "run.pt", progress=False, device="cpu",
              on_epoch_end=lambda e: seen.append(e["epoch"]))
    assert seen == [2, 3]  # resumed, not restarted
    assert states_equal(resumed, reference)
    assert out["history"] == ref["history"]


def test_checkpoint_of_another_run_is_rejected(tmp_path):
    data = BlobDataset(4, seed=0, augment=False)
    fit(SmallNet(), data, data, Recipe(epochs=1, batch_size=4, lr=0.1), checkpoint=tmp_path / "c.pt",
        progress=False, device="cpu")
    with pytest.raises(ValueError, match="belongs to another run"):
        fit(SmallNet(), data, data, Recipe(epochs=1, batch_size=4, lr=0.2), checkpoint=tmp_path / "c.pt",
            progress=False, device="cpu")


def test_state_dict_digest():
    a = {"w": torch.arange(6.0).reshape(2, 3), "n": torch.tensor(3)}
    b = {k: v.clone() for k, v in a.items()}
    assert state_dict_digest(a) == state_dict_digest(b)
    b["w"][1, 2] += 1e-6
    assert state_dict_digest(a) != state_dict_digest(b)
    assert state_dict_digest(a) != state_dict_digest({"w": a["w"].reshape(3, 2), "n": a["n"]})


# --------------------------------------------------------------------------- validation split
def test_validation_split_is_stratified_and_disjoint():
    data = BlobDataset(10, seed=0, augment=False)
    tr, va = train.validation_split(data, 0.2, seed=0)
    assert sorted(tr + va) == list(range(30))
    assert np.bincount(data.targets[va].numpy()).tolist() == [2, 2, 2]
    assert train.validation_split(data, 0.2, seed=0) == (tr, va)
    assert train.validation_split(data, 0.2, seed=1) != (tr, va)


# --------------------------------------------------------------------------- data-parallel
def test_torchrun_two_cpu_ranks_end_with_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "tests" / "ddp_worker.py"), "--preset", "tiny", "--width", "1", "--dataset", "blobs",
           "--epochs", "2", "--batch-size", "8", "--lr", "0.1", "--per-class-train", "10", "--per-class-test", "5",
           "--device", "cpu", "--out", str(tmp_path), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (record_path,) = [p for p in tmp_path.glob("train-*.json") if not p.name.endswith(".pt.json")]
    record = json.loads(record_path.read_text())
    assert record["world_size"] == 2
    per_rank = record["state_sha256_per_rank"]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]
    weights = torch.load(record["weights"], weights_only=True)
    assert state_dict_digest(weights) == per_rank[0]
    # training happened: the weights are not the seeded initialisation
    models, _ = ddp_worker.fake_modules()
    torch.manual_seed(0)
    init = models.build(record["spec"])
    real_models.reinitialize(init)
    assert not torch.equal(init.state_dict()["1.weight"], weights["1.weight"])
    assert record["history"][-1]["test_top1"] == record["top1"] and len(record["history"]) == 2


def test_cli_single_process_writes_record_and_resumes(tmp_path, monkeypatch):
    ddp_worker.install(monkeypatch)
    argv = ["--preset", "tiny", "--dataset", "blobs", "--epochs", "2", "--batch-size", "8", "--lr", "0.1",
            "--per-class-train", "6", "--per-class-test", "3", "--device", "cpu", "--out", str(tmp_path),
            "--no-progress"]
    assert cli.main(["train", *argv]) == 0
    (record_path,) = [p for p in tmp_path.glob("train-*.json") if not p.name.endswith(".pt.json")]
    first = json.loads(record_path.read_text())
    assert first["world_size"] == 1 and first["params"] == 4 * 16 + 16 + 2 * 16 + 16 * 3 + 3
    assert state_dict_digest(torch.load(first["weights"], weights_only=True)) == first["state_sha256_per_rank"][0]
    calls = []
    monkeypatch.setattr(train.DataLoader, "__iter__", lambda self: calls.append(1) or iter(()), raising=True)
    assert cli.main(["train", *argv]) == 0  # the finished checkpoint is resumed: nothing is trained again
    second = json.loads(record_path.read_text())
    assert second["state_sha256_per_rank"] == first["state_sha256_per_rank"] and not calls


# --------------------------------------------------------------------------- the cached run
def test_train_run_is_cached_and_retrains_when_weights_are_missing(tmp_path, monkeypatch):
    ddp_worker.install(monkeypatch)
    monkeypatch.setenv("SPVR_CACHE", str(tmp_path / "runs"))
    fits = []
    real_fit = train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **k: fits.append(k["checkpoint"]) or real_fit(*a, **k))
    spec = ddp_worker._preset("tiny", num_classes=3, in_channels=1)
    recipe = Recipe(epochs=2, batch_size=8, lr=0.1)
    args = dict(spec=spec, dataset="blobs", recipe=recipe, seed=0, per_class_train=6, per_class_test=3,
                progress=False, device="cpu")

    first = train.train_run(**args)
    assert len(fits) == 1 and Path(fits[0]).parent == tmp_path / "checkpoints"
    assert not Path(fits[0]).exists()  # the resume checkpoint is dropped once the record is written
    weights = Path(first["weights"])
    assert weights.parent == tmp_path / "checkpoints" and weights.exists()
    assert first["params"] == 4 * 16 + 16 + 2 * 16 + 16 * 3 + 3 and first["spec"] == spec
    assert list((tmp_path / "runs").glob("train-*.json")) == [tmp_path / "runs" / f"train-{first['hash']}.json"]

    assert train.train_run(**args) == first and len(fits) == 1  # cached: not trained again
    model = train.load_weights(first)
    digest = state_dict_digest(model.state_dict())

    weights.unlink()
    with pytest.raises(FileNotFoundError, match="train_run again"):
        train.load_weights(first)
    again = train.train_run(**args)
    assert len(fits) == 2 and weights.exists()
    assert state_dict_digest(train.load_weights(again).state_dict()) == digest  # deterministic retrain

    # fine-tuning from given weights is another run; init_state is refused in scratch mode
    ft = train.train_run(**{**args, "recipe": Recipe(epochs=1, batch_size=8, lr=0.01, mode="finetune")},
                         init_state=model.state_dict())
    assert len(fits) == 3 and ft["hash"] != first["hash"] and ft["key"]["init"] == digest
    with pytest.raises(ValueError, match="init_state"):
        train.train_run(**args, init_state=model.state_dict())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_on_cuda_with_amp_learns_and_evaluates_like_cpu():
    train_set, test_set = BlobDataset(20, seed=0, augment=True), BlobDataset(10, seed=1, augment=False)
    model = SmallNet()
    out = fit(model, train_set, test_set, Recipe(epochs=4, batch_size=8, lr=0.1, amp=True), device="cuda",
              progress=False)
    assert next(model.parameters()).is_cuda and out["top1"] >= 90.0
    on_cpu = evaluate(model, test_set, device="cpu")
    assert on_cpu["top1"] == out["top1"] and on_cpu["loss"] == pytest.approx(out["loss"], rel=1e-4)


# --------------------------------------------------------------------------- data held in memory
def _images(n=24, seed=0, augment=True):
    from spvr_lib.data import InMemoryImages
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 8, 8), dtype=torch.uint8, generator=g)
    return InMemoryImages(images, torch.arange(n) % 3, classes=["a", "b", "c"], mean=(0.5,), std=(0.25,),
                          crop_padding=2, augment=augment, seed=seed)


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def test_batch_augmentation_is_the_per_image_crop_and_flip():
    from spvr_lib.data.common import random_crop_flip_batch
    images = _images(5).images
    g = torch.Generator().manual_seed(7)
    got = random_crop_flip_batch(images, 2, g)
    g.manual_seed(7)                                     # the same draws: offsets [B, 2], then flips [B]
    offsets = torch.randint(0, 5, (5, 2), generator=g)
    flips = torch.randint(0, 2, (5,), generator=g).bool()
    for i in range(5):
        padded = torch.nn.functional.pad(images[i], (2, 2, 2, 2))
        crop = padded[:, offsets[i, 0]:offsets[i, 0] + 8, offsets[i, 1]:offsets[i, 1] + 8]
        assert torch.equal(got[i], crop.flip(-1) if flips[i] else crop)


def test_in_memory_batches_equal_the_items_and_evaluation_matches_the_dataloader():
    from spvr_lib.data import LabeledSubset
    plain = _images(augment=False)
    sub = torch.utils.data.Subset(LabeledSubset(plain, range(3, 20)), [0, 5, 7, 2])
    source = train.batch_source(sub)
    x, y = source(torch.tensor([1, 3]))
    assert torch.equal(x[0], sub[1][0]) and torch.equal(x[1], sub[3][0]) and y.tolist() == [sub[1][1], sub[3][1]]
    assert train.batch_source(torch.utils.data.TensorDataset(torch.zeros(2, 1))) is None

    class Items(torch.utils.data.Dataset):              # the same data without a batch method: the DataLoader path
        def __len__(self):
            return len(plain)

        def __getitem__(self, i):
            return plain[i]

    torch.manual_seed(0)
    model = TinyConv().eval()
    fast, slow = evaluate(model, plain, batch_size=5), evaluate(model, Items(), batch_size=5)
    assert fast["top1"] == slow["top1"] and fast["loss"] == pytest.approx(slow["loss"], rel=1e-6)


def test_in_memory_training_is_deterministic_and_resumes_bit_identically(tmp_path):
    recipe = Recipe(epochs=3, batch_size=5, lr=0.1)
    test_set = _images(9, seed=1, augment=False)

    def run(checkpoint=None, stop_after=None):
        torch.manual_seed(0)
        model = TinyConv()

        def stop(entry):
            if stop_after is not None and entry["epoch"] == stop_after:
                raise KeyboardInterrupt
        try:
            fit(model, _images(), test_set, recipe, seed=3, checkpoint=checkpoint, progress=False, on_epoch_end=stop)
        except KeyboardInterrupt:
            pass
        return model

    a, b = run(), run()
    assert states_equal(a, b) and train.batch_source(_images()) is not None
    run(tmp_path / "ck.pt", stop_after=1)                 # interrupted after epoch 1 ...
    resumed = run(tmp_path / "ck.pt")                     # ... and resumed: the same weights as never stopping
    assert states_equal(resumed, a)
