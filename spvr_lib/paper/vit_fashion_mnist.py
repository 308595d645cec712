"""Notebook 14: a small ViT on Fashion-MNIST, pruned by SPvR and by Torch-Pruning's head and neuron pruning to the
same parameter budgets, each retrained with the same budget (the paper's protocol), three seeds.

* The network: torchvision's ``VisionTransformer`` (32x32 input, 4x4 patches) whose patch embedding takes the
  dataset's channels (:func:`build_vit`: Fashion-MNIST is grey, so ``conv_proj`` has 1 input channel); rebuilt
  from ``{"model_file": <this file>:build_vit, "kwargs": ...}`` (:func:`source`), so that ``models.build_pruned``
  rebuilds every pruned network from its plan.  Sizes per scale: ``scales.vit_setup``.
* Training: :func:`vit_run`, ``train_run``'s cached record (kind ``vit_train``) for a network that is no spec:
  ``train.fit`` (the one loop: SGD, momentum 0.9, cosine annealing, per-epoch checkpoints under
  ``data/checkpoints``), the weights beside them.  The learning rates come from a grid search on held-out
  training images (``lr_search.validation_images``, never the test set): from scratch on the base network, and
  for fine-tuning on Torch-Pruning magnitude's network at the smallest keep (as Table 1's on ℓ1's).
* SPvR: ``spvr_prune`` on the trained base (its ranking cached, kind ``vit_ranking``; the graph engine's units
  are the attention heads and the MLP neurons, the embedding width is not pruned), retrained FROM SCRATCH.
* Torch-Pruning (:mod:`.vit_tp`): its ``MetaPruner`` with ``prune_num_heads=True, prune_head_dims=False`` and
  ``GroupMagnitudeImportance(p=2)`` or ``GroupTaylorImportance``, one ratio for heads and neurons bisected to the
  budget, FINE-TUNED from the kept weights (as the paper's protocol does for its baselines).
* The table: per budget and method, parameters against the budget, what collapsed, per-seed top-1
  (``stats.cell_text``), the difference to SPvR with its 95% interval (``stats.compare``), failed runs named and
  never averaged (``stats.run_status``), batch-1 one-thread latency (``latency_vs_accuracy.timed_together``).
* The fan-out (:func:`declared_jobs`, :func:`prepare`): the lr trials, the base and every training run side by side
  in the scale's ``jobs.worker_count`` processes (or as Slurm jobs); the prunings run in the notebook's process.

Cost at the cpu scale, cold, ESTIMATED (not measured: the machine was busy with another regeneration, so the cpu
scale was not run): one training step of the cpu ViT (batch 128, one thread) took 0.99 s on this 2-core machine
under a load average of 5, so one 30-epoch training on 1,500 images costs ~360 s, plus ~12% for the test passes
(2,000 images, about 8 times); the notebook trains 3 lr trials, the base, its 3/4-epoch reading, 2 fine-tuning lr
trials on a 20% network (~0.3 of a base training each) and 18 pruned networks (~0.6 of one at keep 50%, ~0.3 at
20%): ~13.5 base trainings, ~5,400 s; the ranking took ~4-5 minutes by the naive path (528 forward passes of 200
images, ~2.6 ms per image; the fast path, which now runs on transformers, takes less), Torch-Pruning's bisections ~1 minute, the latency seconds: ~5,800 s, ~1.6
machine-hours, under the issue's 2 (an unloaded machine should be faster).  The smoke scale runs in 75-80 s.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.stats
import torch
from torch import nn

from spvr_lib import data, diagnostics, models, store, train
from spvr_lib.paper import jobs, latency_vs_accuracy, plots, scales, stats
from spvr_lib.paper.lr_search import recipe, trial_share, validation_images
from spvr_lib.paper.scales import ViTSetup, get_scale, vit_setup
from spvr_lib.paper.vit_tp import TP_METHODS, tp_prune
from spvr_lib.prune import GroupRanking, rank_groups, spvr_prune

NOTEBOOK = "14_vit_fashion_mnist"
METHODS = ("spvr", *TP_METHODS)
NAMES = {"spvr": "SPvR", "tp_l2": "TP magnitude (p=2)", "tp_taylor": "TP Taylor"}
MODES = {"spvr": "scratch", "tp_l2": "finetune", "tp_taylor": "finetune"}
FINETUNE_LR_METHOD = "tp_l2"      # the network the fine-tuning lr is searched on (at the smallest keep)


def setup(scale: str) -> ViTSetup:
    """Notebook 14's settings at ``scale`` (``scales.vit_setup``)."""
    return vit_setup(scale)


