"""Inference latency (Section 5.3, Figure 1) and the one MAC counter.

``measure_latency`` times a model's prediction as the paper does: the mean over 1500 forward
passes after a warm-up, here with per-run statistics (median, spread) and the device and thread
count written into the result so they go into a notebook's provenance. ``count_macs`` counts
multiply-accumulates with torch-pruning's counter, the same function for every method.
"""
from __future__ import annotations

import copy
import itertools
import time

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from spvr_lib.devices import resolve_device

__all__ = ["measure_latency", "measure_interleaved", "median_interval", "cpu_model", "count_macs"]


def _check_input_shape(input_shape) -> tuple[int, int, int]:
    if not isinstance(input_shape, (tuple, list)) or len(input_shape) != 3 or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in input_shape):
        raise ValueError(f"input_shape must be a tuple of 3 positive ints (C, H, W), got {input_shape!r}")
    return tuple(input_shape)


def _check_int(value, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")


def measure_latency(model: nn.Module, input_shape: tuple[int, int, int], batch_size: int = 1, runs: int = 1500,
                    warmup: int = 50, device: str | None = None, threads: int | None = None) -> dict:
    """Time ``model`` predicting a batch of ``batch_size`` random inputs of shape ``input_shape`` (C, H, W).

    ``warmup`` untimed forwards, then ``runs`` timed ones, in eval mode under
    ``torch.inference_mode``. CPU: ``time.perf_counter`` around each forward. CUDA: a pair of CUDA
    events around each forward, read after one ``torch.cuda.synchronize``. ``device`` None: CUDA if
    available, else CPU; a model elsewhere is timed on a copy moved to ``device`` (the caller's model
    is not moved, and its train/eval mode is restored). ``threads``: torch's intra-op thread count
    during the measurement (restored after); None keeps the current one.

    Returns {"mean_ms", "median_ms", "std_ms", "p10_ms", "p90_ms": milliseconds per forward of one
    batch (std over runs, 0 for one run), "runs", "batch_size", "device" (e.g. "cpu", "cuda:0"),
    "threads" (``torch.get_num_threads()`` during the runs)}.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    _check_int(batch_size, "batch_size", 1)
    _check_int(runs, "runs", 1)
    _check_int(warmup, "warmup", 0)
    if threads is not None:
        _check_int(threads, "threads", 1)
    dev = resolve_device(device)

    tensors = itertools.chain(model.parameters(), model.buffers())
    net = model if all(t.device == dev for t in tensors) else copy.deepcopy(model).to(dev)
    was_training, old_threads = net.training, torch.get_num_threads()
    x = torch.randn((batch_size, *shape), generator=torch.Generator().manual_seed(0)).to(dev)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        net.eval()
        with torch.inference_mode():
            for _ in range(warmup):
                net(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
                events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                          for _ in range(runs)]
                for start, end in events:
                    start.record()
                    net(x)
                    end.record()
                torch.cuda.synchronize(dev)
                times_ms = np.array([start.elapsed_time(end) for start, end in events])
            else:
                times_ms = np.empty(runs)
                for r in range(runs):
                    t0 = time.perf_counter()
                    net(x)
                    times_ms[r] = (time.perf_counter() - t0) * 1e3
    finally:
        net.train(was_training)
        torch.set_num_threads(old_threads)
    return {"mean_ms": float(times_ms.mean()), "median_ms": float(np.median(times_ms)),
            "std_ms": float(times_ms.std(ddof=1)) if runs > 1 else 0.0,
            "p10_ms": float(np.percentile(times_ms, 10)), "p90_ms": float(np.percentile(times_ms, 90)),
            "runs": runs, "batch_size": batch_size, "device": str(dev), "threads": used_threads}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` where there is none): a latency is a
    property of the machine that measured it."""
    import platform
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def median_interval(values, level: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high) of ``values`` with a distribution-free ``level`` confidence interval of the median:
    the order statistics x_(j) and x_(n+1-j), j the largest with P(Binomial(n, 1/2) < j) <= (1 - level) / 2.
    With too few values for the level (n < 6 at 95%) the interval is (min, max)."""
    from scipy.stats import binom

    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        raise ValueError("values is empty; expected at least one timing")
    j = 0
    while j + 1 <= n // 2 and binom.cdf(j, n, 0.5) <= (1 - level) / 2:
        j += 1
    # P(X <= j - 1) <= alpha/2: x_(j) .. x_(n+1-j) (1-based) covers the median with probability >= level
    low, high = (x[j - 1], x[n - j]) if j >= 1 else (x[0], x[-1])
    return float(np.median(x)), float(low), float(high)


def measure_interleaved(models: dict[str, nn.Module], input_shape: tuple[int, int, int], batch_size: int = 1,
                        rounds: int = 30, runs_per_round: int = 10, warmup: int = 30,
                        threads: int | None = None) -> dict[str, dict]:
    """Time several networks on the CPU so that drift (other load, frequency, cache) hits all alike: ``rounds``
    rounds, each timing every network for ``runs_per_round`` forwards of a batch of ``batch_size`` random inputs
    (eval mode, ``torch.inference_mode``, ``time.perf_counter``), the order of the networks rotated from round to
    round; ``warmup`` untimed forwards of each first.  A round's median is one sample; each network's latency is
    the median over rounds with its 95% interval (:func:`median_interval`).

    Returns {name: {"median_ms", "low_ms", "high_ms" (the interval), "mean_ms", "p10_ms", "p90_ms" (over every
    timed forward), "rounds", "runs", "batch_size", "threads"}}: milliseconds per forward of one batch."""
    if not models or not all(isinstance(m, nn.Module) for m in models.values()):
        raise ValueError(f"models must be a non-empty {{name: nn.Module}}, got {type(models).__name__}")
    shape = _check_input_shape(input_shape)
    for value, what, minimum in ((batch_size, "batch_size", 1), (rounds, "rounds", 1),
                                 (runs_per_round, "runs_per_round", 1), (warmup, "warmup", 0)):
        _check_int(value, what, minimum)
    if threads is not None:
        _check_int(threads, "threads", 1)
    names = list(models)
    nets = {n: copy.deepcopy(m).cpu().eval() for n, m in models.items()}
    x = torch.randn((batch_size, *shape), generator=torch.Generator().manual_seed(0))
    old_threads = torch.get_num_threads()
    per_round = {n: [] for n in names}
    every = {n: [] for n in names}
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        used_threads = torch.get_num_threads()
        with torch.inference_mode():
            for n in names:
                for _ in range(warmup):
                    nets[n](x)
            for r in range(rounds):
                for n in names[r % len(names):] + names[:r % len(names)]:
                    times = np.empty(runs_per_round)
                    for i in range(runs_per_round):
                        t0 = time.perf_counter()
                        nets[n](x)
                        times[i] = (time.perf_counter() - t0) * 1e3
                    per_round[n].append(float(np.median(times)))
                    every[n].extend(times.tolist())
    finally:
        torch.set_num_threads(old_threads)
    out = {}
    for n in names:
        med, low, high = median_interval(per_round[n])
        out[n] = {"median_ms": med, "low_ms": low, "high_ms": high, "mean_ms": float(np.mean(every[n])),
                  "p10_ms": float(np.percentile(every[n], 10)), "p90_ms": float(np.percentile(every[n], 90)),
                  "rounds": rounds, "runs": rounds * runs_per_round, "batch_size": batch_size,
                  "threads": used_threads}
    return out


def count_macs(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-accumulates for ONE sample of shape ``input_shape`` (C, H, W): THE op counter.

    ``torch_pruning.utils.count_ops_and_params`` (torch-pruning 1.6.1, ptflops' convention; it runs
    on a deepcopy in eval mode, with a zero input of shape (1, C, H, W) on the model's device). Its
    "ops" are MACs for the layers that dominate: Conv2d counts k_h * k_w * (c_in / groups) per output
    element, Linear c_in per output feature. It also adds, per OUTPUT element, 1 for a conv bias,
    per output feature 1 for a linear bias, and per INPUT element 2 for an affine BatchNorm, 1 for a
    ReLU (output element) and 1 for a pooling layer. Functional ops (residual additions, flatten)
    and modules it does not know (Hardswish, MaxUnpool2d, Dropout) count 0. FLOPs are about 2x this.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = _check_input_shape(input_shape)
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    x = torch.zeros((1, *shape), device=first.device if first is not None else "cpu")
    with torch.no_grad():
        ops, _ = tp.utils.count_ops_and_params(model, x)
    return int(ops)
