"""The entry point: :func:`prune`, one baseline to the parameter budget, and ``_run``, the dispatch to its method.

``prune`` checks the arguments, turns ``keep`` into a budget, runs the method on a deep copy (``_run``: the units,
the method's scores from :mod:`.tp_local`, :mod:`.authors` or :mod:`.others`, and its selection) and returns a
:class:`~spvr_lib.baselines.common.BaselineResult`; a method that cannot run or reach the budget is a result with
``status="failed"``, never an exception.  The methods' sources are cited in :mod:`.catalogue` and in the module of
each criterion.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spvr_lib import models
from spvr_lib.baselines.authors import _filter_scores, _fit_global, _taylor_scores
from spvr_lib.baselines.catalogue import OTOV2_UNAVAILABLE, PRUNE_METHODS, _RCP_PROXY, _RCP_TRAIN
from spvr_lib.baselines.common import (BaselineResult, _MethodFailure, _check_calib, _check_kwargs, _check_pos_int,
                                       bisect_budget, budget_from_keep)
from spvr_lib.baselines.others import (_CURL_FLOORS, _adaptive_bn_accuracy, _curl_scores, _hrank_scores, _nisp_scores,
                                       _rcp_removals)
from spvr_lib.baselines.tp_local import TP_IMPORTANCES, _accumulate_gradients, _fit_local, tp_importance
from spvr_lib.baselines.units import ChannelScoreImportance, _Units

__all__ = ["prune"]


def _run(method: str, model: nn.Module, x: Tensor, y: Tensor, budget: int, group_size: int, seed: int,
         progress: bool, kw: dict) -> tuple[nn.Module, float | None, str]:
    """The pruned model, its ratio and what this run adds to the method's notes; raises _MethodFailure when the
    method cannot do it.  (The static :data:`NOTES` are never read here: editing them changes no record.)"""
    if method == "otov2":
        raise _MethodFailure(OTOV2_UNAVAILABLE)
    device = next(model.parameters()).device
    work = copy.deepcopy(model).eval()
    batch_size = kw["batch_size"]
    units = _Units(work, x[:1].to(device))
    notes = ""
    if method in TP_IMPORTANCES:
        if method == "tp_taylor":
            _accumulate_gradients(work, x, y, batch_size, device, progress)
        scores = units.scores(tp_importance(method))
        work.zero_grad(set_to_none=True)
        pruned, ratio = _fit_local(units, scores, budget, group_size)
        return pruned, ratio, notes
    if method in ("l1", "l2", "fpgm", "hrank", "nisp"):
        if method in ("l1", "l2", "fpgm"):
            channel_scores = _filter_scores(work, method)
        else:
            compute = _hrank_scores if method == "hrank" else _nisp_scores
            channel_scores = compute(work, x, y, batch_size, device, progress)
        scores = units.scores(ChannelScoreImportance(channel_scores))
        pruned, ratio = _fit_local(units, scores, budget, group_size)
        unscored = sorted(n for n, s in scores.items() if s is None)
        if unscored:
            notes += f" Units left unpruned (nothing to score): {', '.join(unscored)}."
        return pruned, ratio, notes
    if method == "taylor":
        scores = units.scores(ChannelScoreImportance(_taylor_scores(work, x, y, batch_size, device, progress)))
        pruned, ratio, _ = _fit_global(units, scores, budget)
        return pruned, ratio, notes
    if method == "curl":
        scores = _curl_scores(work, units, x, batch_size, progress)
        for floor in (kw["floor_fraction"], *(f for f in _CURL_FLOORS if f < kw["floor_fraction"])):
            try:
                pruned, ratio, _ = _fit_global(units, scores, budget, floor)
            except _MethodFailure as e:
                failure = e
                continue
            if floor < kw["floor_fraction"]:
                notes += (f" The budget is out of reach with a {kw['floor_fraction']:.0%} floor: the floor used here "
                          f"is {floor:.0%}" + (" (one channel)." if floor == 0 else "."))
            return pruned, ratio, notes
        raise _MethodFailure(f"{failure} (even keeping one channel per unit)")
    # rcp
    n_samples, short_train = kw["n_samples"], kw["short_train"]
    scores = {n: s for n, s in units.scores(ChannelScoreImportance(_filter_scores(work, "l1"))).items()
              if s is not None}
    gen = torch.Generator().manual_seed(seed)
    best, failures = None, []
    for _ in tqdm(range(n_samples), desc="rcp samples", disable=not progress, leave=False):
        fractions = dict(zip(scores, (0.1 + 0.9 * torch.rand(len(scores), generator=gen, dtype=torch.float64))
                             .tolist()))
        try:
            x_fit, _ = bisect_budget(lambda v: units.count(_rcp_removals(scores, units.widths, fractions, v,
                                                                         group_size)), budget)
        except _MethodFailure as e:
            failures.append(str(e))
            continue
        removals = _rcp_removals(scores, units.widths, fractions, x_fit, group_size)
        candidate = units.apply(removals)
        trial = copy.deepcopy(candidate)
        acc = float(short_train(trial)) if short_train is not None else \
            _adaptive_bn_accuracy(trial, x, y, batch_size, device)
        if best is None or acc > best[0]:
            best = (acc, candidate, removals)
    if best is None:
        raise _MethodFailure(f"no random architecture reaches the budget: {failures[0]}")
    notes += (_RCP_TRAIN if short_train is not None else _RCP_PROXY) + \
        f" {n_samples} samples; best score {best[0]:.4f}."
    return best[1], units.removed_fraction(best[2]), notes


def prune(method: str, model: nn.Module, calib: tuple[Tensor, Tensor], keep: int | float, *, group_size: int = 1,
          seed: int = 0, progress: bool = True, **method_kw) -> BaselineResult:
    """Prune a deep copy of ``model`` with baseline ``method`` to the parameter budget given by ``keep``.

    method: one of PRUNE_METHODS (Table 1's BASELINES, or an original authors' variant). calib: (x [n, C, H, W], y [n] int64) calibration data (importance scores,
    HRank ranks, Taylor gradients, NISP/CURL outputs; x[:1] traces the graph). keep: parameters to keep
    (int) or a fraction of ``count_params(model)`` (float in (0, 1]). group_size: channels are removed in
    multiples of it (torch-pruning's round_to; CURL's group). method_kw: ``batch_size`` (taylor, hrank,
    nisp, rcp; default 64), ``floor_fraction`` (curl; default 0.1), ``n_samples`` (rcp; default 20),
    ``short_train`` (rcp: callable(model) -> validation accuracy; the model passed is a copy).
    Bad arguments raise ValueError; a method that cannot run or reach the budget returns status "failed".
    """
    if method not in PRUNE_METHODS:
        raise ValueError(f"method must be one of {list(PRUNE_METHODS)}, got {method!r}")
    if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
        raise ValueError(f"model must be an nn.Module with parameters, got {type(model).__name__}")
    x, y = _check_calib(calib)
    group_size = _check_pos_int(group_size, "group_size")
    kw = _check_kwargs(method, method_kw)
    params_before = models.count_params(model)
    budget = budget_from_keep(keep, params_before)
    start = time.perf_counter()
    try:
        pruned, ratio, details = _run(method, model, x, y, budget, group_size, seed, progress, kw)
        params_after = models.count_params(pruned)
        if params_after > budget:
            raise _MethodFailure(f"pruned model has {params_after} parameters > budget {budget}")
    except Exception as e:                                 # a method failure is a result, not an exception
        error = str(e) if isinstance(e, _MethodFailure) else f"{type(e).__name__}: {e}"
        return BaselineResult(method, None, params_before, None, budget, None, "", "failed", error,
                              time.perf_counter() - start)
    if hasattr(pruned, "spec"):
        del pruned.spec                                    # per-layer widths no longer match any spec
    pruned.train(model.training)
    return BaselineResult(method, pruned, params_before, params_after, budget, ratio, details, "ok", None,
                          time.perf_counter() - start)
