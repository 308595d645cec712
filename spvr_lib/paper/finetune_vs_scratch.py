"""Notebook 05: Table 2, the same pruned network fine-tuned (FT) and trained from scratch (TFS), each with
its own learning rate searched on held-out data, as the paper says.
"""
from __future__ import annotations

import dataclasses

from collections.abc import Iterable, Mapping, Sequence
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


MODES = (("FT", "finetune"), ("TFS", "scratch"))   # Table 2's columns and the training modes they are
ON_BUDGET = "on-budget readings"                   # the start of the on-budget batches' words (:func:`declared_jobs`)


def declared_jobs(cfg: Any, key: str, seeds: Iterable[int] | None = None,
                  nets: Sequence[tuple[str, float | None, dict[str, Any] | None]] | None = None,
                  lrs: Mapping[str, Mapping[str, float | None]] | None = None,
                  inits: Mapping[str, Mapping[str, torch.Tensor] | None] | None = None,
                  counted: Mapping[str, Mapping[str, Sequence[int]]] | None = None) -> list[jobs.Batch]:
    """Notebook 05's independent computations for model ``key``, declared once (:func:`table2` fans them out, the
    plan counts and costs them), three batches per network of ``nets`` (:func:`table2_networks`' (set, rate,
    ``spvr_pruned`` record); a set whose record is None, every rate collapsed, has none):

    * ``Table 2 lr search``: :func:`_table2_trial_job` (cfg, key, rate, mode, lr) for every value of
      ``base_models.lr_grid(setup, mode)``, from scratch then fine-tuned (none for a one-value grid, which
      ``searched_lr`` takes as is; a network that lost layers is not fine-tuned); size (epochs, 1 - rate,
      ``lr_search.trial_share``);
    * ``Table 2 <key> (<set>)``: the ``train.train_run`` keyword arguments of every seed of ``seeds`` (default the
      scale's), fine-tuned (FT) then from scratch (TFS); a network that lost layers: TFS only; size (epochs,
      1 - rate, 1.0);
    * :data:`ON_BUDGET`: those trainings of the ``counted`` seeds trained again with 3/4 of the epochs
      (``convergence.on_budget_batch``); size (``convergence.short_epochs`` of the epochs, 1 - rate, 1.0).

    What is known only once earlier results are: ``lrs`` ({set: {"FT" | "TFS": searched lr}}), ``inits`` ({set:
    the FT state dict, the base's kept weights}) and ``counted`` ({set: {"FT" | "TFS": the seeds whose run
    counts}}).  Not given (the plan, which computes nothing), placeholders that keep a cold run's count: ``nets``
    None gives both sets at the paper's rate (:data:`reference.PAPER_TABLE2`; the rule's rate, unknown before the
    prunings, is costed at the paper's), each keeping every layer (so fine-tuned too), its spec the words
    "SPvR's <key> (<set>)"; an unknown lr is the grid's first value (the searched lr itself in a one-value grid),
    an unknown FT start None, and every seed counts."""
    setup = cfg.model(key)
    seeds = [int(s) for s in (cfg.seeds if seeds is None else seeds)]
    if nets is None:
        paper_rate = _check_rate(reference.PAPER_TABLE2[key]["rate"])
        nets = [(label_set, paper_rate, None) for label_set in TABLE2_SETS]
        placeholder = True
    else:
        nets, placeholder = [n for n in nets if n[2] is not None], False
    lrs, inits, share = lrs or {}, inits or {}, base_models.trial_share(setup)
    out = []
    for label_set, rate, rec in nets:
        spec = f"SPvR's {key} ({label_set})" if placeholder else rec["spec"]
        modes = [m for m in MODES if placeholder or not rec["collapsed"] or m[1] == "scratch"]
        # the rule's rate, unknown to the plan, is a word: its trials are not the paper's rate's
        rate_arg = f"the rate of the {label_set}" if placeholder and label_set != TABLE2_SETS[-1] else rate
        trials = [(cfg, key, rate_arg, mode, lr) for _, mode in reversed(modes)
                  for grid in [base_models.lr_grid(setup, mode)] if len(grid) > 1 for lr in grid]
        lr = {label: (lrs.get(label_set) or {}).get(label) for label, _ in modes}
        lr = {label: base_models.lr_grid(setup, mode)[0] if lr[label] is None else lr[label] for label, mode in modes}
        runs = {(label, s): dict(spec=spec, dataset=setup.dataset, recipe=base_models.recipe(setup, lr=lr[label],
                                                                                            mode=mode), seed=s,
                                 per_class_train=setup.train_subset, per_class_test=setup.test_subset,
                                 init_state=inits.get(label_set) if mode == "finetune" else None,
                                 tag=training_tag("spvr", mode), weights_needed=False)
                for label, mode in modes for s in seeds}
        read = (counted or {}).get(label_set)
        read = {label: seeds for label, _ in modes} if read is None else read
        out += [jobs.Batch(f"Table 2 lr search: SPvR's network ({label_set}) at {rate:.0%}, "
                           f"{' and '.join(m for _, m in reversed(modes))}", _table2_trial_job, tuple(trials),
                           size=lambda job, rate=rate: (setup.epochs, 1.0 - rate, share)),
                jobs.Batch(f"Table 2 {key} ({label_set}): {' and '.join(lab for lab, _ in modes)}, "
                           f"{len(seeds)} seeds", train.train_run, tuple(runs.values()),
                           size=lambda job, rate=rate: (job["recipe"].epochs, 1.0 - rate, 1.0),
                           kwargs={"progress": False}),
                convergence.on_budget_batch(cfg, [runs[lab, s] for lab, _ in modes for s in read.get(lab, [])],
                                            f"{ON_BUDGET}: Table 2's {key} ({label_set}), 3/4 of the epochs",
                                            1.0 - rate)]
    return out


