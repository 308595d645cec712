"""Command line: ``python -m spvr_lib <command>`` (or ``spvr <command>``).

``prune``: SPvR on a trained network; writes the pruned architecture (untrained) to a folder.  The network is
one of spvr_lib's presets or spec files (``--model``/``--spec`` with ``--checkpoint``), a torchvision model
(``--torchvision``) or a function in a Python file (``--model-file``), the last two with ``--weights``::

    python -m spvr_lib prune --model vgg16_bn --checkpoint base.pt --data fashion-mnist \\
        --keep 0.1 --group-size 4 --out pruned/ [--width 0.25] [--calib-per-class 50]
    python -m spvr_lib prune --torchvision resnet18 --weights resnet18.pt --data cifar10 --keep 0.3 --out pruned/
    python -m spvr_lib prune --model-file mynet.py:build --weights mynet.pt --data fashion-mnist --keep 0.3 --out pruned/
    python -m spvr_lib prune --torchvision vit_b_16 --model-kwargs '{"image_size": 32}' --weights vit.pt \\
        --data fashion-mnist --keep 0.5 --group-size 512 --out pruned/     # builder options: --model-kwargs
    torchrun --nproc_per_node 2 -m spvr_lib prune ...     # the ranking's groups split over the processes

``train``: trains a preset on a dataset with the paper's recipe (``spvr_lib.train.fit``) and writes its record and
weights to a folder; a rerun with the same arguments resumes from the per-epoch checkpoint there::

    python -m spvr_lib train --preset resnet34 --width 0.25 --dataset fashion-mnist --epochs 30 \\
        --batch-size 128 --lr 0.05 --out runs/
    torchrun --nproc_per_node 2 -m spvr_lib train ...     # data-parallel (--batch-size is the global batch)

Bad input exits with status 2 and a message naming the argument.
"""
from __future__ import annotations

import argparse
import difflib
import importlib.util
import inspect
import json
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spvr_lib import data, models, store, train
from spvr_lib.budget import budget_from_keep
from spvr_lib.devices import resolve_device
from spvr_lib.prune import spvr_prune

_COMMANDS = ("prune", "train")


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
    p = commands.add_parser("prune", help="prune a trained network to a parameter budget",
                            description="Group, rank and prune a trained network; writes model.pt (the UNTRAINED "
                                        "pruned model, with model.pt.json to rebuild it: models.load_network), "
                                        "scores.csv, summary.json and, for spvr_lib's own networks, spec.json to "
                                        "--out.  Under torchrun every process ranks its share of the groups and "
                                        "rank 0 writes the outputs.")
    arch = p.add_mutually_exclusive_group(required=True)
    arch.add_argument("--model", help="spvr_lib preset: vgg16_bn, resnet18, resnet34, resnet50 (with --checkpoint)")
    arch.add_argument("--spec", type=Path, help="JSON file with a spvr_lib.models spec (instead of --model/--width; "
                      "with --checkpoint)")
    arch.add_argument("--torchvision", metavar="NAME", help="a torchvision classification model, e.g. resnet18, "
                      "resnet50 or vit_b_16: torchvision.models.get_model(NAME, weights=None, num_classes=<the data's "
                      "classes>, **<--model-kwargs>); its trained weights with --weights")
    arch.add_argument("--model-file", metavar="FILE.py:FN", help="your own network: FN(num_classes=<the data's "
                      "classes>, **<--model-kwargs>) (or FN(**<--model-kwargs>) when it takes no num_classes) from "
                      "FILE.py must return a torch.nn.Module; its trained weights with --weights")
    p.add_argument("--model-kwargs", metavar="JSON", default=None,
                   help="more keyword arguments for the --torchvision builder or the --model-file function, as a JSON "
                        "object, e.g. '{\"image_size\": 32}' (torchvision's ViTs at 32 px); num_classes comes from "
                        "--data.  Kept in summary.json's source, so models.load_network rebuilds the same network")
    p.add_argument("--width", type=float, default=None, help="width multiplier of a --model preset (default 1)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="trained weights of a --model/--spec network: a state_dict, or a dict holding one under "
                        "'model' or 'state_dict'")
    p.add_argument("--weights", type=Path, default=None,
                   help="trained weights of a --torchvision/--model-file network (a state_dict, or a dict holding "
                        "one under 'model' or 'state_dict'; loaded with torch.load(weights_only=True)); without "
                        "it the randomly initialised network is pruned, with a warning")
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
                   "when present, else the CPU; under torchrun each process takes cuda:LOCAL_RANK); the "
                   "calibration set is streamed to it in chunks")
    p.add_argument("--stem", choices=("cifar", "imagenet"), default=None,
                   help="ResNet stem of a --model preset: cifar (3x3, stride 1) or imagenet (7x7/2 + max-pool, the "
                   "paper's ResNet50 and torchvision's); default: the preset's (cifar)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_train_parser(commands)
    return parser


def _add_train_parser(commands) -> None:
    p = commands.add_parser("train", help="train a preset on a dataset (data-parallel under torchrun)",
                            description="Train a preset on a dataset with the paper's recipe; writes "
                                        "<out>/train-<hash>.json (the record, with the sha256 of the final state dict "
                                        "on every rank) and <out>/train-<hash>.final.pt (models.load_network); the "
                                        "per-epoch checkpoint <out>/train-<hash>.ckpt.pt makes a rerun with the same "
                                        "arguments resume.  Under torchrun --batch-size is the global batch.")
    p.add_argument("--preset", required=True, help="models preset: vgg16_bn, resnet18, resnet34, resnet50")
    p.add_argument("--width", type=float, default=1.0, help="width multiplier")
    p.add_argument("--stem", choices=("cifar", "imagenet"), default=None,
                   help="ResNet stem: cifar (3x3, stride 1; the preset's default) or imagenet (7x7/2 + max-pool)")
    p.add_argument("--data-root", default=None, help="the folder holding the dataset (default: the usual places)")
    p.add_argument("--dataset", required=True, help="data.load_dataset name, e.g. fashion-mnist")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--batch-size", type=int, required=True, help="global batch size (all ranks)")
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--per-class-train", type=int, default=None, help="training samples per class (default all)")
    p.add_argument("--per-class-test", type=int, default=None, help="test samples per class (default all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast on CUDA")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda:LOCAL_RANK if available)")
    p.add_argument("--out", required=True, type=Path, help="folder for the JSON record and weights")
    p.add_argument("--no-progress", action="store_true")


