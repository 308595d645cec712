"""Notebook 12: SPvR on a network that is not spvr_lib's own, a torchvision model, end to end.

Per scale (:func:`setup`):

* ``smoke``: torchvision's ResNet18 with its RANDOM initialisation (nothing is trained, nothing can be
  downloaded); Fashion-MNIST calibration images, the grey channel repeated 3 times.  Shows the mechanics only.
* ``cpu``: the same ResNet18 trained briefly with the library's one training loop (:func:`spvr_lib.train.fit`)
  on a Fashion-MNIST subset (cached as a run record), then pruned.
* ``paper``: torchvision's ResNet50 with its published ImageNet weights (found locally, as the paper scale's
  base network: :func:`spvr_lib.paper.base_models.pretrained_weights`), calibrated on ImageNet.

The notebook itself calls the library: ``spvr_prune`` with ``source=`` (so ``load_network`` rebuilds the
pruned network), ``models.save_network``, ``latency.measure_interleaved`` (through ``latency_vs_accuracy.timed_together``) and ``latency.count_macs``.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import torch
from torch import nn

from spvr_lib import data, store, train
from spvr_lib.latency import count_macs
from spvr_lib.paper.plots import PLOT_STYLE
from spvr_lib.paper.scales import get_scale
from spvr_lib.paper import latency_vs_accuracy
from spvr_lib.paper.base_models import pretrained_weights


@dataclass(frozen=True)
class OwnModelSetup:
    """What notebook 12 prunes at one scale."""

    arch: str                   # torchvision.models name
    dataset: str                # calibration (and, at the cpu scale, training) data
    keep: float                 # fraction of the parameters kept
    group_size: int             # d of Section 3.2
    calib_per_class: int
    epochs: int = 0             # training epochs of the base network (0: no training)
    train_subset: int | None = None   # training images per class
    test_subset: int | None = None    # test images per class (accuracy of the trained base network)
    batch_size: int = 64
    lr: float = 0.05
    pretrained: str | None = None     # base_models.PRETRAINED_FILES key: published weights instead of training
    batch_sizes: tuple[int, ...] = (1, 64)   # latency batch sizes


_SETUPS = {
    "smoke": OwnModelSetup("resnet18", "fashion-mnist", keep=0.3, group_size=16, calib_per_class=2,
                           batch_sizes=(1,)),
    "cpu": OwnModelSetup("resnet18", "fashion-mnist", keep=0.3, group_size=8, calib_per_class=10, epochs=3,
                         train_subset=200, test_subset=100, batch_size=32, lr=0.05),
    "paper": OwnModelSetup("resnet50", "imagenet", keep=0.3, group_size=8, calib_per_class=20,
                           pretrained="torchvision-resnet50-imagenet1k-v1"),
}


def setup(scale: str) -> OwnModelSetup:
    """Notebook 12's settings at ``scale`` (the scale's latency runs come from :mod:`spvr_lib.paper.scales`)."""
    get_scale(scale)                                   # a known scale, or ValueError naming the choices
    return _SETUPS[scale]


def source(cfg: OwnModelSetup) -> dict[str, Any]:
    """How ``models.load_network`` rebuilds the original network (``spvr_prune``'s ``source``)."""
    return {"torchvision": cfg.arch, "kwargs": {"num_classes": data.dataset_info(cfg.dataset).num_classes}}


class GreyAsRGB(nn.Module):
    """Repeats a 1-channel image 3 times (Fashion-MNIST into a network that takes RGB)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


def _build(cfg: OwnModelSetup) -> nn.Module:
    import torchvision

    src = source(cfg)
    return torchvision.models.get_model(src["torchvision"], weights=None, **src["kwargs"])


def base_network(cfg: OwnModelSetup, seed: int = 0, progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The network to prune (eval mode) and what it is: random (smoke), trained here (cpu; a cached run
    record, its weights beside the checkpoints) or the published weights (paper)."""
    torch.manual_seed(seed)
    model = _build(cfg)
    if cfg.pretrained:

        state = torch.load(pretrained_weights(cfg.pretrained), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        return model.eval(), {"weights": f"published ({cfg.pretrained})", "top1": None, "epochs": 0}
    if cfg.epochs == 0:
        return model.eval(), {"weights": "random initialisation (untrained)", "top1": None, "epochs": 0}
    key = {"notebook": "12", "setup": dataclasses.asdict(cfg), "seed": seed,
           "data_files": data.fingerprint(cfg.dataset)}
    weights = train.checkpoint_dir() / f"{store.cache_path(key, kind='own_model').stem}.final.pt"

    def compute() -> dict[str, Any]:
        recipe = train.Recipe(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr)
        train_set = data.load_dataset(cfg.dataset, "train", augment=True, per_class=cfg.train_subset, seed=seed)
        test_set = data.load_dataset(cfg.dataset, "test", per_class=cfg.test_subset, seed=0)
        torch.manual_seed(seed)
        net = _build(cfg)
        scores = train.fit(nn.Sequential(GreyAsRGB(), net), train_set, test_set, recipe, seed=seed,
                           progress=progress)
        weights.parent.mkdir(parents=True, exist_ok=True)
        store.atomic_torch_save({k: v.detach().cpu() for k, v in net.state_dict().items()}, weights)
        return {"weights": store.repo_relative(weights), "top1": scores["top1"], "epochs": cfg.epochs,
                "history": scores["history"]}

    path = store.cache_path(key, kind="own_model")
    stale = False
    if path.exists() and not weights.exists():
        # the committed cache keeps the record, not the 45 MB of weights a 15-second training makes: train again
        # and keep the record where the run is the same, epoch by epoch (it is on one machine and thread count)
        stale = compute()["history"] != store.read_record(path).get("history")
        if stale:
            warnings.warn(f"own_model record {path.name}: training again to restore its weights gave another "
                          "history; recomputing the record", stacklevel=2)
    record = store.cached(key, compute, kind="own_model", refresh=stale)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
    return model.eval(), record


def calibration(cfg: OwnModelSetup, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``calib_per_class`` training images per class, as the network takes them (3 channels)."""
    x, y = data.calibration_set(data.load_dataset(cfg.dataset, "train"), cfg.calib_per_class, seed, progress=False)
    return GreyAsRGB()(x), y


def conv_table(model: nn.Module, result: Any) -> pd.DataFrame:
    """One row per convolution of the original network: its channels before and after, and whether it was
    pruned, kept whole, or collapsed (with the unit that disappeared)."""
    after = dict(result.model.named_modules())
    gone = {m: c for c in (result.collapsed or []) for m in c.get("modules", [])}
    rows = []
    for name, conv in model.named_modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        new = after.get(name)
        kept = new if isinstance(new, nn.Conv2d) else None
        if kept is None:
            unit = gone.get(name) or next((c for m, c in gone.items() if name.startswith(m + ".")), None)
            status = f"collapsed ({unit['kind']} {unit['unit']})" if unit else "removed"
        else:
            status = "kept whole" if kept.out_channels == conv.out_channels else "pruned"
        rows.append({"conv": name, "in before": conv.in_channels, "out before": conv.out_channels,
                     "in after": kept.in_channels if kept is not None else 0,
                     "out after": kept.out_channels if kept is not None else 0, "status": status})
    return pd.DataFrame(rows)


def latency(model: nn.Module, pruned: nn.Module, input_shape: tuple[int, int, int], rounds: int,
            runs_per_round: int, warmup: int, batch_sizes: tuple[int, ...]) -> pd.DataFrame:
    """Latency of the network before and after pruning, timed together on one CPU thread
    (``latency_vs_accuracy.timed_together``: interleaved rounds, median with its 95% interval; a record, so a rerun on
    the same kind of machine re-times nothing)."""

    rows = []
    for bs in batch_sizes:
        rec = latency_vs_accuracy.timed_together({"notebook": "12_prune_your_own_model"},
                                     {"original": model, "SPvR-pruned": pruned}, input_shape, bs, rounds,
                                     runs_per_round, warmup, threads=1)
        for name, lat in rec["latency"].items():
            rows.append({"network": name, "batch_size": bs, "median_ms": lat["median_ms"], "low_ms": lat["low_ms"],
                         "high_ms": lat["high_ms"], "runs": lat["runs"], "cpu": rec["key"]["cpu"],
                         "threads": lat["threads"]})
    return pd.DataFrame(rows)


def summary_table(cfg: OwnModelSetup, model: nn.Module, result: Any, lat: pd.DataFrame,
                  input_shape: tuple[int, int, int]) -> pd.DataFrame:
    """Parameters against the budget, MACs and median latency (the smallest batch size), before and after."""
    med = lat[lat["batch_size"] == lat["batch_size"].min()].set_index("network")["median_ms"]
    return pd.DataFrame([
        {"network": f"{cfg.arch} (original)", "params": result.params_before, "budget": "",
         "MMACs": count_macs(model, input_shape) / 1e6, "median latency (ms)": med["original"]},
        {"network": f"{cfg.arch} SPvR, keep {cfg.keep:.0%}", "params": result.params_after, "budget": result.budget,
         "MMACs": count_macs(result.model, input_shape) / 1e6, "median latency (ms)": med["SPvR-pruned"]},
    ])


def width_figure(convs: pd.DataFrame, title: str = "") -> plt.Figure:
    """Output channels of every convolution before and after pruning (collapsed ones at 0, marked)."""
    with plt.rc_context(PLOT_STYLE):
        fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(convs)), 3.4))
        pos = range(len(convs))
        ax.bar([p - 0.2 for p in pos], convs["out before"], width=0.4, label="before", color="0.7")
        ax.bar([p + 0.2 for p in pos], convs["out after"], width=0.4, label="after SPvR")
        for p, status in zip(pos, convs["status"]):
            if status.startswith("collapsed") or status == "removed":
                ax.annotate("x", (p + 0.2, 0), ha="center", va="bottom", color="C3", fontweight="bold")
        ax.set_xticks(list(pos), convs["conv"], rotation=90, fontsize=6)
        ax.set(ylabel="output channels", title=title)
        ax.legend()
        fig.tight_layout()
    return fig
