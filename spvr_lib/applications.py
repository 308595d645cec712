"""The paper's two applications: Section 5.4 / Table 4 (a pruned ResNet50 against MobileNetV3,
notebook 10) and Section 5.5 (SegNet pruned by SPvR for semantic segmentation, notebook 11).

Table 4.  SPvR prunes the scale's trained ResNet50 to 80% of MobileNetV3-small-minimal's parameter
count (the paper: 1.6M against 2.0M); the pruned network is re-initialised and trained from
scratch with the same data and recipe as MobileNetV3-small and -minimal (one recipe for all three,
at the base ResNet50's searched learning rate, as every trained comparison here: Appendix D's
"consistency ... in terms of optimizer, scheduler, batch size, and training duration"), and the
three are compared on accuracy, parameters, MACs and batch-1 latency.  The scale's ResNet50 is
narrow at the smoke and cpu scales, so the MobileNets are built at the width multiplier that
keeps the paper's proportions (:func:`mobilenet_width`).

Section 5.5.  SegNet (VGG16 encoder and mirrored decoder) trained on a segmentation set, pruned
by SPvR at 80% with Eq. 2 summed over the pixels (``ranking.spvr_loss`` on the [n, K, H, W]
softmax outputs), re-initialised and trained from scratch; mean IoU before and after, through the
same ``prune.spvr_prune`` as every classifier (the encoder conv and the decoder conv feeding its
unpool share a width, a tie like a ResNet stage's).
"""
from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from . import data, experiments, models, results
from .ablation import _mean_std, train_pruned
from .prune import spvr_prune

__all__ = ["TABLE4_PAPER", "BUDGET_FRACTION", "PAPER_MINIMAL_SHARE", "MOBILENET_VARIANTS",
           "mobilenet_width", "mobilenet_specs", "mobilenet_budget", "pruned_resnet50", "table4",
           "SEGMENTATION_PAPER_MIOU", "segmentation_settings", "segmentation_dataset",
           "segnet_spec", "train_segnet", "load_segnet", "segnet_base", "segnet_pruned",
           "segmentation_table", "segmentation_curves"]

# =============================================================================================
# Section 5.4 / Table 4
# =============================================================================================
# Table 4 as printed (ImageNet1K): parameters in millions, top-1 in %.
TABLE4_PAPER = {
    "MobileNetV3-small": {"paper params (M)": 2.4, "paper top1": 65.40},
    "MobileNetV3-minimal": {"paper params (M)": 2.0, "paper top1": 61.90},
    "ResNet50-pruned": {"paper params (M)": 1.6, "paper top1": 65.20},
}
BUDGET_FRACTION = 0.8   # Section 5.4: the pruned ResNet50 has "20% fewer parameters" than -minimal (1.6M / 2.0M)
MOBILENET_VARIANTS = {"MobileNetV3-small": "small", "MobileNetV3-minimal": "small-minimal"}
# MobileNetV3-small-minimal's share of ResNet50's parameters at the paper's size (1000 classes, RGB,
# width 1): 2,044,736 / 25,557,032 = 8.0% (the paper prints 2.0M and 25.6M).
# (models.spec_params of mobilenetv3("small-minimal", 1000) and resnet50(1000, stem="imagenet"))
PAPER_MINIMAL_SHARE = 2_044_736 / 25_557_032
_WIDTH_GRID = tuple(round(0.025 * k, 3) for k in range(4, 49))     # 0.1, 0.125, ..., 1.2
# batch-1 latency runs per network: the paper's 1500 (Section 5.3); a few at smoke


def _resnet50_setup(cfg: Any) -> Any:
    return cfg.model("resnet50")


def _mobilenet_spec(setup: Any, variant: str, width: float) -> dict:
    info = data.dataset_info(setup.dataset)
    # the MobileNet's stem mirrors the ResNet50's: the paper's ImageNet stem (stride 2) keeps its
    # stride-2 stem, so both networks reduce the input by 32 (a "cifar" ResNet stem gets stride 1)
    return models.mobilenetv3(variant, num_classes=info.num_classes, in_channels=info.in_channels, width=width,
                              small_input=setup.stem == "cifar")


