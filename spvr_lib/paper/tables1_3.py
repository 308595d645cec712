"""SPvR against the nine baselines at equal parameter budgets (Tables 1-3, Figure 1).

Every method prunes the SAME trained base network (``base_models.base_model``, seed 0) with the
SAME calibration set (``base_models.calibration``, seed 0) to the SAME parameter budget
``floor((1 - rate) * params of the base)``:

* ``"spvr"``: ``base_models.spvr_pruned`` (its cache is shared with every notebook); SPvR's
  network is always trained from scratch (fresh initialisation, Section 5.2).
* a baseline of ``baselines.BASELINES``: ``baselines.prune`` with the budget as an int, keeping the
  trained weights of the kept channels.  The pruned structure and weights are cached under
  ``data/pruned/<hash>.pt`` (``models.save_network``: weights + a JSON description) with a JSON record in the
  run cache (kind ``baseline``); a method failure (OTOv2 here) is cached as a record with
  ``status="failed"`` and its reason.

The architecture is fixed once per (model, method, rate): the pruning uses seed 0's base model and
calibration set, and seed 0 for RCP's random architecture sampling (as the paper prunes once).  Seeds
vary the training (initialisation, data order, augmentation) and the training and test subsets, drawn
with the seed as ``train.train_run`` does.

Every trained comparison uses the SAME recipe for every method (Appendix D: "Consistency was
maintained across all methods ... optimizer, scheduler, batch size, and training duration"):
``base_models.recipe(setup, lr=<the base model's searched lr>)``.  Table 2 alone searches the
learning rate for each of fine-tuning and training from scratch, as the paper says.

Comparison rule (one rule everywhere, :data:`stats.RULE`): the difference of the two means with its 95% Welch
interval from the per-seed values; "X better" only where the interval excludes 0.  A run that failed (at chance,
diverged, or fine-tuned from a dead network: :func:`stats.run_status`) is named in its cell and never averaged.
Every runs table says what each network is: its narrowest layer, the features its classifier sees and the layers
it lost (:func:`network_facts`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from spvr_lib import baselines, data, diagnostics, models, prune, store, train
from spvr_lib.budget import budget_from_keep
from spvr_lib.paper import base_models, convergence, plots, reference, stats

__all__ = ["TABLE1_METHODS", "DISPLAY_NAMES", "parameter_budget", "rcp_samples", "pruned_network",
           "trained_accuracy", "accuracy_runs", "summarize", "table1",
           "highest_uncollapsed_rate", "table2", "table3", "accuracy_figure"]

TABLE1_METHODS = (*baselines.BASELINES, "spvr")             # the paper's column order: l1 ... otov2, SPvR
ALL_METHODS = (*baselines.PRUNE_METHODS, "spvr")                      # and the original authors' variants (sensitivity table)
DISPLAY_NAMES = {**baselines.DISPLAY_NAMES, "spvr": "SPvR"}
TABLE2_GRID = tuple(round(0.05 * k, 2) for k in range(19, 0, -1))   # 0.95, 0.90, ..., 0.05

# --------------------------------------------------------------------------- validation / small helpers
def paper_method(method: str) -> str | None:
    """The paper's name of ``method`` in :mod:`reference`'s tables: Torch-Pruning's ℓ1 is the paper's ℓ1
    (Section 4.3); an original authors' variant (ours only) has none."""
    if method in baselines.AUTHORS_VARIANTS:
        return None
    return {tp_name: name for tp_name, name in baselines.AUTHORS_VARIANT_OF.items()}.get(method, method)


def _check_method(method: str) -> str:
    if method not in ALL_METHODS:
        raise ValueError(f"method={method!r}; expected one of {list(ALL_METHODS)}")
    return method


def _check_rate(rate: float) -> float:
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 < float(rate) < 1.0:
        raise ValueError(f"rate={rate!r}; expected the fraction of parameters removed, in (0, 1)")
    return round(float(rate), 6)


