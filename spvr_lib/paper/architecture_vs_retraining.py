"""Notebook 06: Table 3, SPvR's architecture against the baselines' when every network is trained from
scratch: is it the architecture or the retraining?  
"""
from __future__ import annotations


from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from spvr_lib.paper import jobs, reference
from spvr_lib.paper.pruned_networks import DISPLAY_NAMES, TABLE1_METHODS, _check_method, paper_method
from spvr_lib.paper.trained_runs import BEST, _comparison_row, _metrics, _paper_fmt, _tidy, accuracy_jobs, accuracy_runs, on_budget_batch, run_list, summarize
from spvr_lib.paper.accuracy_vs_baselines import _add_on_budget


def declared_jobs(cfg: Any, key: str, methods: Iterable[str] = TABLE1_METHODS, seeds: Iterable[int] | None = None,
                  with_finetune: bool = True, best: str | None = None) -> list[jobs.Batch]:
    """Notebook 06's independent computations for model ``key``, declared once (what :func:`table3` fans out, and
    what the plan counts): every method but OTOv2 from scratch at ``table3_rate`` and every seed (the local
    methods' one architecture is one training), with ``with_finetune`` the same methods fine-tuned (Table 1's runs
    at that rate), and the on-budget readings of SPvR and the best baseline trained from scratch (``best`` once the
    runs are read; unknown: ``trained_runs.BEST``, every seed)."""
    setup = cfg.model(key)
    methods = [_check_method(m) for m in methods if m != "otov2"]
    seeds = [int(s) for s in (cfg.seeds if seeds is None else seeds)]
    rates = [setup.table3_rate]
    out = accuracy_jobs(cfg, key, run_list(cfg, key, methods, seeds, rates), "scratch")
    if with_finetune:
        out += accuracy_jobs(cfg, key, run_list(cfg, key, methods, seeds, rates), "finetune")
    compared = ["spvr"] if setup.quote_baselines else ["spvr", best or BEST]
    return out + [on_budget_batch(cfg, key, [(setup.table3_rate, m, seeds) for m in compared], "scratch")]


def table3(cfg: Any, keys: Iterable[str], methods: Iterable[str] = TABLE1_METHODS, seeds: Iterable[int] | None = None,
           with_finetune: bool = True, progress: bool = True,
           on_budget: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Table 3: every method's network re-initialised and trained from scratch at ``setup.table3_rate``
    (OTOv2 excluded: it retrains the original network).  Returns (wide table, per-seed runs).

    Rows per (model, metric): "scratch (Table 3)", with ``with_finetune`` "Table 1 (baselines fine-tuned)"
    (the fine-tuned runs of Table 1 at the same rate; SPvR's cell there is its from-scratch run) and
    "scratch - fine-tune", and "paper (Table 3)".  Columns as :func:`table1`.
    """
    keys = list(keys)
    methods = [_check_method(m) for m in methods if m != "otov2"]
    seeds = [int(s) for s in (cfg.seeds if seeds is None else seeds)]
    rates = {k: [cfg.model(k).table3_rate] for k in keys}
    scratch = accuracy_runs(cfg, keys, methods, seeds, "scratch", rates=rates, progress=progress)
    finetune = accuracy_runs(cfg, keys, methods, seeds, "finetune", rates=rates, progress=progress) \
        if with_finetune else None
    rows = []
    for key in keys:
        rate = round(float(cfg.model(key).table3_rate), 6)
        for metric in _metrics(cfg, key):
            head = {"model": key, "metric": metric, "params removed (%)": round(100 * rate, 2)}
            parts = [("scratch (Table 3)", scratch)] + ([("Table 1 (baselines fine-tuned)", finetune)]
                                                         if finetune is not None else [])
            summaries = {}
            for label, runs in parts:
                rsub = runs[runs["model"] == key]
                summaries[label] = summarize(rsub).set_index("method")
                rows.append({**head, "rows": label, "dataset": cfg.model(key).dataset,
                             **_comparison_row(summarize(rsub), rsub, metric, methods)})
            if finetune is not None:
                s, f = summaries["scratch (Table 3)"], summaries["Table 1 (baselines fine-tuned)"]
                diff = {DISPLAY_NAMES[m]: "same run" if m == "spvr" else
                        (f"{s.loc[m, metric + ' mean'] - f.loc[m, metric + ' mean']:+.2f}"
                                           if m in s.index and m in f.index and
                                           np.isfinite(s.loc[m, metric + " mean"] - f.loc[m, metric + " mean"])
                                           else "-") for m in methods}
                rows.append({**head, "rows": "scratch - fine-tune", "dataset": cfg.model(key).dataset, **diff})
            rows.append({**head, "rows": "paper (Table 3)", "dataset": reference.PAPER_BASE[key]["paper dataset"],
                         **{DISPLAY_NAMES[m]: _paper_fmt(reference.PAPER_TABLE3.get((key, rate, paper_method(m)), {}).get(metric))
                            for m in methods}})
    if on_budget:          # SPvR and the best baseline of each scratch cell, read on their budget
        _add_on_budget(cfg, [r for r in rows if r.get("rows") == "scratch (Table 3)"], scratch, "scratch", progress)
    # SPvR trains from scratch in both parts: its runs are listed once
    parts = [scratch] + ([finetune[finetune["method"] != "spvr"]] if finetune is not None else [])
    runs = pd.concat(parts, ignore_index=True)
    return _tidy(pd.DataFrame(rows)), runs