def mobilenet_width(cfg: Any) -> float:
    """MobileNetV3 width multiplier for the scale: the width in 0.1, 0.125, ..., 1.2 at which
    MobileNetV3-small-minimal's share of the scale's base ResNet50 parameters is closest to the
    paper's (:data:`PAPER_MINIMAL_SHARE`, 8.0%; ties to the wider).  At the paper scale this is 1.0;
    with the 1/8-width ResNet50 of the cpu scale it is 0.125, so that SPvR removes about as much
    of the ResNet50 as in the paper (94%)."""
    setup = _resnet50_setup(cfg)
    base = models.spec_params(experiments.base_spec(setup))

    def share(w: float) -> float:
        return models.spec_params(_mobilenet_spec(setup, "small-minimal", w)) / base

    # channel counts, hence parameters, do not decrease with the width: bisect for the first width
    # whose share reaches the paper's, then take the closer of it and the one before
    lo, hi = 0, len(_WIDTH_GRID)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if share(_WIDTH_GRID[mid]) >= PAPER_MINIMAL_SHARE else (mid + 1, hi)
    candidates = _WIDTH_GRID[max(lo - 1, 0):lo + 1]
    return min(candidates, key=lambda w: (abs(share(w) - PAPER_MINIMAL_SHARE), -w))


def mobilenet_specs(cfg: Any, width: float | None = None) -> dict[str, dict]:
    """{"MobileNetV3-small": spec, "MobileNetV3-minimal": spec} for the ResNet50's dataset at ``width``
    (default :func:`mobilenet_width`)."""
    setup = _resnet50_setup(cfg)
    w = mobilenet_width(cfg) if width is None else width
    return {name: _mobilenet_spec(setup, variant, w) for name, variant in MOBILENET_VARIANTS.items()}


def mobilenet_budget(cfg: Any, width: float | None = None) -> int:
    """The pruned ResNet50's parameter budget: floor(0.8 x MobileNetV3-small-minimal's parameters).

    ValueError if that is not below the base ResNet50's parameters (nothing would be pruned)."""
    minimal = models.spec_params(mobilenet_specs(cfg, width)["MobileNetV3-minimal"])
    budget = math.floor(BUDGET_FRACTION * minimal)
    base = models.spec_params(experiments.base_spec(_resnet50_setup(cfg)))
    if budget >= base:
        raise ValueError(f"MobileNet width={width!r}: the budget {budget} (80% of -minimal's {minimal}) is not below "
                         f"the base ResNet50's {base} parameters; expected a narrower MobileNet")
    return budget


def pruned_resnet50(cfg: Any, budget: int | None = None, progress: bool = True) -> dict[str, Any]:
    """SPvR's ResNet50 at ``budget`` parameters (default :func:`mobilenet_budget`): the cached
    ``experiments.spvr_pruned`` record at rate 1 - budget / params of the base, with
    ``params_after <= budget`` checked (ValueError otherwise)."""
    budget = mobilenet_budget(cfg) if budget is None else int(budget)
    base = models.spec_params(experiments.base_spec(_resnet50_setup(cfg)))
    if not 0 < budget < base:
        raise ValueError(f"budget={budget}; expected a parameter count in (0, {base}) (the base ResNet50's size)")
    rec = experiments.spvr_pruned(cfg, "resnet50", 1.0 - budget / base, progress=progress)
    if rec["params_after"] > budget:
        raise ValueError(f"SPvR's ResNet50 has {rec['params_after']} parameters, more than the budget {budget}")
    return rec


def _latency_and_macs(spec: dict, dataset: str, runs: int) -> dict[str, Any]:
    """Batch-1 latency on ``runs`` forwards (weights do not matter: a fresh network) and MACs of one sample."""
    from . import latency

    info = data.dataset_info(dataset)
    shape = (info.in_channels, info.image_size, info.image_size)
    net = models.build(spec)
    t = latency.measure_latency(net, shape, batch_size=1, runs=runs, warmup=min(50, runs))
    return {"latency median (ms)": t["median_ms"], "latency p10 (ms)": t["p10_ms"], "latency p90 (ms)": t["p90_ms"],
            "latency device": t["device"], "threads": t["threads"], "MMACs": latency.count_macs(net, shape) / 1e6}


