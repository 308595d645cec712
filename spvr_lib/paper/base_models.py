"""Notebook 03 and what every table starts from: the base networks (their learning rate searched on held-out
data, trained on the scale's budget, cached), their calibration sets, and SPvR's ranking and pruned network of a
base (cached, shared by every notebook)."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch

from spvr_lib import data, models, store, train
from spvr_lib.models import build, spec_to_str
from spvr_lib.paper import jobs, reference, scales
from spvr_lib.paper.lr_search import lr_grid, lr_trial, recipe, searched_lr, trial_share  # noqa: F401 (re-exported)
from spvr_lib.prune import GroupRanking, rank_groups, spvr_prune
from spvr_lib.train import load_weights, train_run

# ----------------------------------------------------------------- the base models (notebook 03)


def base_spec(setup: Any) -> dict:
    """The unpruned network of a :class:`scales.ModelSetup`, sized for its dataset as it is on disk (a
    subset of ImageNet's classes gets that many outputs, not 1000)."""
    info = data.dataset_info(setup.dataset)
    kw = {"stem": setup.stem} if setup.stem else {}
    return models.preset(setup.preset, num_classes=data.num_classes(setup.dataset), in_channels=info.in_channels,
                         width=setup.width, **kw)


def _scratch_trial_job(cfg: Any, key: str, lr: float) -> None:
    setup = cfg.model(key)
    lr_trial(setup, base_spec(setup), lr, "scratch", progress=False)


def _base_job(cfg: Any, key: str, epochs_factor: int = 1, amp: bool | None = None) -> None:
    train_base(cfg, key, progress=False, epochs_factor=epochs_factor, amp=amp)


# --------------------------------------------------------------------------- the budgets notebook 03 reads
def short_epochs(epochs: int) -> int:
    """The shorter budget of ``epochs``: ``round(scales.ON_BUDGET_FRACTION * epochs)``, at least 1 and fewer than ``epochs``
    when ``epochs > 1``."""
    if int(epochs) < 1:
        raise ValueError(f"epochs={epochs!r}: expected an int >= 1")
    if int(epochs) == 1:
        return 1
    return max(1, min(int(epochs) - 1, round(scales.ON_BUDGET_FRACTION * int(epochs))))


def base_with_epochs(cfg: Any, key: str, epochs: int, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Model ``key``'s base network trained by its own recipe (searched lr, data, batch, precision) for
    ``epochs`` with a complete cosine schedule: the base's own record at the base's epochs, the longer base's
    (``train_base(epochs_factor=...)``) at a whole multiple of them."""
    setup = cfg.model(key)
    if setup.pretrained:
        raise ValueError(f"model={key!r} loads published weights at scale {cfg.name!r}; it has no training budget")
    if int(epochs) % setup.epochs == 0:
        return train_base(cfg, key, seed, progress=progress, epochs_factor=int(epochs) // setup.epochs)
    lr, _ = scratch_lr(cfg, key, progress=progress)
    rcp = dataclasses.replace(recipe(setup, lr=lr), epochs=int(epochs))
    return train.train_run(base_spec(setup), setup.dataset, rcp, seed, setup.train_subset,
                           setup.test_subset, tag=f"base-e{int(epochs)}", progress=progress,
                           weights_needed=False)


def budget_factors(cfg: Any) -> tuple[int, ...]:
    """The budgets the table reads, as multiples of the base's epochs: the base's own, and the scale's
    ``convergence_factor`` (twice as long at the cpu scale) when it has one."""
    return (1,) + ((int(cfg.convergence_factor),) if cfg.convergence_factor else ())


def budget_jobs(cfg: Any, keys: Sequence[str]) -> list[tuple]:
    """The (cfg, key, epochs, seed) trainings :func:`convergence_table` reads, for every seed of the scale: the
    base's epochs and :func:`short_epochs` of them (the last quarter's gain), and the scale's
    ``convergence_factor`` times the epochs (what twice the training adds; no shorter run there)."""
    jobs = []
    for key in keys:
        setup = cfg.model(key)
        if setup.pretrained:
            continue
        for seed in cfg.seeds:
            jobs += [(cfg, key, setup.epochs, seed), (cfg, key, short_epochs(setup.epochs), seed)]
            jobs += [(cfg, key, f * setup.epochs, seed) for f in budget_factors(cfg)[1:]]
    return jobs


def declared_jobs(cfg: Any, key: str) -> list[jobs.Batch]:
    """Notebook 03's independent computations for model ``key``, declared once (the runner and the plan read them):
    the lr search from scratch (none for a one-value grid), the base network, ``convergence_factor`` times as long,
    without bfloat16 where the setup uses it, and the convergence table's shorter and other seeds' budgets
    (:func:`budget_jobs`, less those the base's own records are).  None for published weights."""
    setup = cfg.model(key)
    if setup.pretrained:
        return []
    grid, share = lr_grid(setup, "scratch"), trial_share(setup)
    bases = [(cfg, key, f) for f in budget_factors(cfg)] + ([(cfg, key, 1, False)] if setup.amp else [])
    budget = [j for j in budget_jobs(cfg, [key]) if not (j[3] == 0 and j[2] % setup.epochs == 0)]
    return [jobs.Batch(f"lr search (scratch): {len(grid)} values, {share:.0%} of the images", _scratch_trial_job,
                       tuple((cfg, key, lr) for lr in grid) if len(grid) > 1 else (),
                       size=lambda job: (setup.epochs, 1.0, share)),
            jobs.Batch("base networks: the base" + (f", {cfg.convergence_factor}x its epochs" if
                                                    cfg.convergence_factor else "") +
                       (", without bfloat16" if setup.amp else ""), _base_job, tuple(bases),
                       size=lambda job: (job[2] * setup.epochs, 1.0, 1.0)),
            jobs.Batch("budget curve: 3/4 of the epochs and the other seeds", base_with_epochs,
                       tuple(budget), size=lambda job: (job[2], 1.0, 1.0), kwargs={"progress": False})]


def prepare_bases(cfg: Any, keys: Any, progress: bool = True) -> None:
    """Fill the run cache with the base networks of ``keys`` and their learning-rate searches (:func:`declared_jobs`),
    side by side in ``jobs.worker_count(cfg)`` processes (nothing happens with one worker: the callers compute in
    order)."""

    jobs.run([b for k in keys for b in declared_jobs(cfg, k) if b.target in (_scratch_trial_job, _base_job)],
             jobs.worker_count(cfg), progress)


def scratch_lr(cfg: Any, key: str, progress: bool = True) -> tuple[float, dict[float, float]]:
    """THE learning rate of every network of model ``key`` trained from scratch (base, SPvR, baselines
    re-initialised, Figure 2): searched once per model on the unpruned network.  (best, {lr: val top-1})."""
    setup = cfg.model(key)
    return searched_lr(setup, base_spec(setup), "scratch", progress=progress)


# The paper prunes "an ImageNet1K pre-trained ResNet50" (Section 4.3): torchvision's IMAGENET1K_V1 weights
# (76.13% top-1 by torchvision's evaluation; the paper's base row says 76.32).
PRETRAINED_FILES = {"torchvision-resnet50-imagenet1k-v1": "resnet50-0676ba61.pth"}


def pretrained_weights(name: str) -> Path:
    """The local file of pre-trained weights ``name`` (a key of :data:`PRETRAINED_FILES`).

    Looked for, in order: ``$SPVR_PRETRAINED/<file>``, ``data/pretrained/<file>``, and torch hub's
    cache (``torch.hub.get_dir()/checkpoints/<file>``, where torchvision's own download puts it);
    when none has it, torchvision's download is tried.  Raises FileNotFoundError saying where to put
    the file when it cannot be had (no network)."""
    fname = PRETRAINED_FILES[name]
    places = [Path(p) / fname for p in (os.environ.get("SPVR_PRETRAINED"),) if p]
    places += [store.REPO_ROOT / "data" / "pretrained" / fname, Path(torch.hub.get_dir()) / "checkpoints" / fname]
    for path in places:
        if path.is_file():
            return path
    try:
        from torchvision.models import ResNet50_Weights

        ResNet50_Weights.IMAGENET1K_V1.get_state_dict(progress=False)   # torchvision's download into the hub cache
        if places[-1].is_file():
            return places[-1]
    except Exception as err:                           # offline: say where the file goes
        why = f"{type(err).__name__}: {str(err)[:120]}"
    else:
        why = "the download left no file"
    raise FileNotFoundError(f"pre-trained weights {name!r} ({fname}) are not on this machine ({why}); put the file "
                            f"in one of {[str(p.parent) for p in places]} (torchvision's ResNet50_Weights.IMAGENET1K_V1)")


def pretrained_base(cfg: Any, key: str, progress: bool = True) -> dict[str, Any]:
    """The paper's ResNet50 regime: the published ImageNet1K weights instead of a training run, evaluated on
    the scale's test split; a record shaped like ``train_run``'s (cached, kind ``pretrained``).  Its recipe
    (learning rate included) is the setup's, used by every network trained from it (no grid search: the
    paper's ~700-epoch search on ImageNet is what this regime avoids)."""
    setup = cfg.model(key)
    spec = base_spec(setup)
    rcp = recipe(setup)
    key_ = {"pretrained": setup.pretrained, "spec": spec, "dataset": setup.dataset, "recipe": rcp.to_dict(),
            "per_class_train": setup.train_subset, "per_class_test": setup.test_subset,
            "data_files": data.fingerprint(setup.dataset)}
    weights = train.checkpoint_dir() / f"{store.cache_path(key_, kind='pretrained').stem}.final.pt"

    def compute() -> dict[str, Any]:
        model = build(spec)
        state = torch.load(pretrained_weights(setup.pretrained), map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        test_set = data.load_dataset(setup.dataset, "test", per_class=setup.test_subset, seed=0)
        scores = train.evaluate(model, test_set, batch_size=setup.batch_size, num_workers=setup.num_workers)
        models.save_network(model, weights, spec=spec)
        return {**{k: scores[k] for k in ("top1", "top5", "loss")}, "history": [], "epochs": 0,
                "params": models.count_params(model), "size_mb": models.model_size_mb(model), "wall_s": 0.0,
                "weights": store.repo_relative(weights), "spec": spec, "shapes": None, "pretrained": setup.pretrained}

    path = store.cache_path(key_, kind="pretrained")
    return store.cached(key_, compute, kind="pretrained", refresh=path.exists() and not weights.exists())


def train_base(cfg: Any, key: str, seed: int = 0, progress: bool = True, epochs_factor: int = 1,
               amp: bool | None = None) -> dict[str, Any]:
    """Train (or fetch from the cache) the pre-trained network SPvR starts from; its run record.
    A setup with ``pretrained`` weights (the paper's ImageNet ResNet50) loads them instead of training.
    ``epochs_factor``: the same network and recipe trained that many times longer (the convergence check of
    :func:`base_table`: had the base network converged, more epochs would not raise its top-1).  ``amp``
    overrides the setup's bfloat16 autocast (:func:`amp_table`: what bfloat16 costs in accuracy)."""

    setup = cfg.model(key)
    if setup.pretrained:
        return pretrained_base(cfg, key, progress=progress)
    spec = base_spec(setup)
    lr, _ = scratch_lr(cfg, key, progress=progress)
    rcp = recipe(setup, lr=lr)
    if epochs_factor != 1:
        rcp = dataclasses.replace(rcp, epochs=rcp.epochs * int(epochs_factor))
    if amp is not None:
        rcp = dataclasses.replace(rcp, amp=bool(amp))
    tag = "base" if epochs_factor == 1 else f"base-x{int(epochs_factor)}"
    tag = tag if amp is None or amp == setup.amp else f"{tag}-amp{int(bool(amp))}"
    # only THE base's weights are read later (seed 0: pruning starts from them); the others, the bases of the
    # other seeds included, are read for their scores (the committed cache holds no weights of theirs)
    return train_run(spec, setup.dataset, rcp, seed, setup.train_subset, setup.test_subset, tag=tag,
                     progress=progress, weights_needed=tag == "base" and seed == 0)


def amp_table(cfg: Any, keys: Any) -> pd.DataFrame:
    """What bfloat16 autocast costs: for every model of ``keys`` whose setup trains with it, the base network's
    top-1 with and without it (same seed, data and recipe otherwise) and its training time."""
    rows = []
    for key in keys:
        setup = cfg.model(key)
        if not setup.amp or setup.pretrained:
            continue
        on, off = train_base(cfg, key, progress=False), train_base(cfg, key, progress=False, amp=False)
        rows.append({"model": key, "top1 bf16": on["top1"], "top1 float32": off["top1"],
                     "bf16 - float32": round(on["top1"] - off["top1"], 2),
                     "train s bf16": on["wall_s"], "train s float32": off["wall_s"],
                     "threads bf16": on["provenance"]["device"]["torch_threads"],
                     "threads float32": off["provenance"]["device"]["torch_threads"]})
    return pd.DataFrame(rows, columns=["model", "top1 bf16", "top1 float32", "bf16 - float32", "train s bf16",
                                       "train s float32", "threads bf16", "threads float32"])


def base_model(cfg: Any, key: str, seed: int = 0, progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained base network (eval mode) and its run record."""

    rec = train_base(cfg, key, seed, progress=progress)
    return load_weights(rec).eval(), rec


def calibration(cfg: Any, key: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration subset SPvR ranks with: ``calib_per_class`` training images per class."""

    setup = cfg.model(key)
    return data.calibration_set(data.load_dataset(setup.dataset, "train"), setup.calib_per_class, seed, progress=False)




def train_images_of(setup: Any) -> int:
    """How many training images every network of ``setup`` is trained on."""
    return len(data.load_dataset(setup.dataset, "train", per_class=setup.train_subset))


def test_images_of(setup: Any) -> int:
    """How many test images every network of ``setup`` is scored on."""
    return len(data.load_dataset(setup.dataset, "test", per_class=setup.test_subset))


def base_table(cfg: Any, records: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Notebook 03's table: our base models beside the paper's base rows."""

    rows = []
    for key, rec in records.items():
        setup = cfg.model(key)
        per_class = rec["key"]["per_class_train"]
        n_classes = data.num_classes(setup.dataset)
        factor = cfg.convergence_factor
        longer = None if rec.get("pretrained") or not factor else \
            train_base(cfg, key, epochs_factor=factor, progress=False)
        rows.append({"model": key, "dataset": setup.dataset, "width": setup.width,
                     "train images per class": per_class if per_class is not None else
                     train_images_of(setup) // n_classes,
                     "test images": test_images_of(setup),
                     "epochs": "published weights" if rec.get("pretrained") else rec["key"]["recipe"]["epochs"],
                     "lr": rec["key"]["recipe"]["lr"], "params": rec["params"], "size (MB)": rec["size_mb"],
                     "top1": rec["top1"], "top5": rec["top5"],
                     "top1 with more epochs": None if longer is None else longer["top1"],
                     "epochs factor": factor if longer is not None else None,
                     "gain with more epochs": None if longer is None else round(longer["top1"] - rec["top1"], 2),
                     "train s": rec["wall_s"],
                     **reference.PAPER_BASE[key], "architecture": spec_to_str(rec["spec"])})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------- SPvR pruning of the base models
def prunable_count(spec: dict) -> int:
    """How many prunable layers ``spec``'s network has (fewer after a layer or stage collapsed)."""
    with torch.device("meta"):
        return len(models.prunable_layers(models.build(spec), spec))


def spvr_ranking(cfg: Any, key: str, group_size: int | None = None, method: str = "fast", criterion: str = "spvr",
                 seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """SPvR's groups and importances on the scale's trained base network: computed ONCE per (base run,
    calibration set, d, criterion, ranking path) and cached (kind ``ranking``), on the device the scale
    uses (CUDA when present).  Every rate reuses it; only the budget step depends on the rate."""
    setup = cfg.model(key)
    d = int(group_size or setup.group_size)
    base_rec = train_base(cfg, key, progress=progress)
    rkey = {"base": base_rec["hash"], "group_size": d, "method": method, "criterion": criterion,
            "calib_seed": int(seed), "calib_per_class": setup.calib_per_class}

    def compute() -> dict[str, Any]:
        model = load_weights(base_rec).eval()
        ranking = rank_groups(model, calibration(cfg, key, seed), d, criterion, method, device=ranking_device(cfg),
                              progress=progress)
        return ranking.to_dict()

    return store.cached(rkey, compute, kind="ranking")


def ranking_device(cfg: Any = None) -> str:
    """Where the scale ranks: its ``device`` setting, else CUDA when present, else the CPU."""
    return (getattr(cfg, "device", None) if cfg is not None else None) or \
        ("cuda" if torch.cuda.is_available() else "cpu")


def spvr_pruned(cfg: Any, key: str, rate: float, group_size: int | None = None, method: str = "fast",
                criterion: str = "spvr", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """SPvR applied to the scale's trained base network at ``rate`` (fraction of parameters removed).

    The ranking comes from :func:`spvr_ranking` (computed once for every rate); this record (kind
    ``prune``, keyed by the base run, rate, group size, ranking path, criterion and calibration seed)
    holds the pruned ``spec``, ``arch`` (the paper's notation), ``params_before``, ``params_after``,
    ``budget``, ``prune_s`` (grouping + ranking, done once, plus this rate's budget step, in seconds),
    ``collapsed`` (whether a layer or stage disappeared) and ``kept`` (channels kept per layer,
    indices into the base network).
    """
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate={rate!r}; expected the fraction of parameters removed, in (0, 1)")
    setup = cfg.model(key)
    d = int(group_size or setup.group_size)
    base_rec = train_base(cfg, key, progress=progress)
    rkey = {"base": base_rec["hash"], "rate": float(rate), "group_size": d, "method": method,
            "criterion": criterion, "calib_seed": int(seed), "calib_per_class": setup.calib_per_class}

    def compute() -> dict[str, Any]:
        ranking = GroupRanking.from_dict(spvr_ranking(cfg, key, d, method, criterion, seed, progress))
        model = load_weights(base_rec).eval()
        x, y = calibration(cfg, key, seed)
        t0 = time.perf_counter()
        res = spvr_prune(model, (x, y), keep=1.0 - rate, group_size=d, criterion=criterion, method=method,
                         progress=progress, ranking=ranking)
        prune_s = ranking.seconds + time.perf_counter() - t0
        return {"spec": res.spec, "arch": models.spec_to_str(res.spec), "params_before": res.params_before,
                "params_after": res.params_after, "budget": res.budget, "prune_s": round(prune_s, 3),
                "collapsed": prunable_count(res.spec) < prunable_count(base_rec["spec"]),
                "size_mb": models.model_size_mb(res.model), "kept": res.kept,
                "removed_fraction": 1.0 - res.params_after / res.params_before}

    return store.cached(rkey, compute, kind="prune")


def spvr_model(record: dict[str, Any]) -> torch.nn.Module:
    """The freshly initialised network of a :func:`spvr_pruned` record (SPvR trains it from scratch)."""

    return build(record["spec"])


# ----------------------------------------------------------------- the grouping module (notebook 02)


# ----------------------------------------------------------------- the architectures (notebook 08)


