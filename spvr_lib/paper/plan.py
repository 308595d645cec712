"""``python -m spvr_lib.reproduce --scale paper --plan``: what each notebook will compute at a scale, and an
estimate of its GPU-hours.

The estimate counts work exactly and converts it to time with one stated assumption:
* work: multiply-accumulates (MACs) of one forward pass of each network at its input size, counted by
  ``latency.count_macs`` on the real architecture; a training step costs 3x a forward pass (forward +
  backward); a pruned network at removal rate r is costed at (1 - r) of its base (an approximation: MACs
  fall roughly with parameters); a ranking costs one forward pass of the calibration set per group (the
  naive algorithm) divided by the fast path's measured speed-up (figures/cpu/ranking_speed.csv, 8-12x).
* time: :data:`ASSUMED_MAC_PER_S`, a sustained bfloat16 training throughput of an A100/H100-class GPU.
  It is an ASSUMPTION, not a measurement: no GPU has been lent to this project's sessions yet
  (``make gpu-check`` is where a measured figure would come from).  Small inputs (32x32, 64x64) keep a
  GPU far below such a throughput, and data loading is not counted, so the hours are a LOWER BOUND.
Image counts per epoch are the paper's dataset sizes (Section 4.1) and CityScapes' fine training set.
"""
from __future__ import annotations

import json
import math
from typing import Any

import pandas as pd
import torch

from spvr_lib import baselines, data, latency, models, store
from spvr_lib.paper import base_models, convergence, group_size_ablation, pruned_networks, reference, scales

ASSUMED_MAC_PER_S = 60e12          # ~120 TFLOP/s sustained (bfloat16, ~40% of an A100's 312 TFLOP/s peak)
TRAIN_COST = 3.0                   # a training step: forward + backward, in forward passes
# Training / test images per dataset: Section 4.1 of the paper (CityScapes: the fine annotations' train / val).
IMAGES = {"cifar10": (50_000, 10_000), "tiny-imagenet": (100_000, 10_000), "imagenet": (1_200_000, 50_000),
          "cityscapes": (2_975, 500)}


def _figure2_d(cfg: Any, key: str) -> list[int]:
    """Figure 2's group sizes of model ``key`` at ``cfg``'s width (``group_size_ablation.group_sizes``)."""

    return list(group_size_ablation.group_sizes(cfg, [key])[key]) if key in reference.PAPER_GROUP_SIZES else\
        [cfg.model(key).group_size]


def _input_shape(setup: Any) -> tuple[int, int, int]:
    info = data.dataset_info(setup.dataset)
    size = info.image_size if isinstance(info.image_size, int) else info.image_size[0]
    return (info.in_channels, size, size)