def table4(cfg: Any, seeds: Sequence[int] | None = None, latency_runs: int | None = None,
           progress: bool = True) -> pd.DataFrame:
    """Table 4 at the scale: MobileNetV3-small, -minimal and SPvR's ResNet50 at 80% of -minimal's
    parameters, each trained from scratch with the ResNet50 setup's data and recipe at the base
    ResNet50's searched learning rate, over ``seeds`` (default the scale's); the unpruned base ResNet50
    (seed 0, as every notebook prunes it) as a reference row.  Accuracies in % (mean, sample std),
    latency batch 1 (median over ``latency_runs``, default the scale's ``latency_runs``), MACs per image.
    A network whose pruning or training raises is a row with status "failed" and its reason."""
    setup = _resnet50_setup(cfg)
    seeds = list(cfg.seeds if seeds is None else seeds)
    runs = cfg.latency_runs if latency_runs is None else int(latency_runs)
    width = mobilenet_width(cfg)
    budget = mobilenet_budget(cfg, width)
    base_rec = experiments.train_base(cfg, "resnet50", progress=progress)
    lr = float(base_rec["key"]["recipe"]["lr"])          # the base ResNet50's searched learning rate
    jobs: list[tuple[str, Any]] = [(name, spec) for name, spec in mobilenet_specs(cfg, width).items()]
    jobs.append(("ResNet50-pruned", None))
    rows = []
    for name, spec in tqdm(jobs, desc="Table 4", disable=not progress, leave=False):
        row: dict[str, Any] = {"model": name, "width": width if name in MOBILENET_VARIANTS else setup.width,
                               "status": "ok", "error": ""}
        try:
            if spec is None:
                rec = pruned_resnet50(cfg, budget, progress=progress)
                spec = rec["spec"]
                row.update({"budget": budget, "removed from ResNet50 (%)": 100.0 * rec["removed_fraction"],
                            "prune s": rec["prune_s"], "collapsed": rec["collapsed"]})
            trained = [train_pruned(cfg, "resnet50", spec, s, lr=lr, progress=progress) for s in seeds]
            row.update(_accuracy_columns(trained))
            row.update({"params": models.spec_params(spec), "lr": lr, "architecture": models.spec_to_str(spec)})
            row.update(_latency_and_macs(spec, setup.dataset, runs))
        except Exception as err:  # a failed network is a row, never dropped
            row.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        row.update(TABLE4_PAPER[name])
        rows.append(row)
    base_spec = base_rec["spec"]
    rows.append({"model": "ResNet50 (unpruned base)", "width": setup.width, "status": "ok", "error": "",
                 **_accuracy_columns([base_rec]), "params": base_rec["params"],
                 "lr": lr, "architecture": models.spec_to_str(base_spec),
                 **_latency_and_macs(base_spec, setup.dataset, runs), "paper params (M)": 25.6, "paper top1": None})
    df = pd.DataFrame(rows)
    minimal = df.loc[df["model"] == "MobileNetV3-minimal", "params"]
    if len(minimal) and pd.notna(minimal.iloc[0]):
        df["params / minimal"] = df["params"] / minimal.iloc[0]
    order = ["model", "width", "params", "params / minimal", "budget", "removed from ResNet50 (%)", "top1", "top1 std",
             "top5", "top5 std", "n seeds", "lr", "MMACs", "latency median (ms)", "latency p10 (ms)",
             "latency p90 (ms)", "latency device", "threads", "prune s", "collapsed", "paper params (M)",
             "paper top1", "status", "error", "architecture"]
    return df[[c for c in order if c in df.columns]]


def _accuracy_columns(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"n seeds": len(records)}
    for metric in ("top1", "top5"):
        out[metric], out[f"{metric} std"] = _mean_std([r[metric] for r in records])
    return out


# =============================================================================================
# Section 5.5: SegNet
# =============================================================================================
SEGMENTATION_PAPER_MIOU = {"base": 51.2, "pruned": 46.5}   # Section 5.5, CityScapes, % IoU

def segmentation_settings(scale: str) -> dict[str, Any]:
    """The segmentation settings of ``scale`` ("smoke", "cpu" or "paper"), from ``config`` (a copy)."""
    from .config import get_scale

    s = get_scale(scale).segmentation
    return {**s, "options": dict(s["options"]), "name": scale}


