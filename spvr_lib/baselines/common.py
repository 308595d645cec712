"""What every baseline shares: its result, its failure, the argument checks, and the bisection to a budget.

:class:`BaselineResult` (what :func:`spvr_lib.baselines.prune` returns), ``_MethodFailure`` (a method that cannot
run or reach the budget: recorded in the result, never raised), the checks of ``prune``'s arguments (``_KWARGS``:
each method's keywords, ``_DEFAULT_KW``), :func:`bisect_budget` (the smallest setting of a non-increasing
parameter count that meets a budget: one ratio for the local methods, a prefix of the global order for Taylor and
CURL, a multiplier for RCP), :func:`budget_from_keep` (from :mod:`spvr_lib.budget`: ``keep`` as an int or a
fraction, to a parameter budget) and ``_batches`` (the calibration mini-batches).  No criterion lives here; the
methods' sources are cited in :mod:`.catalogue` and the module of each criterion.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spvr_lib.baselines.catalogue import method_notes
from spvr_lib.budget import budget_from_keep

__all__ = ["BaselineResult", "bisect_budget", "budget_from_keep"]


_KWARGS = {"tp_l1": set(), "tp_l2": set(), "tp_fpgm": set(), "tp_taylor": {"batch_size"}, "l1": set(), "l2": set(), "fpgm": set(), "taylor": {"batch_size"}, "hrank": {"batch_size"},
           "nisp": {"batch_size"}, "curl": {"floor_fraction", "batch_size"}, "rcp": {"n_samples", "short_train", "batch_size"},
           "otov2": set()}
_DEFAULT_KW = {"batch_size": 64, "floor_fraction": 0.3, "n_samples": 20, "short_train": None}


@dataclass(eq=False)
class BaselineResult:
    """What :func:`prune` returns.

    model: the pruned nn.Module with the kept channels' trained weights (None when failed); it is not
    a ``models.build`` model any more (per-layer widths), so it has no ``.spec``.
    params_before / params_after: ``models.count_params`` of the input / pruned model (after is None
    when failed); budget: the parameter budget from ``keep``.
    ratio: the per-unit channel pruning ratio found by bisection for the local methods; the fraction of
    all unit channels removed for curl and rcp; None for otov2 and failures.
    details: what this run adds to the method's :data:`NOTES` (a floor lowered, units left unpruned, RCP's best
    score; "" when nothing); notes: the two together; seconds: wall time of the method.
    """

    method: str
    model: nn.Module | None
    params_before: int
    params_after: int | None
    budget: int
    ratio: float | None
    details: str
    status: str
    error: str | None
    seconds: float

    @property
    def notes(self) -> str:
        """:data:`NOTES` of the method and what this run adds (``details``: a floor lowered, RCP's best score)."""
        return method_notes(self.method, self.details)


class _MethodFailure(Exception):
    """A method cannot run on this model / reach this budget: recorded in the result, never raised by prune."""


# --------------------------------------------------------------------------- validation
def _check_calib(calib) -> tuple[Tensor, Tensor]:
    if not (isinstance(calib, (tuple, list)) and len(calib) == 2 and all(isinstance(t, Tensor) for t in calib)):
        raise ValueError(f"calib must be a tuple (x, y) of tensors, got {type(calib).__name__}")
    x, y = calib
    if x.ndim < 2 or x.shape[0] < 1 or y.shape != (x.shape[0],) or y.dtype != torch.long:
        raise ValueError(f"calib must be x [n, ...] and integer labels y [n] (n >= 1), got x {tuple(x.shape)}, "
                         f"y {tuple(y.shape)} {y.dtype}")
    return x, y


def _check_pos_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return int(value)


def _check_kwargs(method: str, method_kw: dict) -> dict:
    """The method's keyword arguments, validated, with defaults filled in."""
    if unknown := set(method_kw) - _KWARGS[method]:
        raise ValueError(f"unknown keyword(s) {sorted(unknown)} for method {method!r}; allowed: "
                         f"{sorted(_KWARGS[method])}")
    kw = {**_DEFAULT_KW, **method_kw}
    _check_pos_int(kw["batch_size"], "batch_size")
    _check_pos_int(kw["n_samples"], "n_samples")
    f = kw["floor_fraction"]
    if isinstance(f, bool) or not isinstance(f, Real) or not 0 <= f < 1:
        raise ValueError(f"floor_fraction must be a number in [0, 1), got {f!r}")
    if kw["short_train"] is not None and not callable(kw["short_train"]):
        raise ValueError(f"short_train must be a callable(nn.Module) -> float, or None; got {kw['short_train']!r}")
    return kw


# --------------------------------------------------------------------------- bisection
def bisect_budget(count_at: Callable[[float], int], budget: int, tol: float = 1e-9,
                  max_iter: int = 40) -> tuple[float, int]:
    """Smallest x in [0, 1] with ``count_at(x) <= budget``, for a non-increasing step function ``count_at``.

    Returns (x, count_at(x)). Bisection stops when the bracket [x_lo, x] (count_at(x_lo) > budget) is
    narrower than ``tol`` or after ``max_iter`` halvings, so x is within ``tol`` of the step where the
    count first fits: one more channel (group) kept would exceed the budget. Raises _MethodFailure if
    even ``count_at(1)`` exceeds the budget.
    """
    count = count_at(0.0)
    if count <= budget:
        return 0.0, count
    lo, hi, count = 0.0, 1.0, count_at(1.0)
    if count > budget:
        raise _MethodFailure(f"budget unreachable: the most this method can prune leaves {count} parameters "
                             f"> budget {budget}")
    for _ in range(max_iter):
        if hi - lo <= tol:
            break
        mid = (lo + hi) / 2
        c = count_at(mid)
        if c <= budget:
            hi, count = mid, c
        else:
            lo = mid
    return hi, count


def _batches(x: Tensor, y: Tensor, batch_size: int, device: torch.device, desc: str, progress: bool):
    starts = range(0, x.shape[0], batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        yield x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
