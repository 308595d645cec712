"""Has a network converged on its training budget?  Measured, never guessed from one run's curve (notebook 03 for
the bases; every network that decides a verdict of Tables 1-3 and Figure 2).

The rule (at most ``scales.PLATEAU_POINTS`` = 0.3 points of top-1 gained by the last quarter of the budget):
the same network and recipe trained with a complete schedule over 3/4 of the epochs, against all of them,
paired by seed (same data draw and initialisation).  Had the network not converged, the last quarter of its
budget would buy more than 0.3 points.  The bases are also trained ``convergence_factor`` times as long.
(The within-run rise of a cosine schedule, top-1 at the end minus at 3/4 of the same run, is not a reading of
convergence: it rises however long the run is; it is not used.)
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from spvr_lib import store, train
from spvr_lib.paper import base_models, jobs, mobilenet, scales, segmentation, trained_runs
from spvr_lib.paper.base_models import base_with_epochs, budget_factors, budget_jobs, short_epochs  # noqa: F401
from spvr_lib.paper.lr_search import recipe



def prepare_budget_runs(cfg: Any, keys: Sequence[str], progress: bool = True) -> None:
    """Fill the run cache with notebook 03's budget curve (``base_models.declared_jobs``), side by side (a no-op with
    one worker)."""

    jobs.run([b for k in keys for b in base_models.declared_jobs(cfg, k) if b.target is base_with_epochs],
             jobs.worker_count(cfg), progress)


def budget_gain(short_top1: Mapping[int, float], full_top1: Mapping[int, float]) -> dict[str, Any]:
    """What the larger budget buys, paired by seed: ``{seed: top-1 (%)}`` at the smaller and the larger budget ->
    gain (mean of larger - smaller over the seeds both have, points), its sample sd and standard error (None with
    one seed), and the seeds used."""
    seeds = sorted(set(short_top1) & set(full_top1))
    if not seeds:
        raise ValueError(f"short_top1 seeds {sorted(short_top1)} and full_top1 seeds {sorted(full_top1)}: "
                         "expected at least one seed in both")
    diffs = [float(full_top1[s]) - float(short_top1[s]) for s in seeds]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else None
    return {"seeds": seeds, "gain": round(statistics.fmean(diffs), 3),
            "gain sd": None if sd is None else round(sd, 3),
            "gain se": None if sd is None else round(sd / math.sqrt(len(diffs)), 3)}


def convergence_table(cfg: Any, keys: Sequence[str], progress: bool = True) -> pd.DataFrame:
    """Notebook 03's convergence table, one row per trained base model, every top-1 a mean over the scale's seeds
    and every gain paired by seed (with its standard error):

    * ``gain of last quarter``: top-1 after the base's epochs minus after 3/4 of them (complete schedules both);
      ``plateau on the budget``: at most 0.3 points (``scales.PLATEAU_POINTS``);
    * ``gain of Nx epochs``: top-1 after ``convergence_factor`` times the epochs minus after the base's;
      ``plateau at Nx``: at most 0.3 points (the columns are left out when the scale has no factor)."""
    rows = []
    factors = budget_factors(cfg)[1:]
    for key in keys:
        setup = cfg.model(key)
        if setup.pretrained:
            continue
        full_e, short_e = setup.epochs, short_epochs(setup.epochs)
        full = {s: base_with_epochs(cfg, key, full_e, s, progress) for s in cfg.seeds}
        short = {s: base_with_epochs(cfg, key, short_e, s, progress) for s in cfg.seeds}
        g = budget_gain({s: r["top1"] for s, r in short.items()}, {s: r["top1"] for s, r in full.items()})
        row = {"model": key, "lr": full[cfg.seeds[0]]["key"]["recipe"]["lr"], "epochs": full_e,
               "shorter epochs": short_e, "seeds": len(g["seeds"]),
               "top1 at shorter": round(statistics.fmean(r["top1"] for r in short.values()), 2),
               "top1": round(statistics.fmean(r["top1"] for r in full.values()), 2),
               "gain of last quarter": g["gain"], "gain se": g["gain se"],
               "plateau on the budget": bool(g["gain"] <= scales.PLATEAU_POINTS)}
        runs = [*full.values(), *short.values()]
        for factor in factors:
            longer = {s: base_with_epochs(cfg, key, factor * full_e, s, progress) for s in cfg.seeds}
            gl = budget_gain({s: r["top1"] for s, r in full.items()}, {s: r["top1"] for s, r in longer.items()})
            row.update({f"top1 at {factor}x epochs": round(statistics.fmean(r["top1"] for r in longer.values()), 2),
                        f"gain of {factor}x epochs": gl["gain"], f"gain of {factor}x se": gl["gain se"],
                        f"plateau at {factor}x": bool(gl["gain"] <= scales.PLATEAU_POINTS)})
            runs += longer.values()
        row["train s (these runs)"] = round(sum(r["wall_s"] for r in runs), 1)
        rows.append(row)
    return pd.DataFrame(rows)


def _on_budget_columns(short: Mapping[int, Mapping[str, Any]], full: Mapping[int, Mapping[str, Any]], short_e: int,
                       full_e: int, score: str, label: str, metric: str) -> dict[str, Any]:
    """The on-budget reading's columns from ``{seed: record}`` at ``short_e`` and ``full_e`` epochs: the epochs,
    the seeds paired, the mean ``score`` (``label`` at shorter, ``label``), ``gain of last quarter`` (paired by seed)
    with its standard error, ``plateau on the budget`` (at most ``scales.PLATEAU_POINTS``; both None when
    ``short_e`` is not shorter), and the runs' training seconds."""
    g = budget_gain({s: r[score] for s, r in short.items()}, {s: r[score] for s, r in full.items()})
    shorter = short_e < full_e
    return {"epochs": full_e, "shorter epochs": short_e, "seeds": len(g["seeds"]),
            f"{label} at shorter": round(statistics.fmean(r[score] for r in short.values()), 2),
            label: round(statistics.fmean(r[score] for r in full.values()), 2),
            "gain of last quarter": g["gain"] if shorter else None, "gain se": g["gain se"],
            "plateau on the budget": bool(g["gain"] <= scales.PLATEAU_POINTS) if shorter else None,
            "train s (these runs)": round(sum(r["wall_s"] for r in [*full.values(), *short.values()]), 1)}


