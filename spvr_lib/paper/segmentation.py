"""Section 5.5: SPvR on SegNet (semantic segmentation), Eq. 2 summed over the pixels."""
from __future__ import annotations

import time
from typing import Any

import pandas as pd
import torch
from torch import nn

from spvr_lib import data, models, store, tasks, train
from spvr_lib.paper import base_models, convergence, jobs, reference, scales
from spvr_lib.paper.stats import mean_std
from spvr_lib.prune import spvr_prune


def segmentation_settings(scale: str) -> dict[str, Any]:
    """The segmentation settings of ``scale`` ("smoke", "cpu" or "paper"), from ``scales`` (a copy)."""
    s = scales.get_scale(scale).segmentation
    return {**s, "options": dict(s["options"]), "name": scale}



def split_options(settings: dict[str, Any], split: str) -> dict[str, Any]:
    """``data.load_dataset`` options of the settings' ``split``: its size, and scenes always composed with seed 0."""
    opts = dict(settings["options"])
    n = settings["n_train" if split == "train" else "n_test"]
    if settings["dataset"] == "fashion-mnist-scenes":
        opts.update(n_images=n, compose_seed=0)
    elif n is not None:
        opts["limit"] = n
    return opts


def segmentation_dataset(settings: dict[str, Any], split: str, augment: bool = False) -> torch.utils.data.Dataset:
    """The segmentation set of ``settings`` (``split`` "train" or "test"), as the training run loads it."""
    return data.load_dataset(settings["dataset"], split, augment=augment, seed=0, **split_options(settings, split))


def segnet_spec(settings: dict[str, Any]) -> dict:
    """SegNet-VGG16 for the settings' dataset and width."""
    info = data.dataset_info(settings["dataset"])
    return models.segnet_vgg16(num_classes=info.num_classes, in_channels=info.in_channels, width=settings["width"])


def segnet_recipe(settings: dict[str, Any], lr: float) -> train.Recipe:
    """The settings' recipe at ``lr``: SGD with momentum 0.9 and cosine annealing, from scratch."""
    return train.Recipe(epochs=settings["epochs"], batch_size=settings["batch_size"], lr=float(lr),
                        weight_decay=settings["weight_decay"], augment=bool(settings["augment"]), mode="scratch",
                        eval_every=int(settings.get("eval_every", 1)))


