"""Trained runs of the pruned networks (Tables 1-3): the trainings fanned out side by side, one row per run,
the per-method summary and the compared cells.

Every trained comparison uses the SAME recipe for every method (Appendix D: "Consistency was maintained across
all methods ... optimizer, scheduler, batch size, and training duration"): ``base_models.recipe(setup, lr=<the
base model's searched lr>)``.  Seeds vary the training (initialisation, data order, augmentation) and the
training and test subsets, drawn with the seed as ``train.train_run`` does.

Comparison rule (one rule everywhere, :data:`stats.RULE`): the difference of the two means with its 95% Welch
interval from the per-seed values; "X better" only where the interval excludes 0.  A run that failed (at chance,
diverged, or fine-tuned from a dead network: :func:`stats.run_status`) is named in its cell and never averaged.
"""
from __future__ import annotations

import functools

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from torch import nn
from tqdm.auto import tqdm

from spvr_lib import baselines, data, models, train
from spvr_lib.paper import base_models, convergence, jobs, reference, stats
from spvr_lib.paper.pruned_networks import DISPLAY_NAMES, FINETUNE_LR_METHOD, _base, _check_method, _check_mode, _check_rate, _classes, model_lr, network_facts, output_spread, paper_method, parameter_budget, pruned_network, pruned_state, taylor_iterative


def _prune_job(cfg: Any, key: str, method: str, rate: float) -> None:
    pruned_network(cfg, key, method, rate, progress=False)


def _finetune_trial_job(cfg: Any, key: str, lr: float) -> None:
    setup = cfg.model(key)
    model, _ = pruned_network(cfg, key, FINETUNE_LR_METHOD, setup.table3_rate, progress=False)
    base_models.lr_trial(setup, _base(cfg, key, False)["spec"], lr, "finetune", init_state=pruned_state(model),
                         progress=False,
                         shapes=models.network_shapes(model))


def training_tag(method: str, mode: str) -> str:
    """The ``tag`` of a pruned network's training record: the method when fine-tuning (it starts from that
    method's weights), "scratch" from scratch, where the network (spec and layer shapes), recipe and seed
    alone determine the training: methods that give the same architecture (the uniform ones: ℓ1, ℓ2, FPGM,
    HRank, NISP) share one run instead of repeating it, as do Tables 1-3 and Figure 2 for one network."""
    return method if mode == "finetune" else "scratch"


def training_cost(cfg: Any, key: str, rate: float) -> tuple[int, float]:
    """How long a pruned network's training runs, for ordering jobs (``paper.jobs``, longest first):
    (the model's epochs, the fraction of parameters kept), compared in that order: epochs first, since a
    narrow network's epoch is not proportionally shorter (the per-batch overhead stays)."""
    return cfg.model(key).epochs, 1.0 - float(rate)


def training_ident(job: tuple) -> tuple:
    """What a :func:`trained_accuracy` job ``(cfg, key, method, rate, seed, mode)`` trains (``jobs.Batch.ident``): SPvR
    always from scratch; from scratch, the local methods' one architecture (``baselines.LOCAL_METHODS``: one channel
    ratio for every unit, so the same widths) is one training (:func:`training_tag`)."""
    cfg, key, method, rate, seed, mode = job
    mode = "scratch" if method == "spvr" else mode
    net = "local" if mode == "scratch" and method in baselines.LOCAL_METHODS else method
    return cfg.name, key, net, round(float(rate), 6), int(seed), mode