# --------------------------------------------------------------------------- Section 5.5's unpruned SegNet
def segnet_with_epochs(settings: Mapping[str, Any], epochs: int, seed: int = 0,
                       progress: bool = True) -> dict[str, Any]:
    """Section 5.5's unpruned SegNet (``segmentation.segmentation_settings``) trained by its own recipe (the
    searched lr, the same scenes) for ``epochs`` with a complete cosine schedule: notebook 11's own record at the
    settings' epochs."""

    settings = dict(settings)
    spec = segmentation.segnet_spec(settings)
    if int(epochs) == int(settings["epochs"]):
        return segmentation.train_segnet(spec, settings, int(seed), tag="base", progress=progress)
    lr, _ = segmentation.segnet_lr(settings, progress=progress)
    rcp = segmentation.segnet_recipe({**settings, "epochs": int(epochs)}, lr)
    return train.train_run(spec, settings["dataset"], rcp, int(seed), tag=f"base-e{int(epochs)}", progress=progress,
                           weights_needed=False, train_options=segmentation.split_options(settings, "train"),
                           test_options=segmentation.split_options(settings, "test"))


def prepare_segnet_budget_runs(settings: Mapping[str, Any], progress: bool = True) -> None:
    """Fill the run cache with the shorter-budget SegNets :func:`segnet_convergence_table` reads (one per seed;
    ``segmentation.declared_jobs``), side by side in the settings' scale's ``jobs.worker_count`` processes (a no-op
    with one)."""

    jobs.run([b for b in segmentation.declared_jobs(settings) if b.target is segnet_with_epochs],
             jobs.worker_count(scales.get_scale(settings["name"])), progress)


def segnet_convergence_table(settings: Mapping[str, Any], progress: bool = True) -> pd.DataFrame:
    """Has Section 5.5's unpruned SegNet, the base of its comparison, converged on its budget?  One row, read as
    notebook 03 reads the classification bases (:func:`convergence_table`), test mean IoU (%) for top-1: every
    value a mean over the settings' seeds, every gain paired by seed.  ``gain of last quarter``: mIoU after the
    settings' epochs minus after :func:`short_epochs` of them (complete schedules both); ``plateau on the
    budget``: at most ``scales.PLATEAU_POINTS`` (both None with one epoch: no shorter budget)."""
    seeds = list(settings["seeds"])
    full_e = int(settings["epochs"])
    short_e = short_epochs(full_e)
    full = {s: segnet_with_epochs(settings, full_e, s, progress) for s in seeds}
    short = {s: segnet_with_epochs(settings, short_e, s, progress) for s in seeds}
    return pd.DataFrame([{"model": "SegNet", "dataset": settings["dataset"],
                          "lr": full[seeds[0]]["key"]["recipe"]["lr"],
                          **_on_budget_columns(short, full, short_e, full_e, "miou", "mIoU", "test_miou")}])


# --------------------------------------------------------------------------- networks trained from scratch, on budget
def scratch_with_epochs(cfg: Any, key: str, spec: dict, lr: float, epochs: int, seed: int = 0,
                        progress: bool = True) -> dict[str, Any]:
    """``spec`` trained from scratch by model ``key``'s recipe (its data, batch, precision) at ``lr`` for
    ``epochs`` with a complete cosine schedule: ``trained_runs.train_from_scratch``'s own record at the setup's epochs (the
    record Table 4 reads)."""

    setup = cfg.model(key)
    if int(epochs) == setup.epochs:
        return trained_runs.train_from_scratch(cfg, key, spec, int(seed), lr=float(lr), progress=progress)
    rcp = dataclasses.replace(recipe(setup, lr=float(lr)), epochs=int(epochs))
    return train.train_run(spec, setup.dataset, rcp, int(seed), setup.train_subset, setup.test_subset,
                           tag=f"scratch-e{int(epochs)}", progress=progress, weights_needed=False)