# --------------------------------------------------------------------------- loading the network
def _load_state(path: Path, flag: str = "--checkpoint") -> dict[str, Any]:
    """The state dict in ``path`` (``flag`` names the argument in messages)."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{flag} {str(path)!r}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise _UsageError(f"{flag} {str(path)!r} could not be loaded as weights ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise _UsageError(f"{flag} {str(path)!r}: expected a state_dict (or a dict holding one under "
                          f"'model' or 'state_dict'), got {type(obj).__name__}")
    return obj


def _load_weights(model, path: Path, flag: str, what: str) -> None:
    state = _load_state(path, flag)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise _UsageError(f"{flag} {str(path)!r} does not fit the model ({what}): {str(err).splitlines()[0]} "
                          f"...") from None


def _model_kwargs(text: str | None) -> dict[str, Any]:
    """``--model-kwargs``: a JSON object of builder keyword arguments (empty without the flag)."""
    if text is None:
        return {}
    expected = "expected a JSON object of keyword arguments, e.g. '{\"image_size\": 32}'"
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as err:
        raise _UsageError(f"--model-kwargs {text!r}: not valid JSON ({err}); {expected}") from None
    if not isinstance(kwargs, dict):
        raise _UsageError(f"--model-kwargs {text!r}: a JSON {type(kwargs).__name__}; {expected}")
    bad = [k for k in kwargs if not k.isidentifier()]
    if bad:
        raise _UsageError(f"--model-kwargs {text!r}: {bad} are not Python argument names; {expected}")
    if "num_classes" in kwargs:
        raise _UsageError(f"--model-kwargs {text!r}: num_classes is set from --data's classes; leave it out")
    return kwargs


def _spvr_network(args: argparse.Namespace, info) -> tuple[Any, str, dict]:
    """--model / --spec: a spvr_lib network with its --checkpoint; returns (model, name, spec)."""
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
    flag = "--model" if args.model is not None else "--spec"
    if args.model_kwargs is not None:
        raise _UsageError(f"--model-kwargs {args.model_kwargs!r} goes with --torchvision/--model-file; a {flag} "
                          "network is set by its preset, --width, --stem or spec file")
    if args.weights is not None:
        raise _UsageError(f"--weights {str(args.weights)!r} goes with --torchvision/--model-file; the weights of a "
                          f"{flag} network are given with --checkpoint")
    if args.checkpoint is None:
        raise _UsageError(f"{flag} needs --checkpoint: the trained weights of the network to prune")
    model = models.build(spec)
    _load_weights(model, args.checkpoint, "--checkpoint", models.spec_to_str(spec))
    return model, name, spec


def _torchvision_network(name: str, num_classes: int, extra: dict[str, Any] | None = None) -> tuple[Any, dict]:
    import torchvision

    valid = torchvision.models.list_models(module=torchvision.models)    # the classification models
    if name not in valid:
        close = difflib.get_close_matches(name, valid, n=3)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        raise _UsageError(f"--torchvision {name!r}: not a torchvision classification model; {hint}expected one of "
                          f"torchvision.models.list_models() ({len(valid)} names), e.g. resnet18, resnet50, "
                          "vgg16_bn, mobilenet_v3_small, efficientnet_b0")
    kwargs = {"num_classes": num_classes, **(extra or {})}
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except Exception as err:
        call = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        hint = " (builder options from --model-kwargs)" if extra else ""
        raise _UsageError(f"--torchvision {name!r}: torchvision.models.get_model({name!r}, weights=None, {call}) "
                          f"failed{hint} ({type(err).__name__}: {err})") from None
    return model, {"torchvision": name, "kwargs": kwargs}


def _file_network(value: str, num_classes: int, extra: dict[str, Any] | None = None) -> tuple[Any, dict]:
    from torch import nn

    expected = "expected FILE.py:FN, a Python file and the name of a function in it that returns a torch.nn.Module"
    path_text, sep, fn_name = value.rpartition(":")
    if not sep or not path_text or not fn_name:
        raise _UsageError(f"--model-file {value!r}: no ':FN' given; {expected}")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"--model-file {value!r}: no such file {str(path)!r}; {expected}")
    try:
        spec = importlib.util.spec_from_file_location(f"_spvr_user_model_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ImportError("not an importable Python file")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as err:
        raise _UsageError(f"--model-file {value!r}: importing {str(path)!r} failed ({type(err).__name__}: "
                          f"{err})") from None
    fn = getattr(module, fn_name, None)
    if fn is None:
        public = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise _UsageError(f"--model-file {value!r}: {path.name} defines no {fn_name!r}; {expected} "
                          f"(callables there: {public[:8]})")
    if not callable(fn):
        raise _UsageError(f"--model-file {value!r}: {fn_name!r} is a {type(fn).__name__}, not callable; {expected}")
    try:
        params = inspect.signature(fn).parameters.values()
        takes = any(p.name == "num_classes" or p.kind is p.VAR_KEYWORD for p in params)
    except (TypeError, ValueError):
        takes = False
    kwargs = {**({"num_classes": num_classes} if takes else {}), **(extra or {})}
    try:
        model = fn(**kwargs)
    except Exception as err:
        call = f"{fn_name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"
        raise _UsageError(f"--model-file {value!r}: {call} raised {type(err).__name__}: {err}") from None
    if not isinstance(model, nn.Module):
        raise _UsageError(f"--model-file {value!r}: {fn_name} returned a {type(model).__name__}; {expected}")
    return model, {"model_file": f"{path}:{fn_name}", "kwargs": kwargs}


def _user_network(args: argparse.Namespace, info) -> tuple[Any, str, dict]:
    """--torchvision / --model-file with optional --weights; returns (model, name, source)."""
    flag, value = (("--torchvision", args.torchvision) if args.torchvision is not None
                   else ("--model-file", args.model_file))
    for other, given in (("--checkpoint", args.checkpoint), ("--width", args.width), ("--stem", args.stem)):
        if given is not None:
            why = ("give its weights with --weights" if other == "--checkpoint"
                   else "it applies to --model presets only")
            raise _UsageError(f"{other} {given}: not used with {flag} {value!r}; {why}")
    extra = _model_kwargs(args.model_kwargs)
    if args.torchvision is not None:
        model, source = _torchvision_network(args.torchvision, info.num_classes, extra)
        name = args.torchvision
    else:
        model, source = _file_network(args.model_file, info.num_classes, extra)
        name = source["model_file"]
    if args.weights is not None:
        _load_weights(model, args.weights, "--weights", f"{flag} {value}")
    else:
        print(f"warning: no --weights given; pruning the randomly initialised {flag} {value!r} network",
              file=sys.stderr)
    return model, name, source


def _first_conv_channels(model) -> int | None:
    from torch import nn

    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if conv is None else int(conv.in_channels)


def _fit_channels(model, x, flag: str, value: str, data_name: str, num_classes: int, hint: str = ""):
    """The calibration images as the model takes them: grey repeated to 3 channels when the model expects 3
    (its first Conv2d, or a trial forward pass on one sample); returns (x, repeated)."""
    import torch

    def output(sample):
        with torch.no_grad():
            return model(sample)

    was_training = model.training
    model.eval()
    try:
        expected = _first_conv_channels(model)
        repeated = False
        if x.shape[1] == 1 and expected == 3:
            repeated = True
        elif x.shape[1] == 1 and expected is None:
            try:
                output(x[:1])
            except Exception:
                try:
                    output(x[:1].repeat(1, 3, 1, 1))
                    repeated = True
                except Exception:
                    pass
        if repeated:
            x = x.repeat(1, 3, 1, 1)
            print(f"note: the model takes 3 input channels and --data {data_name!r} has 1; its grey channel is "
                  "repeated 3 times", file=sys.stderr)
        try:
            out = output(x[:1])
        except Exception as err:
            raise _UsageError(f"{flag} {value!r} does not accept --data {data_name!r}'s inputs "
                              f"{tuple(x.shape[1:])}: {type(err).__name__}: {str(err).splitlines()[0]}{hint}") from None
        if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] == num_classes):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise _UsageError(f"{flag} {value!r} returns {shape} for one sample; expected logits [1, {num_classes}] "
                              f"for --data {data_name!r}'s {num_classes} classes")
    finally:
        model.train(was_training)
    return x, repeated


# --------------------------------------------------------------------------- torchrun
def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): the process group (nccl on CUDA, else gloo; env://) and this process's
    device (cuda:LOCAL_RANK on CUDA); returns (rank, device)."""
    import torch
    import torch.distributed as dist

    if device.type == "cuda":
        local_rank, local_world = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if local_world > torch.cuda.device_count():
            raise _UsageError(f"--device {device.type!r} under torchrun: {local_world} processes on this machine but "
                              f"{torch.cuda.device_count()} GPU(s); expected one process per GPU (--nproc_per_node), "
                              "or --device cpu")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://")
    return dist.get_rank(), device


