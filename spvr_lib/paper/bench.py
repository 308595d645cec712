"""Benchmarks: ``python -m spvr_lib.bench ranking --model vgg16 --scale cpu --group-size 2 [--json]``.

``vit`` (``python -m spvr_lib.bench vit [--torchvision vit_b_16 --image-size 224] [--json]``) times SPvR pruning a
vision transformer end to end (:func:`bench_vit`).

``ranking`` times the naive ranking (one forward pass of the calibration set per group, the
paper's algorithm) and the fast one on the same model, groups and calibration set in one
process, and prints one JSON object: model, groups, naive_s, fast_s, speedup, max_rel_diff,
same_ranking (every pair of groups in the same order, but pairs whose naive importances are equal to the
issue's tolerance, relative difference <= 1e-4: see :func:`same_ranking`), exact_order (argsort identical),
near_tie_swaps, n_calib, device, threads, weights ("trained" when a cached trained base model of
that setup exists in the run cache, else "random-init"), loadavg (the machine's 1-minute load
before and after, since a shared machine skews timings), repeat, and naive_cpu_s / fast_cpu_s /
speedup_cpu (process CPU time, less sensitive to other processes than wall-clock time).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch.utils.data import DataLoader
from torch import nn

from spvr_lib import data, latency, models, store, train
from spvr_lib.devices import resolve_device
from spvr_lib.paper import base_models, scales
from spvr_lib.graph import trace_units
from spvr_lib.prune import network_units, unit_groups
from spvr_lib.ranking import group_importance, unit_importance


def trained_base_model(spec: dict, dataset: str) -> tuple[nn.Module, str] | None:
    """The best cached ``train_run`` of ``spec`` on ``dataset`` whose weights file exists, or None.

    Returns (model with those weights, record hash); "best" is the highest top-1.
    """

    folder = store.cache_dir()
    if not folder.is_dir():
        return None
    want = store.canonical_json(spec)
    candidates = []
    for path in sorted(folder.glob("train-*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        key = record.get("key", {})
        if store.canonical_json(record.get("spec")) != want or key.get("dataset") != dataset:
            continue
        weights = Path(record.get("weights", ""))
        if not weights.is_absolute():
            weights = store.REPO_ROOT / weights
        if weights.is_file():
            candidates.append((float(record.get("top1", 0.0)), path.name, record))
    if not candidates:
        return None
    _, _, record = max(candidates, key=lambda c: (c[0], c[1]))
    model = train.load_weights(record)
    assert models.count_params(model) == models.spec_params(spec)
    return model, str(record.get("hash"))


def _timed_pair(first, second, repeat: int) -> tuple[tuple[float, float, Any], tuple[float, float, Any]]:
    """Run ``first`` and ``second`` alternately ``repeat`` times; for each the fastest wall-clock
    seconds, the fastest process CPU seconds and its result (alternating spreads a shared
    machine's load over both)."""
    best = [[float("inf"), float("inf"), None], [float("inf"), float("inf"), None]]
    for _ in range(repeat):
        for slot, fn in ((0, first), (1, second)):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            best[slot] = [min(best[slot][0], wall), min(best[slot][1], cpu), out]
    return tuple(best[0]), tuple(best[1])


def bench_ranking(model_key: str, scale: str, group_size: int | None = None, per_class: int | None = None,
                  seed: int = 0, repeat: int = 1, criterion: str = "spvr", progress: bool = False,
                  model: nn.Module | None = None, check_float64: bool = False) -> dict[str, Any]:
    """Naive vs fast ranking of ``scales.get_scale(scale).models[model_key]`` (its preset, width,
    dataset, group size and calibration samples per class unless given); the JSON record.
    ``model``: the trained network to rank (default: the best cached trained base of that setup,
    else a randomly initialised one)."""

    setup = scales.get_scale(scale).model(model_key)
    group_size = setup.group_size if group_size is None else group_size
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}; expected an integer >= 1")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat={repeat!r}; expected an integer >= 1")
    spec = base_models.base_spec(setup)
    found = trained_base_model(spec, setup.dataset) if model is None else (model, None)
    if found is None:
        torch.manual_seed(seed)
        model, weights, run = models.build(spec), "random-init", None
    else:
        (model, run), weights = found, "trained"
    model.eval()
    k = setup.calib_per_class if per_class is None else per_class
    x, y = data.calibration_set(data.load_dataset(setup.dataset, "train"), k, seed=seed, progress=progress)
    groups = unit_groups(model, network_units(model, x), x, group_size)
    load_before = os.getloadavg()[0]
    (naive_s, naive_cpu, naive), (fast_s, fast_cpu, fast) = _timed_pair(
        lambda: group_importance(model, x, groups, criterion, "naive", progress=progress),
        lambda: group_importance(model, x, groups, criterion, "fast", progress=progress), repeat)
    a = torch.cat([naive[n] for n in groups])
    b = torch.cat([fast[n] for n in groups])
    rel = ((a - b).abs() / a.abs().clamp_min(1e-12)).max().item()
    same, flipped = same_ranking(a, b)
    return {"model": model_key, "preset": setup.preset, "width": setup.width, "scale": scale,
            "architecture": models.spec_to_str(spec),
            "dataset": setup.dataset, "group_size": group_size, "criterion": criterion,
            "groups": int(len(a)), "naive_s": round(naive_s, 3), "fast_s": round(fast_s, 3),
            "speedup": round(naive_s / fast_s, 2), "max_rel_diff": rel, "same_ranking": same,
            "exact_order": bool(torch.equal(torch.argsort(a, stable=True), torch.argsort(b, stable=True))),
            "near_tie_swaps": flipped,
            "naive_cpu_s": round(naive_cpu, 3), "fast_cpu_s": round(fast_cpu, 3),
            "speedup_cpu": round(naive_cpu / fast_cpu, 2),
            "n_calib": int(len(x)), "device": str(next(model.parameters()).device),
            "threads": torch.get_num_threads(), "weights": weights, "weights_run": run,
            "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)], "repeat": repeat,
            **(_float64_check(model, x, groups, criterion) if check_float64 else {})}