def prepare_scratch_budget_runs(cfg: Any, key: str, nets: Mapping[str, tuple[dict, float]],
                                progress: bool = True) -> None:
    """Fill the run cache with the shorter-budget trainings :func:`scratch_budget_table` reads for notebook 10
    (every net of ``nets``, {name: (spec, lr)}, at every seed of the scale; ``mobilenet.declared_jobs``), side by
    side (a no-op with one worker)."""

    jobs.run([b for b in mobilenet.declared_jobs(cfg, key, nets=nets) if b.target is scratch_with_epochs],
             jobs.worker_count(cfg), progress)


def scratch_budget_table(cfg: Any, key: str, nets: Mapping[str, tuple[dict, float]],
                         progress: bool = True) -> pd.DataFrame:
    """Have networks trained from scratch with model ``key``'s budget converged on it?  Read as notebook 03 reads
    the bases (:func:`convergence_table`): one row per net of ``nets`` ({name: (spec, lr)}), every top-1 a mean
    over the scale's seeds.  ``gain of last quarter``: top-1 after the setup's epochs minus after
    :func:`short_epochs` of them (complete schedules both, paired by seed); ``plateau on the budget``: at most
    ``scales.PLATEAU_POINTS`` (both None with one epoch: no shorter budget)."""
    full_e = cfg.model(key).epochs
    short_e = short_epochs(full_e)
    rows = []
    for name, (spec, lr) in nets.items():
        full = {s: scratch_with_epochs(cfg, key, spec, lr, full_e, s, progress) for s in cfg.seeds}
        short = {s: scratch_with_epochs(cfg, key, spec, lr, short_e, s, progress) for s in cfg.seeds}
        rows.append({"model": key, "name": name, "params": full[cfg.seeds[0]]["params"], "lr": float(lr),
                     **_on_budget_columns(short, full, short_e, full_e, "top1", "top1", "test_top1")})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- any training, read on its budget
def shorter_call(call: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a ``train.train_run`` call with the same network, data, seed and recipe but
    :func:`short_epochs` of its epochs (a complete cosine schedule over them)."""
    rcp = call["recipe"]
    return {**call, "recipe": dataclasses.replace(rcp, epochs=short_epochs(rcp.epochs))}


def on_budget_jobs(calls: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The shorter trainings :func:`on_budget_gain` reads for ``calls`` (``train.train_run`` keyword arguments),
    each once."""
    out: dict[str, dict[str, Any]] = {}
    for call in calls:
        short = shorter_call(call)
        init = short.get("init_state")
        ident = store.canonical_json({**{k: v for k, v in short.items() if k != "init_state"},
                                      "recipe": short["recipe"].to_dict(),
                                      "init": None if init is None else train.state_dict_digest(init)})
        out.setdefault(ident, short)
    return list(out.values())


def on_budget_batch(cfg: Any, calls: Iterable[Mapping[str, Any]], what: str = "on-budget readings",
                    share: float = 1.0) -> jobs.Batch:
    """The on-budget readings of ``calls`` (``train.train_run`` keyword arguments) as one batch: target
    ``train.train_run``, the jobs :func:`on_budget_jobs` (each once), ``{"progress": False}``.  ``what``: the plan's
    words (before a colon: the progress bar's); ``share``: the networks' share of the base network's
    multiply-accumulates per image, so a job's size is (:func:`short_epochs` of its epochs, ``share``, 1.0).
    ``cfg``, the scale, is the batch builders' first argument; nothing here reads it."""
    return jobs.Batch(what, train.train_run, tuple(on_budget_jobs(calls)),
                      size=lambda job: (job["recipe"].epochs, float(share), 1.0), kwargs={"progress": False})


def prepare_on_budget(cfg: Any, calls: Iterable[Mapping[str, Any]], progress: bool = True) -> None:
    """Fill the run cache with :func:`on_budget_batch`, side by side (a no-op with one worker)."""

    jobs.run([on_budget_batch(cfg, calls)], jobs.worker_count(cfg), progress)


def on_budget_gain(calls: Mapping[int, Mapping[str, Any]], metric: str = "top1", counted: Iterable[int] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Has the network of ``calls`` ({seed: ``train.train_run`` keyword arguments}) converged on its budget?
    :func:`budget_gain` of ``metric`` after all its epochs against after :func:`short_epochs` of them, paired by
    seed over ``counted`` (default: every seed; the seeds whose full run counts); ``converged`` is the gain
    at most ``scales.PLATEAU_POINTS`` (None without a seed to read or with one epoch)."""
    seeds = sorted(calls if counted is None else set(counted) & set(calls))
    if not seeds or calls[seeds[0]]["recipe"].epochs <= 1:
        return {"seeds": seeds, "gain": None, "gain sd": None, "gain se": None, "converged": None}
    full = {s: train.train_run(**calls[s], progress=progress)[metric] for s in seeds}
    short = {s: train.train_run(**shorter_call(calls[s]), progress=progress)[metric] for s in seeds}
    g = budget_gain(short, full)
    return {**g, "converged": bool(g["gain"] <= scales.PLATEAU_POINTS)}