def _check_mode(mode: str) -> str:
    if mode not in ("finetune", "scratch"):
        raise ValueError(f"mode={mode!r}; expected 'finetune' (keep the pruned weights) or 'scratch' (re-initialise)")
    return mode


def parameter_budget(params: int, rate: float) -> int:
    """The parameter budget of every method: ``floor((1 - rate) * params)``, computed as
    ``budget.budget_from_keep(1 - rate, params)`` (the same float ``keep`` SPvR is given)."""

    return budget_from_keep(1.0 - _check_rate(rate), int(params))


def rcp_samples(cfg: Any) -> int:
    """Architectures RCP samples (``scales``: the paper's 20, Appendix D, at cpu and paper scale)."""
    return cfg.rcp_samples


# RCP's selection: a brief training of each candidate (one epoch over at most 500 images per class: with 20
# candidates per architecture, a whole epoch of the cpu scale's training set each would cost as much as
# training ten networks in full)
RCP_BRIEF_TRAINING = {"epochs": 1, "val_fraction": 0.1, "max_per_class": 500}


# NVlabs's iterative Taylor schedule (configs/imagenet_resnet50_prune72.json: 100 neurons every 30 mini-batches while
# training, then fine-tuning), scaled to the cpu scale's budgets: the pruning runs over the first quarter of the
# fine-tuning epochs in ten equal steps (one every few epochs; an epoch here is about 20 mini-batches, NVlabs's 30),
# each masking the least important channels until the parameter count has fallen by a tenth of the way to the budget;
# the remaining three quarters fine-tune the pruned network.  The whole run keeps the common epoch budget.
TAYLOR_SCHEDULE = {"prune_fraction": 0.25, "steps": 10}


def taylor_steps(epochs: int) -> list[int]:
    """The epochs after which NVlabs's schedule prunes (:data:`TAYLOR_SCHEDULE`), the last one at the end of its
    phase; as many distinct epochs as the phase allows."""
    phase = max(1, round(TAYLOR_SCHEDULE["prune_fraction"] * int(epochs)))
    steps = TAYLOR_SCHEDULE["steps"]
    return sorted({max(1, round(phase * k / steps)) for k in range(1, steps + 1)})


def taylor_iterative(cfg: Any, key: str, rate: float, seed: int, progress: bool = True) -> dict[str, Any]:
    """The original authors' Taylor (NVlabs, :class:`spvr_lib.baselines.TaylorGates`): the base network fine-tuned
    with the common recipe (fine-tuning lr, the base's images and epochs) while its channels are pruned on
    :func:`taylor_steps` down to the common budget, then fine-tuned to the end of the budget; the record (kind
    ``taylor``) holds the pruned network's scores (its test top-1 / top-5 after removing the masked channels),
    history, parameters and widths."""
    rate = _check_rate(rate)
    setup = cfg.model(key)
    base_rec = _base(cfg, key, progress)
    budget = parameter_budget(base_rec["params"], rate)
    recipe = base_models.recipe(setup, lr=model_lr(cfg, key, "finetune", progress), mode="finetune")
    tkey = {"base": base_rec["hash"], "budget": budget, "recipe": recipe.to_dict(), "seed": int(seed),
            "schedule": TAYLOR_SCHEDULE, "calib_seed": 0, "dataset": setup.dataset,
            "per_class_train": setup.train_subset, "per_class_test": setup.test_subset,
            "data_files": data.fingerprint(setup.dataset)}
    checkpoint = train.checkpoint_dir() / f"{store.cache_path(tkey, kind='taylor').stem}.pt"

    def compute() -> dict[str, Any]:
        t0 = time.perf_counter()
        torch.manual_seed(int(seed))
        model = train.load_weights(base_rec)
        x, _ = base_models.calibration(cfg, key, 0)
        gates = baselines.TaylorGates(model, x[:1])
        params_before = gates.count()
        steps = taylor_steps(recipe.epochs)
        targets = {e: round(params_before - (params_before - budget) * (i + 1) / len(steps))
                   for i, e in enumerate(steps)}
        targets[steps[-1]] = budget

        def on_epoch_end(entry: dict[str, Any]) -> None:
            # the target of the latest step epoch: a step lost to an interruption (the checkpoint of its epoch is
            # written before it) is taken at the next epoch's end, as the masks the checkpoint holds say
            done = [e for e in steps if e <= int(entry["epoch"])]
            if done and gates.count() > targets[done[-1]]:
                gates.step(targets[done[-1]])

        train_set = data.load_dataset(setup.dataset, "train", augment=recipe.augment, per_class=setup.train_subset,
                                      seed=int(seed))
        test_set = data.load_dataset(setup.dataset, "test", augment=False, per_class=setup.test_subset,
                                     seed=int(seed))
        out = train.fit(model, train_set, test_set, recipe, seed=int(seed), checkpoint=checkpoint,
                        progress=progress, on_epoch_end=on_epoch_end)
        if gates.count() > budget:              # (a step lost in the very last epoch: taken now, untrained after)
            gates.step(budget)
        pruned = gates.pruned()
        scores = train.evaluate(pruned, test_set)
        return {**network_facts(cfg, key, pruned), "top1": scores["top1"], "top5": scores.get("top5"),
                "gated top1": out["top1"], "history": out["history"], "params": int(models.count_params(pruned)),
                "budget": budget,
                "params_before": params_before, "arch": ", ".join(map(str, _conv_widths(pruned))),
                "pruning epochs": steps, "wall_s": round(time.perf_counter() - t0, 3)}

    rec = store.cached(tkey, compute, kind="taylor")
    checkpoint.unlink(missing_ok=True)
    return rec