RANKING_TOLERANCE = 1e-4      # the relative difference within which two importances are the same (issue: <= 1e-4)


def same_ranking(naive: torch.Tensor, fast: torch.Tensor, rtol: float = RANKING_TOLERANCE) -> tuple[bool, int]:
    """Whether ``fast`` ranks every pair of groups as ``naive`` does, except pairs whose naive importances are
    equal to ``rtol`` (relative difference <= rtol: ties at the precision the two paths are required to agree
    to, whose order float32 rounding decides); and how many such near-tie pairs the two orders swap.
    ``naive``, ``fast``: [groups] importances."""
    a, b = naive.double().flatten(), fast.double().flatten()
    if a.shape != b.shape:
        raise ValueError(f"naive has {a.numel()} importances, fast {b.numel()}: expected the same groups")
    da = a[:, None] - a[None, :]                                      # [g, g]: a_i - a_j
    db = b[:, None] - b[None, :]
    scale = torch.maximum(a.abs()[:, None], a.abs()[None, :]).clamp_min(1e-300)
    distinct = da.abs() > rtol * scale
    swapped = (torch.sign(da) != torch.sign(db)) & (da != 0)
    return bool(not (swapped & distinct).any()), int((swapped & ~distinct).sum().item() // 2)


def _float64_check(model: nn.Module, x: torch.Tensor, groups: dict, criterion: str) -> dict[str, Any]:
    """Both paths once more in float64 (a copy of the model): float32 rounding, in either path, can swap
    groups whose scores differ by less than it; in float64 the two paths must agree to rounding."""
    m64 = copy.deepcopy(model).double()
    naive = group_importance(m64, x.double(), groups, criterion, "naive", progress=False)
    fast = group_importance(m64, x.double(), groups, criterion, "fast", progress=False)
    a, b = torch.cat([naive[n] for n in groups]), torch.cat([fast[n] for n in groups])
    return {"max_rel_diff_f64": ((a - b).abs() / a.abs().clamp_min(1e-12)).max().item(),
            "same_ranking_f64": bool(torch.equal(torch.argsort(a, stable=True), torch.argsort(b, stable=True)))}


def bench_ranking_torchvision(name: str = "resnet50", size: int = 224, group_size: int = 8, n_units: int = 4,
                              n_calib: int = 10, device: str = "cpu", seed: int = 0) -> dict[str, Any]:
    """Fast vs naive ranking of a FULL-WIDTH torchvision network (random weights, 10 classes) at ``size`` px.

    A full naive ranking of such a network is hours on a CPU, so both paths score the same sample: every
    group of ``n_units`` units spread evenly over the network's depth (the fast path's gain depends on how
    deep the unit is and on ranking many groups of a unit at once), and the full ranking's time is
    extrapolated per group.  One JSON object: model, size, device, groups (the full count), groups_timed,
    units_timed, naive_s / fast_s (the sample), speedup, naive_full_s_est / fast_full_s_est, max_rel_diff
    and same_ranking on the sample."""
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval().to(dev)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_calib, 3, size, size, generator=gen)
    g = trace_units(model, x[:1].to(dev))
    groups = unit_groups(model, g, x, group_size)
    picks = sorted({round(i * (len(g.units) - 1) / max(1, n_units - 1)) for i in range(n_units)})
    subset = {g.units[i].name: (g.units[i].sites, groups[g.units[i].name]) for i in picks}
    timed = sum(len(gs) for _, gs in subset.values())
    total = sum(len(gs) for gs in groups.values())
    (naive_s, _, naive), (fast_s, _, fast) = _timed_pair(
        lambda: unit_importance(model, x, subset, method="naive", progress=False),
        lambda: unit_importance(model, x, subset, method="fast", progress=False), 1)
    a = torch.cat([naive[k] for k in subset])
    b = torch.cat([fast[k] for k in subset])
    rel = ((a - b).abs() / a.abs().clamp_min(1e-12)).max().item()
    return {"model": name, "size": size, "device": str(dev), "group_size": group_size, "n_calib": n_calib,
            "units": len(g.units), "groups": total, "groups_timed": timed, "units_timed": list(subset), "naive_s": round(naive_s, 2),
            "fast_s": round(fast_s, 2), "speedup": round(naive_s / fast_s, 2),
            "naive_full_s_est": round(naive_s / timed * total, 1), "fast_full_s_est": round(fast_s / timed * total, 1),
            "max_rel_diff": rel, "same_ranking": same_ranking(a, b)[0],
            "exact_order": bool(torch.equal(a.argsort(stable=True), b.argsort(stable=True))),
            "threads": torch.get_num_threads(), "weights": "random-init"}