def segnet_lr_trial(settings: dict[str, Any], lr: float, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """One point of SegNet's learning-rate grid search: the unpruned SegNet trained with the settings' recipe at
    ``lr`` on the training scenes minus a random ``settings["val_fraction"]`` of them (never the test scenes),
    scored by mean IoU on those; cached (kind ``lrtrial``).  Record: lr, val_miou (%; 0 when the training loss
    diverged), history, wall_s.  (``lr_search.lr_trial`` is the classification twin.)"""
    spec, rcp = segnet_spec(settings), segnet_recipe(settings, lr)
    key = {"spec": spec, "dataset": settings["dataset"], "train_options": split_options(settings, "train"),
           "recipe": rcp.to_dict(), "seed": int(seed), "val_fraction": settings["val_fraction"],
           "data_files": data.fingerprint(settings["dataset"])}

    def compute() -> dict[str, Any]:
        t0 = time.perf_counter()
        ds = segmentation_dataset(settings, "train", augment=rcp.augment)
        plain = segmentation_dataset(settings, "train")
        train_idx, val_idx = train.validation_split(ds, settings["val_fraction"], int(seed))
        torch.manual_seed(int(seed))
        model = models.build_network(spec)
        out = train.fit(model, torch.utils.data.Subset(ds, train_idx), torch.utils.data.Subset(plain, val_idx), rcp,
                        seed=int(seed), progress=progress, task=tasks.SEGMENTATION)
        diverged = not all(torch.isfinite(torch.tensor(h["train_loss"])) for h in out["history"])
        return {"lr": float(lr), "val_miou": 0.0 if diverged else float(out["miou"]), "history": out["history"],
                "wall_s": round(time.perf_counter() - t0, 3)}

    return store.cached(key, compute, kind="lrtrial")


def segnet_lr(settings: dict[str, Any], progress: bool = True) -> tuple[float, dict[float, float | None]]:
    """THE learning rate of every SegNet of the settings (unpruned and SPvR's from scratch), searched once on the
    unpruned network over ``settings["lr_grid"]`` by :func:`segnet_lr_trial`: (best, {lr: validation mIoU});
    ties go to the smaller lr; a one-value grid is taken as is, untrained."""
    grid = [float(v) for v in settings["lr_grid"]]
    if len(grid) == 1:
        return grid[0], {grid[0]: None}
    scores = {lr: segnet_lr_trial(settings, lr, progress=progress)["val_miou"] for lr in grid}
    return max(sorted(scores), key=lambda lr: scores[lr]), scores


def train_segnet(spec: dict, settings: dict[str, Any], seed: int, tag: str = "",
                 progress: bool = True) -> dict[str, Any]:
    """Train ``spec`` from scratch with the settings' recipe at the searched lr (:func:`segnet_lr`):
    ``train.train_run`` with the segmentation task (the dataset's).  Record: miou, pixel_acc, loss (final
    test scores), history, params, size_mb, wall_s, weights, spec."""
    lr, _ = segnet_lr(settings, progress=progress)
    return train.train_run(spec, settings["dataset"], segnet_recipe(settings, lr), int(seed), tag=tag,
                           progress=progress, weights_needed=tag == "base" and int(seed) == 0,   # seed 0's is pruned
                           train_options=split_options(settings, "train"),
                           test_options=split_options(settings, "test"))


def load_segnet(record: dict[str, Any]) -> nn.Module:
    """The trained network of a :func:`train_segnet` record (CPU, eval mode)."""
    return train.load_weights(record).eval()


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
                         device=base_models.ranking_device(),
                         method="naive", progress=progress)
        prune_s = time.perf_counter() - t0
        return {"spec": res.spec, "arch": models.spec_to_str(res.spec), "params_before": res.params_before,
                "params_after": res.params_after, "budget": res.budget, "prune_s": round(prune_s, 3),
                "collapsed": base_models.prunable_count(res.spec) < base_models.prunable_count(base_rec["spec"]),
                "removed_fraction": 1.0 - res.params_after / res.params_before,
                "calibration images": len(x)}

    return store.cached(key, compute, kind="segprune")


PRUNED_SPEC = "SPvR's SegNet at the settings' rate"     # the plan's placeholder: known once the base is pruned
BASE_RUNS, SPVR_RUNS = "SegNet", "SPvR's SegNet"


def declared_jobs(settings: dict[str, Any], pruned_spec: dict | None = None) -> list[jobs.Batch]:
    """Notebook 11's independent computations, declared once (:func:`prepare_segmentation`,
    ``convergence.prepare_segnet_budget_runs`` and the plan read them): the lr trials (:func:`segnet_lr_trial`; none
    for a one-value grid), the unpruned SegNet at every seed (:func:`train_segnet`, tag "base"), SPvR's SegNet from
    scratch at every seed (tag "scratch"; ``pruned_spec`` unknown, the plan: :data:`PRUNED_SPEC`), and the
    unpruned SegNet's shorter budget at every seed (``convergence.segnet_with_epochs`` at
    ``convergence.short_epochs`` of the epochs; none with one epoch, where the shorter budget is the base itself).
    Sizes in the settings' epochs and scenes: SPvR's SegNet is costed at ``1 - settings["rate"]`` of the base's
    MACs per image (its parameters' share; MACs fall roughly with them), an lr trial trains on ``1 -
    settings["val_fraction"]`` of the training scenes."""
    epochs, seeds = int(settings["epochs"]), list(settings["seeds"])
    short = convergence.short_epochs(epochs)
    keep, trial = 1.0 - float(settings["rate"]), 1.0 - float(settings["val_fraction"])
    grid = list(settings["lr_grid"])
    pruned = PRUNED_SPEC if pruned_spec is None else pruned_spec
    return [jobs.Batch(f"lr search (SegNet): {len(grid)} values, {trial:.0%} of the scenes", segnet_lr_trial,
                       tuple((settings, lr) for lr in grid) if len(grid) > 1 else (),
                       size=lambda job: (epochs, 1.0, trial), kwargs={"progress": False}),
            jobs.Batch(BASE_RUNS, train_segnet, tuple((segnet_spec(settings), settings, s, "base") for s in seeds),
                       size=lambda job: (epochs, 1.0, 1.0), kwargs={"progress": False}),
            jobs.Batch(SPVR_RUNS, train_segnet, tuple((pruned, settings, s, "scratch") for s in seeds),
                       size=lambda job: (epochs, keep, 1.0), kwargs={"progress": False}),
            jobs.Batch(f"SegNet budget: {short} of {epochs} epochs", convergence.segnet_with_epochs,
                       tuple((dict(settings), short, s) for s in seeds) if short < epochs else (),
                       size=lambda job: (job[1], 1.0, 1.0), kwargs={"progress": False})]


