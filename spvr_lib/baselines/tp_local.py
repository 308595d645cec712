"""Table 1's ℓ1, ℓ2, Taylor and FPGM as the paper ran them: Torch-Pruning's importances and its local rule.

Source: VainF/Torch-Pruning (the installed ``torch_pruning``): the importances of torch_pruning/pruner/importance.py
(:data:`TP_IMPORTANCES`: GroupMagnitudeImportance p=1 and p=2, GroupTaylorImportance, FPGMImportance p=2, every
other argument at its default, scored over whole dependency groups; :func:`tp_importance`), Taylor's gradients of
the mean cross-entropy over the calibration set (``_accumulate_gradients``), and MetaPruner's local selection
(``global_pruning=False``, ``round_to=group_size``): one channel ratio ``r`` for every unit, each keeping
``int(C * (1 - r))`` channels rounded down to a group, at least one group (``_keep_local``, ``_local_removals``).
``_fit_local`` bisects ``r`` to the parameter budget and splits the last step across units so that the budget
is met exactly.  The same local rule selects the channels of the authors' ``l1``, ``l2``, ``fpgm``, HRank and NISP.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import Tensor, nn

from spvr_lib.baselines.common import _MethodFailure, _batches, bisect_budget
from spvr_lib.baselines.units import _Units

__all__ = ["TP_IMPORTANCES", "tp_importance"]


# Torch-Pruning's importance of each criterion: (class in torch_pruning.importance, its arguments); every other
# argument at Torch-Pruning's default (group_reduction "mean", normalizer "mean", bias False)
TP_IMPORTANCES = {"tp_l1": ("GroupMagnitudeImportance", {"p": 1}), "tp_l2": ("GroupMagnitudeImportance", {"p": 2}),
                  "tp_taylor": ("GroupTaylorImportance", {}), "tp_fpgm": ("FPGMImportance", {"p": 2})}


def tp_importance(method: str) -> tp.importance.Importance:
    """Torch-Pruning's importance object of ``method`` (a key of :data:`TP_IMPORTANCES`)."""
    if method not in TP_IMPORTANCES:
        raise ValueError(f"method={method!r} has no Torch-Pruning importance; expected one of {list(TP_IMPORTANCES)}")
    cls, kwargs = TP_IMPORTANCES[method]
    return getattr(tp.importance, cls)(**kwargs)


def _accumulate_gradients(work: nn.Module, x: Tensor, y: Tensor, batch_size: int, device, progress: bool) -> None:
    """``.grad`` of every parameter = d(mean cross-entropy over the whole of (x, y))/dw, accumulated over
    mini-batches (eval mode: BN running statistics), for Torch-Pruning's GroupTaylorImportance."""
    work.zero_grad(set_to_none=True)
    n = x.shape[0]
    for xb, yb in _batches(x, y, batch_size, device, "taylor (tp)", progress):
        (nn.functional.cross_entropy(work(xb), yb, reduction="sum") / n).backward()


def _keep_local(width: int, ratio: float, group_size: int) -> int:
    """torch-pruning's local rule: int(C * (1 - r)) rounded down to a multiple of round_to (only when pruning),
    but at least one group (torch-pruning skips a layer that would lose every channel)."""
    keep = int(width * (1 - ratio))
    if keep < width:
        keep -= keep % group_size
    return max(keep, min(group_size, width))


def _local_removals(scores: dict[str, Tensor | None], widths: dict[str, int], ratio: float,
                    group_size: int) -> dict[str, list[int]]:
    """{unit: the width - keep least important channels} for one ratio r (units without scores untouched)."""
    out = {}
    for name, s in scores.items():
        if s is not None:
            n_drop = widths[name] - _keep_local(widths[name], ratio, group_size)
            out[name] = torch.argsort(s, stable=True)[:n_drop].tolist()
    return out


def _fit_local(units: _Units, scores: dict[str, Tensor | None], budget: int, group_size: int):
    """One ratio for every unit, bisected to the budget; then the last step made exact.

    Units of equal width lose a group at the same ratio, so one step of the ratio can jump by several
    units' worth of parameters (4.5 points of ResNet50 at d = 8).  The step is split: the first k units
    (in model order) keep the next-smaller ratio's widths (one group more), the rest the found ratio's,
    with the largest k that fits; every unit's width still follows its own importance order."""
    if all(s is None for s in scores.values()):
        raise _MethodFailure("the importance scored no prunable unit of this model")
    ratio, _ = bisect_budget(lambda r: units.count(_local_removals(scores, units.widths, r, group_size)), budget)
    at = _local_removals(scores, units.widths, ratio, group_size)
    lighter = _local_removals(scores, units.widths, max(0.0, ratio - 1e-8), group_size)
    names = [n for n in at if len(lighter.get(n, ())) < len(at[n])]

    def mixed(k: int) -> dict[str, list[int]]:
        return {**at, **{n: lighter.get(n, []) for n in names[:k]}}

    lo, hi = 0, len(names)                          # count(mixed(k)) grows with k; mixed(0) fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if units.count(mixed(mid)) <= budget else (lo, mid - 1)
    return units.apply(mixed(lo)), ratio