def _key_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: settings[k] for k in ("dataset", "options", "n_train", "n_test", "epochs", "batch_size", "lr",
                                     "weight_decay", "augment")}


def segmentation_dataset(settings: dict[str, Any], split: str, augment: bool = False) -> torch.utils.data.Dataset:
    """The segmentation set of ``settings`` (``split`` "train" or "test"); the scenes are composed with seed 0."""
    opts = dict(settings["options"])
    if settings["dataset"] == "fashion-mnist-scenes":
        opts["n_images"] = settings["n_train" if split == "train" else "n_test"]
    ds = data.load_dataset(settings["dataset"], split, augment=augment, seed=0, **opts)
    n = settings["n_train" if split == "train" else "n_test"]
    if settings["dataset"] != "fashion-mnist-scenes" and n is not None and n < len(ds):
        ds = torch.utils.data.Subset(ds, range(n))
    return ds


def segnet_spec(settings: dict[str, Any]) -> dict:
    """SegNet-VGG16 for the settings' dataset and width."""
    info = data.dataset_info(settings["dataset"])
    return models.segnet_vgg16(num_classes=info.num_classes, in_channels=info.in_channels, width=settings["width"])


def train_segnet(spec: dict, settings: dict[str, Any], seed: int, tag: str = "",
                 progress: bool = True) -> dict[str, Any]:
    """Train ``spec`` from a fresh initialisation (seeded) with ``segmentation.fit_segmentation``; cached
    (kind ``segtrain``) with its final weights beside the checkpoints.  Record: miou, pixel_acc, loss
    (final test scores), history, params, size_mb, wall_s, weights, spec."""
    from . import segmentation
    from .train import checkpoint_dir

    key = {"spec": spec, "settings": _key_settings(settings), "seed": int(seed), "tag": tag}
    path = results.cache_path(key, kind="segtrain")
    weights = checkpoint_dir() / f"{path.stem}.final.pt"

    def compute() -> dict[str, Any]:
        t0 = time.perf_counter()
        train_set = segmentation_dataset(settings, "train", augment=settings["augment"])
        test_set = segmentation_dataset(settings, "test")
        getattr(train_set, "reseed", lambda s: None)(int(seed))      # the flips follow the training seed
        torch.manual_seed(int(seed))
        model = models.build(spec)
        out = segmentation.fit_segmentation(model, train_set, test_set, epochs=settings["epochs"], lr=settings["lr"],
                                            batch_size=settings["batch_size"], seed=int(seed), progress=progress,
                                            weight_decay=settings["weight_decay"])
        results.atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, weights)
        try:
            where = str(weights.resolve().relative_to(results.REPO_ROOT.resolve()))
        except ValueError:
            where = str(weights.resolve())
        return {**out, "params": models.count_params(model), "size_mb": models.model_size_mb(model),
                "wall_s": round(time.perf_counter() - t0, 3), "weights": where, "spec": spec}

    return results.cached(key, compute, kind="segtrain", refresh=path.exists() and not weights.exists())


