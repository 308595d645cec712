"""Notebook 05: Table 2, the same pruned network fine-tuned (FT) and trained from scratch (TFS), each with
its own learning rate searched on held-out data, as the paper says.
"""
from __future__ import annotations

import dataclasses

from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd
import torch

from spvr_lib import prune, train
from spvr_lib.paper import base_models, convergence, jobs, reference, stats
from spvr_lib.paper.pruned_networks import _check_mode, _check_rate, _classes, network_facts
from spvr_lib.paper.trained_runs import _metrics, _tidy, runs_frame, training_row, training_tag


TABLE2_GRID = tuple(round(0.05 * k, 2) for k in range(19, 0, -1))   # 0.95, 0.90, ..., 0.05


def highest_uncollapsed_rate(cfg: Any, key: str, grid: Sequence[float] = TABLE2_GRID,
                             progress: bool = True) -> tuple[float | None, dict[str, Any] | None]:
    """The highest rate of ``grid`` at which SPvR's network keeps every layer (``collapsed`` False), and
    its ``spvr_pruned`` record; (None, None) when every rate collapses.  Rates are tried from the highest
    down and the search stops at the first that does not collapse."""
    for rate in sorted({_check_rate(r) for r in grid}, reverse=True):
        rec = base_models.spvr_pruned(cfg, key, rate, progress=progress)
        if not rec["collapsed"]:
            return rate, rec
    return None, None


def _finetune_init(cfg: Any, key: str, record: dict[str, Any], progress: bool) -> dict[str, torch.Tensor]:
    """State dict of SPvR's network with the base network's weights of the kept channels."""
    from types import SimpleNamespace


    base, base_rec = base_models.base_model(cfg, key, progress=progress)
    # inherit_weights reads spec, kept and original_spec of a PruneResult; the cached record has the first two
    result = SimpleNamespace(spec=record["spec"], kept=record["kept"], original_spec=base_rec["spec"])
    model = prune.inherit_weights(base, result)
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


TABLE2_SETS = ("rule", "paper's rate")     # the paper's rule (highest rate without depth reduction), its own rates


def table2_networks(cfg: Any, key: str, grid: Sequence[float] = TABLE2_GRID,
                    progress: bool = True) -> list[tuple[str, float | None, dict[str, Any] | None]]:
    """Table 2's networks of model ``key``: (set, rate, SPvR's ``spvr_pruned`` record) for the paper's rule (the
    highest rate of ``grid`` without layer collapse; (rule, None, None) where every rate collapses) and for the
    paper's own rate (:data:`reference.PAPER_TABLE2`: 60% VGG16 and ResNet34, 90% ResNet50)."""
    rate, rec = highest_uncollapsed_rate(cfg, key, grid, progress=progress)
    paper_rate = _check_rate(reference.PAPER_TABLE2[key]["rate"])
    return [("rule", rate, rec), ("paper's rate", paper_rate, base_models.spvr_pruned(cfg, key, paper_rate,
                                                                                       progress=progress))]


def table2_lr(cfg: Any, key: str, rec: dict[str, Any], mode: str,
              progress: bool = True) -> tuple[float, dict[float, float]]:
    """The learning rate of SPvR's network ``rec`` trained in ``mode`` (Table 2: "with the best learning rates
    selected using grid-search", for each network and mode): ``base_models.searched_lr`` on the validation split,
    fine-tuning from the base's kept weights or from scratch.  (best, {lr: validation top-1})."""
    _check_mode(mode)
    setup = cfg.model(key)
    init = _finetune_init(cfg, key, rec, progress) if mode == "finetune" else None
    return base_models.searched_lr(setup, rec["spec"], mode, init_state=init, progress=progress)


def _table2_trial_job(cfg: Any, key: str, rate: float, mode: str, lr: float) -> None:
    rec = base_models.spvr_pruned(cfg, key, rate, progress=False)
    init = _finetune_init(cfg, key, rec, False) if mode == "finetune" else None
    base_models.lr_trial(cfg.model(key), rec["spec"], lr, mode, init_state=init, progress=False)