def prepare_segmentation(settings: dict[str, Any], progress: bool = True) -> None:
    """Fill the run cache with the settings' learning-rate trials and every seed's unpruned SegNet, then SPvR's
    SegNet from scratch (:func:`declared_jobs`), side by side in the scale's ``jobs.worker_count`` processes
    (nothing with one worker but the pruning, done here: SPvR's SegNet needs it)."""

    workers = jobs.worker_count(scales.get_scale(settings["name"]) if "name" in settings else None)
    jobs.run([b for b in declared_jobs(settings) if b.target is segnet_lr_trial or b.what == BASE_RUNS], workers,
             progress)
    prec = segnet_pruned(settings, progress=progress)
    jobs.run([b for b in declared_jobs(settings, prec["spec"]) if b.what == SPVR_RUNS], workers, progress)


def segmentation_table(settings: dict[str, Any], progress: bool = True) -> tuple[pd.DataFrame, dict[str, list]]:
    """Mean IoU before and after pruning, beside the paper's 51.2 and 46.5.

    Rows: the trained SegNet and SPvR's SegNet at ``settings["rate"]`` re-initialised and trained
    from scratch with the same recipe and searched lr; mIoU and pixel accuracy in % (mean, sample std over
    ``settings["seeds"]``), the lr and its grid, epochs, and the rise of test mIoU over the last quarter of
    training (mean over seeds, as base_models.csv's).  Also returns the training records per row (for the
    curves).  A step that raises gives a row with status "failed" and its reason."""
    rows, records = [], {}
    jobs = [("SegNet", reference.SEGMENTATION_PAPER_MIOU["base"]),
            (f"SegNet, {settings['rate']:.0%} removed by SPvR", reference.SEGMENTATION_PAPER_MIOU["pruned"])]
    for i, (name, paper) in enumerate(jobs):
        row: dict[str, Any] = {"model": name, "dataset": settings["dataset"], "status": "ok", "error": ""}
        try:
            lr, scores = segnet_lr(settings, progress=progress)
            row.update({"epochs": settings["epochs"], "train images": settings["n_train"],
                        "test images": settings["n_test"], "lr": lr,
                        "lr grid (val mIoU)": ", ".join(f"{k:g}: {'-' if v is None else round(v, 2)}"
                                                        for k, v in scores.items())})
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
                row[col], row[f"{col} std"] = mean_std([r[metric] for r in runs])
            row["mIoU seeds"] = " / ".join(f"{r['miou']:.2f}" for r in runs)
            row["n seeds"] = len(runs)
            row["architecture"] = models.spec_to_str(spec)
        except Exception as err:  # a failed step is a row, never dropped
            row.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        row["paper mIoU (CityScapes)"] = paper
        rows.append(row)
    order = ["model", "dataset", "params", "removed (%)", "budget", "mIoU", "mIoU std", "mIoU seeds", "pixel acc",
             "pixel acc std", "n seeds", "paper mIoU (CityScapes)", "epochs", "train images", "test images", "lr",
             "lr grid (val mIoU)", "prune s", "calibration images", "collapsed", "status", "error",
             "architecture"]
    df = pd.DataFrame(rows)
    return df[[c for c in order if c in df.columns]], records


def segmentation_curves(records: dict[str, list[dict[str, Any]]]) -> pd.DataFrame:
    """Test mean IoU per scored epoch (``eval_every`` skips some) of every training run in ``records`` (from
    :func:`segmentation_table`)."""
    return pd.DataFrame([{"model": name, "seed": r["key"]["seed"], "epoch": h["epoch"], "test mIoU (%)": h["test_miou"]}
                         for name, runs in records.items() for r in runs for h in r["history"] if "test_miou" in h])