def load_segnet(record: dict[str, Any]) -> nn.Module:
    """The trained network of a :func:`train_segnet` record (CPU, eval mode)."""
    path = Path(record["weights"])
    path = path if path.is_absolute() else results.REPO_ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"weights file {str(path)!r} of run {record.get('hash')} is missing; call "
                                "train_segnet again with the same arguments: it retrains when the weights are gone")
    model = models.build(record["spec"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def segnet_base(settings: dict[str, Any], seed: int = 0, progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The trained unpruned SegNet (eval mode) and its record."""
    rec = train_segnet(segnet_spec(settings), settings, seed, tag="base", progress=progress)
    return load_segnet(rec), rec


def segnet_pruned(settings: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """SPvR's SegNet at ``settings["rate"]``, pruned from the seed-0 base with ``calib_per_class x K``
    calibration images (seed 0); cached (kind ``segprune``).  Record: spec, arch, params_before,
    params_after, budget, prune_s, collapsed, removed_fraction."""
    _, base_rec = segnet_base(settings, 0, progress=progress)
    key = {"base": base_rec["hash"], "rate": float(settings["rate"]), "group_size": int(settings["group_size"]),
           "calib_per_class": int(settings["calib_per_class"]), "calib_seed": 0, "method": "naive"}

    def compute() -> dict[str, Any]:
        model = load_segnet(base_rec)
        x, masks = data.calibration_set(segmentation_dataset(settings, "train"), settings["calib_per_class"], seed=0,
                                        progress=False)
        t0 = time.perf_counter()
        # Section 5.5: Eq. 2 summed over all pixels; the naive ranking (the fast path has no SegNet plan)
        res = spvr_prune(model, (x, masks), keep=1.0 - settings["rate"], group_size=settings["group_size"],
                         method="naive", progress=progress)
        prune_s = time.perf_counter() - t0
        with torch.device("meta"):
            layers_before = len(models.prunable_layers(models.build(base_rec["spec"]), base_rec["spec"]))
            layers_after = len(models.prunable_layers(models.build(res.spec), res.spec))
        return {"spec": res.spec, "arch": models.spec_to_str(res.spec), "params_before": res.params_before,
                "params_after": res.params_after, "budget": res.budget, "prune_s": round(prune_s, 3),
                "collapsed": layers_after < layers_before,
                "removed_fraction": 1.0 - res.params_after / res.params_before,
                "calibration images": len(x)}

    return results.cached(key, compute, kind="segprune")


def segmentation_table(settings: dict[str, Any], progress: bool = True) -> tuple[pd.DataFrame, dict[str, list]]:
    """Mean IoU before and after pruning, beside the paper's 51.2 and 46.5.

    Rows: the trained SegNet and SPvR's SegNet at ``settings["rate"]`` re-initialised and trained
    from scratch with the same recipe; mIoU and pixel accuracy in % (mean, sample std over
    ``settings["seeds"]``).  Also returns the training records per row (for the curves).  A step
    that raises gives a row with status "failed" and its reason."""
    rows, records = [], {}
    jobs = [("SegNet", SEGMENTATION_PAPER_MIOU["base"]),
            (f"SegNet, {settings['rate']:.0%} removed by SPvR", SEGMENTATION_PAPER_MIOU["pruned"])]
    for i, (name, paper) in enumerate(jobs):
        row: dict[str, Any] = {"model": name, "dataset": settings["dataset"], "status": "ok", "error": ""}
        try:
            if i == 0:
                spec, tag = segnet_spec(settings), "base"
            else:
                prec = segnet_pruned(settings, progress=progress)
                spec, tag = prec["spec"], "scratch"
                row.update({"budget": prec["budget"], "prune s": prec["prune_s"], "collapsed": prec["collapsed"],
                            "calibration images": prec["calibration images"]})
            runs = [train_segnet(spec, settings, s, tag=tag, progress=progress) for s in settings["seeds"]]
            records[name] = runs
            params = models.spec_params(spec)
            row["params"] = params
            row["removed (%)"] = 100.0 * (1 - params / models.spec_params(segnet_spec(settings)))
            for metric, col in (("miou", "mIoU"), ("pixel_acc", "pixel acc")):
                row[col], row[f"{col} std"] = _mean_std([r[metric] for r in runs])
            row["n seeds"] = len(runs)
            row["architecture"] = models.spec_to_str(spec)
        except Exception as err:  # a failed step is a row, never dropped
            row.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        row["paper mIoU (CityScapes)"] = paper
        rows.append(row)
    order = ["model", "dataset", "params", "removed (%)", "budget", "mIoU", "mIoU std", "pixel acc", "pixel acc std",
             "n seeds", "paper mIoU (CityScapes)", "prune s", "calibration images", "collapsed", "status", "error",
             "architecture"]
    df = pd.DataFrame(rows)
    return df[[c for c in order if c in df.columns]], records


def segmentation_curves(records: dict[str, list[dict[str, Any]]]) -> pd.DataFrame:
    """Test mean IoU per epoch of every training run in ``records`` (from :func:`segmentation_table`)."""
    return pd.DataFrame([{"model": name, "seed": r["key"]["seed"], "epoch": h["epoch"], "test mIoU (%)": h["test_miou"]}
                         for name, runs in records.items() for r in runs for h in r["history"]])
