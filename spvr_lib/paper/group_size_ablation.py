"""Section 6.2 / Figure 2: how the group size d changes accuracy and pruning time (notebook 09).

At the highest pruning rate of each model (``max(setup.rates)``: 98% for VGG16 and ResNet34, 95%
for ResNet50 as set up here), SPvR prunes the scale's trained base network once per group size (the paper's
d, :data:`reference.PAPER_GROUP_SIZES`, scaled with the width as the main tables' d: :func:`group_sizes`; a d
whose network misses the rate by more than :data:`RATE_TOLERANCE` points is shown, not compared)
with each ranking method (``base_models.spvr_pruned(..., method="fast" | "naive")``; both are
cached, and ``prune_s`` is the wall time of grouping + ranking + budget loop).  The two methods
compute the same importances, so they must return the same pruned network: the table says
whether they did.  Each pruned network is re-initialised and trained from scratch with the
model's recipe at the base model's searched learning rate, once per seed of the scale.

A step that raises is kept as a row with ``status="failed"`` and its reason, never dropped.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from spvr_lib.paper import base_models, convergence, jobs, pruned_networks, reference, stats, trained_runs
from spvr_lib.paper.plots import PLOT_STYLE
from spvr_lib.train import train_run
from spvr_lib.paper.scales import scaled_group_size

__all__ = ["RANKING_METHODS", "RATE_TOLERANCE", "group_sizes", "ablation_rate", "base_lr", "declared_jobs",
           "group_size_rows", "group_size_table", "figure2"]

RANKING_METHODS = ("fast", "naive")
RATE_TOLERANCE = 1.0     # points: a d whose network's removal is further than this from the rate is not compared


def group_sizes(cfg: Any, keys: Sequence[str] | None = None) -> dict[str, dict[int, list[int]]]:
    """Figure 2's grid at ``cfg``'s widths: {model: {d: [the paper's d it stands for]}}, each of the paper's
    group sizes (:data:`reference.PAPER_GROUP_SIZES`) scaled like the main tables' d
    (``scales.scaled_group_size``: the same fraction of a layer; at 1/8 width the paper's d = 8 is d = 1), equal
    scaled values merged."""

    out: dict[str, dict[int, list[int]]] = {}
    for key in (keys or reference.PAPER_GROUP_SIZES):
        width = cfg.model(key).width
        grid: dict[int, list[int]] = {}
        for paper_d in reference.PAPER_GROUP_SIZES[key]:
            grid.setdefault(scaled_group_size(paper_d, width), []).append(paper_d)
        out[key] = grid
    return out


def ablation_rate(cfg: Any, key: str) -> float:
    """The highest rate of the model's setup (Section 6.2 ablates "only the maximum level of pruning")."""
    return float(max(cfg.model(key).rates))


def base_lr(cfg: Any, key: str, progress: bool = True) -> float:
    """The learning rate found by grid search for the model's unpruned network (cached)."""
    setup = cfg.model(key)
    return base_models.searched_lr(setup, base_models.base_spec(setup), progress=progress)[0]



def declared_jobs(cfg: Any, key: str, seeds: Sequence[int] | None = None, specs: Sequence[dict] | None = None,
                  lr: float | None = None, decides: Sequence[dict] | None = None) -> list[jobs.Batch]:
    """Notebook 09's independent computations for model ``key`` at :func:`ablation_rate`, declared once
    (:func:`group_size_rows` and :func:`group_size_table` fan them out, the plan counts and costs them):

    * ``Figure 2 <key> trainings``: :func:`train_from_scratch` (cfg, key, spec, seed, lr) of every network of ``specs``
      (SPvR's at each d, the ranking paths' networks each once) at every seed of ``seeds`` (default the scale's);
    * ``on-budget readings``: the networks of ``decides`` (the best and the worst compared d's, fast ranking), every
      seed, trained again with 3/4 of the epochs (``convergence.on_budget_batch``).

    Sizes (epochs, 1 - rate, 1.0), on budget ``convergence.short_epochs`` of the epochs.  ``lr``: the base's searched
    lr (:func:`base_lr`).  What is not given (the plan, which computes nothing) is a placeholder that keeps a cold
    run's count: one network per d of :func:`group_sizes` (the fast and the naive ranking give the same network),
    its spec the words "SPvR's network at d=<d>"; the best and the worst d (none with fewer than two d's); the lr
    the grid's first value (the searched lr itself in a one-value grid).  None for a model outside Figure 2."""
    if key not in reference.PAPER_GROUP_SIZES:
        return []
    setup, rate = cfg.model(key), ablation_rate(cfg, key)
    seeds = list(cfg.seeds if seeds is None else seeds)
    ds = list(group_sizes(cfg, [key])[key])
    specs = [f"SPvR's network at d={d}" for d in ds] if specs is None else list(specs)
    decides = ([f"SPvR's network at the {which} d" for which in ("best", "worst")] if len(ds) > 1 else []) \
        if decides is None else list(decides)
    lr = base_models.lr_grid(setup, "scratch")[0] if lr is None else lr
    return [jobs.Batch(f"Figure 2 {key} trainings: {len(specs)} networks (d in {ds}) at {rate:.0%}, "
                       f"{len(seeds)} seeds", trained_runs.train_from_scratch,
                       tuple((cfg, key, spec, s, lr) for spec in specs for s in seeds),
                       size=lambda job: (setup.epochs, 1.0 - rate, 1.0), kwargs={"progress": False}),
            convergence.on_budget_batch(cfg, [trained_runs.scratch_call(cfg, key, spec, s, lr) for spec in decides
                                              for s in seeds],
                                        f"on-budget readings: Figure 2's best and worst d of {key}, 3/4 of the epochs",
                                        1.0 - rate)]


def _prepare(cfg: Any, key: str, rate: float, group_sizes: Sequence[int], naive_at: set[int], seeds: Sequence[int],
             progress: bool) -> None:
    """Prune at every d in this process (its timings are the figure's), then fill the run cache with the
    trainings of :func:`declared_jobs` side by side (``paper.jobs``; nothing happens with one worker).  Errors are
    left to the rows."""

    workers = jobs.worker_count(cfg)
    if workers <= 1:
        return
    specs = []
    for d in group_sizes:
        for m in [m for m in RANKING_METHODS if m == "fast" or int(d) in naive_at]:
            try:
                spec = base_models.spvr_pruned(cfg, key, rate, group_size=int(d), method=m, progress=progress)["spec"]
            except Exception:
                continue
            if spec not in specs:
                specs.append(spec)
    lr = base_lr(cfg, key, progress=progress)
    jobs.run([b for b in declared_jobs(cfg, key, seeds, specs, lr) if b.target is trained_runs.train_from_scratch],
             workers, progress)


def group_size_rows(cfg: Any, key: str, group_sizes: Sequence[int], seeds: Sequence[int] | None = None,
                    naive_group_sizes: Sequence[int] | None = None, progress: bool = True,
                    runs_out: list | None = None) -> list[dict[str, Any]]:
    """One row per group size d for model ``key`` at :func:`ablation_rate`: pruning time of the fast
    and the naive ranking, whether they gave the same network, and its accuracy trained from
    scratch (mean and sample std over ``seeds``, default the scale's; in %, NaN where the dataset
    has <= 5 classes for top-5).  ``naive_group_sizes``: the d at which the naive ranking runs too
    (default: all); elsewhere its columns are NaN and "same spec" is None (not checked)."""
    seeds = list(cfg.seeds if seeds is None else seeds)
    if not seeds:
        raise ValueError("seeds is empty; expected at least one training seed")
    bad = [d for d in group_sizes if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1]
    if bad or not group_sizes:
        raise ValueError(f"group_sizes={list(group_sizes)!r}; expected a non-empty list of positive ints")
    naive_at = {int(d) for d in (group_sizes if naive_group_sizes is None else naive_group_sizes)}
    rate = ablation_rate(cfg, key)
    _prepare(cfg, key, rate, group_sizes, naive_at, seeds, progress)
    rows = []
    for d in tqdm(list(group_sizes), desc=f"{key}: group sizes", disable=not progress, leave=False):
        row: dict[str, Any] = {"model": key, "rate": rate, "d": int(d), "paper d": None, "status": "ok", "error": ""}
        try:
            methods = [m for m in RANKING_METHODS if m == "fast" or int(d) in naive_at]
            recs = {m: base_models.spvr_pruned(cfg, key, rate, group_size=int(d), method=m, progress=progress)
                    for m in methods}
            fast, naive = recs["fast"], recs.get("naive")
            row.update({"params before": fast["params_before"], "budget": fast["budget"],
                        "params after": fast["params_after"], "removed (%)": 100.0 * fast["removed_fraction"],
                        "collapsed": fast["collapsed"], "prune s (fast)": fast["prune_s"],
                        "prune s (naive)": naive["prune_s"] if naive else float("nan"),
                        "naive / fast": naive["prune_s"] / max(fast["prune_s"], 1e-9) if naive else float("nan"),
                        "same spec": fast["spec"] == naive["spec"] if naive else None, "architecture": fast["arch"]})
            removed = 100.0 * fast["removed_fraction"]
            row["meets the rate"] = bool(abs(removed - 100.0 * rate) <= RATE_TOLERANCE)
            if not row["meets the rate"]:
                row["status"] = (f"not compared: removes {removed:.2f}% (the rate {100 * rate:.0f}% "
                                 f"± {RATE_TOLERANCE:g} point)")
            lr = base_lr(cfg, key, progress=progress)

            facts = pruned_networks.network_facts(cfg, key, base_models.spvr_model(fast))
            row.update({k: facts[k] for k in ("narrowest layer", "classifier inputs", "layers removed")})
            classes = pruned_networks._classes(cfg.model(key).dataset)
            for m in methods:           # identical specs share one cached training run per seed
                runs = [trained_runs.train_from_scratch(cfg, key, recs[m]["spec"], s, lr=lr, progress=progress)
                        for s in seeds]
                statuses = [stats.run_status(r.get("top1"), classes, r.get("history") or []) for r in runs]
                if runs_out is not None:
                    runs_out += [{**trained_runs.training_row(cfg.model(key), key, "spvr", r, rate=rate,
                                                           budget=recs[m]["budget"],
                                                           params_before=recs[m]["params_before"],
                                                           arch=recs[m]["arch"], facts=facts), "d": int(d),
                                  "ranking": m} for r in runs]
                for metric in ("top1", "top5"):
                    counted, failed = stats.split_failed([r[metric] for r in runs], statuses)
                    mean, std = stats.mean_std(counted)
                    row[f"{metric} ({m})"], row[f"{metric} std ({m})"] = mean, std
                    row[f"{metric} seeds ({m})"] = " / ".join(f"{v:.2f}" for v in counted) or None
                    row[f"{metric} failed runs ({m})"] = stats.seeds_note(len(counted), failed) or None
                row[f"n seeds ({m})"] = sum(st == "ok" for st in statuses)
        except Exception as err:  # a failed run is a row, never dropped
            row.update({"status": "failed", "error": f"{type(err).__name__}: {err}"})
        row["paper prune s bound (d=32)"] = None
        rows.append(row)
    return rows


def group_size_table(cfg: Any, group_sizes: Mapping[str, Sequence[int] | Mapping[int, Sequence[int]]],
                     seeds: Sequence[int] | None = None,
                     naive_group_sizes: Mapping[str, Sequence[int]] | None = None,
                     progress: bool = True, with_runs: bool = False,
                     on_budget: bool = True) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 2's data: :func:`group_size_rows` for every model in ``group_sizes`` ({model key: [d, ...]}, or
    :func:`group_sizes`' {model key: {d: [the paper's d]}}, whose paper d's fill the "paper d" column);
    ``naive_group_sizes`` ({model key: [d, ...]}, default: all of ``group_sizes``) limits the naive ranking.
    ``on_budget``: the best and the worst compared d of each model ("decides") are read on their budget
    (``convergence.on_budget_gain``: trained again with 3/4 of the epochs, "gain on budget (fast)")."""
    if not group_sizes:
        raise ValueError("group_sizes is empty; expected {model key: [d, ...]}")
    runs: list[dict[str, Any]] = []
    rows = []
    for key, ds in group_sizes.items():
        paper_ds = ds if isinstance(ds, Mapping) else {}
        for r in group_size_rows(cfg, key, list(ds), seeds,
                                 None if naive_group_sizes is None else naive_group_sizes.get(key, list(ds)), progress,
                                 runs_out=runs):
            if r["d"] in paper_ds:
                r["paper d"] = ", ".join(map(str, paper_ds[r["d"]]))
                if 32 in paper_ds[r["d"]]:
                    r["paper prune s bound (d=32)"] = reference.PAPER_PRUNE_S_AT_D32.get(key)
            rows.append(r)
    order = ["model", "rate", "d", "paper d", "params before", "budget", "params after", "removed (%)",
             "meets the rate", "collapsed", "narrowest layer", "classifier inputs", "layers removed",
             "prune s (fast)", "prune s (naive)", "naive / fast", "same spec",
             "top1 (fast)", "top1 std (fast)", "top1 seeds (fast)", "top1 failed runs (fast)",
             "top5 (fast)", "top5 std (fast)", "top5 seeds (fast)", "top5 failed runs (fast)", "n seeds (fast)",
             "top1 (naive)", "top1 std (naive)", "top5 (naive)", "top5 std (naive)", "n seeds (naive)",
             "decides", "gain on budget (fast)", "paper prune s bound (d=32)", "status", "error", "architecture"]
    if on_budget:
        _read_on_budget(cfg, rows, seeds, progress)
    df = pd.DataFrame(rows)
    df = df[[c for c in order if c in df.columns]]
    if not with_runs:
        return df

    frame = trained_runs.runs_frame(runs)
    if runs:
        frame.insert(2, "d", [r["d"] for r in runs])
        frame.insert(3, "ranking", [r["ranking"] for r in runs])
    return df, frame


def _read_on_budget(cfg: Any, rows: list[dict[str, Any]], seeds: Sequence[int] | None, progress: bool) -> None:
    """Mark the best and the worst compared d of each model ("decides") and read their networks (fast ranking)
    on their budget, on the seeds that count (the shorter trainings: :func:`declared_jobs`' on-budget batch, run
    side by side first)."""

    seeds = list(cfg.seeds if seeds is None else seeds)
    picked = []
    for key in dict.fromkeys(r["model"] for r in rows):
        compared = [r for r in rows if r["model"] == key and r["status"] == "ok" and pd.notna(r.get("top1 (fast)"))]
        if len(compared) < 2:
            continue
        best = max(compared, key=lambda r: r["top1 (fast)"])
        worst = min(compared, key=lambda r: r["top1 (fast)"])
        for r, role in ((best, "best d"), (worst, "worst d")):
            r["decides"] = role
            picked.append(r)
    lrs = {key: base_lr(cfg, key, progress=progress) for key in dict.fromkeys(r["model"] for r in picked)}
    specs = {id(r): base_models.spvr_pruned(cfg, r["model"], r["rate"], group_size=r["d"], progress=False)["spec"]
             for r in picked}
    calls = {id(r): {s: trained_runs.scratch_call(cfg, r["model"], specs[id(r)], s, lrs[r["model"]])
                     for s in seeds}
             for r in picked}
    jobs.run([b for key in lrs for b in declared_jobs(cfg, key, seeds, lr=lrs[key], decides=[
        specs[id(r)] for r in picked if r["model"] == key]) if b.target is not trained_runs.train_from_scratch],
        jobs.worker_count(cfg), progress)
    for r in picked:
        counted = [s for s, v in zip(seeds, _counted_seeds(cfg, r, calls[id(r)], progress)) if v]
        r["gain on budget (fast)"] = convergence.on_budget_gain(calls[id(r)], "top1", counted, progress)["gain"]


def _counted_seeds(cfg: Any, row: dict[str, Any], calls: dict[int, dict], progress: bool) -> list[bool]:

    classes = pruned_networks._classes(cfg.model(row["model"]).dataset)
    recs = [train_run(**calls[s], progress=progress) for s in calls]
    return [stats.run_status(r.get("top1"), classes, r.get("history") or []) == "ok" for r in recs]


_TITLES = {"vgg16": "VGG16", "resnet34": "ResNet34", "resnet50": "ResNet50"}


def figure2(table: pd.DataFrame, top5_for: Sequence[str] = ("resnet34", "resnet50")) -> plt.Figure:
    """Figure 2's layout: one panel per model; top-1 (and top-5 for ``top5_for``) of the fast
    ranking's network against d on the left axis (error bars: std over seeds), pruning time of the
    fast and the naive ranking on a logarithmic right axis.  Failed rows are left out of the lines."""
    keys = list(dict.fromkeys(table["model"]))
    with plt.rc_context(PLOT_STYLE):
        fig, axes = plt.subplots(1, len(keys), figsize=(4.0 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            sub = table[(table["model"] == key) & (table["status"] == "ok")].sort_values("d")   # compared d's only
            handles = []
            for metric, style in (("top1", "-"), ("top5", "--")):
                col = f"{metric} (fast)"
                if (metric == "top5" and key not in top5_for) or col not in sub or sub[col].isna().all():
                    continue
                h = ax.errorbar(sub["d"], sub[col], yerr=sub[f"{metric} std (fast)"], ls=style, marker="o", ms=3,
                                capsize=2, color="C0", label=f"top-{metric[-1]} accuracy")
                handles.append(h)
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(table.loc[table["model"] == key, "d"]))
            ax.set_xticklabels([str(d) for d in table.loc[table["model"] == key, "d"]])
            rate = table.loc[table["model"] == key, "rate"].iloc[0]
            ax.set(xlabel="group size d", ylabel="accuracy (%)", title=f"{_TITLES.get(key, key)}, {rate:.0%} removed")
            right = ax.twinx()
            right.grid(False)
            right.spines["right"].set_visible(True)
            for method, color in (("fast", "C1"), ("naive", "C3")):
                col = f"prune s ({method})"
                if col in sub and not sub[col].isna().all():
                    handles += right.plot(sub["d"], sub[col], ls=":", marker="s", ms=3, color=color,
                                          label=f"pruning time ({method})")
            right.set_yscale("log")
            right.set_ylabel("pruning time (s)")
            ax.legend(handles=handles, fontsize=7, frameon=False, loc="best")
        fig.tight_layout()
    return fig
