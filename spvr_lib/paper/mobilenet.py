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
by SPvR at 80% with Eq. 2 summed over the pixels (``criteria.spvr_loss`` on the [n, K, H, W]
softmax outputs), re-initialised and trained from scratch; mean IoU before and after, through the
same ``prune.spvr_prune`` as every classifier (the encoder conv and the decoder conv feeding its
unpool share a width, a tie like a ResNet stage's).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from spvr_lib import data, diagnostics, latency, models, store
from spvr_lib.paper import (base_models, convergence, jobs, latency_vs_accuracy, pruned_networks, reference, stats,
                            trained_runs)
from spvr_lib.paper.stats import mean_std

__all__ = ["MOBILENET_VARIANTS", "mobilenet_width", "mobilenet_specs", "mobilenet_budget", "declared_jobs",
           "pruned_resnet50", "table4"]

# =============================================================================================
# Section 5.4 / Table 4
# =============================================================================================
MOBILENET_VARIANTS = {"MobileNetV3-small": "small", "MobileNetV3-minimal": "small-minimal"}
_WIDTH_GRID = tuple(round(0.025 * k, 3) for k in range(4, 49))     # 0.1, 0.125, ..., 1.2
# batch-1 latency runs per network: the paper's 1500 (Section 5.3); a few at smoke


def _resnet50_setup(cfg: Any) -> Any:
    return cfg.model("resnet50")


def _mobilenet_spec(setup: Any, variant: str, width: float) -> dict:
    info = data.dataset_info(setup.dataset)
    # the MobileNet's stem mirrors the ResNet50's: the paper's ImageNet stem (stride 2) keeps its
    # stride-2 stem, so both networks reduce the input by 32 (a "cifar" ResNet stem gets stride 1)
    return models.mobilenetv3(variant, num_classes=data.num_classes(setup.dataset), in_channels=info.in_channels,
                              width=width,
                              small_input=setup.stem == "cifar")


def mobilenet_width(cfg: Any) -> float:
    """MobileNetV3 width multiplier for the scale: the width in 0.1, 0.125, ..., 1.2 at which
    MobileNetV3-small-minimal's share of the scale's base ResNet50 parameters is closest to the
    paper's (:data:`reference.PAPER_MINIMAL_SHARE`, 8.0%; ties to the wider).  At the paper scale this is 1.0;
    with the 1/8-width ResNet50 of the cpu scale it is 0.125, so that SPvR removes about as much
    of the ResNet50 as in the paper (94%)."""
    setup = _resnet50_setup(cfg)
    base = models.spec_params(base_models.base_spec(setup))

    def share(w: float) -> float:
        return models.spec_params(_mobilenet_spec(setup, "small-minimal", w)) / base

    # channel counts, hence parameters, do not decrease with the width: bisect for the first width
    # whose share reaches the paper's, then take the closer of it and the one before
    lo, hi = 0, len(_WIDTH_GRID)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if share(_WIDTH_GRID[mid]) >= reference.PAPER_MINIMAL_SHARE else (mid + 1, hi)
    candidates = _WIDTH_GRID[max(lo - 1, 0):lo + 1]
    return min(candidates, key=lambda w: (abs(share(w) - reference.PAPER_MINIMAL_SHARE), -w))


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
    budget = math.floor(reference.PAPER_MOBILENET_BUDGET_FRACTION * minimal)
    base = models.spec_params(base_models.base_spec(_resnet50_setup(cfg)))
    if budget >= base:
        raise ValueError(f"MobileNet width={width!r}: the budget {budget} (80% of -minimal's {minimal}) is not below "
                         f"the base ResNet50's {base} parameters; expected a narrower MobileNet")
    return budget


def pruned_resnet50(cfg: Any, budget: int | None = None, progress: bool = True) -> dict[str, Any]:
    """SPvR's ResNet50 at ``budget`` parameters (default :func:`mobilenet_budget`): the cached
    ``base_models.spvr_pruned`` record at rate 1 - budget / params of the base, with
    ``params_after <= budget`` checked (ValueError otherwise)."""
    budget = mobilenet_budget(cfg) if budget is None else int(budget)
    base = models.spec_params(base_models.base_spec(_resnet50_setup(cfg)))
    if not 0 < budget < base:
        raise ValueError(f"budget={budget}; expected a parameter count in (0, {base}) (the base ResNet50's size)")
    rec = base_models.spvr_pruned(cfg, "resnet50", 1.0 - budget / base, progress=progress)
    if rec["params_after"] > budget:
        raise ValueError(f"SPvR's ResNet50 has {rec['params_after']} parameters, more than the budget {budget}")
    return rec


def _macs(spec: dict, dataset: str) -> float:
    """MACs of one sample (millions) of ``spec``'s network."""
    info = data.dataset_info(dataset)
    return latency.count_macs(models.build(spec), (info.in_channels, info.image_size, info.image_size)) / 1e6


def _latencies(cfg: Any, specs: dict[str, dict], dataset: str) -> dict[str, dict[str, Any]]:
    """Batch-1 latency of Table 4's networks, timed together (``latency_vs_accuracy.timed_together``; weights do not matter:
    fresh networks), {name: columns}."""

    info = data.dataset_info(dataset)
    shape = (info.in_channels, info.image_size, info.image_size)
    nets = {name: models.build(spec) for name, spec in specs.items()}
    rec = latency_vs_accuracy.timed_together({"table": "table4"}, nets, shape, 1, **latency_vs_accuracy.protocol(cfg))
    return {name: {"latency median (ms)": t["median_ms"], "latency low (ms)": t["low_ms"],
                   "latency high (ms)": t["high_ms"], "threads": t["threads"], "cpu": rec["key"]["cpu"]}
            for name, t in rec["latency"].items()}


def _trial_job(cfg: Any, spec: dict, lr: float) -> None:
    base_models.lr_trial(_resnet50_setup(cfg), spec, lr, "scratch", progress=False)


# the plan's placeholders for what a cold run knows only once it has computed it
SEARCHED_LR = "the MobileNet's searched lr"
BASE_LR = "the base ResNet50's searched lr"
PRUNED_SPEC = "SPvR's ResNet50 at the budget"
PRUNED = "ResNet50-pruned"


def declared_jobs(cfg: Any, key: str = "resnet50", nets: Mapping[str, tuple[Any, Any]] | None = None,
                  seeds: Sequence[int] | None = None) -> list[jobs.Batch]:
    """Notebook 10's independent computations, declared once (:func:`_prepare`, the convergence cell's
    ``convergence.prepare_scratch_budget_runs`` and the plan read them); none for a ``key`` other than
    ``"resnet50"`` or a scale without it.

    * the MobileNets' lr trials from scratch (``_trial_job``; none for a one-value grid);
    * Table 4's trainings (``trained_runs.train_from_scratch``): every net of ``nets`` ({name: (spec, lr)}) at
      every seed of ``seeds`` (default the scale's);
    * the convergence cell's shorter budgets (``convergence.scratch_with_epochs`` at ``convergence.short_epochs``
      of the setup's epochs): every net of ``nets`` at every seed of the scale (none with one epoch, where the
      shorter budget is the training itself).

    ``nets`` unknown (the plan): the cold run's three, MobileNetV3-small and -minimal at :data:`SEARCHED_LR` and
    SPvR's ResNet50 (:data:`PRUNED_SPEC`) at :data:`BASE_LR`.  Sizes: a MobileNet's share of the base ResNet50's
    MACs per image is counted (``latency.count_macs`` at the dataset's input size, once per network and call), as
    is a given pruned ResNet50's; :data:`PRUNED_SPEC`'s is its parameter budget's share of the base's parameters
    (MACs fall roughly, not exactly, with parameters); an lr trial reads ``lr_search.trial_share`` of the
    training images, a training all of them."""
    if key != "resnet50" or key not in cfg.models:
        return []
    setup = cfg.model(key)
    mobiles = mobilenet_specs(cfg)
    if nets is None:
        nets = {**{name: (spec, SEARCHED_LR) for name, spec in mobiles.items()}, PRUNED: (PRUNED_SPEC, BASE_LR)}
    seeds = list(cfg.seeds if seeds is None else seeds)
    base = base_models.base_spec(setup)
    base_macs = _macs(base, setup.dataset)
    shares = {store.canonical_json(spec): _macs(spec, setup.dataset) / base_macs
              for spec in [*mobiles.values(), *(s for s, _ in nets.values() if isinstance(s, dict))]}
    shares[store.canonical_json(PRUNED_SPEC)] = mobilenet_budget(cfg) / models.spec_params(base)

    def share(spec: Any) -> float:
        return shares[store.canonical_json(spec)]

    grid, trial = base_models.lr_grid(setup, "scratch"), base_models.trial_share(setup)
    short = convergence.short_epochs(setup.epochs)
    return [jobs.Batch(f"lr search (MobileNets): {len(grid)} values, {trial:.0%} of the images", _trial_job,
                       tuple((cfg, spec, lr) for spec in mobiles.values() for lr in grid) if len(grid) > 1 else (),
                       size=lambda job: (setup.epochs, share(job[1]), trial)),
            jobs.Batch("Table 4 trainings: the MobileNets and SPvR's ResNet50 from scratch",
                       trained_runs.train_from_scratch,
                       tuple((cfg, key, spec, s, lr) for spec, lr in nets.values() for s in seeds),
                       size=lambda job: (setup.epochs, share(job[2]), 1.0), kwargs={"progress": False}),
            jobs.Batch(f"budget (from scratch): {short} of {setup.epochs} epochs", convergence.scratch_with_epochs,
                       tuple((cfg, key, spec, lr, short, s) for spec, lr in nets.values() for s in cfg.seeds)
                       if short < setup.epochs else (),
                       size=lambda job: (job[4], share(job[2]), 1.0), kwargs={"progress": False})]


def _prepare(cfg: Any, setup: Any, nets: Sequence[tuple[str, Any]], seeds: Sequence[int], base_lr: float,
             budget: int, progress: bool) -> None:
    """Fill the run cache for Table 4 side by side (:func:`declared_jobs`): the MobileNets' lr searches, then every
    training.  Nothing happens with one worker."""

    workers = jobs.worker_count(cfg)
    if workers <= 1:
        return
    jobs.run([b for b in declared_jobs(cfg, "resnet50") if b.target is _trial_job], workers, progress)
    trained = {name: (spec, base_models.searched_lr(setup, spec, "scratch", progress=False)[0])
               for name, spec in nets if name in MOBILENET_VARIANTS}
    try:
        trained[PRUNED] = (pruned_resnet50(cfg, budget, progress=progress)["spec"], base_lr)
    except Exception:            # reported by table4's own call
        pass
    jobs.run([b for b in declared_jobs(cfg, "resnet50", nets=trained, seeds=seeds)
              if b.target is trained_runs.train_from_scratch], workers, progress)


def table4(cfg: Any, seeds: Sequence[int] | None = None,
           progress: bool = True, with_runs: bool = False) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Table 4 at the scale: MobileNetV3-small, -minimal and SPvR's ResNet50 at 80% of -minimal's
    parameters, each trained from scratch with the ResNet50 setup's data and recipe at the base
    ResNet50's searched learning rate, over ``seeds`` (default the scale's); the unpruned base ResNet50
    (seed 0, as every notebook prunes it) as a reference row.  Accuracies in % (mean, sample std),
    latency batch 1 (the networks timed together by the scale's protocol, ``latency_vs_accuracy.timed_together``: median
    over rounds with its 95% interval), MACs per image.
    A network whose pruning or training raises is a row with status "failed" and its reason."""
    setup = _resnet50_setup(cfg)
    seeds = list(cfg.seeds if seeds is None else seeds)
    specs: dict[str, dict] = {}
    width = mobilenet_width(cfg)
    budget = mobilenet_budget(cfg, width)
    base_rec = base_models.train_base(cfg, "resnet50", progress=progress)
    base_lr = float(base_rec["key"]["recipe"]["lr"])     # the base ResNet50's searched learning rate
    nets: list[tuple[str, Any]] = [(name, spec) for name, spec in mobilenet_specs(cfg, width).items()]
    nets.append((PRUNED, None))
    _prepare(cfg, setup, nets, seeds, base_lr, budget, progress)
    rows, run_rows = [], []
    for name, spec in tqdm(nets, desc="Table 4", disable=not progress, leave=False):
        row: dict[str, Any] = {"model": name, "width": width if name in MOBILENET_VARIANTS else setup.width,
                               "status": "ok", "error": ""}
        try:
            if spec is None:
                rec = pruned_resnet50(cfg, budget, progress=progress)
                spec = rec["spec"]
                row.update({"budget": budget, "removed from ResNet50 (%)": 100.0 * rec["removed_fraction"],
                            "prune s": rec["prune_s"], "collapsed": rec["collapsed"]})
            # each MobileNet's own learning rate, searched on a validation split; the pruned ResNet50 trains
            # from scratch as every ResNet50 network does, at the base's searched lr
            lr = base_lr if name not in MOBILENET_VARIANTS else\
                base_models.searched_lr(setup, spec, "scratch", progress=progress)[0]
            trained = [trained_runs.train_from_scratch(cfg, "resnet50", spec, s, lr=lr, progress=progress)
                       for s in seeds]
            with torch.device("meta"):              # what the network is (no weights needed)
                summary = diagnostics.layer_summary(models.build(spec))
            facts = {**summary, "layers removed": None}
            run_rows += [trained_runs.training_row(setup, "resnet50", "spvr" if spec is not None and name not in
                                                MOBILENET_VARIANTS else name, r, budget=row.get("budget"),
                                                params_before=base_rec["params"], name=name,
                                                rate=None if name in MOBILENET_VARIANTS else
                                                round(1 - budget / base_rec["params"], 6),
                                                arch=models.spec_to_str(spec), facts=facts) for r in trained]
            row.update(_accuracy_columns(trained, pruned_networks._classes(setup.dataset)))
            row.update({"params": models.spec_params(spec), "lr": lr, "architecture": models.spec_to_str(spec)})
            row["MMACs"] = _macs(spec, setup.dataset)
            specs[name] = spec
        except Exception as err:  # a failed network is a row, never dropped
            row.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        row.update(reference.TABLE4_PAPER[name])
        rows.append(row)
    base_spec = base_rec["spec"]
    rows.append({"model": "ResNet50 (unpruned base)", "width": setup.width, "status": "ok", "error": "",
                 **_accuracy_columns([base_rec], pruned_networks._classes(setup.dataset)), "params": base_rec["params"],
                 "lr": base_lr, "architecture": models.spec_to_str(base_spec),
                 "MMACs": _macs(base_spec, setup.dataset), "paper params (M)": 25.6, "paper top1": None})
    specs["ResNet50 (unpruned base)"] = base_spec
    timed = _latencies(cfg, specs, setup.dataset)
    for row in rows:
        row.update(timed.get(row["model"], {}))
    df = pd.DataFrame(rows)
    minimal = df.loc[df["model"] == "MobileNetV3-minimal", "params"]
    if len(minimal) and pd.notna(minimal.iloc[0]):
        df["params / minimal"] = df["params"] / minimal.iloc[0]
    order = ["model", "width", "params", "params / minimal", "budget", "removed from ResNet50 (%)", "top1", "top1 std",
             "top1 seeds", "top5", "top5 std", "top5 seeds", "n seeds", "failed runs", "lr", "MMACs",
             "latency median (ms)", "latency low (ms)", "latency high (ms)", "cpu", "threads", "prune s", "collapsed",
             "paper params (M)", "paper top1", "status", "error", "architecture"]
    df = df[[c for c in order if c in df.columns]]
    return (df, trained_runs.runs_frame(run_rows)) if with_runs else df


def _accuracy_columns(records: Sequence[dict[str, Any]], classes: int) -> dict[str, Any]:
    """Mean and std over the runs that count (:func:`stats.run_status`), their per-seed values, how many count
    ("n seeds") and the failed ones named."""
    statuses = [stats.run_status(r.get("top1"), classes, r.get("history") or []) for r in records]
    out: dict[str, Any] = {}
    for metric in ("top1", "top5"):
        counted, failed = stats.split_failed([r[metric] for r in records], statuses)
        out[metric], out[f"{metric} std"] = mean_std(counted)
        out[f"{metric} seeds"] = " / ".join(f"{v:.2f}" for v in counted) or None
    out["n seeds"] = len(counted)
    out["failed runs"] = stats.seeds_note(len(counted), failed) or None
    return out


# =============================================================================================
# Section 5.5: SegNet
# =============================================================================================