# --------------------------------------------------------------------------- the network
def build_vit(num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int, patch_size: int = 4,
              image_size: int = 32, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """torchvision's ``VisionTransformer`` for ``in_channels`` x ``image_size`` x ``image_size`` images (input
    [n, in_channels, 32, 32] -> logits [n, num_classes]): its patch embedding ``conv_proj`` takes ``in_channels``
    (torchvision's takes 3).  The builder ``models.build_source`` calls (:func:`source`)."""
    import torchvision

    model = torchvision.models.VisionTransformer(image_size=image_size, patch_size=patch_size, num_layers=num_layers,
                                                 num_heads=num_heads, hidden_dim=hidden_dim, mlp_dim=mlp_dim,
                                                 num_classes=num_classes)
    if in_channels != 3:
        model.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
    return model


def vit_kwargs(cfg: ViTSetup) -> dict[str, int]:
    """:func:`build_vit`'s arguments for ``cfg`` (the dataset says the channels, size and classes)."""
    info = data.dataset_info(cfg.dataset)
    return {"num_layers": cfg.num_layers, "num_heads": cfg.num_heads, "hidden_dim": cfg.hidden_dim,
            "mlp_dim": cfg.mlp_dim, "patch_size": cfg.patch_size, "image_size": int(info.image_size),
            "in_channels": int(info.in_channels), "num_classes": int(info.num_classes)}


def source(cfg: ViTSetup) -> dict[str, Any]:
    """How ``models.build_source`` rebuilds the original ViT (``spvr_prune``'s ``source``; a plan's)."""
    return {"model_file": f"{Path(__file__).resolve()}:build_vit", "kwargs": vit_kwargs(cfg)}


def _source_key(cfg: ViTSetup) -> dict[str, Any]:
    """The network in cache keys: the builder by module and name, not by this checkout's path."""
    return {"builder": f"{__name__}:build_vit", "kwargs": vit_kwargs(cfg)}


def network(cfg: ViTSetup, plan: Mapping[str, Any] | None = None) -> nn.Module:
    """The original ViT (``plan`` None) or the pruned one a plan describes, freshly initialised."""
    return build_vit(**vit_kwargs(cfg)) if plan is None else models.build_pruned(source(cfg), plan)


def vit_reinit(model: nn.Module) -> nn.Module:
    """Re-initialise a (pruned) ViT in place, as torchvision initialises one: ``models.reinitialize`` for the
    layers that have an init, the packed q/k/v of ``nn.MultiheadAttention``, the class token at 0 and the
    position embedding N(0, 0.02)."""
    models.reinitialize(model, strict=False)
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m._reset_parameters()
        if isinstance(getattr(m, "class_token", None), nn.Parameter):
            nn.init.zeros_(m.class_token)
        if isinstance(getattr(m, "pos_embedding", None), nn.Parameter):
            nn.init.normal_(m.pos_embedding, std=0.02)
    return model


# --------------------------------------------------------------------------- the cached training run
def _datasets(cfg: ViTSetup, seed: int, augment: bool) -> tuple[Any, Any]:
    train_set = data.load_dataset(cfg.dataset, "train", augment=augment, per_class=cfg.train_subset, seed=seed)
    test_set = data.load_dataset(cfg.dataset, "test", augment=False, per_class=cfg.test_subset, seed=seed)
    return train_set, test_set


def vit_run(cfg: ViTSetup, plan: Mapping[str, Any] | None, rcp: train.Recipe, seed: int, tag: str,
            init_state: Mapping[str, torch.Tensor] | None = None, progress: bool = False) -> dict[str, Any]:
    """``train.train_run`` for the ViT: the network (:func:`network` of ``plan``) trained with ``rcp`` on the
    setup's images (``seed`` draws them and the training), scored on its test images; cached (kind
    ``vit_train``, keyed by the network, recipe, seed, tag, data and the digest of ``init_state``, which only
    ``mode="finetune"`` takes).  Record: top1, top5, loss, history, epochs, params, wall_s, weights (the final
    state dict), plan."""
    if init_state is not None and rcp.mode != "finetune":
        raise ValueError(f"init_state is given but recipe.mode={rcp.mode!r}: expected 'finetune'")
    key = {"network": _source_key(cfg), "plan": dict(plan) if plan else None, "dataset": cfg.dataset,
           "per_class_train": cfg.train_subset, "per_class_test": cfg.test_subset, "recipe": rcp.to_dict(),
           "seed": int(seed), "tag": tag, "init": None if init_state is None else train.state_dict_digest(init_state),
           "data_files": data.fingerprint(cfg.dataset)}
    stem = store.cache_path(key, kind="vit_train").stem
    resume, final = train.checkpoint_dir() / f"{stem}.pt", train.checkpoint_dir() / f"{stem}.final.pt"

    def compute() -> dict[str, Any]:
        t0 = time.perf_counter()
        torch.manual_seed(int(seed))
        model = network(cfg, plan)
        if init_state is not None:
            model.load_state_dict(dict(init_state), strict=True)
        train_set, test_set = _datasets(cfg, int(seed), rcp.augment)
        out = train.fit(model, train_set, test_set, rcp, seed=int(seed), checkpoint=resume, progress=progress,
                        reinit=vit_reinit)
        store.atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, final)
        return {**out, "params": int(models.count_params(model)), "wall_s": round(time.perf_counter() - t0, 3),
                "weights": store.repo_relative(final), "plan": dict(plan) if plan else None}

    exists = store.cache_path(key, kind="vit_train").exists()
    record = store.cached(key, compute, kind="vit_train", refresh=exists and not final.exists())
    resume.unlink(missing_ok=True)
    return record