def _is_on_budget(batch: jobs.Batch) -> bool:
    return batch.what.startswith(ON_BUDGET)


def _label(call: Mapping[str, Any]) -> str:
    """Table 2's column ("FT" or "TFS") of a training's ``train.train_run`` keyword arguments."""
    return {mode: label for label, mode in MODES}[call["recipe"].mode]


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
    jobs.run([b for key in keys for b in declared_jobs(cfg, key, seeds, nets[key]) if b.target is _table2_trial_job],
             jobs.worker_count(cfg), progress)
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
                    for label, mode, _ in modes:
                        lrs[label] = table2_lr(cfg, key, rec, mode, progress)[0]
                    known = dict(nets=[(label_set, rate, rec)], lrs={label_set: lrs},
                                 inits={label_set: next((st for lab, _, st in modes if lab == "FT"), None)})
                    trainings = [b for b in declared_jobs(cfg, key, seeds, **known)
                                 if b.target is train.train_run and not _is_on_budget(b)]
                    jobs.run(trainings, jobs.worker_count(cfg), progress)
                    runs = [(_label(kw), kw) for b in trainings for kw in b.jobs]
                    for label, kw in runs:
                        per_mode[label].append(train.train_run(**kw, progress=progress))
                        run_rows.append({**training_row(setup, key, "spvr", per_mode[label][-1], rate=rate,
                                                        budget=rec["budget"], params_before=rec["params_before"],
                                                        arch=rec["arch"], facts=facts), "set": label_set})
                    calls = {lab: {kw["seed"]: kw for label, kw in runs if label == lab} for lab, _, _ in modes}
                    counted = {lab: [r["key"]["seed"] for r in per_mode[lab] if stats.run_status(
                        r.get("top1"), _classes(setup.dataset), r.get("history") or []) == "ok"] for lab in calls}
                    if on_budget:        # both networks decide the cell: read on their budget
                        jobs.run([b for b in declared_jobs(cfg, key, seeds, **known, counted={label_set: counted})
                                  if _is_on_budget(b)], jobs.worker_count(cfg), progress)
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