def rcp_short_train(cfg: Any, key: str, lr: float, seed: int = 0) -> Any:
    """RCP's selection rule (Li et al. 2022): each sampled candidate is fine-tuned briefly and scored on
    held-out data.  Here: :data:`RCP_BRIEF_TRAINING` epochs of (at most ``max_per_class`` images per class of)
    the model's training set minus a stratified validation split, with the fine-tuning learning rate ``lr``
    and the common recipe, scored
    by validation top-1 (never the test set).  Returns ``short_train(model) -> float``."""
    setup = cfg.model(key)
    cap = RCP_BRIEF_TRAINING["max_per_class"]
    per_class = cap if setup.train_subset is None else min(setup.train_subset, cap)
    targets = getattr(data.load_dataset(setup.dataset, "train", per_class=setup.train_subset, seed=seed), "targets", None)
    if targets is not None and int(np.bincount(np.asarray(targets)).min()) <= per_class:
        per_class = setup.train_subset              # a class has no more than the cap: the whole training set
    augmented = data.load_dataset(setup.dataset, "train", augment=setup.augment, per_class=per_class, seed=seed)
    plain = data.load_dataset(setup.dataset, "train", augment=False, per_class=per_class, seed=seed)
    train_idx, val_idx = train.validation_split(augmented, RCP_BRIEF_TRAINING["val_fraction"], seed)
    recipe = dataclasses.replace(base_models.recipe(setup, lr=lr, mode="finetune"),
                                 epochs=RCP_BRIEF_TRAINING["epochs"])
    train_part = torch.utils.data.Subset(augmented, train_idx)
    val_part = torch.utils.data.Subset(plain, val_idx)

    def short_train(model: nn.Module) -> float:
        return float(train.fit(model, train_part, val_part, recipe, seed=seed, progress=False)["top1"])

    return short_train


def _conv_widths(model: nn.Module) -> list[int]:
    """Output channels of every Conv2d, in module order: a pruned network's per-layer widths."""
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


# --------------------------------------------------------------------------- pruned-network files
def pruned_dir() -> Path:
    """``data/pruned/``: pruned baseline networks, beside the run cache."""
    return store.cache_dir().parent / "pruned"


# --------------------------------------------------------------------------- pruning
def _base(cfg: Any, key: str, progress: bool) -> dict[str, Any]:
    return base_models.train_base(cfg, key, progress=progress)