def accuracy_jobs(cfg: Any, key: str, runs: Sequence[tuple[float, str, int]], mode: str) -> list[jobs.Batch]:
    """The independent computations of model ``key``'s ``runs`` ((rate, method, seed) of :func:`trained_accuracy`) in
    ``mode``, in dependency order: every pruned network (and, fine-tuning, ℓ1's at ``table3_rate``, on which the
    fine-tuning lr is searched), the fine-tuning lr trials (none for a one-value grid), the trainings.  A model whose
    baselines are quoted (Section 4.2: ImageNet) trains SPvR's networks alone, at its published weights' lr."""
    setup = cfg.model(key)
    quoted = setup.quote_baselines
    runs = [(float(r), m, int(s)) for r, m, s in runs if not quoted or m == "spvr"]
    prunes = {(m, r) for r, m, _ in runs}
    grid = base_models.lr_grid(setup, "finetune")
    share = base_models.trial_share(setup)
    searched = mode == "finetune" and not quoted and runs
    if searched:
        prunes |= {(FINETUNE_LR_METHOD, float(setup.table3_rate))}
    return [jobs.Batch("pruned networks", _prune_job, tuple((cfg, key, m, r) for m, r in sorted(prunes))),
            jobs.Batch(f"lr search (fine-tune): {len(grid)} values on {DISPLAY_NAMES[FINETUNE_LR_METHOD]}'s network "
                       f"at {setup.table3_rate:.0%}", _finetune_trial_job,
                       tuple((cfg, key, lr) for lr in grid) if searched and len(grid) > 1 else (),
                       size=lambda job: (setup.epochs, 1.0 - setup.table3_rate, share)),
            jobs.Batch(f"{mode} trainings", trained_accuracy, tuple((cfg, key, m, r, s, mode) for r, m, s in runs),
                       size=lambda job: (setup.epochs, 1.0 - job[3], 1.0), kwargs={"progress": False},
                       cost=lambda job: training_cost(cfg, job[1], job[3]), ident=training_ident)]


BEST = "best baseline"      # the plan's placeholder for the method that decides a cell (known once its runs are)


def on_budget_batch(cfg: Any, key: str, cells: Sequence[tuple[float, str, Sequence[int]]], mode: str) -> jobs.Batch:
    """The on-budget readings of model ``key``'s deciding networks: ``cells`` lists (rate, method, the seeds that
    count) and each is trained again with 3/4 of the epochs (:func:`_on_budget_job`), once each.  The plan passes
    :data:`BEST` for the best baseline and every seed."""
    setup = cfg.model(key)
    todo = {(m, round(float(r), 6), int(s)): (cfg, key, m, round(float(r), 6), int(s), mode)
            for r, m, seeds in cells for s in seeds}
    return jobs.Batch("on-budget readings: SPvR and the best baseline, 3/4 of the epochs", _on_budget_job,
                      tuple(todo.values()),
                      size=lambda job: (convergence.short_epochs(setup.epochs), 1.0 - job[3], 1.0),
                      cost=lambda job: training_cost(cfg, job[1], job[3]),
                      ident=lambda job: ("on budget", *training_ident(job)))


def prepare_runs(cfg: Any, jobs_: Sequence[tuple[str, float, str, int]], mode: str, progress: bool = True) -> None:
    """Fill the run cache for the (model, rate, method, seed) runs ``jobs_`` in ``mode`` side by side
    (``paper.jobs``; nothing happens with one worker), in dependency order: base networks and their lr
    searches, SPvR's rankings, then :func:`accuracy_jobs` (every pruned network, the fine-tuning lr searches,
    the trainings)."""

    workers = jobs.worker_count(cfg)
    if workers <= 1 or not jobs_:
        return
    keys = sorted({k for k, *_ in jobs_})
    base_models.prepare_bases(cfg, keys, progress)
    for k in keys:        # in this process, alone on the machine: the rankings' timings are reported (Figure 2)
        if any(m == "spvr" for kk, _, m, _ in jobs_ if kk == k):
            base_models.spvr_ranking(cfg, k, progress=progress)
    jobs.run([b for k in keys for b in accuracy_jobs(cfg, k, [(r, m, s) for kk, r, m, s in jobs_ if kk == k], mode)],
             workers, progress)