def load_run(cfg: ViTSetup, record: Mapping[str, Any]) -> nn.Module:
    """The trained network of a :func:`vit_run` record (CPU, eval mode)."""
    path = Path(record["weights"])
    path = path if path.is_absolute() else store.REPO_ROOT / path
    model = network(cfg, record.get("plan"))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def lr_trial(cfg: ViTSetup, lr: float, mode: str, plan: Mapping[str, Any] | None = None,
             init_state: Mapping[str, torch.Tensor] | None = None, progress: bool = False) -> dict[str, Any]:
    """One point of a learning-rate grid: the network trained at ``lr`` on ``lr_search.validation_images``
    (held-out training images, never the test set), scored by validation top-1 (0 when it diverged); cached
    (kind ``vit_lrtrial``)."""
    rcp = recipe(cfg, lr=float(lr), mode=mode)
    key = {"network": _source_key(cfg), "plan": dict(plan) if plan else None, "dataset": cfg.dataset,
           "per_class_train": cfg.train_subset, "recipe": rcp.to_dict(), "val_per_class": cfg.val_per_class,
           "val_fraction": cfg.val_fraction, "init": None if init_state is None else
           train.state_dict_digest(init_state), "data_files": data.fingerprint(cfg.dataset)}

    def compute() -> dict[str, Any]:
        train_part, val_part = validation_images(cfg, 0)
        torch.manual_seed(0)
        model = network(cfg, plan)
        if init_state is not None:
            model.load_state_dict(dict(init_state), strict=True)
        out = train.fit(model, train_part, val_part, rcp, seed=0, progress=progress, reinit=vit_reinit)
        diverged = not all(np.isfinite(h["train_loss"]) for h in out["history"])
        return {"lr": float(lr), "val_top1": 0.0 if diverged else float(out["top1"]), "history": out["history"],
                "train images": len(train_part), "val images": len(val_part)}

    return store.cached(key, compute, kind="vit_lrtrial")