def pruned_network(cfg: Any, key: str, method: str, rate: float, seed: int = 0,
                   progress: bool = True) -> tuple[nn.Module | None, dict[str, Any]]:
    """The network of ``method`` at ``rate`` (fraction of the base's parameters removed), and its record.

    ``"spvr"``: SPvR's architecture, freshly initialised (``base_models.spvr_model``).  A baseline:
    the base network pruned by ``baselines.prune`` to the same budget, trained weights kept (eval mode).
    ``seed``: RCP's sampling seed (the other methods are deterministic); the comparisons use 0.
    The record: method, rate, budget, params_before, params_after, status ("ok" | "failed"), error,
    notes, prune_s, arch (per-layer widths), hash.  A failed method returns (None, record with its reason).
    """
    _check_method(method)
    rate = _check_rate(rate)
    setup = cfg.model(key)
    base_rec = _base(cfg, key, progress)
    budget = parameter_budget(base_rec["params"], rate)
    if method == "spvr":
        rec = base_models.spvr_pruned(cfg, key, rate, progress=progress)
        info = {"method": method, "rate": rate, "budget": budget, "params_before": rec["params_before"],
                "params_after": rec["params_after"], "status": "ok", "error": None,
                "notes": "SPvR (base_models.spvr_pruned); trained from scratch", "prune_s": rec["prune_s"],
                "arch": rec["arch"], "hash": rec["hash"], "collapsed": rec["collapsed"]}
        if rec["params_after"] > budget:
            info.update(status="failed", error=f"SPvR's network has {rec['params_after']} parameters > the "
                                               f"common budget {budget} (its own budget: {rec['budget']})")
            return None, info
        return base_models.spvr_model(rec), info

    prune_seed = int(seed) if method == "rcp" else 0      # the other methods are deterministic
    kw = {"n_samples": rcp_samples(cfg)} if method == "rcp" else {}
    lr = float(base_rec["key"]["recipe"]["lr"])
    pkey = {"base": base_rec["hash"], "method": method, "budget": budget, "group_size": setup.group_size,
            "calib_seed": 0, "calib_per_class": setup.calib_per_class, "seed": prune_seed, "kw": kw,
            "selection": {**RCP_BRIEF_TRAINING, "lr": lr} if method == "rcp" else None}
    record_path = store.cache_path(pkey, kind="baseline")
    weights = pruned_dir() / f"{record_path.stem}.pt"
    built: dict[str, nn.Module] = {}

    def compute() -> dict[str, Any]:
        base, _ = base_models.base_model(cfg, key, progress=progress)
        calib = base_models.calibration(cfg, key, 0)
        extra = {"short_train": rcp_short_train(cfg, key, lr, prune_seed)} if method == "rcp" else {}
        res = baselines.prune(method, base, calib, keep=budget, group_size=setup.group_size, seed=prune_seed,
                              progress=progress, **kw, **extra)
        if res.status == "ok":
            models.save_network(res.model, weights, spec=base_rec["spec"])
            built["model"] = res.model.eval()
        return {"method": method, "rate": rate, "budget": res.budget, "params_before": res.params_before,
                "params_after": res.params_after, "status": res.status, "error": res.error, "details": res.details,
                "prune_s": round(res.seconds, 3), "ratio": res.ratio,
                "arch": None if res.model is None else ", ".join(map(str, _conv_widths(res.model))),
                "weights": str(weights.name)}

    # weights gone and no digest to stand in for them (a description written before digests): prune again
    stale = record_path.exists() and store.read_record(record_path).get("status") == "ok" \
        and not weights.exists() and "state_sha256" not in _description(weights)
    rec = store.cached(pkey, compute, kind="baseline", refresh=stale)
    info = {k: rec.get(k) for k in ("method", "rate", "budget", "params_before", "params_after", "status", "error",
                                    "prune_s", "arch")}
    info["notes"] = baselines.method_notes(method, rec.get("details") or "")
    info.update(hash=rec["hash"], rate=rate)     # a rate with the same budget shares the record
    if rec["status"] != "ok":
        return None, info
    return _pruned_weights_or_architecture(weights, compute, built.get("model")), info