def trained_accuracy(cfg: Any, key: str, method: str, rate: float, seed: int, mode: str,
                     progress: bool = True) -> dict[str, Any]:
    """Prune with ``method`` at ``rate``, train with the common recipe, and return the record.

    ``mode``: "finetune" keeps the pruned weights, "scratch" re-initialises (``models.reinitialize``).  SPvR always trains from scratch,
    whatever ``mode`` says (the record's ``mode`` is the one used).  The recipe is
    ``base_models.recipe(setup, lr=<the base model's searched lr>, mode)`` for every method; training
    writes a per-epoch checkpoint under ``data/checkpoints`` so an interrupted run resumes.
    Cached (kind ``compare``).  Returns: model, method, rate, seed, mode, top1, top5 (None with <= 5
    classes), params, budget, params_before, status ("ok" | "failed"), error, notes, arch, lr,
    history, wall_s.  A method that cannot prune is a cached record with status "failed"; an
    exception while training propagates (nothing is cached, so a rerun retries).
    """
    _check_method(method)
    rate = _check_rate(rate)
    _check_mode(mode)
    mode = "scratch" if method == "spvr" else mode         # SPvR trains from scratch (Section 5.2)
    setup = cfg.model(key)
    base_rec = _base(cfg, key, progress)
    if method == "taylor" and mode == "finetune":           # NVlabs prunes while fine-tuning
        return _taylor_row(cfg, key, rate, seed, progress)
    lr = model_lr(cfg, key, mode, progress)
    recipe = base_models.recipe(setup, lr=lr, mode=mode)
    budget = parameter_budget(base_rec["params"], rate)
    model, info = pruned_network(cfg, key, method, rate, seed=0, progress=progress)
    out = {"model": key, "method": method, "rate": rate, "seed": int(seed), "mode": mode, "lr": lr,
           "epochs": recipe.epochs, "train images": train_images(setup), "test images": base_models.test_images_of(setup),
           "budget": budget, "params_before": info["params_before"], "params": info["params_after"],
           "status": "failed: could not prune" if info["status"] != "ok" else "ok", "error": info["error"],
           "notes": info["notes"], "arch": info["arch"], "prune_hash": info["hash"], "top1": None, "top5": None,
           "history": []}
    if info["status"] != "ok":
        return out
    out.update(network_facts(cfg, key, model))
    call = _training_call(cfg, key, method, mode, seed, model, recipe)
    dead = None
    if call["init_state"] is not None:           # checked before training: does its output depend on its input?
        out["output spread"] = output_spread(cfg, key, model, call["init_state"], progress)
        dead = out["output spread"] <= stats.DEAD_SPREAD
    rec = train.train_run(**call, progress=progress)
    out.update(top1=rec["top1"], top5=rec["top5"], history=rec["history"], wall_s=rec["wall_s"], hash=rec["hash"],
               status=stats.run_status(rec["top1"], _classes(setup.dataset), rec["history"], dead))
    return out


def scratch_call(cfg: Any, key: str, spec: dict, seed: int, lr: float) -> dict[str, Any]:
    """:func:`train_from_scratch`'s ``train.train_run`` keyword arguments."""
    setup = cfg.model(key)
    return dict(spec=spec, dataset=setup.dataset, recipe=base_models.recipe(setup, lr=lr), seed=int(seed),
                per_class_train=setup.train_subset, per_class_test=setup.test_subset, tag="scratch",
                weights_needed=False)


def train_from_scratch(cfg: Any, key: str, spec: dict, seed: int, lr: float, progress: bool = True) -> dict[str, Any]:
    """Train ``spec`` from scratch (fresh init) with model ``key``'s recipe at ``lr`` on its data subsets (Figure 2's
    networks, Table 4's); the cached ``train.train_run`` record (the one SPvR's network of Tables 1-3 has too)."""
    return train.train_run(**scratch_call(cfg, key, spec, seed, lr), progress=progress)


def _taylor_row(cfg: Any, key: str, rate: float, seed: int, progress: bool) -> dict[str, Any]:
    """:func:`trained_accuracy`'s record for NVlabs's Taylor (pruned while fine-tuning: :func:`taylor_iterative`)."""
    setup = cfg.model(key)
    rec = taylor_iterative(cfg, key, rate, seed, progress)
    facts = {k: rec[k] for k in ("narrowest layer", "classifier inputs", "layers removed")}
    return {"model": key, "method": "taylor", "rate": rate, "seed": int(seed), "mode": "finetune",
            "lr": rec["key"]["recipe"]["lr"], "epochs": rec["key"]["recipe"]["epochs"],
            "train images": train_images(setup), "test images": base_models.test_images_of(setup),
            "budget": rec["budget"], "params_before": rec["params_before"], "params": rec["params"],
            "status": "failed: over budget" if rec["params"] > rec["budget"] else
            stats.run_status(rec["top1"], _classes(setup.dataset), rec["history"]), "error": None,
            "notes": baselines.method_notes("taylor", f"Pruned while fine-tuning after epochs {rec['pruning epochs']} "
                                                      "(NVlabs's schedule, scaled: TAYLOR_SCHEDULE)."),
            "arch": rec["arch"], "prune_hash": rec["hash"], "top1": rec["top1"], "top5": rec["top5"],
            "history": rec["history"], "wall_s": rec["wall_s"], "hash": rec["hash"], **facts}