def table2(cfg: Any, keys: Iterable[str], seeds: Iterable[int] | None = None, grid: Sequence[float] = TABLE2_GRID,
           progress: bool = True, with_runs: bool = False,
           on_budget: bool = True) -> pd.DataFrame | tuple[pd.DataFrame, pd.DataFrame]:
    """Table 2: SPvR's network fine-tuned from the base network's weights (FT) against trained from scratch
    (TFS), same data and epochs as the base, the learning rate grid-searched for EACH network and mode
    (:func:`table2_lr`), ``cfg.seeds`` seeds; at two rates per model (:func:`table2_networks`): the paper's rule
    (the highest rate of ``grid`` without layer collapse) and the paper's own rate.

    A network that lost layers (the paper's rate can collapse one here) is trained from scratch only: its FT cell
    and verdict say why.  One row per (model, set, metric): rate, architecture, narrowest layer, classifier inputs,
    params, FT and TFS
    (:func:`stats.cell_text`, failed runs named and left out), their lrs, TFS - FT with its 95% interval and the
    verdict of :data:`stats.RULE`, the paper's rate, FT and TFS, status and error; with ``on_budget`` both networks
    are read on their budget too (trained again with 3/4 of the epochs: "FT / TFS gain on budget", "converged")."""

    seeds = [int(s) for s in (cfg.seeds if seeds is None else seeds)]
    keys = list(keys)
    nets = {key: table2_networks(cfg, key, grid, progress) for key in keys}
    trials = [(cfg, key, rate, mode, lr) for key in keys for _, rate, rec in nets[key] if rec is not None
              for mode in ("scratch",) + (() if rec["collapsed"] else ("finetune",))
              for lr in base_models.lr_grid(cfg.model(key), mode)]
    jobs.fill_cache(_table2_trial_job, trials, jobs.worker_count(cfg), desc="Table 2 lr search", progress=progress)
    rows, run_rows = [], []
    for key in keys:
        setup = cfg.model(key)
        paper = reference.PAPER_TABLE2[key]
        for label_set, rate, rec in nets[key]:
            per_mode: dict[str, list[dict]] = {"FT": [], "TFS": []}
            lrs: dict[str, float | None] = {"FT": None, "TFS": None}
            error = None if rec is not None else f"SPvR collapses a layer at every rate of {list(grid)}"
            facts: dict[str, Any] = {}
            if rec is not None:
                try:
                    facts = network_facts(cfg, key, base_models.spvr_model(rec))
                    # a network that lost layers cannot start from the base's weights: trained from scratch only
                    modes = [("TFS", "scratch", None)] if rec["collapsed"] else \
                        [("FT", "finetune", _finetune_init(cfg, key, rec, progress)), ("TFS", "scratch", None)]
                    runs = []
                    for label, mode, state in modes:
                        lrs[label] = table2_lr(cfg, key, rec, mode, progress)[0]
                        runs += [(label, dict(spec=rec["spec"], dataset=setup.dataset,
                                              recipe=base_models.recipe(setup, lr=lrs[label], mode=mode), seed=s,
                                              per_class_train=setup.train_subset, per_class_test=setup.test_subset,
                                              init_state=state, tag=training_tag("spvr", mode), weights_needed=False))
                                 for s in seeds]
                    jobs.fill_cache(train.train_run, [kw for _, kw in runs], jobs.worker_count(cfg),
                                    desc=f"Table 2 {key} ({label_set})", progress=progress, kwargs={"progress": False})
                    for label, kw in runs:
                        per_mode[label].append(train.train_run(**kw, progress=progress))
                        run_rows.append({**training_row(setup, key, "spvr", per_mode[label][-1], rate=rate,
                                                        budget=rec["budget"], params_before=rec["params_before"],
                                                        arch=rec["arch"], facts=facts), "set": label_set})
                    calls = {lab: {kw["seed"]: kw for label, kw in runs if label == lab} for lab, _, _ in modes}
                    counted = {lab: [r["key"]["seed"] for r in per_mode[lab] if stats.run_status(
                        r.get("top1"), _classes(setup.dataset), r.get("history") or []) == "ok"] for lab in calls}
                    if on_budget:        # both networks decide the cell: read on their budget
                        convergence.prepare_on_budget(cfg, [calls[lab][s] for lab in calls for s in counted[lab]],
                                                      progress)
                except Exception as e:                    # recorded; the other models go on
                    error = f"{type(e).__name__}: {e}"
            for metric in _metrics(cfg, key):
                cells = {}
                for lab in ("FT", "TFS"):
                    statuses = [stats.run_status(r.get("top1"), _classes(setup.dataset), r.get("history") or [])
                                for r in per_mode[lab]]
                    cells[lab] = stats.split_failed([r.get(metric) for r in per_mode[lab]], statuses)
                cmp = stats.compare(cells["TFS"][0], cells["FT"][0], "TFS", "FT")
                row = {"model": key, "dataset": setup.dataset, "set": label_set, "metric": metric,
                       "params removed (%)": None if rate is None else round(100 * rate, 2),
                       "architecture": None if rec is None else rec["arch"],
                       "narrowest layer": facts.get("narrowest layer"),
                       "classifier inputs": facts.get("classifier inputs"),
                       "params": None if rec is None else rec["params_after"]}
                for lab in ("FT", "TFS"):
                    mean, std = stats.mean_std(cells[lab][0])
                    row.update({lab: stats.cell_text(*cells[lab]), f"{lab} mean": mean, f"{lab} std": std,
                                f"{lab} seeds counted": len(cells[lab][0]), f"{lab} lr": lrs[lab]})
                if rec is not None and rec["collapsed"]:
                    row["FT"] = "n/a: layers collapsed (fine-tuning needs every layer of the base)"
                    cmp = dataclasses.replace(cmp, verdict="n/a (no fine-tuning: layers collapsed)")
                if on_budget and rec is not None and error is None:
                    gains = {lab: convergence.on_budget_gain(calls[lab], metric, counted[lab], progress)
                             for lab in calls}
                    row.update({f"{lab} gain on budget": gains[lab]["gain"] for lab in gains})
                    late = [f"{lab} gains {g['gain']:+.2f}" for lab, g in gains.items() if g["converged"] is False]
                    row["converged"] = "not converged: " + "; ".join(late) if late else \
                        ("yes" if all(g["converged"] is not None for g in gains.values()) else "not read")
                row.update({"TFS - FT": cmp.diff, "95% interval": cmp.interval_text(), "verdict": cmp.verdict,
                            "paper dataset": reference.PAPER_BASE[key]["paper dataset"],
                            "paper params removed (%)": round(100 * paper["rate"]), "paper FT": paper[f"FT {metric}"],
                            "paper TFS": paper[f"TFS {metric}"], "seeds": len(seeds),
                            "status": "ok" if error is None else "failed", "error": error})
                rows.append(row)
    table = _tidy(pd.DataFrame(rows), ["params"])
    if not with_runs:
        return table
    frame = runs_frame(run_rows)
    frame.insert(frame.columns.get_loc("rate"), "set", [r["set"] for r in run_rows])
    return table, frame