# --------------------------------------------------------------------------- the command
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
    if args.model is not None or args.spec is not None:
        model, name, _ = _spvr_network(args, info)
        source, flag, value = None, ("--model" if args.model is not None else "--spec"), str(args.model or args.spec)
        weights = args.checkpoint
    else:
        model, name, source = _user_network(args, info)
        flag, value = (("--torchvision", args.torchvision) if args.torchvision is not None
                       else ("--model-file", args.model_file))
        weights = args.weights
    try:
        device = resolve_device(args.device)
    except (ValueError, RuntimeError, AssertionError) as err:
        raise _UsageError(f"--device {args.device!r}: {err}") from None
    try:
        budget_from_keep(args.keep, models.count_params(model))
    except ValueError as err:
        raise _UsageError(f"--keep: {err}") from None

    world = _world_size()
    rank = 0
    progress = not args.no_progress
    dataset = data.load_dataset(args.data, "train", root=args.data_root)
    x, y = data.calibration_set(dataset, args.calib_per_class, seed=args.seed, progress=progress)
    hint = ("; a builder option may set the input size, e.g. --model-kwargs '{\"image_size\": "
            f"{x.shape[-1]}}}'" if source is not None and args.model_kwargs is None else "")
    x, repeated = _fit_channels(model, x, flag, value, args.data, info.num_classes, hint)
    if world > 1:
        rank, device = _init_distributed(device)
        progress = progress and rank == 0
    try:
        model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise _UsageError(f"--device {args.device!r}: {err}") from None
    torch.manual_seed(args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        result = spvr_prune(model.eval(), (x, y), args.keep, group_size=args.group_size, criterion=args.criterion,
                            method=args.method, progress=progress,
                            **({"source": source} if source is not None else {}))
    for w in caught:                                           # issued again as usual, and the fallback kept
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    fallback = next((str(w.message) for w in caught if "fast ranking cannot run" in str(w.message)), None)
    if rank != 0:
        return 0
    out = args.out
    spec = getattr(result, "spec", None)
    if spec is not None:
        store.atomic_write_json(out / "spec.json", spec)
    models.save_network(result.model, out / "model.pt")        # model.pt + model.pt.json (load_network)
    store.atomic_write_text(out / "scores.csv", result.scores.to_csv(index=False))
    before = getattr(result, "architecture_before", None)
    after = getattr(result, "architecture", None)
    if before is None:          # an engine that predates the architecture strings
        before, after = models.spec_to_str(result.original_spec), models.spec_to_str(result.spec)
    summary = {
        "model": name, "source": source,
        "weights": None if weights is None else str(weights),
        "weights_sha256": None if weights is None else store.file_sha256(weights),
        "data": args.data, "calib_per_class": args.calib_per_class, "n_calib": len(x), "keep": args.keep,
        "input_channels_repeated": repeated,
        "group_size": args.group_size, "criterion": args.criterion, "method": args.method, "seed": args.seed,
        "ranking_path": "naive" if args.method == "naive" or fallback else "fast", "ranking_fallback": fallback,
        "world_size": world,
        "params_before": result.params_before, "params_after": result.params_after, "budget": result.budget,
        "removed_fraction": 1 - result.params_after / result.params_before,
        "architecture_before": before, "architecture": after,
        "collapsed": list(getattr(result, "collapsed", None) or []),
        "kept_one": list(getattr(result, "kept_one", None) or []),
        "groups": int(len(result.scores)), "groups_removed": int(result.scores["removed"].sum()),
        "wall_s": round(time.perf_counter() - t0, 3),
        "provenance": {"git": store.git_state(), "versions": store.library_versions(),
                       "device": store.device_info()},
    }
    if args.checkpoint is not None:         # the keys of the --model/--spec summary, as before
        summary["checkpoint"], summary["checkpoint_sha256"] = summary["weights"], summary["weights_sha256"]
    store.atomic_write_json(out / "summary.json", summary)   # written last: its presence marks a complete run
    collapsed = f"; collapsed: {', '.join(c['unit'] for c in summary['collapsed'])}" if summary["collapsed"] else ""
    print(f"{before}\n -> {after}\n"
          f"params {result.params_before} -> {result.params_after} (budget {result.budget}){collapsed}; wrote {out}/")
    return 0


def _train(args: argparse.Namespace) -> int:
    """The ``train`` command.  Its record is keyed by the spec, data, recipe and seed (``train-<hash>``), in --out;
    ``train.train_run`` is the cached run of the library and the notebooks, in the run cache."""
    import torch
    import torch.distributed as dist

    t0 = time.perf_counter()
    if args.stem is not None and not args.preset.startswith("resnet"):
        raise _UsageError(f"--stem applies to ResNet presets, not --preset {args.preset!r}")
    recipe = train.Recipe(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                          num_workers=args.num_workers, augment=not args.no_augment, amp=args.amp)
    dev = resolve_device(args.device)
    rank, world = train.init_distributed(dev)
    root = {} if args.data_root is None else {"root": args.data_root}
    train_set = data.load_dataset(args.dataset, "train", augment=recipe.augment, per_class=args.per_class_train,
                                  seed=args.seed, **root)
    test_set = data.load_dataset(args.dataset, "test", augment=False, per_class=args.per_class_test,
                                 seed=args.seed, **root)
    in_channels = int(train_set[0][0].shape[0])
    spec = models.preset(args.preset, num_classes=train_set.num_classes, in_channels=in_channels, width=args.width,
                         **({} if args.stem is None else {"stem": args.stem}))
    key = {"spec": spec, "dataset": args.dataset, "per_class_train": args.per_class_train,
           "per_class_test": args.per_class_test, "recipe": recipe.to_dict(), "seed": args.seed}
    stem = f"train-{store.run_hash(key)}"
    torch.manual_seed(args.seed)
    model = models.build(spec)
    out = train.fit(model, train_set, test_set, recipe, seed=args.seed, checkpoint=args.out / f"{stem}.ckpt.pt",
                    device=dev, progress=not args.no_progress)
    digests = [train.state_dict_digest(model.state_dict())]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, digests[0])
        digests = gathered
    if rank == 0:
        weights = args.out / f"{stem}.final.pt"
        models.save_network(model, weights, spec=spec)
        record = {**out, "key": key, "spec": spec, "params": int(models.count_params(model)),
                  "size_mb": float(models.model_size_mb(model)), "world_size": world,
                  "state_sha256_per_rank": digests, "weights": str(weights),
                  "wall_s": round(time.perf_counter() - t0, 3),
                  "provenance": {"git": store.git_state(), "versions": store.library_versions(),
                                 "device": store.device_info()}}
        path = store.atomic_write_json(args.out / f"{stem}.json", record)
        print(f"top1 {out['top1']:.2f}%  record {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m spvr_lib`` and the ``spvr`` script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prune":
            return _prune(args)
        if args.command == "train":
            return _train(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        _destroy_process_group()
    return 2


def _destroy_process_group() -> None:
    if _world_size() > 1:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()              # rank 0 has written the outputs
            dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