def _training_call(cfg: Any, key: str, method: str, mode: str, seed: int, model: nn.Module,
                   recipe: train.Recipe) -> dict[str, Any]:
    """The keyword arguments of the one cached ``train.train_run`` of a pruned network: SPvR's described by its
    spec, a baseline's by the base spec and its layer shapes (fine-tuning starts from its weights, scratch
    re-initialises)."""
    setup = cfg.model(key)
    spec = getattr(model, "spec", None) or _base(cfg, key, False)["spec"]
    return dict(spec=spec, dataset=setup.dataset, recipe=recipe, seed=int(seed), per_class_train=setup.train_subset,
                per_class_test=setup.test_subset, init_state=pruned_state(model) if mode == "finetune" else None,
                tag=training_tag(method, mode), shapes=None if hasattr(model, "spec") else models.network_shapes(model),
                weights_needed=False)


def training_call(cfg: Any, key: str, method: str, rate: float, seed: int, mode: str,
                  progress: bool = True) -> dict[str, Any] | None:
    """The ``train.train_run`` keyword arguments of :func:`trained_accuracy`'s training (None where the method
    could not prune): what the on-budget reading trains again with 3/4 of the epochs."""
    _check_mode(mode)
    mode = "scratch" if method == "spvr" else mode
    model, info = pruned_network(cfg, key, method, _check_rate(rate), seed=0, progress=progress)
    if info["status"] != "ok":
        return None
    recipe = base_models.recipe(cfg.model(key), lr=model_lr(cfg, key, mode, progress), mode=mode)
    return _training_call(cfg, key, method, mode, seed, model, recipe)


def on_budget_columns(cfg: Any, key: str, rate: float, mode: str, roles: Mapping[str, str], runs: pd.DataFrame,
                      metric: str, progress: bool = True) -> dict[str, Any]:
    """The on-budget reading of the networks that decide a cell (``roles``: {label: method}, e.g. {"SPvR": "spvr",
    "best": "curl"}), each trained again with 3/4 of its epochs on the seeds that count in ``runs`` (the cell's
    runs): "<label> gain on budget" (points of ``metric``, paired by seed) and "converged": "yes", or
    "not converged: <name> gains +x.xx" where a deciding network gains more than ``scales.PLATEAU_POINTS``
    (the verdict is qualified, never deleted)."""
    out: dict[str, Any] = {}
    unconverged = []
    for label, method in roles.items():
        sub = runs[runs["method"] == method]
        counted = [int(s) for s, st in zip(sub["seed"], sub["status"]) if st == "ok"]
        calls = {s: training_call(cfg, key, method, rate, s, mode, progress) for s in counted}
        calls = {s: c for s, c in calls.items() if c is not None}
        g = convergence.on_budget_gain(calls, metric, progress=progress) if calls else {"gain": None,
                                                                                        "converged": None}
        out[f"{label} gain on budget"] = g["gain"]
        if g["converged"] is False:
            unconverged.append(f"{DISPLAY_NAMES[method]} gains {g['gain']:+.2f}")
    out["converged"] = "not converged: " + "; ".join(unconverged) if unconverged else \
        ("yes" if all(out[f"{label} gain on budget"] is not None for label in roles) else "not read")
    return out


def _on_budget_job(cfg: Any, key: str, method: str, rate: float, seed: int, mode: str) -> None:
    """One shorter training of a deciding network (``paper.jobs``: built in the worker from picklable arguments,
    so that weights kept only by their digest are pruned again there when needed)."""
    call = training_call(cfg, key, method, rate, seed, mode, progress=False)
    if call is not None:
        train.train_run(**convergence.shorter_call(call), progress=False)


_RUN_COLUMNS = ("model", "dataset", "rate", "params removed (%)", "removed (%)", "method", "name", "seed", "mode",
                "epochs", "train images", "test images", "lr", "top1", "top5", "status", "narrowest layer",
                "classifier inputs", "layers removed", "output spread", "params", "budget", "params_before", "error",
                "notes", "arch", "wall_s")


