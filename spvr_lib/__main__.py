"""Command line: ``python -m spvr_lib <command>`` (or ``spvr <command>``).

``prune``: SPvR on a trained checkpoint; writes the pruned architecture (untrained) to a folder::

    python -m spvr_lib prune --model vgg16_bn --checkpoint base.pt --data fashion-mnist \\
        --keep 0.1 --group-size 4 --out pruned/ [--width 0.25] [--calib-per-class 50]

Bad input exits with status 2 and a message naming the argument.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spvr_lib import data, models, store
from spvr_lib.budget import budget_from_keep
from spvr_lib.devices import resolve_device
from spvr_lib.prune import spvr_prune

_COMMANDS = ("prune",)


class _UsageError(ValueError):
    """A bad command-line argument (exit status 2)."""


def _keep(text: str) -> int | float:
    """``--keep``: with a decimal point or exponent a fraction (0.1), else a parameter count (150000)."""
    try:
        return float(text) if any(ch in text for ch in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep {text!r}: expected a fraction like 0.1 or a parameter count "
                                         "like 150000") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m spvr_lib", description="SPvR: structured pruning via ranking")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("prune", help="prune a trained checkpoint to a parameter budget",
                            description="Group, rank and prune a trained network; writes spec.json, model.pt "
                                        "(the UNTRAINED pruned model), scores.csv and summary.json to --out.")
    arch = p.add_mutually_exclusive_group(required=True)
    arch.add_argument("--model", help="preset name: vgg16_bn, resnet18, resnet34, resnet50")
    arch.add_argument("--spec", type=Path, help="JSON file with a spvr_lib.models spec (instead of --model/--width)")
    p.add_argument("--width", type=float, default=None, help="width multiplier of the preset (default 1)")
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="trained weights: a state_dict, or a dict holding one under 'model' or 'state_dict'")
    p.add_argument("--data", required=True, help="dataset name for the calibration set, e.g. fashion-mnist")
    p.add_argument("--data-root", default=None, help="where the dataset files are (default: the usual places)")
    p.add_argument("--keep", type=_keep, required=True,
                   help="parameters to keep: a fraction of the original, written with a decimal point "
                        "(0.1; 1.0 keeps everything), or a parameter count, written as an integer (150000)")
    p.add_argument("--group-size", type=int, default=2, help="d, channels per group (default 2)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--calib-per-class", type=int, default=50, help="calibration samples per class (default 50)")
    p.add_argument("--criterion", choices=("spvr", "kl"), default="spvr")
    p.add_argument("--method", choices=("fast", "naive"), default="fast")
    p.add_argument("--seed", type=int, default=0, help="seeds the calibration draw and the new model's init")
    p.add_argument("--device", default=None, help="where grouping and ranking run: cpu, cuda, cuda:1 (default: CUDA "
                   "when present, else the CPU); the calibration set is streamed to it in chunks")
    p.add_argument("--stem", choices=("cifar", "imagenet"), default=None,
                   help="ResNet stem of a --model preset: cifar (3x3, stride 1) or imagenet (7x7/2 + max-pool, the "
                   "paper's ResNet50 and torchvision's); default: the preset's (cifar)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _load_state(path: Path) -> dict[str, Any]:
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {str(path)!r}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise _UsageError(f"--checkpoint {str(path)!r} could not be loaded as weights ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _UsageError(f"--checkpoint {str(path)!r}: expected a state_dict (or a dict holding one under "
                          f"'model' or 'state_dict'), got {type(obj).__name__}")
    return obj


def _prune(args: argparse.Namespace) -> int:
    import torch


    t0 = time.perf_counter()
    for flag, value in (("--group-size", args.group_size), ("--calib-per-class", args.calib_per_class)):
        if value < 1:
            raise _UsageError(f"{flag} {value}: expected an integer >= 1")
    try:
        info = data.dataset_info(args.data)
    except ValueError as err:
        raise _UsageError(f"--data: {err}") from None
    if info.task != "classification":
        raise _UsageError(f"--data {args.data!r} is a {info.task} dataset; pruning needs a classification dataset")
    if args.spec is not None:
        if args.width is not None:
            raise _UsageError("--width applies to --model presets; a --spec file already fixes every width")
        if not args.spec.is_file():
            raise FileNotFoundError(f"--spec {str(args.spec)!r}: no such file")
        try:
            spec = json.loads(args.spec.read_text())
            models.validate(spec)
        except (json.JSONDecodeError, ValueError) as err:
            raise _UsageError(f"--spec {str(args.spec)!r}: {err}") from None
        name = spec["arch"]
    else:
        if args.model not in models.PRESETS:
            raise _UsageError(f"--model {args.model!r}: expected one of {sorted(models.PRESETS)}")
        width = 1.0 if args.width is None else args.width
        if not width > 0:
            raise _UsageError(f"--width {args.width}: expected a positive multiplier")
        stem = {} if args.stem is None else {"stem": args.stem}
        if stem and not args.model.startswith("resnet"):
            raise _UsageError(f"--stem applies to ResNet presets, not --model {args.model!r}")
        spec = models.preset(args.model, num_classes=info.num_classes, in_channels=info.in_channels, width=width,
                             **stem)
        name = args.model
    if spec["num_classes"] != info.num_classes:
        raise _UsageError(f"the model has {spec['num_classes']} classes but --data {args.data!r} has "
                          f"{info.num_classes}")
    in_key = "in_features" if spec["arch"] == "mlp" else "in_channels"
    if spec["arch"] != "mlp" and spec[in_key] != info.in_channels:
        raise _UsageError(f"the model takes {spec[in_key]} input channels but --data {args.data!r} has "
                          f"{info.in_channels}")
    state = _load_state(args.checkpoint)
    model = models.build(spec)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _UsageError(f"--checkpoint {str(args.checkpoint)!r} does not fit the model "
                          f"({models.spec_to_str(spec)}): {str(err).splitlines()[0]} ...") from None
    try:
        device = resolve_device(args.device)
        model.to(device)
    except (ValueError, RuntimeError, AssertionError) as err:
        raise _UsageError(f"--device {args.device!r}: {err}") from None

    try:
        budget_from_keep(args.keep, models.count_params(model))
    except ValueError as err:
        raise _UsageError(f"--keep: {err}") from None

    dataset = data.load_dataset(args.data, "train", root=args.data_root)
    x, y = data.calibration_set(dataset, args.calib_per_class, seed=args.seed, progress=not args.no_progress)
    torch.manual_seed(args.seed)
    result = spvr_prune(model, (x, y), args.keep, group_size=args.group_size, criterion=args.criterion,
                        method=args.method, progress=not args.no_progress)
    out = args.out
    store.atomic_write_json(out / "spec.json", result.spec)
    models.save_network(result.model, out / "model.pt")        # model.pt + model.pt.json (load_network)
    store.atomic_write_text(out / "scores.csv", result.scores.to_csv(index=False))
    summary = {
        "model": name, "checkpoint": str(args.checkpoint), "checkpoint_sha256": store.file_sha256(args.checkpoint),
        "data": args.data, "calib_per_class": args.calib_per_class, "n_calib": len(x), "keep": args.keep,
        "group_size": args.group_size, "criterion": args.criterion, "method": args.method, "seed": args.seed,
        "params_before": result.params_before, "params_after": result.params_after, "budget": result.budget,
        "removed_fraction": 1 - result.params_after / result.params_before,
        "architecture_before": models.spec_to_str(result.original_spec),
        "architecture": models.spec_to_str(result.spec),
        "groups": int(len(result.scores)), "groups_removed": int(result.scores["removed"].sum()),
        "wall_s": round(time.perf_counter() - t0, 3),
        "provenance": {"git": store.git_state(), "versions": store.library_versions(),
                       "device": store.device_info()},
    }
    store.atomic_write_json(out / "summary.json", summary)   # written last: its presence marks a complete run
    print(f"{summary['architecture_before']}\n -> {summary['architecture']}\n"
          f"params {result.params_before} -> {result.params_after} (budget {result.budget}); wrote {out}/")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m spvr_lib`` and the ``spvr`` script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prune":
            return _prune(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