# the default ``vit`` setup: torchvision's VisionTransformer at 32 px, 4x4 patches, 4 layers of 4 heads, width 64
SMALL_VIT = {"image_size": 32, "patch_size": 4, "num_layers": 4, "num_heads": 4, "hidden_dim": 64, "mlp_dim": 128}
_FALLBACK = "fast ranking cannot run"          # the start of spvr_lib.ranking's warning when it takes the naive path


def _vit(name: str | None, image_size: int, num_classes: int) -> tuple[nn.Module, dict[str, Any]]:
    """The ViT to prune (random weights) and its configuration: :data:`SMALL_VIT` at ``image_size`` px, or
    torchvision's ``name`` (e.g. vit_b_16) at ``image_size`` px.  The classifier, which torchvision
    zero-initialises (every output equal: every importance 0), is drawn from N(0, 0.2^2)."""
    from torchvision.models.vision_transformer import VisionTransformer

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size={image_size!r}; expected a positive number of pixels")
    if name is None:
        config = {**SMALL_VIT, "image_size": image_size}
        if image_size % config["patch_size"]:
            raise ValueError(f"image_size={image_size}: expected a multiple of the small ViT's patch size "
                             f"{config['patch_size']}")
        model = VisionTransformer(**config, num_classes=num_classes)
    else:
        vits = [n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith("vit_")]
        if name not in vits:
            raise ValueError(f"torchvision={name!r}: expected one of torchvision's ViTs {vits}")
        try:
            model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, image_size=image_size)
        except (AssertionError, TypeError, ValueError) as err:
            raise ValueError(f"torchvision={name!r} at image_size={image_size}: {type(err).__name__}: {err}") from None
        config = {"image_size": model.image_size, "patch_size": model.patch_size,
                  "num_layers": len(model.encoder.layers),
                  "num_heads": model.encoder.layers[0].self_attention.num_heads,
                  "hidden_dim": model.hidden_dim, "mlp_dim": model.mlp_dim}
    nn.init.normal_(model.heads.head.weight, std=0.2)
    return model, config