def training_row(setup: Any, model: str, method: str, record: dict[str, Any], *, rate: float | None = None,
                 budget: int | None = None, params_before: int | None = None, arch: str | None = None,
                 name: str | None = None, facts: Mapping[str, Any] | None = None,
                 dead: bool | None = None) -> dict[str, Any]:
    """One row of a runs table (the columns of Table 1's) for a ``train.train_run`` record of ``setup``'s data:
    its recipe (mode, epochs, lr), training and test images, scores, its :func:`stats.run_status` (``dead``: its
    starting network's output did not depend on its input), what the network is (``facts``:
    :func:`network_facts`), its parameters against ``budget`` and the achieved removal from ``params_before``."""
    rcp = record["key"]["recipe"]
    params = record.get("params")
    return {"model": model, "dataset": setup.dataset, "rate": rate,
            "params removed (%)": None if rate is None else round(100 * rate, 2),
            "removed (%)": None if params is None or not params_before else round(100 * (1 - params / params_before), 2),
            "method": method, "name": name or DISPLAY_NAMES.get(method, method), "seed": record["key"]["seed"],
            "mode": rcp["mode"], "epochs": rcp["epochs"], "train images": train_images(setup),
            "test images": base_models.test_images_of(setup), "lr": rcp["lr"], "top1": record.get("top1"),
            "top5": record.get("top5"),
            "status": stats.run_status(record.get("top1"), _classes(setup.dataset), record.get("history") or [], dead),
            **{k: (facts or {}).get(k) for k in ("narrowest layer", "classifier inputs", "layers removed")},
            "params": params, "budget": budget, "params_before": params_before, "error": None,
            "arch": arch, "wall_s": record.get("wall_s")}