def _pruned_weights_or_architecture(weights: Path, compute: Any, built: nn.Module | None = None) -> nn.Module:
    """A pruned baseline's network: loaded from its weights file, or, where only its description is kept (the
    committed cache holds ``<weights>.json``, not the weights), its architecture with
    :class:`~spvr_lib.train.WeightsOnDemand` as ``pruned_weights``: the digest that names it in a training's
    key, and the weights themselves pruned again (``compute``, checked against that digest) only when a
    computation reads them."""
    described = weights.with_name(weights.name + ".json")
    desc = _description(weights)
    if built is not None or weights.exists():
        model = built if built is not None else models.load_network(weights).eval()
        if "state_sha256" not in desc:           # the description names the weights by their digest from now on
            store.atomic_write_json(described, {**desc, "state_sha256": train.state_dict_digest(model.state_dict())})
        return model
    if "state_sha256" not in desc:
        compute()                                # no digest to stand in for the weights: prune again
        return models.load_network(weights).eval()
    model = models.build_network(desc["spec"], desc.get("shapes")).eval()

    def regenerate() -> dict[str, torch.Tensor]:
        compute()
        return models.load_network(weights).state_dict()

    model.pruned_weights = train.WeightsOnDemand(desc["state_sha256"], regenerate, str(weights.name))
    return model


def _description(weights: Path) -> dict[str, Any]:
    """``models.save_network``'s description of a pruned network (``<weights>.json``; {} when there is none)."""
    described = weights.with_name(weights.name + ".json")
    return json.loads(described.read_text()) if described.exists() else {}