def bench_vit(torchvision_name: str | None = None, image_size: int = 32, keep: float = 0.5, group_size: int = 2,
              n_calib: int = 20, method: str = "fast", device: str = "cpu", seed: int = 0,
              compare: bool = False) -> dict[str, Any]:
    """SPvR on a vision transformer with random weights, timed: :data:`SMALL_VIT` (default) or torchvision's
    ``torchvision_name`` (e.g. "vit_b_16"), at ``image_size`` px, 10 classes, ``n_calib`` Gaussian-noise
    calibration images [n_calib, 3, image_size, image_size] (labels cycling over the classes), to ``keep``
    (a fraction of the parameters or a count) with groups of ``group_size``.

    One JSON object: model, config, params_before, params_after, budget, under_budget (budget - after), groups,
    groups_removed, heads (per attention: before, after; 0 when collapsed), mlp (per MLP: hidden neurons before,
    after), collapsed (the units whose whole branch went), ranking (requested and used path: "fast" or "naive",
    and why), ranking_s (grouping + ranking), prune_s (global sort + rebuild), total_s, device, threads, loadavg.
    ``compare``: the ranking again by the naive path, after the rest: ``compare`` = {naive_ranking_s, speedup
    (naive_ranking_s / ranking_s), same_ranking (every pair of groups ordered alike but near-ties,
    :func:`same_ranking`), near_tie_swaps, max_rel_diff}.
    """
    from spvr_lib.attention import PrunedMultiheadAttention
    from spvr_lib.budget import budget_from_keep
    from spvr_lib.prune import rank_groups, spvr_prune

    if isinstance(n_calib, bool) or not isinstance(n_calib, int) or n_calib < 10:
        raise ValueError(f"n_calib={n_calib!r}; expected an integer >= 10 (one image of each of the 10 classes)")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}; expected an integer >= 1")
    torch.manual_seed(seed)
    model, config = _vit(torchvision_name, image_size, 10)
    model.eval()
    budget_from_keep(keep, models.count_params(model))             # a bad keep fails before the long part
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n_calib, 3, image_size, image_size, generator=gen), torch.arange(n_calib) % 10
    attentions = {n: m.num_heads for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    mlps = {n: m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("mlp.0")}
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ranking = rank_groups(model, (x, y), group_size, method=method, device=device, progress=False)
    t1 = time.perf_counter()
    result = spvr_prune(model, (x, y), keep, group_size=group_size, ranking=ranking, progress=False, device=device)
    t2 = time.perf_counter()
    fallback = next((str(w.message) for w in caught if str(w.message).startswith(_FALLBACK)), None)
    after = dict(result.model.named_modules())
    heads_after = {n: (int(after[n].num_heads) if isinstance(after.get(n), (nn.MultiheadAttention,
                                                                             PrunedMultiheadAttention)) else 0)
                   for n in attentions}
    return {"model": torchvision_name or "VisionTransformer (small)", "config": config, "weights": "random-init",
            "keep": keep, "group_size": group_size, "n_calib": n_calib, "calibration": "gaussian noise",
            "params_before": result.params_before, "params_after": result.params_after, "budget": result.budget,
            "under_budget": result.budget - result.params_after,
            "groups": int(len(result.scores)), "groups_removed": int(result.scores["removed"].sum()),
            "heads": {n: [h, heads_after[n]] for n, h in attentions.items()},
            "mlp": {n: [w, int(after[n].out_features) if n in after else 0] for n, w in mlps.items()},
            "collapsed": [c["unit"] for c in result.collapsed],
            "ranking": {"requested": method, "used": "naive" if method == "naive" or fallback else "fast",
                        "why": fallback if fallback else ("requested" if method == "naive" else None)},
            "ranking_s": round(t1 - t0, 3), "prune_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
            "device": str(resolve_device(device)), "threads": torch.get_num_threads(),
            "loadavg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            **({"compare": _compare_paths(model, (x, y), group_size, ranking, t1 - t0, device)} if compare else {})}


def _compare_paths(model: nn.Module, calib: tuple, group_size: int, ranking: Any, ranking_s: float,
                   device: str) -> dict[str, Any]:
    """The naive path's ranking of the same groups, timed, against ``ranking`` (made in ``ranking_s`` seconds)."""
    from spvr_lib.prune import rank_groups

    t0 = time.perf_counter()
    naive = rank_groups(model, calib, group_size, method="naive", device=device, progress=False)
    naive_s = time.perf_counter() - t0
    if naive.groups != ranking.groups:
        raise RuntimeError("the naive path grouped the channels differently from the ranking it is compared with")
    a = torch.cat([naive.scores[k] for k in naive.scores])
    b = torch.cat([ranking.scores[k] for k in naive.scores])
    same, swaps = same_ranking(a, b)
    return {"naive_ranking_s": round(naive_s, 3), "speedup": round(naive_s / ranking_s, 2), "same_ranking": same,
            "near_tie_swaps": swaps,
            "max_rel_diff": float(((a - b).abs() / a.abs().clamp_min(1e-12)).max())}


def ranking_table(cfg: Any, keys: Sequence[str], repeat: int = 1, progress: bool = False) -> Any:
    """Notebook 08: :func:`bench_ranking` on each scale's trained base network, one row per model, kept as a
    record (kind ``rankspeed``) so that a rerun on the same kind of machine re-times nothing."""
    import pandas as pd


    rows = []
    for key in keys:
        model, base_rec = base_models.base_model(cfg, key, progress=progress)
        # a timing belongs to the machine that measured it: a record keyed by the network, the protocol, the CPU
        # model, the threads and the torch version, re-timed only with SPVR_RETIME=1 (``reproduce --retime``)
        bkey = {"model": key, "scale": cfg.name, "base": base_rec["hash"], "repeat": int(repeat),
                "threads": torch.get_num_threads(), "cpu": latency.cpu_model(), "torch": torch.__version__}
        rec = store.cached(bkey, lambda: dict(bench_ranking(key, cfg.name, repeat=repeat, progress=progress,
                                                            model=model)),
                           kind="rankspeed", refresh=os.environ.get("SPVR_RETIME") == "1")
        rows.append({k: v for k, v in rec.items() if k not in ("architecture", "weights_run", "key", "hash", "code",
                                                               "computed_by", "provenance", "wall_s")})
    return pd.DataFrame(rows)


def bench_train(model_key: str, scale: str, images: int = 2048, batch_size: int | None = None,
                amp: bool | None = None, seed: int = 0, side_by_side: int = 0) -> dict[str, Any]:
    """The training loop's end-to-end images/s against its own ceiling, for the scale's base network of
    ``model_key`` with the scale's data and recipe (``batch_size``/``amp`` override the recipe's).

    end_to_end: ``train.fit`` for one epoch over ``images`` training images (augmentation, batching, the
    optimizer step; the per-epoch evaluation runs on one batch and is excluded from the timing).
    ceiling: forward + backward + optimizer step of the same network on one fixed batch already in memory,
    in the same memory format and precision.  Both after a warm-up; wall clock on this machine.
    ``side_by_side``: also run the end-to-end measure in that many single-thread processes at once (as
    ``paper.jobs`` trains independent networks) and report their summed images/s."""
    cfg = scales.get_scale(scale)
    setup = cfg.model(model_key)
    spec = base_models.base_spec(setup)
    recipe = dataclasses.replace(base_models.recipe(setup), epochs=1, mode="finetune",
                                 **({"batch_size": batch_size} if batch_size else {}),
                                 **({"amp": amp} if amp is not None else {}))
    train_set = data.load_dataset(setup.dataset, "train", augment=setup.augment, seed=seed)
    n = min(images, len(train_set))
    part = torch.utils.data.Subset(train_set, range(n))
    probe = torch.utils.data.Subset(data.load_dataset(setup.dataset, "test"), range(recipe.batch_size))
    use_amp = recipe.amp and train._cpu_bf16()
    source = train.batch_source(part)
    loader = DataLoader(part, batch_size=recipe.batch_size) if source is None else None
    prebuilt = [source(torch.arange(i, min(i + recipe.batch_size, n))) for i in range(0, n, recipe.batch_size)] \
        if source is not None else list(loader)

    def ceiling_once() -> float:
        """forward + backward + step over batches already built in memory: the loop without its data work."""
        torch.manual_seed(seed)
        model = models.build(spec).train()
        if recipe.channels_last:
            model.to(memory_format=torch.channels_last)
        opt = train.make_optimizer(model, recipe)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            x = train._to_format(x) if recipe.channels_last else x
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        for x, y in prebuilt[:2]:
            step(x, y)
        t = time.perf_counter()
        for x, y in prebuilt:
            step(x, y)
        return n / (time.perf_counter() - t)

    def end_to_end_once() -> float:
        """``train.fit`` for one epoch over the n images (the evaluation's time subtracted)."""
        torch.manual_seed(seed)
        model = models.build(spec)
        done: dict[str, float] = {}
        train.fit(model, torch.utils.data.Subset(train_set, range(min(2 * recipe.batch_size, n))), probe, recipe,
                  seed=seed, progress=False)                                  # warm-up
        t_eval = time.perf_counter()
        train.evaluate(model, probe, batch_size=recipe.batch_size)
        eval_s = time.perf_counter() - t_eval
        t0 = time.perf_counter()
        train.fit(model, part, probe, recipe, seed=seed, progress=False,
                  on_epoch_end=lambda entry: done.setdefault("end", time.perf_counter()))
        return n / max(1e-9, done["end"] - t0 - eval_s)

    ceiling = end_to_end = 0.0
    for _ in range(2):                                   # alternating, the best of each: noise on a shared CPU
        ceiling = max(ceiling, ceiling_once())
        end_to_end = max(end_to_end, end_to_end_once())
    out = {"model": model_key, "scale": scale, "dataset": setup.dataset, "width": setup.width,
           "batch_size": recipe.batch_size, "amp_bf16": bool(use_amp), "channels_last": recipe.channels_last,
           "images": n, "end_to_end_img_s": round(end_to_end, 1), "ceiling_img_s": round(ceiling, 1),
           "loop_share_of_ceiling": round(end_to_end / ceiling, 3), "threads": torch.get_num_threads(),
           "in_memory_path": source is not None}
    if side_by_side and side_by_side > 1 and not _IN_BENCH_WORKER:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(side_by_side, initializer=_bench_worker_init) as pool:
            each = pool.starmap(bench_train, [(model_key, scale, images, batch_size, amp, seed, 0)] * side_by_side)
        out.update({"side_by_side_processes": side_by_side,
                    "side_by_side_img_s": round(sum(r["end_to_end_img_s"] for r in each), 1),
                    "side_by_side_per_process_img_s": [r["end_to_end_img_s"] for r in each]})
    return out


_IN_BENCH_WORKER = False


def _bench_worker_init() -> None:
    """A side-by-side bench process: one torch thread, as ``paper.jobs`` runs its workers."""
    global _IN_BENCH_WORKER
    _IN_BENCH_WORKER = True
    torch.set_num_threads(1)


# ImageNet's typical stored image (about 500x375 JPEG) and Tiny ImageNet's (64x64 JPEG)
_LOADER_IMAGES = {"imagenet": (500, 375), "tiny-imagenet": (64, 64)}


def bench_loader(dataset: str, workers: Sequence[int] = (0, 1, 2), n_images: int = 256, batch_size: int = 64,
                 root: str | Path | None = None) -> dict[str, Any]:
    """Images/s of the training DataLoader ALONE (decode, random crop/resize, flip, normalise; no network) for
    ``dataset`` ("imagenet" or "tiny-imagenet") at each number of worker processes.

    Without ``root``, ``n_images`` noise JPEGs at the dataset's stored resolution are written to a temporary
    folder in its real layout (the decode cost is the real one; the content does not matter).
    """
    import tempfile

    import numpy as np
    from PIL import Image

    if dataset not in _LOADER_IMAGES:
        raise ValueError(f"dataset={dataset!r}: expected one of {sorted(_LOADER_IMAGES)}")
    with tempfile.TemporaryDirectory() as tmp:
        if root is None:
            rng = np.random.default_rng(0)
            w, h = _LOADER_IMAGES[dataset]
            base = Path(tmp) / ("imagenet" if dataset == "imagenet" else "tiny-imagenet-200")
            wnids = [f"n{i:08d}" for i in range(2)]
            for i in range(n_images):
                wnid = wnids[i % 2]
                folder = base / "train" / wnid if dataset == "imagenet" else base / "train" / wnid / "images"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.JPEG",
                                                                                        quality=90)
            if dataset == "imagenet":
                for wnid in wnids:
                    (base / "val" / wnid).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                        base / "val" / wnid / "v.JPEG")
            else:
                (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
                (base / "val" / "images").mkdir(parents=True)
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(base / "val" / "images" / "v.JPEG")
                (base / "val" / "val_annotations.txt").write_text(f"v.JPEG\t{wnids[0]}\t0\t0\t1\t1\n")
            root = tmp
        ds = data.load_dataset(dataset, "train", root=root, augment=True)
        out: dict[str, Any] = {"dataset": dataset, "images": len(ds), "batch_size": batch_size,
                               "stored_size": list(_LOADER_IMAGES[dataset]), "cpu_count": os.cpu_count(),
                               "workers": {}}
        for n_workers in workers:
            loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=n_workers,
                                                 persistent_workers=False)
            t0 = time.perf_counter()
            seen = sum(len(y) for _, y in loader)
            out["workers"][str(n_workers)] = round(seen / (time.perf_counter() - t0), 1)
        return out