def searched_lr(cfg: ViTSetup, mode: str, plan: Mapping[str, Any] | None = None,
                init_state: Mapping[str, torch.Tensor] | None = None, progress: bool = False
                ) -> tuple[float, dict[float, float | None]]:
    """(best lr, {lr: validation top-1}) over the setup's grid for ``mode``; ties go to the smaller lr; a
    one-value grid is taken as is, untrained."""
    grid = [float(v) for v in (cfg.lr_grid if mode == "scratch" else cfg.finetune_lr_grid)]
    if len(grid) == 1:
        return grid[0], {grid[0]: None}
    scores = {lr: lr_trial(cfg, lr, mode, plan, init_state, progress)["val_top1"] for lr in grid}
    return max(sorted(scores), key=lambda lr: scores[lr]), scores


# --------------------------------------------------------------------------- base network
def base_with_epochs(cfg: ViTSetup, epochs: int, progress: bool = False) -> dict[str, Any]:
    """The base ViT (seed 0, the lr searched from scratch) trained for ``epochs`` with a complete cosine schedule:
    :func:`base_run`'s record at the setup's epochs, its on-budget reading (:func:`base_table`) at fewer."""
    lr, _ = searched_lr(cfg, "scratch", progress=progress)
    return vit_run(cfg, None, dataclasses.replace(recipe(cfg, lr=lr), epochs=int(epochs)), 0, "base",
                   progress=progress)


def base_run(cfg: ViTSetup, progress: bool = False) -> dict[str, Any]:
    """The trained base ViT's record (seed 0, the lr searched from scratch)."""
    return base_with_epochs(cfg, cfg.epochs, progress)


def _short_epochs(cfg: ViTSetup) -> int | None:
    """The epochs of the base's on-budget reading (3/4 of them), None where the setup reads none."""
    short = max(1, train.last_quarter_start(cfg.epochs))
    return short if cfg.convergence and short < cfg.epochs else None


def base_table(cfg: ViTSetup, progress: bool = False) -> pd.DataFrame:
    """The base network: parameters, lr (and the grid's scores), top-1, and its on-budget reading: the same network
    trained with a complete schedule over 3/4 of the epochs (seed 0 only); "converged" where the last quarter of
    the budget bought at most ``scales.PLATEAU_POINTS`` points."""

    lr, scores = searched_lr(cfg, "scratch", progress=progress)
    rec = base_run(cfg, progress)
    row = {"network": f"ViT L{cfg.num_layers} H{cfg.num_heads} D{cfg.hidden_dim} M{cfg.mlp_dim}",
           "params": rec["params"], "epochs": cfg.epochs, "train images": len(_datasets(cfg, 0, False)[0]),
           "test images": len(_datasets(cfg, 0, False)[1]), "lr": lr,
           "lr grid (val top1)": ", ".join(f"{k:g}: {'-' if v is None else f'{v:.2f}'}" for k, v in scores.items()),
           "top1": rec["top1"], "train s": rec["wall_s"]}
    short = _short_epochs(cfg)
    if short is not None:
        shorter = base_with_epochs(cfg, short, progress)
        gain = round(rec["top1"] - shorter["top1"], 2)
        row.update({"top1 at 3/4 epochs": shorter["top1"], "gain on budget": gain,
                    "converged": "yes" if gain <= scales.PLATEAU_POINTS else f"no (+{gain:.2f} from the last quarter)"})
    else:
        row.update({"top1 at 3/4 epochs": None, "gain on budget": None, "converged": "not measured"})
    return pd.DataFrame([row])