def pruned_state(model: nn.Module) -> Mapping[str, torch.Tensor]:
    """The weights a network of :func:`pruned_network` was pruned to (what fine-tuning starts from): its state
    dict, or the :class:`~spvr_lib.train.WeightsOnDemand` standing in for it."""
    lazy = getattr(model, "pruned_weights", None)      # (not `or`: the truth of a mapping is its length, made)
    return lazy if lazy is not None else {k: v.detach().cpu() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- learning rates
FINETUNE_LR_METHOD = "l1"     # the pruned network the fine-tuning lr is searched on (at setup.table3_rate)


def finetune_lr(cfg: Any, key: str, progress: bool = True) -> tuple[float, dict[float, float]]:
    """THE learning rate of every network of model ``key`` fine-tuned from pruned weights: searched once per
    model (``base_models.searched_lr`` in mode "finetune", validation split of the training set) on the
    base network pruned by ℓ1 at ``setup.table3_rate``, starting from its kept weights.  (best, scores)."""
    setup = cfg.model(key)
    if setup.pretrained or len(base_models.lr_grid(setup, "finetune")) == 1:
        lr = float(_base(cfg, key, progress)["key"]["recipe"]["lr"]) if setup.pretrained else \
            base_models.lr_grid(setup, "finetune")[0]
        return lr, {lr: None}
    model, info = pruned_network(cfg, key, FINETUNE_LR_METHOD, setup.table3_rate, progress=progress)
    if model is None:
        raise RuntimeError(f"the fine-tuning lr of {key} is searched on {FINETUNE_LR_METHOD}'s network, which "
                           f"failed: {info['error']}")
    return base_models.searched_lr(setup, _base(cfg, key, progress)["spec"], "finetune",
                                   init_state=pruned_state(model), progress=progress,
                                   shapes=models.network_shapes(model))


def model_lr(cfg: Any, key: str, mode: str, progress: bool = True) -> float:
    """The learning rate of every network of ``key`` trained in ``mode`` ("scratch": ``base_models.scratch_lr``,
    the base network's; "finetune": :func:`finetune_lr`).  A pretrained base (the paper's ImageNet ResNet50)
    uses its setup's lr for both."""
    _check_mode(mode)
    if cfg.model(key).pretrained:
        return float(_base(cfg, key, progress)["key"]["recipe"]["lr"])
    return float(base_models.scratch_lr(cfg, key, progress)[0] if mode == "scratch" else
                 finetune_lr(cfg, key, progress)[0])


# --------------------------------------------------------------------------- side by side (paper.jobs)
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


def prepare_runs(cfg: Any, jobs_: Sequence[tuple[str, float, str, int]], mode: str, progress: bool = True) -> None:
    """Fill the run cache for the (model, rate, method, seed) runs ``jobs_`` in ``mode`` side by side
    (``paper.jobs``; nothing happens with one worker), in dependency order: base networks and their lr
    searches, SPvR's rankings, every pruned network, the fine-tuning lr searches, then the trainings."""
    from spvr_lib.paper import jobs

    workers = jobs.worker_count(cfg)
    if workers <= 1 or not jobs_:
        return
    # a model whose baselines are quoted (Section 4.2: ImageNet) trains SPvR's networks alone, from its published
    # weights' lr (no lr search, no fine-tuning lr searched on l1's network)
    jobs_ = [j for j in jobs_ if not cfg.model(j[0]).quote_baselines or j[2] == "spvr"]
    keys = sorted({k for k, *_ in jobs_})
    searched = [k for k in keys if not cfg.model(k).quote_baselines]
    base_models.prepare_bases(cfg, keys, progress)
    for k in keys:        # in this process, alone on the machine: the rankings' timings are reported (Figure 2)
        if any(m == "spvr" for kk, _, m, _ in jobs_ if kk == k):
            base_models.spvr_ranking(cfg, k, progress=progress)
    prunes = {(k, m, float(r)) for k, r, m, _ in jobs_}
    if mode == "finetune":
        prunes |= {(k, FINETUNE_LR_METHOD, float(cfg.model(k).table3_rate)) for k in searched}
    jobs.fill_cache(_prune_job, [(cfg, *p) for p in sorted(prunes)], workers, desc="pruned networks",
                    progress=progress)
    if mode == "finetune":
        trials = [(cfg, k, lr) for k in searched for lr in base_models.lr_grid(cfg.model(k), "finetune")
                  if len(base_models.lr_grid(cfg.model(k), "finetune")) > 1]
        jobs.fill_cache(_finetune_trial_job, trials, workers, desc="lr search (fine-tune)", progress=progress)
    jobs.fill_cache(trained_accuracy, [(cfg, k, m, float(r), int(s), mode) for k, r, m, s in jobs_], workers,
                    desc=f"{mode} trainings", progress=progress, kwargs={"progress": False},
                    cost=lambda job: training_cost(cfg, job[1], job[3]))


# --------------------------------------------------------------------------- training
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
    "not converged: <name> gains +x.xx" where a deciding network gains more than ``base_models.PLATEAU_POINTS``
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


@functools.lru_cache(maxsize=8)
def _classes(dataset: str) -> int:
    return data.dataset_info(dataset).num_classes


def _base_architecture(cfg: Any, key: str) -> nn.Module:
    """Model ``key``'s unpruned network, built on the meta device (its layers, no weights)."""
    with torch.device("meta"):
        return models.build_network(base_models.base_spec(cfg.model(key)))


def network_facts(cfg: Any, key: str, model: nn.Module) -> dict[str, Any]:
    """What a pruned network of model ``key`` is, for the runs tables (:func:`spvr_lib.diagnostics.layer_summary`
    against the unpruned network): narrowest layer, classifier inputs, layers removed ("k of n")."""
    facts = diagnostics.layer_summary(model, _base_architecture(cfg, key))
    total = facts["layers"] + facts["layers removed"]
    return {"narrowest layer": facts["narrowest layer"], "classifier inputs": facts["classifier inputs"],
            "layers removed": f"{facts['layers removed']} of {total}"}


def output_spread(cfg: Any, key: str, model: nn.Module, state: Mapping[str, torch.Tensor],
                  progress: bool = True) -> float:
    """:func:`spvr_lib.diagnostics.output_spread` of ``model`` with the weights ``state`` over model ``key``'s
    calibration set (seed 0): how much its logits vary with the input before fine-tuning starts (0: a dead
    network).  Cached (kind ``spread``), keyed by the weights' digest."""
    setup = cfg.model(key)
    skey = {"weights": train.state_dict_digest(state), "shapes": models.network_shapes(model),
            "calib": {"model": key, "seed": 0, "per_class": setup.calib_per_class, "dataset": setup.dataset}}

    def compute() -> dict[str, Any]:
        net = models.build_network(getattr(model, "spec", None) or _base(cfg, key, progress)["spec"],
                                   models.network_shapes(model))
        net.load_state_dict(dict(state))
        x, _ = base_models.calibration(cfg, key, 0)
        return {"spread": diagnostics.output_spread(net, x)}

    return float(store.cached(skey, compute, kind="spread")["spread"])


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


def accuracy_runs(cfg: Any, keys: Iterable[str], methods: Iterable[str], seeds: Iterable[int], mode: str,
                  rates: dict[str, Sequence[float]] | None = None, progress: bool = True) -> pd.DataFrame:
    """Every (model, rate, method, seed) run of :func:`trained_accuracy`: one row each (long format).

    ``rates``: {model key: rates}; default each setup's ``compare_rates``.  An exception in one run is
    caught and recorded as a row with status "failed" and ``error`` "<type>: <message>" (not cached:
    a rerun retries it); the other runs go on.  Finished runs come from the cache.
    """
    _check_mode(mode)
    keys, methods, seeds = list(keys), [_check_method(m) for m in methods], [int(s) for s in seeds]
    jobs = [(k, r, m, s) for k in keys for r in (rates or {}).get(k, cfg.model(k).compare_rates)
            for m in methods for s in seeds]
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


# --------------------------------------------------------------------------- Table 1
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


def _add_on_budget(cfg: Any, rows: list[dict[str, Any]], runs: pd.DataFrame, mode: str, progress: bool) -> None:
    """:func:`on_budget_columns` for every compared row of ``rows`` (those with a best baseline): SPvR and the best
    baseline of the cell, whose shorter budgets are first trained side by side."""
    from spvr_lib.paper import jobs

    cells = [(r, _METHOD_OF[r["best baseline"]]) for r in rows if r.get("best baseline")]
    todo = []
    for r, best in cells:
        rate = round(float(r["params removed (%)"]) / 100, 6)
        rsub = runs[(runs["model"] == r["model"]) & (runs["rate"] == rate)]
        for m in ("spvr", best):
            todo += [(cfg, r["model"], m, rate, int(x), mode) for x, st in
                     zip(rsub.loc[rsub["method"] == m, "seed"], rsub.loc[rsub["method"] == m, "status"]) if st == "ok"]
    todo = list({job[1:]: job for job in todo}.values())         # once each (Tables 1's two metrics share them)
    jobs.fill_cache(_on_budget_job, todo, jobs.worker_count(cfg), desc="on-budget readings", progress=progress,
                    cost=lambda job: training_cost(cfg, job[1], job[3]))
    for r, best in cells:
        rate = round(float(r["params removed (%)"]) / 100, 6)
        rsub = runs[(runs["model"] == r["model"]) & (runs["rate"] == rate)]
        r.update(on_budget_columns(cfg, r["model"], rate, mode, {"SPvR": "spvr", "best": best}, rsub, r["metric"],
                                   progress))


# --------------------------------------------------------------------------- the baselines' sensitivity table
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
    methods = [*baselines.AUTHORS_VARIANT_OF, *baselines.AUTHORS_VARIANTS, *others]
    runs = accuracy_runs(cfg, keys, methods, seeds, "finetune", rates=rates, progress=progress)
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


# --------------------------------------------------------------------------- Table 2
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
    from spvr_lib.paper import jobs

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


# --------------------------------------------------------------------------- Table 3
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


# --------------------------------------------------------------------------- Figure 1: latency


# --------------------------------------------------------------------------- figures
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


