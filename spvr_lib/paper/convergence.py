"""Have the base networks converged?  The scale's plateau rule read on the training budget (notebook 03).

The rule (at most 0.3 points of top-1 gained over the last quarter of training) can be read two ways:

* within one run (:func:`spvr_lib.train.plateau_rise`, base_models.csv's "rise over last quarter"): top-1 at
  the end minus top-1 at 3/4 of the epochs of the same run.  Under the paper's cosine annealing the last quarter
  is where the learning rate falls from 15% of its peak to zero, and top-1 climbs there however long the run
  is: the same networks trained twice as long rise as much (the ``rise at 2x epochs`` column measures it).
* on the budget (this module): the same network and recipe trained with a complete schedule over 3/4 of
  the epochs, against all of them, paired by seed (same data draw and initialisation).  Had the network not
  converged, the last quarter of its budget would buy more than 0.3 points.

Both are shown; neither replaces the other.
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from spvr_lib import train
from spvr_lib.paper import base_models
from spvr_lib.paper.lr_search import recipe

BUDGET_FRACTION = 0.75      # the shorter budget: 3/4 of the base's epochs (its last quarter left out)


def short_epochs(epochs: int) -> int:
    """The shorter budget of ``epochs``: ``round(BUDGET_FRACTION * epochs)``, at least 1 and fewer than ``epochs``
    when ``epochs > 1``."""
    if int(epochs) < 1:
        raise ValueError(f"epochs={epochs!r}: expected an int >= 1")
    if int(epochs) == 1:
        return 1
    return max(1, min(int(epochs) - 1, round(BUDGET_FRACTION * int(epochs))))


def base_with_epochs(cfg: Any, key: str, epochs: int, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Model ``key``'s base network trained by its own recipe (searched lr, data, batch, precision) for
    ``epochs`` with a complete cosine schedule: the base's own record at the base's epochs, the longer base's
    (``base_models.train_base(epochs_factor=...)``) at a whole multiple of them."""
    setup = cfg.model(key)
    if setup.pretrained:
        raise ValueError(f"model={key!r} loads published weights at scale {cfg.name!r}; it has no training budget")
    if int(epochs) % setup.epochs == 0:
        return base_models.train_base(cfg, key, seed, progress=progress, epochs_factor=int(epochs) // setup.epochs)
    lr, _ = base_models.scratch_lr(cfg, key, progress=progress)
    rcp = dataclasses.replace(recipe(setup, lr=lr), epochs=int(epochs))
    return train.train_run(base_models.base_spec(setup), setup.dataset, rcp, seed, setup.train_subset,
                           setup.test_subset, tag=f"base-e{int(epochs)}", progress=progress)


def budget_factors(cfg: Any) -> tuple[int, ...]:
    """The budgets the plateau rule is read at, as multiples of the base's epochs: the base's own, and the scale's
    ``convergence_factor`` (twice as long at the cpu scale) when it has one."""
    return (1,) + ((int(cfg.convergence_factor),) if cfg.convergence_factor else ())


def budget_jobs(cfg: Any, keys: Sequence[str]) -> list[tuple]:
    """The (cfg, key, epochs, seed) trainings :func:`convergence_table` reads: for every budget of
    :func:`budget_factors` and every seed of the scale, the full budget and :func:`short_epochs` of it."""
    jobs = []
    for factor in budget_factors(cfg):
        for key in keys:
            setup = cfg.model(key)
            if setup.pretrained:
                continue
            full = factor * setup.epochs
            for seed in cfg.seeds:
                jobs += [(cfg, key, full, seed), (cfg, key, short_epochs(full), seed)]
    return jobs


def prepare_budget_runs(cfg: Any, keys: Sequence[str], progress: bool = True) -> None:
    """Fill the run cache with :func:`budget_jobs`, side by side (a no-op with one worker)."""
    from spvr_lib.paper import jobs

    jobs.fill_cache(base_with_epochs, budget_jobs(cfg, keys), jobs.worker_count(cfg), desc="budget curve",
                    progress=progress, kwargs={"progress": False})


def budget_gain(short_top1: Mapping[int, float], full_top1: Mapping[int, float]) -> dict[str, Any]:
    """What the last quarter of the budget buys, paired by seed: ``{seed: top-1 (%)}`` at the shorter and the
    full budget -> gain (mean of full - short over the seeds both have, points), its sample sd and standard
    error (None with one seed), and the seeds used."""
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
    """Notebook 03's convergence table, one row per trained base model and budget of :func:`budget_factors`:
    top-1 after 3/4 of the budget's epochs and after all of them (mean over the scale's seeds), the gain of
    the last quarter of the budget (paired by seed, with its standard error; ``plateau on the budget``: gain
    <= 0.3 points) and the rise within the run (mean over seeds; ``plateau within run``: <= 0.3 points)."""
    rows = []
    for factor in budget_factors(cfg):
        for key in keys:
            setup = cfg.model(key)
            if setup.pretrained:
                continue
            full_e = factor * setup.epochs
            short_e = short_epochs(full_e)
            full = {s: base_with_epochs(cfg, key, full_e, s, progress) for s in cfg.seeds}
            short = {s: base_with_epochs(cfg, key, short_e, s, progress) for s in cfg.seeds}
            g = budget_gain({s: r["top1"] for s, r in short.items()}, {s: r["top1"] for s, r in full.items()})
            rises = [v for v in (train.plateau_rise(r["history"]) for r in full.values()) if v is not None]
            rise = round(statistics.fmean(rises), 2) if rises else None
            rows.append({"model": key, "epochs": full_e, "x base epochs": factor, "shorter epochs": short_e,
                         "seeds": len(g["seeds"]),
                         "top1 at shorter": round(statistics.fmean(r["top1"] for r in short.values()), 2),
                         "top1": round(statistics.fmean(r["top1"] for r in full.values()), 2),
                         "gain of last quarter": g["gain"], "gain se": g["gain se"],
                         "plateau on the budget": bool(g["gain"] <= base_models.PLATEAU_POINTS),
                         "rise within run": rise,
                         "plateau within run": None if rise is None else bool(rise <= base_models.PLATEAU_POINTS),
                         "train s (these runs)": round(sum(r["wall_s"] for r in [*full.values(), *short.values()]),
                                                       1)})
    return pd.DataFrame(rows)