def calibration(cfg: ViTSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """``calib_per_class`` training images per class (seed 0): x [n, C, 32, 32], y [n]."""
    return data.calibration_set(data.load_dataset(cfg.dataset, "train"), cfg.calib_per_class, 0, progress=False)


# --------------------------------------------------------------------------- the pruned networks
def spvr_ranking(cfg: ViTSetup, base: nn.Module, base_rec: Mapping[str, Any], progress: bool = False) -> GroupRanking:
    """SPvR's groups and importances on the trained base (cached, kind ``vit_ranking``; every budget reuses it)."""
    rkey = {"base": base_rec["hash"], "group_size": cfg.group_size, "calib_per_class": cfg.calib_per_class,
            "calib_seed": 0}

    def compute() -> dict[str, Any]:
        return rank_groups(copy.deepcopy(base).eval(), calibration(cfg), cfg.group_size, "spvr", "fast",
                           progress=progress).to_dict()

    return GroupRanking.from_dict(store.cached(rkey, compute, kind="vit_ranking"))


def collapsed_text(cfg: ViTSetup, plan: Mapping[str, Any]) -> str:
    """What a plan emptied: "attention 1, MLP 0" (the encoder layers whose attention branch or MLP lost every
    head / neuron, and so collapsed to its shortcut), or "none"."""
    full = {"self_attention": cfg.num_heads, "mlp.0": cfg.mlp_dim}
    gone: dict[str, list[str]] = {"attention": [], "MLP": []}
    for unit, removed in plan.get("removed", {}).items():
        layer = unit.split("encoder_layer_")[-1].split(".")[0]
        for part, width in full.items():
            if unit.endswith(part) and len(removed) == width:
                gone["attention" if part == "self_attention" else "MLP"].append(layer)
    text = "; ".join(f"{kind} {', '.join(layers)}" for kind, layers in gone.items() if layers)
    return text or "none"


def kept_text(cfg: ViTSetup, plan: Mapping[str, Any]) -> str:
    """Heads and MLP neurons kept per encoder layer: "4/64, 3/40, ..." (heads/neurons, layer by layer)."""
    removed = plan.get("removed", {})
    out = []
    for i in range(cfg.num_layers):
        unit = f"encoder.layers.encoder_layer_{i}"
        out.append(f"{cfg.num_heads - len(removed.get(unit + '.self_attention', []))}/"
                   f"{cfg.mlp_dim - len(removed.get(unit + '.mlp.0', []))}")
    return ", ".join(out)


def pruned(cfg: ViTSetup, method: str, keep: float, progress: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """``method``'s network at ``keep`` (fraction of the base's parameters) and what it is: SPvR's freshly
    initialised (trained from scratch), Torch-Pruning's with the kept trained weights (fine-tuned).  Info:
    method, keep, budget, params_before, params, plan, collapsed, kept (heads/neurons per layer), ratio."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {list(METHODS)}")
    if not 0 < float(keep) < 1:
        raise ValueError(f"keep={keep!r}; expected the fraction of parameters kept, in (0, 1)")
    base_rec = base_run(cfg, progress)
    base = load_run(cfg, base_rec)
    calib = calibration(cfg)
    if method == "spvr":
        ranking = spvr_ranking(cfg, base, base_rec, progress)
        res = spvr_prune(copy.deepcopy(base), calib, float(keep), group_size=cfg.group_size, ranking=ranking,
                         progress=False, source=source(cfg))
        net, plan, ratio = res.model, res.plan, None
        info = {"params_before": res.params_before, "budget": res.budget, "params": res.params_after}
    else:
        net, plan, info = tp_prune(base, calib, float(keep), method, source(cfg), base_rec["hash"], cfg.num_heads)
        ratio = info["ratio"]
    return net, {"method": method, "keep": float(keep), **info, "plan": plan, "ratio": ratio,
                 "collapsed": collapsed_text(cfg, plan), "kept": kept_text(cfg, plan)}


def finetune_lr(cfg: ViTSetup, progress: bool = False) -> float:
    """THE fine-tuning lr of Torch-Pruning's networks: searched on :data:`FINETUNE_LR_METHOD`'s network at the
    smallest keep, from its kept weights."""
    if len(cfg.finetune_lr_grid) == 1:
        return float(cfg.finetune_lr_grid[0])
    net, info = pruned(cfg, FINETUNE_LR_METHOD, min(cfg.keeps), progress)
    return searched_lr(cfg, "finetune", info["plan"], _state(net), progress)[0]


def _state(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}


def trained(cfg: ViTSetup, method: str, keep: float, seed: int, progress: bool = False) -> dict[str, Any]:
    """One run: ``method``'s network at ``keep`` trained with the common recipe (SPvR from scratch at the scratch
    lr, Torch-Pruning's fine-tuned at the fine-tuning lr), seed ``seed``.  A row: keep, method, seed, mode, lr,
    params, budget, top1, status (:func:`stats.run_status`; a fine-tuning start whose logits do not depend on
    the input is "dead network"), history, wall_s."""
    net, info = pruned(cfg, method, keep, progress)
    mode = MODES[method]
    lr = searched_lr(cfg, "scratch", progress=progress)[0] if mode == "scratch" else finetune_lr(cfg, progress)
    init = _state(net) if mode == "finetune" else None
    dead = None
    if init is not None:
        dead = diagnostics.output_spread(net.eval(), calibration(cfg)[0]) <= stats.DEAD_SPREAD
    rec = vit_run(cfg, info["plan"], recipe(cfg, lr=lr, mode=mode), seed, method if init is not None else "scratch",
                  init, progress)
    classes = data.dataset_info(cfg.dataset).num_classes
    return {"keep": float(keep), "method": method, "name": NAMES[method], "seed": int(seed), "mode": mode, "lr": lr,
            "epochs": rec["epochs"], "params": info["params"], "budget": info["budget"],
            "params_before": info["params_before"], "collapsed": info["collapsed"], "kept": info["kept"],
            "top1": rec["top1"], "status": stats.run_status(rec["top1"], classes, rec["history"], dead),
            "wall_s": rec["wall_s"]}


def runs(cfg: ViTSetup, progress: bool = False) -> pd.DataFrame:
    """Every (keep, method, seed) run of :func:`trained` (:func:`declared_jobs`' trainings), one row each (long
    format), in the setup's order."""
    from tqdm.auto import tqdm

    todo = [job for b in declared_jobs(cfg) if b.target is trained for job in b.jobs]
    return pd.DataFrame([trained(*job, progress=False) for job in tqdm(todo, disable=not progress, desc="trainings")])


# --------------------------------------------------------------------------- the fan-out
def _scratch_trial_job(cfg: ViTSetup, lr: float) -> None:
    lr_trial(cfg, lr, "scratch")


def _finetune_trial_job(cfg: ViTSetup, lr: float) -> None:
    net, info = pruned(cfg, FINETUNE_LR_METHOD, min(cfg.keeps))
    lr_trial(cfg, lr, "finetune", info["plan"], _state(net))


def declared_jobs(cfg: ViTSetup) -> list[jobs.Batch]:
    """Notebook 14's independent computations, declared once (:func:`prepare`, :func:`runs` and the plan read
    them), in dependency order: the lr trials from scratch on the base network, the base (:func:`base_run`) and
    its 3/4-epoch reading where the setup has ``convergence`` (:func:`base_with_epochs`, one batch, side by side),
    the fine-tuning lr trials on :data:`FINETUNE_LR_METHOD`'s network at the smallest keep, and every (keep,
    method, seed) training (:func:`trained`).  A grid of one value is not searched (no trials).  The rankings and
    Torch-Pruning's selections are not jobs: :func:`prepare` computes them in its own process.  Sizes: epochs, the
    share of the unpruned ViT's MACs per image (a pruned network's approximated by its keep, the share of the
    parameters it keeps: its plan is known only once the base is trained), the share of the setup's training
    images (``lr_search.trial_share`` for a trial)."""
    share, small = trial_share(cfg), min(cfg.keeps)
    grid = [float(v) for v in cfg.lr_grid]
    ft_grid = [float(v) for v in cfg.finetune_lr_grid]
    short = _short_epochs(cfg)
    return [jobs.Batch(f"lr search (scratch): {len(grid)} values, {share:.0%} of the images", _scratch_trial_job,
                       tuple((cfg, lr) for lr in grid) if len(grid) > 1 else (),
                       size=lambda job: (cfg.epochs, 1.0, share)),
            jobs.Batch("base ViT: the base" + (f" and its {short}-epoch reading" if short else ""), base_with_epochs,
                       tuple((cfg, e) for e in (cfg.epochs, short) if e),
                       size=lambda job: (job[1], 1.0, 1.0)),
            jobs.Batch(f"lr search (fine-tune): {len(ft_grid)} values on {NAMES[FINETUNE_LR_METHOD]}'s network at "
                       f"{small:.0%}", _finetune_trial_job, tuple((cfg, lr) for lr in ft_grid) if len(ft_grid) > 1
                       else (), size=lambda job: (cfg.epochs, small, share)),
            jobs.Batch("trainings", trained,
                       tuple((cfg, m, k, s) for k in cfg.keeps for m in METHODS for s in cfg.seeds),
                       size=lambda job: (cfg.epochs, job[2], 1.0), kwargs={"progress": False},
                       cost=lambda job: job[2])]


def prepare(cfg: ViTSetup, scale: str, progress: bool = True) -> None:
    """Fill the run cache with :func:`declared_jobs` side by side in scale ``scale``'s ``jobs.worker_count``
    processes (the setup is the scale's ``vit_setup``): the scratch lr trials, the base and its reading; then, in
    this process, every method's network at every keep (SPvR's ranking, Torch-Pruning's selections: cached, and
    every training reads them); then the fine-tuning lr trials, then every training.  Nothing happens with one
    local worker; a pruning that raises is left to the notebook's own call."""

    workers = jobs.worker_count(get_scale(scale))
    if workers <= 1 and jobs.executor() == "local":
        return
    declared = declared_jobs(cfg)
    jobs.run([b for b in declared if b.target in (_scratch_trial_job, base_with_epochs)], workers, progress)
    for keep in cfg.keeps:
        for method in METHODS:
            try:
                pruned(cfg, method, keep)
            except Exception:            # reported by the notebook's own call
                pass
    jobs.run([b for b in declared if b.target in (_finetune_trial_job, trained)], workers, progress)


# --------------------------------------------------------------------------- latency, table, figure
def latency(cfg: ViTSetup, scale: str) -> pd.DataFrame:
    """Batch-1, one-thread latency of the base and of every method's network at each keep, timed together per keep
    (``latency_vs_accuracy.timed_together`` with the scale's protocol; a record, so the same machine re-times
    nothing).  One row per (keep, network): median_ms, low_ms, high_ms (its 95% interval)."""
    base = load_run(cfg, base_run(cfg))
    info = data.dataset_info(cfg.dataset)
    shape = (int(info.in_channels), int(info.image_size), int(info.image_size))
    rows = []
    for keep in cfg.keeps:
        nets = {"unpruned": base, **{m: pruned(cfg, m, keep)[0].eval() for m in METHODS}}
        rec = latency_vs_accuracy.timed_together({"notebook": NOTEBOOK, "keep": float(keep)}, nets, shape, 1,
                                                 **latency_vs_accuracy.protocol(get_scale(scale)), threads=1)
        for name, lat in rec["latency"].items():
            rows.append({"keep": float(keep), "method": name, "median_ms": lat["median_ms"], "low_ms": lat["low_ms"],
                         "high_ms": lat["high_ms"], "cpu": rec["key"]["cpu"]})
    return pd.DataFrame(rows)


def _counted(runs_: pd.DataFrame) -> tuple[list[float], list[str]]:
    sub = runs_.sort_values("seed")
    return stats.split_failed(list(sub["top1"]), list(sub["status"]))


def comparison_table(runs_: pd.DataFrame, lat: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per keep and method: parameters against the budget, what collapsed, heads/neurons kept per layer, top-1
    (``stats.cell_text`` over the counted seeds, failed runs named), the method's mean minus SPvR's with its 95%
    interval and verdict (``stats.compare(method's seeds, SPvR's seeds)``, :data:`stats.RULE`), and latency
    (``lat``: :func:`latency`'s rows; the unpruned network's rows close the table)."""
    rows = []
    for (keep, method), sub in runs_.groupby(["keep", "method"], sort=False):
        vals, failed = _counted(sub)
        row = {"keep (%)": round(100 * keep, 1), "method": NAMES.get(method, method), "mode": sub["mode"].iloc[0],
               "params": int(sub["params"].iloc[0]), "budget": int(sub["budget"].iloc[0]),
               "collapsed": sub["collapsed"].iloc[0], "heads/neurons kept per layer": sub["kept"].iloc[0],
               "top1": stats.cell_text(vals, failed), "failed runs": stats.seeds_note(len(vals), failed) or None}
        if method == "spvr":
            row.update({"method - SPvR (95% interval)": None, "verdict": None})
        else:
            spvr_vals, _ = _counted(runs_[(runs_["keep"] == keep) & (runs_["method"] == "spvr")])
            cmp = stats.compare(vals, spvr_vals, NAMES.get(method, method), "SPvR")
            row.update({"method - SPvR (95% interval)": cmp.interval_text(), "verdict": cmp.verdict})
        if lat is not None:
            hit = lat[(lat["keep"] == keep) & (lat["method"] == method)]
            row["latency b1 (ms)"] = None if hit.empty else \
                f"{hit['median_ms'].iloc[0]:.3f} [{hit['low_ms'].iloc[0]:.3f}, {hit['high_ms'].iloc[0]:.3f}]"
        rows.append(row)
    if lat is not None:
        for keep, hit in lat[lat["method"] == "unpruned"].groupby("keep", sort=False):
            rows.append({"keep (%)": round(100 * keep, 1), "method": "unpruned (timed with this keep)",
                         "latency b1 (ms)": f"{hit['median_ms'].iloc[0]:.3f} [{hit['low_ms'].iloc[0]:.3f}, "
                                            f"{hit['high_ms'].iloc[0]:.3f}]"})
    df = pd.DataFrame(rows)
    return df.astype(object).where(df.notna(), None)          # empty cells, not "nan"


def accuracy_figure(runs_: pd.DataFrame, base_params: int, base_top1: float | None = None, title: str = ""):
    """Top-1 against the parameters kept (% of the base), one line per method: the mean over the counted seeds
    with its 95% t interval (a single counted seed: no bar); the base network as a dashed line."""
    import matplotlib.pyplot as plt

    with plt.rc_context(plots.PLOT_STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.6))
        for j, (method, sub) in enumerate(runs_.groupby("method", sort=False)):
            xs, ys, errs = [], [], []
            for _, cell in sub.groupby("keep", sort=True):
                vals, _ = _counted(cell)
                if not vals:
                    continue
                mean, std = stats.mean_std(vals)
                half = float(scipy.stats.t.ppf(0.975, len(vals) - 1)) * std / np.sqrt(len(vals)) if len(vals) > 1 \
                    else 0.0
                xs.append(100 * cell["params"].iloc[0] / base_params)
                ys.append(mean)
                errs.append(half)
            ax.errorbar(xs, ys, yerr=errs, marker="o", ms=4, capsize=3, lw=1, color=f"C{j}",
                        label=NAMES.get(method, method))
        if base_top1 is not None:
            ax.axhline(base_top1, ls="--", color="k", lw=0.8, label="unpruned (seed 0)")
        ax.set(xlabel="parameters kept (% of the base)", ylabel="test top-1 (%)", title=title)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
    return fig


def check_budgets(runs_: pd.DataFrame, tolerance: float = 0.01) -> pd.DataFrame:
    """Per keep and method: params <= budget, and how far under it (fraction of the base); ``within`` says
    whether the gap is at most ``tolerance`` of the base's parameters."""
    first = runs_.drop_duplicates(["keep", "method"])
    return pd.DataFrame({"keep": first["keep"], "method": first["method"], "params": first["params"],
                         "budget": first["budget"], "at or under": first["params"] <= first["budget"],
                         "gap (% of base)": 100 * (first["budget"] - first["params"]) / first["params_before"],
                         "within": (first["budget"] - first["params"]) <= tolerance * first["params_before"]})