def _add_vit_parser(commands) -> None:
    def keep(text: str) -> int | float:
        try:
            return float(text) if any(ch in text for ch in ".eE") else int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--keep {text!r}: expected a fraction like 0.5 or a parameter "
                                             "count like 150000") from None

    v = commands.add_parser("vit", help="SPvR pruning a vision transformer, timed (params, collapse, ranking path)",
                            description="Prune a ViT with random weights on Gaussian-noise calibration images and "
                                        "print one JSON object (bench_vit).  Default: torchvision's "
                                        "VisionTransformer at 32 px, 4 layers of 4 heads, width 64, MLP 128.")
    v.add_argument("--torchvision", default=None, metavar="NAME",
                   help="a torchvision ViT instead, e.g. vit_b_16 (86M parameters; its ranking at 224 px takes "
                        "long on a CPU: --device cuda, a large --group-size)")
    v.add_argument("--image-size", type=int, default=32, help="input size in pixels (default 32), a multiple of "
                   "the patch size (4 for the small ViT, 16 for vit_b_16)")
    v.add_argument("--keep", type=keep, default=0.5, help="fraction (0.5) or parameter count to keep (default 0.5)")
    v.add_argument("--group-size", type=int, default=2, help="d, heads or MLP neurons per group (default 2)")
    v.add_argument("--calib", type=int, default=20, help="calibration images, >= 10 (default 20)")
    v.add_argument("--method", choices=("fast", "naive"), default="fast",
                   help="ranking path requested (the JSON says which ran)")
    v.add_argument("--compare", action="store_true", help="also rank by the naive path: its time, the speed-up "
                   "and whether the two rankings agree")
    v.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", action="store_true", help="print only the JSON object (one line)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spvr_lib.bench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    r = commands.add_parser("ranking", help="naive vs fast ranking time on one setup")
    model_arg = r.add_mutually_exclusive_group(required=True)
    model_arg.add_argument("--model", help="a key of scales.get_scale(SCALE).models: vgg16, resnet34, resnet50")
    model_arg.add_argument("--torchvision", help="a full-width torchvision network (e.g. resnet50), random weights, "
                           "timed on every group of --units units")
    r.add_argument("--size", type=int, default=224, help="--torchvision input size in pixels (default 224)")
    r.add_argument("--units", type=int, default=4, help="--torchvision: units timed, spread over the depth (default 4)")
    r.add_argument("--device", default="cpu", help="--torchvision: cpu or cuda (default cpu)")
    r.add_argument("--scale", default="cpu", help="smoke, cpu or paper (default cpu)")
    r.add_argument("--group-size", type=int, default=None, help="d, channels per group (default: the setup's)")
    r.add_argument("--per-class", type=int, default=None, help="calibration samples per class (default: the setup's)")
    r.add_argument("--criterion", choices=("spvr", "kl"), default="spvr")
    r.add_argument("--repeat", type=int, default=1,
                   help="time each method this many times (alternating), report the fastest")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--check-float64", action="store_true",
                   help="also compare both paths in float64 (max_rel_diff_f64, same_ranking_f64): float32 rounding can "
                   "swap groups whose scores differ by less than it, in either path")
    r.add_argument("--json", action="store_true", help="print only the JSON object (one line)")
    tr = commands.add_parser("train", help="the training loop's end-to-end images/s and its ceiling")
    tr.add_argument("--model", required=True, help="a key of the scale's models: vgg16, resnet34, resnet50")
    tr.add_argument("--scale", default="cpu", help="smoke, cpu or paper (default cpu)")
    tr.add_argument("--images", type=int, default=2048, help="training images timed (default 2048)")
    tr.add_argument("--batch-size", type=int, default=None, help="default: the scale's recipe")
    tr.add_argument("--amp", choices=("on", "off"), default=None, help="bfloat16 autocast (default: the recipe's)")
    tr.add_argument("--side-by-side", type=int, default=0, metavar="N",
                    help="also time N single-thread training processes at once (summed images/s; default off)")
    tr.add_argument("--json", action="store_true", help="print only the JSON object (one line)")
    ld = commands.add_parser("loader", help="images/s of the training data loader alone (decode + augmentation)")
    ld.add_argument("--dataset", choices=sorted(_LOADER_IMAGES), default="imagenet")
    ld.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="worker process counts to time")
    ld.add_argument("--images", type=int, default=256, help="synthetic images to write (without --root)")
    ld.add_argument("--root", default=None, help="a real copy of the dataset to read instead")
    ld.add_argument("--json", action="store_true", help="print only the JSON object (one line)")
    _add_vit_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "vit":
        try:
            record = bench_vit(args.torchvision, args.image_size, args.keep, args.group_size, args.calib,
                               args.method, args.device, args.seed, args.compare)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(record) if args.json else json.dumps(record, indent=2))
        return 0
    if args.command == "train":
        try:
            record = bench_train(args.model, args.scale, args.images, args.batch_size,
                                 None if args.amp is None else args.amp == "on", side_by_side=args.side_by_side)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(record) if args.json else json.dumps(record, indent=2))
        return 0
    if args.command == "loader":
        try:
            record = bench_loader(args.dataset, args.workers, args.images, root=args.root)
        except (ValueError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(json.dumps(record) if args.json else json.dumps(record, indent=2))
        return 0
    try:
        if args.torchvision:
            record = bench_ranking_torchvision(args.torchvision, args.size, args.group_size or 8, args.units,
                                               10 * (args.per_class or 1), args.device, args.seed)
        else:
            record = bench_ranking(args.model, args.scale, args.group_size, per_class=args.per_class, seed=args.seed,
                                   repeat=args.repeat, criterion=args.criterion, progress=not args.json,
                                   check_float64=args.check_float64)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(record))
    else:
        print(json.dumps(record, indent=2))
        print(f"{record['model']}: naive {record['naive_s']} s, fast {record['fast_s']} s, "
              f"speedup {record['speedup']}x, same ranking: {record['same_ranking']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
