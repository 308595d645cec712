"""``python -m spvr_lib.reproduce --scale paper --plan``: what each notebook will compute at a scale, and an
estimate of its GPU-hours.

The estimate counts work exactly and converts it to time with one stated assumption:
* jobs: what each notebook's module declares (``declared_jobs``: the lists its runner fans out), each counted once
  across notebooks; where a list depends on results (the best baseline, the rule's rate, a searched lr) the
  declaration's placeholder stands in for it;
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

from spvr_lib import data, latency, models, store
from spvr_lib.paper import (accuracy_vs_baselines, architecture_vs_retraining, base_models, finetune_vs_scratch,
                            group_size_ablation, jobs, mobilenet, reference, segmentation, vit_fashion_mnist)

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


def declared(cfg: Any) -> list[tuple[str, str, jobs.Batch]]:
    """Every notebook's independent computations at the scale, as each notebook's module declares them
    (``declared_jobs``; the runner fans out the same lists): (notebook, the plan row's model, batch), in the order a
    cold run computes them."""
    out: list[tuple[str, str, jobs.Batch]] = []
    for nb, module in (("03", base_models), ("04", accuracy_vs_baselines), ("05", finetune_vs_scratch),
                       ("06", architecture_vs_retraining)):
        out += [(nb, key, b) for key in cfg.models for b in module.declared_jobs(cfg, key)]
    out += [("09", key, b) for key in cfg.models if key in reference.PAPER_GROUP_SIZES
            for b in group_size_ablation.declared_jobs(cfg, key)]
    if "resnet50" in cfg.models:
        out += [("10", MOBILENET_ROW, b) for b in mobilenet.declared_jobs(cfg)]
    if cfg.segmentation:
        out += [("11", "segnet", b) for b in segmentation.declared_jobs(segmentation.segmentation_settings(cfg.name))]
    out += [("14", "vit", b) for b in vit_fashion_mnist.declared_jobs(vit_fashion_mnist.setup(cfg.name))]
    return out


MOBILENET_ROW = "resnet50 + MobileNetV3 x 2"


def _cold_jobs(cfg: Any) -> list[tuple[str, str, jobs.Batch, list[Any]]]:
    """:func:`declared` with each batch's jobs that a cold run computes: a job whose record an earlier batch (of this
    notebook or an earlier one) computes is left out (``jobs.Batch.key``: Table 3's fine-tuned runs are Table 1's;
    the local methods' one architecture from scratch is one training)."""
    seen: set[str] = set()
    out = []
    for nb, model, batch in declared(cfg):
        todo = []
        for job in batch.jobs:
            key = batch.key(job)
            if key not in seen:
                seen.add(key)
                todo.append(job)
        out.append((nb, model, batch, todo))
    return out


def _row_model(cfg: Any, model: str) -> tuple[int, int, int]:
    """(MACs of one forward pass of the row's base network, training images, test images) of a plan row's model."""
    if model in cfg.models:
        setup = cfg.model(model)
        spec, shape = base_models.base_spec(setup), _input_shape(setup)
    elif model == MOBILENET_ROW:
        return _row_model(cfg, "resnet50")
    elif model == "segnet":
        seg = cfg.segmentation
        info = data.dataset_info(seg["dataset"])
        spec = models.segnet_vgg16(num_classes=info.num_classes, in_channels=info.in_channels, width=seg["width"])
        h, w = seg["options"].get("size") or (seg["options"].get("canvas", 32),) * 2
        n_train, n_test = IMAGES.get(seg["dataset"], (seg.get("n_train") or 0, seg.get("n_test") or 0))
        return _macs(spec, (info.in_channels, h, w)), n_train, n_test
    else:                                              # notebook 14's ViT
        setup = vit_fashion_mnist.setup(cfg.name)
        with torch.no_grad():
            fwd = latency.count_macs(vit_fashion_mnist.build_vit(**vit_fashion_mnist.vit_kwargs(setup)),
                                     _input_shape(setup))
        return fwd, *_images(setup)
    return _macs(spec, shape), *_images(setup)


def _images(setup: Any) -> tuple[int, int]:
    """Training and test images of a setup: the paper's dataset sizes, or its per-class subsets."""
    if setup.dataset in IMAGES:
        return IMAGES[setup.dataset]
    classes = data.dataset_info(setup.dataset).num_classes
    return (setup.train_subset or 0) * classes, (setup.test_subset or 0) * classes


def _rankings(cfg: Any, nb: str, model: str) -> int:
    """Rankings a notebook computes in its own process for a model (their time is reported, so they are not fanned
    out): SPvR's at the setup's d (notebook 04; 05, 06 and 09 read it), one per Figure 2's other d (09)."""
    if nb == "04" and model in cfg.models:
        return 1
    if nb == "09":
        return max(len(_figure2_d(cfg, model)) - 1, 0)
    return 1 if (nb, model) in (("11", "segnet"), ("14", "vit")) else 0


def plan(cfg: Any) -> pd.DataFrame:
    """One row per (notebook, model, batch) of :func:`declared`: the jobs a cold run computes, the trainings among
    them, their mean epochs, the rankings computed in the notebook's process, MACs and GPU-hours."""
    rows = []
    speedup = _fast_speedup()
    facts: dict[str, tuple[int, int, int]] = {}
    ranked: set[tuple[str, str]] = set()
    for nb, model, batch, todo in _cold_jobs(cfg):
        if model not in facts:
            facts[model] = _row_model(cfg, model)
        fwd, n_train, n_test = facts[model]
        macs, epochs = 0.0, []
        for job in todo:
            e, share, images = batch.size(job)
            if e > 0:
                epochs.append(e)
                macs += e * share * (TRAIN_COST * fwd * n_train * images + fwd * n_test)
        rankings = 0
        if (nb, model) not in ranked:
            ranked.add((nb, model))
            rankings = _rankings(cfg, nb, model)
            if rankings and model in cfg.models:
                setup = cfg.model(model)
                with torch.device("meta"):
                    spec = base_models.base_spec(setup)
                    groups = sum(math.ceil(pl.width / setup.group_size)
                                 for pl in models.prunable_layers(models.build(spec), spec))
                n_calib = setup.calib_per_class * data.dataset_info(setup.dataset).num_classes
                macs += rankings * groups * n_calib * fwd / speedup
        if not todo and not rankings:
            continue
        rows.append({"notebook": nb, "model": model, "what": batch.what, "jobs": len(todo),
                     "trainings": len(epochs), "epochs each": sum(epochs) / len(epochs) if epochs else 0.0,
                     "rankings": rankings, "MACs": macs, "GPU-hours": macs / ASSUMED_MAC_PER_S / 3600})
    df = pd.DataFrame(rows)
    df["GPU-hours"] = df["GPU-hours"].round(1)
    return df


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


def slurm_jobs(cfg: Any) -> pd.DataFrame:
    """The Slurm jobs a cold run of the scale submits (``reproduce --executor slurm``), per notebook and model of
    :func:`plan`: ``jobs`` (array tasks: the declared jobs a cold run computes, :func:`_cold_jobs`) and ``GPU-hours per training``, the estimated time of
    the longest of its trainings (the longest kind of job) at :data:`ASSUMED_MAC_PER_S`."""
    df = plan(cfg)
    df["per"] = (df["MACs"] / ASSUMED_MAC_PER_S / 3600 / df["trainings"].where(df["trainings"] > 0)).fillna(0.0)
    out = df.groupby(["notebook", "model"], sort=False, as_index=False).agg(jobs=("jobs", "sum"), per=("per", "max"))
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