def _macs(spec: dict, shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return latency.count_macs(models.build(spec), shape)


def _fast_speedup() -> float:
    """The fast ranking's measured speed-up over the naive one (the mean of the committed cpu benchmark)."""
    csv = store.REPO_ROOT / "figures" / "cpu" / "ranking_speed.csv"
    if csv.exists():
        return float(pd.read_csv(csv)["speedup"].mean())
    return 1.0


def plan(cfg: Any) -> pd.DataFrame:
    """One row per (notebook, model): trainings, training image passes, rankings, MACs and GPU-hours."""
    rows = []
    speedup = _fast_speedup()
    trainable = [m for m in pruned_networks.TABLE1_METHODS if m != "otov2"]
    for key, setup in cfg.models.items():
        spec = base_models.base_spec(setup)
        shape = _input_shape(setup)
        fwd = _macs(spec, shape)
        n_train, n_test = IMAGES.get(setup.dataset, (None, None))
        if n_train is None:
            n_train = (setup.train_subset or 0) * data.dataset_info(setup.dataset).num_classes
            n_test = (setup.test_subset or 0) * data.dataset_info(setup.dataset).num_classes
        epoch_macs = TRAIN_COST * fwd * n_train + fwd * n_test
        with torch.device("meta"):
            groups = sum(math.ceil(pl.width / setup.group_size)
                         for pl in models.prunable_layers(models.build(spec), spec))
        n_calib = setup.calib_per_class * data.dataset_info(setup.dataset).num_classes
        ranking_macs = groups * n_calib * fwd / speedup
        seeds = len(cfg.seeds)
        rates = setup.compare_rates
        methods = ["spvr"] if setup.quote_baselines else trainable

        def add(notebook: str, what: str, trainings: float, epochs_each: float, rate_factor: float,
                rankings: float) -> None:
            macs = trainings * epochs_each * epoch_macs * rate_factor + rankings * ranking_macs
            rows.append({"notebook": notebook, "model": key, "what": what, "trainings": trainings,
                         "epochs each": epochs_each, "rankings": rankings, "MACs": macs,
                         "GPU-hours": macs / ASSUMED_MAC_PER_S / 3600})

        # an lr trial trains on the training images minus the validation split, or on all of them when the
        # validation images are others (val_per_class)
        trial_share = 1.0 if setup.val_per_class is not None else 1 - setup.val_fraction
        trial_data = "the training images" if setup.val_per_class is not None else f"{trial_share:.0%} of the data"
        if setup.pretrained:
            add("03", "published weights, evaluated once", 0, 0, 1, 0)
        else:
            add("03", f"lr search from scratch ({len(setup.lr_grid)} values, {trial_data}) + base training"
                + (f" (+ {cfg.convergence_factor}x epochs)" if cfg.convergence_factor else ""),
                len(setup.lr_grid) * trial_share + 1 + (cfg.convergence_factor or 0), setup.epochs, 1, 0)
            ft_grid = base_models.lr_grid(setup, "finetune")
            add("04", f"lr search for fine-tuning ({len(ft_grid)} values) on ℓ1's network at "
                f"{setup.table3_rate:.0%}", len(ft_grid) * trial_share, setup.epochs, 1 - setup.table3_rate, 0)
        mean_keep = sum(1 - r for r in rates) / len(rates)
        add("04", f"{len(methods)} methods x {len(rates)} rates x {seeds} seeds, fine-tuned / from scratch",
            len(methods) * len(rates) * seeds, setup.epochs, mean_keep, 1)
        add("04", "on-budget readings: SPvR and the best baseline of each cell, 3/4 of the epochs",
            2 * len(rates) * seeds, scales.ON_BUDGET_FRACTION * setup.epochs, mean_keep, 0)
        if not setup.quote_baselines:
            add("04", f"the authors' {len(baselines.AUTHORS_VARIANTS)} variants at {max(rates):.0%} (sensitivity)",
                len(baselines.AUTHORS_VARIANTS) * seeds, setup.epochs, 1 - max(rates), 0)
        grids = len(base_models.lr_grid(setup, "finetune")) + len(base_models.lr_grid(setup, "scratch"))
        add("05", f"fine-tune vs scratch at 2 rates (the rule's, the paper's): an lr search per network and mode "
            f"({grids} trials), 2 x seeds trainings and their on-budget readings",
            2 * (grids * trial_share + 2 * seeds * (1 + scales.ON_BUDGET_FRACTION)), setup.epochs, 1 - 0.6, 0)
        # from scratch, the local methods' one architecture is one training, and SPvR's is Table 1's
        shared = [m for m in methods if m in baselines.LOCAL_METHODS]
        spvr_shared = "spvr" in methods and setup.table3_rate in rates
        distinct = len(methods) - max(len(shared) - 1, 0) - spvr_shared
        why = ([f"the {len(shared)} local methods give one architecture"] if len(shared) > 1 else []) +\
            (["SPvR's run is Table 1's"] if spvr_shared else [])
        add("06", f"{len(methods)} methods from scratch at {setup.table3_rate:.0%}"
            + (f" ({distinct} distinct trainings: {', '.join(why)})" if why else ""), distinct * seeds,
            setup.epochs, 1 - setup.table3_rate, 0)
        add("06", "on-budget readings: SPvR and the best baseline, 3/4 of the epochs", 2 * seeds,
            scales.ON_BUDGET_FRACTION * setup.epochs, 1 - setup.table3_rate, 0)
        d_values = _figure2_d(cfg, key)
        add("09", f"d in {d_values} at 98% (the paper's d scaled with the width), trained, and the best and worst d "
            "on their budget", len(d_values) * seeds + 2 * seeds * scales.ON_BUDGET_FRACTION, setup.epochs, 0.02, len(d_values))
    resnet50 = cfg.models.get("resnet50")
    if resnet50 is not None:
        add10 = [r for r in rows if r["model"] == "resnet50" and r["notebook"] == "04"][0]
        per_training = add10["MACs"] / max(add10["trainings"], 1)
        rows.append({"notebook": "10", "model": "resnet50 + MobileNetV3 x 2", "what": "3 networks from scratch",
                     "trainings": 3 * len(cfg.seeds), "epochs each": resnet50.epochs, "rankings": 0,
                     "MACs": 3 * len(cfg.seeds) * per_training * 0.1,
                     "GPU-hours": 3 * len(cfg.seeds) * per_training * 0.1 / ASSUMED_MAC_PER_S / 3600})
    seg = cfg.segmentation
    if seg:
        spec = models.segnet_vgg16(num_classes=data.dataset_info(seg["dataset"]).num_classes,
                                   in_channels=data.dataset_info(seg["dataset"]).in_channels, width=seg["width"])
        h, w = seg["options"].get("size") or (seg["options"].get("canvas", 32),) * 2
        fwd = _macs(spec, (3 if seg["dataset"] == "cityscapes" else 1, h, w))
        n = IMAGES.get(seg["dataset"], (seg.get("n_train") or 0, seg.get("n_test") or 0))
        macs = 2 * len(seg["seeds"]) * seg["epochs"] * (TRAIN_COST * fwd * n[0] + fwd * n[1])
        rows.append({"notebook": "11", "model": "segnet", "what": "base + 80% pruned, from scratch",
                     "trainings": 2 * len(seg["seeds"]), "epochs each": seg["epochs"], "rankings": 1, "MACs": macs,
                     "GPU-hours": macs / ASSUMED_MAC_PER_S / 3600})
    rows.append(_vit_row(cfg))
    df = pd.DataFrame(rows)
    df["GPU-hours"] = df["GPU-hours"].round(1)
    return df


def _vit_row(cfg: Any) -> dict[str, Any]:
    """Notebook 14's row: the lr trials, the base and its 3/4-epoch reading, the fine-tuning lr trials (at the
    smallest keep) and every (keep, method, seed) training of :mod:`.vit_fashion_mnist`, costed as above."""
    from spvr_lib.paper import vit_fashion_mnist

    setup = vit_fashion_mnist.setup(cfg.name)
    with torch.no_grad():
        fwd = latency.count_macs(vit_fashion_mnist.build_vit(**vit_fashion_mnist.vit_kwargs(setup)),
                                 _input_shape(setup))
    n_train, n_test = IMAGES.get(setup.dataset, (None, None))
    if n_train is None:
        classes = data.dataset_info(setup.dataset).num_classes
        n_train, n_test = (setup.train_subset or 0) * classes, (setup.test_subset or 0) * classes
    grid = len(setup.lr_grid) if len(setup.lr_grid) > 1 else 0
    ft_grid = len(setup.finetune_lr_grid) if len(setup.finetune_lr_grid) > 1 else 0
    runs = len(vit_fashion_mnist.METHODS) * len(setup.seeds)
    base_units = grid + 1 + (scales.ON_BUDGET_FRACTION if setup.convergence else 0) + ft_grid * min(setup.keeps) + \
        runs * sum(setup.keeps)
    macs = base_units * setup.epochs * (TRAIN_COST * fwd * n_train + fwd * n_test)
    return {"notebook": "14", "model": "vit", "what": f"ViT: lr searches, base, {runs} trainings per keep "
            f"{list(setup.keeps)}", "trainings": grid + 1 + ft_grid + runs * len(setup.keeps),
            "epochs each": setup.epochs, "rankings": 1, "MACs": macs, "GPU-hours": macs / ASSUMED_MAC_PER_S / 3600}


def plan_markdown(cfg: Any) -> str:
    """The plan as Markdown: every row, then GPU-hours per notebook and in total."""
    df = plan(cfg)
    per_nb = df.groupby("notebook")["GPU-hours"].sum().round(1)
    lines = [f"Plan for scale {cfg.name!r}: work counted exactly (MACs by latency.count_macs), time ASSUMED at "
             f"{ASSUMED_MAC_PER_S / 1e12:.0f} TMAC/s sustained (A100/H100 class, bfloat16; not measured: no GPU was "
             "available), so the GPU-hours are a lower bound (small images and data loading run slower). "
             "Baselines quoted by the paper are not trained.", "",
             df.drop(columns=["MACs"]).to_markdown(index=False, floatfmt=".1f"), "",
             "GPU-hours per notebook: " + ", ".join(f"{nb}: {h}" for nb, h in per_nb.items()),
             f"Total: at least {per_nb.sum():.0f} GPU-hours (~{per_nb.sum() / 24:.1f} GPU-days)."]
    return "\n".join(lines)


def _job_counts(cfg: Any) -> dict[tuple[str, str], int]:
    """{(notebook, plan row's model): the independent computations the notebook fans out for it on a cold run}:
    lr trials, pruned networks, trainings and on-budget readings, one job each (``jobs.fill_cache``'s batches);
    what a notebook computes in its own process (rankings, latency, a model whose baselines are quoted) is not a
    job."""

    out: dict[tuple[str, str], int] = {}
    trainable = [m for m in pruned_networks.TABLE1_METHODS if m != "otov2"]
    seeds = len(cfg.seeds)

    def grid(values: Any) -> int:                       # a grid of one value is not searched
        return len(values) if len(values) > 1 else 0

    for key, setup in cfg.models.items():
        rates = setup.compare_rates
        methods = ["spvr"] if setup.quote_baselines else trainable
        if setup.pretrained:
            out["03", key], trials = 0, 0
        else:
            budget = {(e, s) for _, _, e, s in convergence.budget_jobs(cfg, [key]) if not (s == 0 and e % setup.epochs == 0)}
            out["03", key] = grid(setup.lr_grid) + 1 + bool(cfg.convergence_factor) + bool(setup.amp) + len(budget)
            trials = grid(base_models.lr_grid(setup, "finetune"))
        l1 = set() if setup.quote_baselines else {("l1", float(setup.table3_rate))}   # the fine-tuning lr's network
        prunes = len({(m, float(r)) for m in methods for r in rates} | l1)
        shared = "spvr" in methods and setup.table3_rate in rates
        sensitivity = 0 if setup.quote_baselines else len(baselines.AUTHORS_VARIANTS) * seeds
        out["04", key] = prunes + trials + len(methods) * len(rates) * seeds + 2 * len(rates) * seeds + sensitivity
        t2_trials = grid(base_models.lr_grid(setup, "finetune")) + grid(base_models.lr_grid(setup, "scratch"))
        out["05", key] = 2 * (t2_trials + 2 * seeds * 2)
        out["06", key] = (len(methods) - shared) * seeds + 2 * seeds
        out["09", key] = len(_figure2_d(cfg, key)) * seeds + 2 * seeds
    if "resnet50" in cfg.models:      # 2 MobileNets' lr searches, 3 networks per seed and their shorter budget
        out["10", "resnet50 + MobileNetV3 x 2"] = 2 * grid(base_models.lr_grid(cfg.model("resnet50"), "scratch"))\
            + 2 * 3 * seeds
    seg = cfg.segmentation
    if seg:                           # lr search, base and SPvR's SegNet per seed, the base's shorter budget
        short = int(convergence.short_epochs(int(seg["epochs"])) != int(seg["epochs"]))
        out["11", "segnet"] = grid(seg["lr_grid"]) + (2 + short) * len(seg["seeds"])
    return out


def slurm_jobs(cfg: Any) -> pd.DataFrame:
    """The Slurm jobs a cold run of the scale submits (``reproduce --executor slurm``), per notebook and model of
    :func:`plan`: ``jobs`` (array tasks, :func:`_job_counts`) and ``GPU-hours per training``, the estimated time of
    the longest of its trainings (the longest kind of job) at :data:`ASSUMED_MAC_PER_S`."""
    df = plan(cfg)
    df["per"] = (df["MACs"] / ASSUMED_MAC_PER_S / 3600 / df["trainings"].where(df["trainings"] > 0)).fillna(0.0)
    out = df.groupby(["notebook", "model"], sort=False, as_index=False).agg(per=("per", "max"))
    counts = _job_counts(cfg)
    out.insert(2, "jobs", [counts.get((nb, m), 0) for nb, m in zip(out["notebook"], out["model"])])
    return out.rename(columns={"per": "GPU-hours per training"}).sort_values(["notebook"], kind="stable")


def slurm_markdown(cfg: Any, settings: Any) -> str:
    """What ``reproduce --scale <cfg> --executor slurm`` submits, as Markdown: the jobs per notebook, each sized by
    ``settings`` (``slurm.SlurmSettings``), and the longest training's estimated time against the time limit."""
    df = slurm_jobs(cfg)
    per_nb = df.groupby("notebook").agg(jobs=("jobs", "sum"), longest=("GPU-hours per training", "max"))
    rows = pd.DataFrame({"notebook": per_nb.index, "jobs": per_nb["jobs"].values,
                         "longest training (est. GPU-hours)": per_nb["longest"].round(3).values})
    total, longest = int(per_nb["jobs"].sum()), float(per_nb["longest"].max())
    limit_h = settings.time_min / 60
    lines = [f"Slurm jobs of scale {cfg.name!r} (--executor slurm): about {total} jobs on a cold run, each sized "
             f"{settings.describe()}; partition {settings.partition or '(the cluster default)'}; submitit's files "
             f"in {settings.logs}.  Each batch of a notebook (lr trials, pruned networks, trainings, on-budget "
             "readings) is one job array, one task per computation; only the computations missing from the run "
             "cache are submitted, so a resumed run submits fewer.  The notebooks, the rankings and the latency "
             "timings run in the process that submits.", "",
             rows.to_markdown(index=False, floatfmt=".3g"), "",
             f"Total: {total} jobs; the longest training is estimated at {longest:.3g} GPU-hours (throughput ASSUMED "
             f"as above), against a time limit of {limit_h:.3g} h per job."]
    account = store.REPO_ROOT / "figures" / cfg.name / "reproduce_run.json"
    if account.exists():
        acc = json.loads(account.read_text())
        lines.append(f"Measured: the {acc['records']} records of the scale's last run cost {acc['compute_s'] / 3600:.1f} "
                     f"machine-hours (compute_s of figures/{cfg.name}/reproduce_run.json, on the machine that ran them).")
    if settings.gpus == 0 and cfg.name == "paper":
        lines.append("Warning: the paper scale trains on GPUs; give each job one with --slurm-gpus 1.")
    if longest > limit_h:
        lines.append(f"Warning: the longest training may exceed --slurm-time {settings.time_min} minutes; a job that "
                     "times out leaves no record, and rerunning resumes it from its checkpoint.")
    return "\n".join(lines)


__all__ = ["ASSUMED_MAC_PER_S", "IMAGES", "plan", "plan_markdown", "slurm_jobs", "slurm_markdown"]
