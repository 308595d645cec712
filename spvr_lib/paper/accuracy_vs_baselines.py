"""Notebook 04: Table 1, SPvR against the baselines at equal parameter budgets, and the baselines'
sensitivity table (Torch-Pruning's criteria, which the paper ran, against the original authors' formulas).  Also the
accuracy-against-removal figure.
"""
from __future__ import annotations


from collections.abc import Iterable
from typing import Any

import pandas as pd

from spvr_lib import baselines
from spvr_lib.paper import jobs, plots, reference, stats
from spvr_lib.paper.pruned_networks import DISPLAY_NAMES, TABLE1_METHODS, _base, _check_method, paper_method, parameter_budget
from spvr_lib.paper.trained_runs import BEST, _cell, _comparison_row, _counted, _metrics, _paper_fmt, _tidy, accuracy_jobs, accuracy_runs, on_budget_batch, on_budget_columns, run_list, summarize


def table1(cfg: Any, keys: Iterable[str], methods: Iterable[str] = TABLE1_METHODS, seeds: Iterable[int] | None = None,
           runs: pd.DataFrame | None = None, progress: bool = True, on_budget: bool = True) -> pd.DataFrame:
    """Table 1: every method fine-tuned (SPvR from scratch) at each setup's ``compare_rates``.

    Two rows per (model, metric, rate): "ours" (this scale's dataset; cells "mean ± std" over seeds,
    "failed" with the reason in ``failures``) and "paper" (the paper's Table 1 on its dataset, "-"
    where it prints none).  Columns: model, metric, params removed (%), source, dataset, budget,
    base, one per method (:func:`stats.cell_text`), best baseline, SPvR - best, 95% interval, verdict
    (:data:`stats.RULE`), failures.
    ``runs``: the output of :func:`accuracy_runs` (mode "finetune") if already computed.  ``on_budget``: SPvR
    and the best baseline of each compared row are also read on their budget (:func:`on_budget_columns`: trained
    again with 3/4 of the epochs; "converged" qualifies the verdict).
    """
    keys, methods = list(keys), [_check_method(m) for m in methods]
    seeds = list(cfg.seeds if seeds is None else seeds)
    if runs is None:
        runs = accuracy_runs(cfg, keys, methods, seeds, "finetune", progress=progress)
    summary = summarize(runs)
    rows = []
    for key in keys:
        base = _base(cfg, key, progress)
        paper_ds = reference.PAPER_BASE[key]["paper dataset"]
        for metric in _metrics(cfg, key):
            for rate in cfg.model(key).compare_rates:
                rate = round(float(rate), 6)
                sub = summary[(summary["model"] == key) & (summary["rate"] == rate)]
                rsub = runs[(runs["model"] == key) & (runs["rate"] == rate)]
                head = {"model": key, "metric": metric, "params removed (%)": round(100 * rate, 2)}
                ours = {**head, "source": f"ours ({cfg.name})", "dataset": cfg.model(key).dataset,
                        "budget": int(parameter_budget(base["params"], rate)),
                        "base": None if base[metric] is None else round(float(base[metric]), 2),
                        **_comparison_row(sub, rsub, metric, methods)}
                paper_base = reference.PAPER_TABLE1[(key, 0.0, "base")][metric]
                paper = {**head, "source": "paper", "dataset": paper_ds, "budget": None,
                         "base": paper_base,
                         **{DISPLAY_NAMES[m]: _paper_fmt(reference.PAPER_TABLE1.get((key, rate, paper_method(m)), {}).get(metric))
                            for m in methods}}
                rows += [ours, paper]
    if on_budget:
        _add_on_budget(cfg, rows, runs, "finetune", progress)
    return _tidy(pd.DataFrame(rows), ["budget"])


_METHOD_OF = {name: m for m, name in DISPLAY_NAMES.items()}


def sensitivity_methods() -> list[str]:
    """The methods of :func:`baselines_sensitivity`: Torch-Pruning's four, the authors' variants, the other
    baselines and SPvR (Table 1's verdict is recomputed with each four)."""
    others = [m for m in TABLE1_METHODS if m not in baselines.AUTHORS_VARIANT_OF]
    return [*baselines.AUTHORS_VARIANT_OF, *baselines.AUTHORS_VARIANTS, *others]


def declared_jobs(cfg: Any, key: str, methods: Iterable[str] = TABLE1_METHODS, seeds: Iterable[int] | None = None,
                  best: dict[float, str] | None = None) -> list[jobs.Batch]:
    """Notebook 04's independent computations for model ``key``, declared once (what :func:`table1` and
    :func:`baselines_sensitivity` fan out, and what the plan counts): Table 1's runs (every method at every
    ``compare_rates`` and seed, fine-tuned; SPvR from scratch), the on-budget readings of SPvR and the best baseline
    of each rate (``best``: {rate: method} once the runs are read; unknown: ``trained_runs.BEST``, every seed), and
    the sensitivity table's runs at the highest rate (those of Table 1 counted once)."""
    setup = cfg.model(key)
    methods, seeds = [_check_method(m) for m in methods], [int(s) for s in (cfg.seeds if seeds is None else seeds)]
    out = accuracy_jobs(cfg, key, run_list(cfg, key, methods, seeds), "finetune")
    compared = ["spvr"] if setup.quote_baselines else ["spvr", None]
    out.append(on_budget_batch(cfg, key, [(r, m or (best or {}).get(round(float(r), 6), BEST), seeds)
                                          for r in setup.compare_rates for m in compared], "finetune"))
    return out + accuracy_jobs(cfg, key, run_list(cfg, key, sensitivity_methods(), seeds, [max(setup.compare_rates)]),
                               "finetune")