def runs_frame(rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """A runs table from :func:`training_row` rows (Table 1's columns but ``notes``)."""
    return _nullable_ints(pd.DataFrame(list(rows), columns=[c for c in _RUN_COLUMNS if c != "notes"]))


@functools.lru_cache(maxsize=32)
def _train_images(dataset: str, per_class: int | None) -> int:
    return len(data.load_dataset(dataset, "train", per_class=per_class))


def train_images(setup: Any) -> int:
    """How many training images a network of ``setup`` is trained on (the runs tables' "train images")."""
    return _train_images(setup.dataset, setup.train_subset)


def run_list(cfg: Any, key: str, methods: Iterable[str], seeds: Iterable[int],
             rates: Sequence[float] | None = None) -> list[tuple[float, str, int]]:
    """The (rate, method, seed) runs of model ``key`` a table trains: every method at every rate (default the
    setup's ``compare_rates``) and seed, in that order."""
    methods, seeds = list(methods), list(seeds)
    return [(r, m, s) for r in (cfg.model(key).compare_rates if rates is None else rates) for m in methods
            for s in seeds]


def accuracy_runs(cfg: Any, keys: Iterable[str], methods: Iterable[str], seeds: Iterable[int], mode: str,
                  rates: dict[str, Sequence[float]] | None = None, progress: bool = True) -> pd.DataFrame:
    """Every (model, rate, method, seed) run of :func:`trained_accuracy`: one row each (long format).

    ``rates``: {model key: rates}; default each setup's ``compare_rates``.  An exception in one run is
    caught and recorded as a row with status "failed" and ``error`` "<type>: <message>" (not cached:
    a rerun retries it); the other runs go on.  Finished runs come from the cache.
    """
    _check_mode(mode)
    keys, methods, seeds = list(keys), [_check_method(m) for m in methods], [int(s) for s in seeds]
    jobs = [(k, r, m, s) for k in keys for r, m, s in run_list(cfg, k, methods, seeds, (rates or {}).get(k))]
    prepare_runs(cfg, [(k, r, m, s) for k, r, m, s in jobs], mode, progress=progress)
    rows = []
    for k, r, m, s in tqdm(jobs, desc=f"{mode} runs", disable=not progress):
        if cfg.model(k).quote_baselines and m != "spvr":    # Section 4.2: ImageNet baselines as published
            rows.append({**{c: None for c in _RUN_COLUMNS}, **quoted_run(cfg, k, m, r, s, mode),
                         "dataset": cfg.model(k).dataset, "params removed (%)": round(100 * r, 2),
                         "name": DISPLAY_NAMES[m]})
            continue
        try:
            rec = trained_accuracy(cfg, k, m, r, s, mode, progress=False)
        except Exception as e:                        # recorded, not cached: the rerun retries it
            err = f"{type(e).__name__}: {e} (not cached; a rerun retries)"
            rec = {"model": k, "method": m, "rate": round(float(r), 6), "seed": s, "mode": mode,
                   "status": f"failed: {err}", "error": err}
        achieved = None if rec.get("params") is None or not rec.get("params_before") else \
            round(100 * (1 - rec["params"] / rec["params_before"]), 2)
        rows.append({**{c: rec.get(c) for c in _RUN_COLUMNS}, "dataset": cfg.model(k).dataset,
                     "params removed (%)": round(100 * rec["rate"], 2), "removed (%)": achieved,
                     "name": DISPLAY_NAMES[m]})
    return _nullable_ints(pd.DataFrame(rows, columns=list(_RUN_COLUMNS)))


def quoted_run(cfg: Any, key: str, method: str, rate: float, seed: int, mode: str) -> dict[str, Any]:
    """A baseline's row where the paper quotes its published number instead of training it (ImageNet):
    status "quoted" with the paper's top-1 / top-5 (Table 1 for fine-tuning, Table 3 for training from
    scratch), or "not reported" where the paper prints "-"."""
    table = reference.PAPER_TABLE1 if mode == "finetune" else reference.PAPER_TABLE3
    vals = table.get((key, round(float(rate), 2), paper_method(method)), {})
    reported = vals.get("top1") is not None or vals.get("top5") is not None
    return {"model": key, "method": method, "rate": round(float(rate), 6), "seed": int(seed), "mode": mode,
            "top1": vals.get("top1"), "top5": vals.get("top5"), "status": "quoted" if reported else "not reported",
            "error": None if reported else "the paper reports no number for this cell",
            "notes": "published number quoted by the paper (Section 4.2); not trained here"}


def _errors(sub: pd.DataFrame) -> str | None:
    errs = sorted({str(e) for e in sub.loc[sub["status"] != "ok", "error"] if e is not None})
    return " | ".join(errs) or None


COUNTED = ("ok", "quoted")        # the run statuses whose numbers enter a mean


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (model, rate, method): top1/top5 mean and std over the seeds that count (status "ok", or "quoted";
    a failed run, :func:`stats.run_status`, never enters a mean), their per-seed values ("top1 seeds"),
    ``n_ok`` of ``n_runs``, ``failed runs`` ("2 of 3 seeds (1 diverged)", :func:`stats.seeds_note`), status ("ok",
    "partial", "failed" when no seed counts, "quoted", "not reported"), error (distinct reasons)."""
    rows = []
    for (model, rate, method), sub in runs.groupby(["model", "rate", "method"], sort=False):
        ok = sub[sub["status"].isin(COUNTED)]
        failed = [str(v).removeprefix("failed: ") for v in sub["status"] if str(v).startswith("failed")]
        row = {"model": model, "dataset": sub["dataset"].iloc[0], "rate": rate,
               "params removed (%)": round(100 * rate, 2), "method": method, "name": DISPLAY_NAMES[method],
               "mode": sub["mode"].iloc[0]}
        for metric in ("top1", "top5"):
            v = pd.to_numeric(ok[metric], errors="coerce").dropna()
            row[f"{metric} mean"] = float(v.mean()) if len(v) else np.nan
            row[f"{metric} std"] = float(v.std(ddof=1)) if len(v) > 1 else np.nan
            row[f"{metric} seeds"] = " / ".join(f"{x:.2f}" for x in v) or None
        params = pd.to_numeric(ok["params"], errors="coerce").dropna()
        quoted = sub["status"].nunique() == 1 and sub["status"].iloc[0] in ("quoted", "not reported")
        row.update({"params": int(params.iloc[0]) if len(params) else None,
                    "budget": sub["budget"].dropna().iloc[0] if sub["budget"].notna().any() else None,
                    "n_ok": len(ok), "n_runs": len(sub), "failed runs": stats.seeds_note(len(ok), failed) or None,
                    "status": (sub["status"].iloc[0] if quoted else
                               "ok" if len(ok) == len(sub) else ("failed" if ok.empty else "partial")),
                    "error": _errors(sub)})
        for col in ("narrowest layer", "classifier inputs", "layers removed"):
            if col in sub:
                known = sub[col].dropna()
                row[col] = known.iloc[0] if len(known) else None
        rows.append(row)
    return _nullable_ints(pd.DataFrame(rows))


def _paper_fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _counted(runs: pd.DataFrame, method: str, metric: str) -> tuple[list[float], list[str]]:
    """(the counted per-seed values of ``metric``, the failure causes of the other runs) of ``method`` in
    ``runs`` (one cell), in seed order."""
    sub = runs[runs["method"] == method].sort_values("seed")
    vals = [float(v) for v, st in zip(sub[metric], sub["status"]) if st in COUNTED and pd.notna(v)]
    failed = [str(st).removeprefix("failed: ") for st in sub["status"] if str(st).startswith("failed")]
    return vals, failed


def _cell(runs: pd.DataFrame, method: str, metric: str) -> str:
    sub = runs[runs["method"] == method]
    if sub.empty or (sub["status"] == "not reported").all():
        return "-"
    if (sub["status"] == "quoted").all():
        v = pd.to_numeric(sub[metric], errors="coerce").dropna()
        return f"{v.iloc[0]:.2f} (quoted)" if len(v) else "-"
    if (sub["status"] == "failed: could not prune").all():
        return "failed: could not prune"
    return stats.cell_text(*_counted(runs, method, metric))


def _comparison_row(sub: pd.DataFrame, runs: pd.DataFrame, metric: str, methods: Sequence[str]) -> dict[str, Any]:
    """Method cells (:func:`stats.cell_text`: mean ± std and the per-seed values of the runs that count, the
    failed ones named), the best baseline (highest mean over its counted seeds), SPvR's difference to it with the
    95% interval and the verdict of :data:`stats.RULE`."""
    row: dict[str, Any] = {DISPLAY_NAMES[m]: _cell(runs, m, metric) for m in methods}
    by_method = sub.set_index("method")
    ok = by_method[(by_method["n_ok"] > 0) & by_method[f"{metric} mean"].notna()]
    others = ok.drop(index="spvr", errors="ignore")
    if "spvr" in ok.index and len(others):
        best = others[f"{metric} mean"].idxmax()
        cmp = stats.compare(_counted(runs, "spvr", metric)[0], _counted(runs, best, metric)[0], "SPvR",
                            DISPLAY_NAMES[best])
        row.update({"best baseline": DISPLAY_NAMES[best], "SPvR - best": cmp.diff,
                    "95% interval": cmp.interval_text(), "verdict": cmp.verdict})
    else:
        row.update({"best baseline": None, "SPvR - best": None, "95% interval": None,
                    "verdict": "n/a (SPvR or every baseline failed)"})
    row["failures"] = _failures({m: by_method.loc[m, "error"] for m in by_method.index
                                 if by_method.loc[m, "status"] not in ("ok", "quoted", "not reported")
                                 and by_method.loc[m, "error"] is not None})
    return row


def _failures(errors: dict[str, str | None], width: int = 110) -> str | None:
    """"ℓ1, ℓ2: <reason>; OTOv2: <reason>": methods grouped by identical reason, each reason cut to ``width``
    characters (the full reasons are in the per-run table)."""
    by_reason: dict[str, list[str]] = {}
    for m, err in errors.items():
        by_reason.setdefault(str(err), []).append(DISPLAY_NAMES[m])
    short = {r: r if len(r) <= width else r[:width - 1].rstrip() + "…" for r in by_reason}
    return "; ".join(f"{', '.join(names)}: {short[r]}" for r, names in by_reason.items()) or None


def _nullable_ints(df: pd.DataFrame, columns: Sequence[str] = ("params", "budget", "params_before", "seed",
                                                                  "batch_size", "runs", "threads")) -> pd.DataFrame:
    """Count columns as pandas' nullable Int64 (a failed run's missing count does not turn them into floats)."""
    return df.astype({c: "Int64" for c in columns if c in df})


def _tidy(df: pd.DataFrame, int_columns: Sequence[str] = ()) -> pd.DataFrame:
    """Missing values as None (empty cells in CSV and Markdown), ``int_columns`` as ints (not 1.9e+04)."""
    out = df.astype(object).where(df.notna(), None)
    for c in int_columns:
        if c in out:
            out[c] = pd.Series([None if v is None else int(v) for v in out[c]], dtype=object, index=out.index)
    return out


def _metrics(cfg: Any, key: str) -> list[str]:

    return ["top1", "top5"] if data.dataset_info(cfg.model(key).dataset).num_classes > 5 else ["top1"]
