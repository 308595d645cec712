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

import math
from typing import Any

import pandas as pd
import torch

from spvr_lib import baselines, data, latency, models, store
from spvr_lib.paper import base_models, tables1_3

ASSUMED_MAC_PER_S = 60e12          # ~120 TFLOP/s sustained (bfloat16, ~40% of an A100's 312 TFLOP/s peak)
TRAIN_COST = 3.0                   # a training step: forward + backward, in forward passes
# Training / test images per dataset: Section 4.1 of the paper (CityScapes: the fine annotations' train / val).
IMAGES = {"cifar10": (50_000, 10_000), "tiny-imagenet": (100_000, 10_000), "imagenet": (1_200_000, 50_000),
          "cityscapes": (2_975, 500)}
FIGURE2_D = {"vgg16": (2, 4, 8, 16, 32), "resnet34": (4, 8, 16, 32), "resnet50": (8, 16, 32)}   # Section 6.2


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
    trainable = [m for m in tables1_3.TABLE1_METHODS if m != "otov2"]
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
        add("05", "fine-tune vs scratch: 2 x seeds trainings at one rate (the model's lr per mode)",
            2 * seeds, setup.epochs, 1 - 0.6, 0)
        # from scratch, the local methods' one architecture is one training, and SPvR's is Table 1's
        shared = [m for m in methods if m in baselines.LOCAL_METHODS]
        spvr_shared = "spvr" in methods and setup.table3_rate in rates
        distinct = len(methods) - max(len(shared) - 1, 0) - spvr_shared
        why = ([f"the {len(shared)} local methods give one architecture"] if len(shared) > 1 else []) + \
            (["SPvR's run is Table 1's"] if spvr_shared else [])
        add("06", f"{len(methods)} methods from scratch at {setup.table3_rate:.0%}"
            + (f" ({distinct} distinct trainings: {', '.join(why)})" if why else ""), distinct * seeds,
            setup.epochs, 1 - setup.table3_rate, 0)
        d_values = FIGURE2_D.get(key, (setup.group_size,))
        add("09", f"d in {list(d_values)} at 98%, trained", len(d_values) * seeds, setup.epochs, 0.02,
            len(d_values))
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


__all__ = ["ASSUMED_MAC_PER_S", "IMAGES", "plan", "plan_markdown"]