def _add_on_budget(cfg: Any, rows: list[dict[str, Any]], runs: pd.DataFrame, mode: str, progress: bool) -> None:
    """:func:`on_budget_columns` for every compared row of ``rows`` (those with a best baseline): SPvR and the best
    baseline of the cell, whose shorter budgets are first trained side by side."""

    cells = [(r, _METHOD_OF[r["best baseline"]]) for r in rows if r.get("best baseline")]
    counted: dict[str, list[tuple[float, str, list[int]]]] = {}
    for r, best in cells:
        rate = round(float(r["params removed (%)"]) / 100, 6)
        rsub = runs[(runs["model"] == r["model"]) & (runs["rate"] == rate)]
        for m in ("spvr", best):
            counted.setdefault(r["model"], []).append(
                (rate, m, [int(x) for x, st in zip(rsub.loc[rsub["method"] == m, "seed"],
                                                   rsub.loc[rsub["method"] == m, "status"]) if st == "ok"]))
    jobs.run([on_budget_batch(cfg, key, c, mode) for key, c in counted.items()], jobs.worker_count(cfg), progress)
    for r, best in cells:
        rate = round(float(r["params removed (%)"]) / 100, 6)
        rsub = runs[(runs["model"] == r["model"]) & (runs["rate"] == rate)]
        r.update(on_budget_columns(cfg, r["model"], rate, mode, {"SPvR": "spvr", "best": best}, rsub, r["metric"],
                                   progress))


def baselines_sensitivity(cfg: Any, keys: Iterable[str], seeds: Iterable[int] | None = None,
                          progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Does the choice of implementation move a verdict?  At each model's highest trained rate, ℓ1, ℓ2, Taylor
    and FPGM as the paper ran them (Torch-Pruning's criteria, Table 1's columns) beside the original authors'
    variants (``baselines.AUTHORS_VARIANTS``), each fine-tuned over ``seeds``; and Table 1's verdict (SPvR
    against the best baseline) with the Torch-Pruning four, then with the authors' four in their place.

    Returns (table, runs).  Table rows per (model, criterion): the two cells (:func:`stats.cell_text`), authors -
    Torch-Pruning with its 95% interval and verdict; and one row per model, criterion "Table 1 verdict", with
    the verdict under each implementation and whether it moved."""
    keys = list(keys)
    seeds = [int(s) for s in (cfg.seeds if seeds is None else seeds)]
    rates = {k: [max(cfg.model(k).compare_rates)] for k in keys}
    others = [m for m in TABLE1_METHODS if m not in baselines.AUTHORS_VARIANT_OF]
    runs = accuracy_runs(cfg, keys, sensitivity_methods(), seeds, "finetune", rates=rates, progress=progress)
    rows = []
    for key in keys:
        rate = round(float(rates[key][0]), 6)
        rsub = runs[(runs["model"] == key) & (runs["rate"] == rate)]
        head = {"model": key, "params removed (%)": round(100 * rate, 2)}
        for tp_m, authors_m in baselines.AUTHORS_VARIANT_OF.items():
            cmp = stats.compare(_counted(rsub, authors_m, "top1")[0], _counted(rsub, tp_m, "top1")[0],
                                DISPLAY_NAMES[authors_m], DISPLAY_NAMES[tp_m])
            rows.append({**head, "criterion": DISPLAY_NAMES[tp_m], "Torch-Pruning (Table 1)": _cell(rsub, tp_m, "top1"),
                         "authors' variant": _cell(rsub, authors_m, "top1"), "variant": DISPLAY_NAMES[authors_m],
                         "authors - Torch-Pruning": cmp.diff, "95% interval": cmp.interval_text(),
                         "verdict": cmp.verdict})
        summary = summarize(rsub)
        with_tp = _comparison_row(summary, rsub, "top1", [*baselines.AUTHORS_VARIANT_OF, *others])
        swapped = [*baselines.AUTHORS_VARIANTS, *others]
        with_authors = _comparison_row(summary, rsub, "top1", swapped)
        rows.append({**head, "criterion": "Table 1 verdict",
                     "Torch-Pruning (Table 1)": f"{with_tp['verdict']} (best: {with_tp['best baseline']}, "
                                                f"{with_tp['95% interval']})",
                     "authors' variant": f"{with_authors['verdict']} (best: {with_authors['best baseline']}, "
                                         f"{with_authors['95% interval']})",
                     "verdict": "moved" if _kind(with_tp["verdict"]) != _kind(with_authors["verdict"]) else
                     "unchanged"})
    return _tidy(pd.DataFrame(rows)), runs


def _kind(verdict: str) -> str:
    """"SPvR better", "within noise", "a baseline better" or "n/a": a verdict without the baseline's name."""
    if verdict in ("SPvR better", "within noise") or verdict.startswith("n/a"):
        return verdict
    return "a baseline better"


def accuracy_figure(summary: pd.DataFrame, metric: str = "top1", title: str = "") -> Any:
    """Accuracy (mean over seeds, std as error bars) against parameters removed (%): one panel per model,
    one line per method (failed methods have no points)."""
    import matplotlib.pyplot as plt


    ok = summary[summary[f"{metric} mean"].notna()]
    model_keys = list(dict.fromkeys(summary["model"]))
    with plt.rc_context(plots.PLOT_STYLE):
        fig, axes = plt.subplots(1, len(model_keys), figsize=(4.6 * len(model_keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], model_keys):
        sub = ok[ok["model"] == key].assign(err=lambda d: d[f"{metric} std"].fillna(0.0))
        plots.lines(sub, x="params removed (%)", y=f"{metric} mean", hue="name", yerr="err", ax=ax,
                       title=key, ylabel=f"{metric} accuracy (%)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
