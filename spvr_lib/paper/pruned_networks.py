"""The pruned networks Tables 1-3 compare (notebooks 04-06): every method prunes the SAME trained base
network (``base_models.base_model``, seed 0) with the SAME calibration set to the SAME parameter budget
``floor((1 - rate) * params of the base)``.

* ``"spvr"``: ``base_models.spvr_pruned`` (its cache is shared with every notebook); SPvR's network is always
  trained from scratch (fresh initialisation, Section 5.2).
* a baseline of ``baselines.BASELINES``: ``baselines.prune`` with the budget as an int, keeping the trained
  weights of the kept channels, cached under ``data/pruned/<hash>.pt`` with a record of kind ``baseline``
  (a method failure, OTOv2 here, is cached with ``status="failed"`` and its reason); NVlabs Taylor's iterative
  pruning during fine-tuning (:func:`taylor_iterative`, kind ``taylor``).

The architecture is fixed once per (model, method, rate): seed 0's base model and calibration set, seed 0 for
RCP's sampling (the paper prunes once).  Also here: what each network is (:func:`network_facts`: its narrowest
layer, the features its classifier sees, the layers it lost), its outputs' spread before training
(:func:`output_spread`), and the learning rates (:func:`model_lr`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from spvr_lib import baselines, data, diagnostics, models, store, train
from spvr_lib.budget import budget_from_keep
from spvr_lib.paper import base_models


TABLE1_METHODS = (*baselines.BASELINES, "spvr")             # the paper's column order: l1 ... otov2, SPvR


ALL_METHODS = (*baselines.PRUNE_METHODS, "spvr")                      # and the original authors' variants (sensitivity table)


DISPLAY_NAMES = {**baselines.DISPLAY_NAMES, "spvr": "SPvR"}


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


def pruned_dir() -> Path:
    """``data/pruned/``: pruned baseline networks, beside the run cache."""
    return store.cache_dir().parent / "pruned"


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
