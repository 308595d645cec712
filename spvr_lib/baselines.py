"""The pruning baselines of the paper's Table 1 (Section 4.2), pruned to the SAME parameter budget as SPvR.

One entry point, :func:`prune`. Every method keeps the trained weights of the channels it keeps
(so the result can be fine-tuned) and is built on torch-pruning's ``DependencyGraph`` (the
paper's Section 4.3: "the pruning library by Fang et al. [2023] was utilized to implement the
baseline methods, except for OTOv2").

Channel units. A *unit* is one torch-pruning dependency group: the output channels of one
conv/linear layer together with everything coupled to them (its BN, the next layer's input
channels, and in a ResNet the whole residual stream of a stage: stem or projection conv, every
block's last conv and BN). The final classifier's outputs are never pruned. Units are the same
for every method; each method scores channels as its authors do (:data:`NOTES`,
:data:`METHOD_CARDS`, with the repository each was read from) and selects them as they do:

- ``tp_l1``, ``tp_l2``, ``tp_taylor``, ``tp_fpgm``: Table 1's ℓ1, ℓ2, Taylor and FPGM as the paper ran them, with
  Torch-Pruning's importances (:data:`TP_IMPORTANCES`, scored over whole dependency groups) and its MetaPruner's
  local selection: one channel ratio for every unit, bisected to the budget (as below).
- the original authors' variants of those four (:data:`AUTHORS_VARIANTS`, the sensitivity table):
  ``l1``, ``l2``, ``fpgm`` (raw filter norms and distances), ``hrank`` (ranks of the feature maps
  the network produces), ``nisp``: LOCAL selection, one channel ratio ``r`` for every unit
  (torch-pruning's rule: ``int(C * (1 - r))`` channels kept, rounded down to ``group_size``),
  ``r`` bisected to the smallest value whose pruned model has ``count_params <= budget``.
- ``taylor`` (per-mini-batch gate criterion) and ``curl`` (joint masking, KL(p_masked || p)):
  GLOBAL selection of single channels across units until the budget (CURL with its 30% floor).
- ``rcp``: random per-unit keep fractions scaled to the budget, the best of ``n_samples`` after a
  brief training (``short_train``) or, without one, a cheap proxy.
- ``otov2``: reported as failed with its reason (see :data:`OTOV2_UNAVAILABLE`).

A method that cannot run or cannot reach the budget does not raise: its result has
``status="failed"`` and the reason in ``error``, so a table can show it as missing.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn
from tqdm.auto import tqdm

from spvr_lib import models
from spvr_lib.budget import budget_from_keep

__all__ = ["TaylorGates", "BASELINES", "AUTHORS_VARIANTS", "PRUNE_METHODS", "AUTHORS_VARIANT_OF", "TP_IMPORTANCES", "tp_importance",
           "LOCAL_METHODS", "DISPLAY_NAMES", "NOTES", "METHOD_CARDS", "method_table", "BaselineResult", "prune",
           "budget_from_keep", "bisect_budget", "ChannelScoreImportance", "inf_fs"]

# Table 1's baselines, as the paper ran them (Section 4.3: "The pruning library by Fang et al. [2023] was utilized to
# implement the baseline methods, except for OTOv2"): l1, l2, Taylor and FPGM are Torch-Pruning's importances
BASELINES = ("tp_l1", "tp_l2", "tp_taylor", "tp_fpgm", "rcp", "hrank", "curl", "nisp", "otov2")
# the original authors' formulas for the same four criteria (the sensitivity table: does the choice move a verdict?)
AUTHORS_VARIANTS = ("l1", "l2", "taylor", "fpgm")
PRUNE_METHODS = (*BASELINES, *AUTHORS_VARIANTS)
DISPLAY_NAMES = {"tp_l1": "ℓ1", "tp_l2": "ℓ2", "tp_taylor": "Taylor", "tp_fpgm": "FPGM", "rcp": "RCP",
                 "hrank": "HRank", "curl": "CURL", "nisp": "NISP", "otov2": "OTOv2",
                 "l1": "ℓ1 (Li et al.)", "l2": "ℓ2 (filter norm)", "taylor": "Taylor (NVlabs)", "fpgm": "FPGM (He et al.)"}
# the variant of each Torch-Pruning criterion that follows its original authors
AUTHORS_VARIANT_OF = {"tp_l1": "l1", "tp_l2": "l2", "tp_taylor": "taylor", "tp_fpgm": "fpgm"}

# Torch-Pruning's importance of each criterion: (class in torch_pruning.importance, its arguments); every other
# argument at Torch-Pruning's default (group_reduction "mean", normalizer "mean", bias False)
TP_IMPORTANCES = {"tp_l1": ("GroupMagnitudeImportance", {"p": 1}), "tp_l2": ("GroupMagnitudeImportance", {"p": 2}),
                  "tp_taylor": ("GroupTaylorImportance", {}), "tp_fpgm": ("FPGMImportance", {"p": 2})}

# the methods that choose ONE architecture at a given budget (one ratio for every unit; only which channels differ):
# trained from scratch, their networks are one and the same training (paper.tables1_3.training_tag)
LOCAL_METHODS = ("tp_l1", "tp_l2", "tp_taylor", "tp_fpgm", "l1", "l2", "fpgm", "hrank", "nisp")

_LOCAL = ("one channel ratio r for every unit (torch-pruning's local pruning rule, bisected to the parameter "
          "budget): each unit keeps int(C * (1 - r)) channels rounded down to a multiple of group_size, at least one "
          "group, the most important by the criterion.")
_TP = ("Torch-Pruning {version}'s {cls}({args}; group_reduction 'mean', normalizer 'mean': its defaults) scores each "
       "channel over its whole dependency group (the conv filter, its BN, the next layer's input weights, and in a "
       "ResNet every coupled layer of the residual stream){extra}. Selection as Torch-Pruning's MetaPruner with "
       "global_pruning=False (its default; the paper's layer-wise methods), iterative_steps=1, round_to=group_size, "
       "the classifier ignored: " + _LOCAL + " The ratio is bisected to the parameter budget and the last step split "
       "across units (the first units in model order keep one group more) so that the budget is met exactly.")
NOTES = {
    "tp_l1": _TP.format(version=tp.__version__, cls="GroupMagnitudeImportance", args="p=1", extra=""),
    "tp_l2": _TP.format(version=tp.__version__, cls="GroupMagnitudeImportance", args="p=2", extra=""),
    "tp_taylor": _TP.format(version=tp.__version__, cls="GroupTaylorImportance", args="",
                            extra=" as |w * dL/dw|, the gradient of the mean cross-entropy over the whole calibration "
                                  "set (accumulated over mini-batches, eval mode)"),
    "tp_fpgm": _TP.format(version=tp.__version__, cls="FPGMImportance", args="p=2", extra=""),
    "l1": "Filter L1 norm (Li et al. 2016): a channel's score is sum |W| of the conv filter producing it (a residual "
          "stream unit sums the filters of its coupled convs). " + _LOCAL + " One shot, no iterative pruning.",
    "l2": "Filter L2 norm: ||W||_2 of the conv filter producing a channel (summed over a stream's coupled convs). "
          + _LOCAL,
    "fpgm": "FPGM (He et al. 2019): a channel's score is the sum of Euclidean distances between its raw conv filter and "
            "every other filter of the layer; the filters nearest the geometric median (smallest sum) go first. "
            + _LOCAL,
    "taylor": "Taylor as NVlabs/Taylor_pruning runs it (Molchanov et al. 2019, method 22: a gate of weight 1 after "
              "each BN): the criterion (gate * dL/dgate)^2 = (gamma * dL/dgamma + beta * dL/dbeta)^2 per mini-batch, "
              "accumulated; a stream unit sums its coupled BNs; all channels ranked together (global), at least one "
              "channel per unit.  In the paper harness it prunes while fine-tuning (TaylorGates: NVlabs's iterative "
              "schedule, scaled: paper.tables1_3.TAYLOR_SCHEDULE); prune() alone scores once on the calibration set "
              "(eval mode) and removes the lowest until the parameter budget. ",
    "hrank": "HRank (Lin et al. 2020): a channel's score is the average matrix rank of the feature map the network "
             "produces for it: ReLU(BN) inside a block or a VGG layer, and for a residual-stream channel the output of "
             "every block of the stage (after the ReLU that follows the addition), summed over the blocks. "
             + _LOCAL + " One shot (HRank prunes layer by layer with fine-tuning in between).",
    "nisp": "NISP (Yu et al. 2018): Inf-FS (unsupervised, alpha=0.5) scores of the final response layer (the "
            "classifier's input) on the calibration set, propagated back by s_in = |W|^T s_out with a conv's |W| "
            "summed over its kernel and each BN folded in as the diagonal |gamma / sigma|; pooling, ReLU and dropout "
            "pass scores through per channel. ResNet: the score of a block's input is the residual branch's "
            "back-propagated score plus the shortcut's; a residual-stream unit sums the scores of its coupled convs. "
            + _LOCAL + " Implemented for spvr_lib VGG and ResNet.",
    "curl": "CURL (Luo and Wu 2020): each single channel is masked (its BN's gamma and beta set to 0) and scored by "
            "KL(p_masked || p_original) averaged over the calibration set, CURL's direction; a residual-stream "
            "channel is masked jointly in every coupled BN (the stem or projection BN and the last BN of every block "
            "of the stage) in one forward pass. All channels ranked together (global); the least important removed "
            "until the parameter budget while a unit keeps at least floor_fraction (CURL's 30%) of its channels. "
            "Where 30% cannot reach the budget the floor is lowered (20%, 10%, 5%, one channel) and the floor used "
            "is stated. No distillation or label refinement (CURL's later steps).",
    "rcp": "Random Channel Pruning (Li et al. 2022): n_samples architectures with per-unit keep fractions drawn from "
           "U(0.1, 1), each scaled by one multiplier bisected to the parameter budget; channels kept inside a unit by "
           "filter L1 norm so the chosen network can be fine-tuned; the best candidate after a brief training.",
    "otov2": "OTOv2 (Chen et al. 2023) trains the full network with its DHSPG optimizer and builds the subnet from "
             "its zero groups; no installable release runs here (see error).",
}
_RCP_PROXY = (" Candidates ranked by a cheap proxy (short_train=None): accuracy on the calibration set after "
              "re-estimating BN statistics on it (EagleEye-style adaptive BN), not by RCP's brief training.")
_RCP_TRAIN = " Candidates ranked by the caller's short_train (a brief training, scored on held-out validation data)."

# One card per baseline: what notebook 04's and docs/baselines.md's method table show.
def _tp_card(cls: str, args: str, calibration: str) -> dict[str, str]:
    return {"criterion": f"Torch-Pruning {cls}({args}), group_reduction 'mean', normalizer 'mean'",
            "ranking": "local: MetaPruner(global_pruning=False, iterative_steps=1, round_to=group_size)",
            "per-layer constraint": "at least one group of group_size", "calibration samples": calibration,
            "differences from the authors' code": "one shot to the parameter budget (the ratio bisected, the last "
            "step split across units); the scores are Torch-Pruning's, as the paper ran them (Section 4.3)",
            "read from": f"VainF/Torch-Pruning {tp.__version__} (torch_pruning/pruner/importance.py)"}


METHOD_CARDS: dict[str, dict[str, str]] = {
    "tp_l1": _tp_card("GroupMagnitudeImportance", "p=1", "none (weights only)"),
    "tp_l2": _tp_card("GroupMagnitudeImportance", "p=2", "none (weights only)"),
    "tp_taylor": _tp_card("GroupTaylorImportance", "", "the calibration set (gradients of the mean cross-entropy)"),
    "tp_fpgm": _tp_card("FPGMImportance", "p=2", "none (weights only)"),
    "l1": {"criterion": "filter L1 norm: sum of abs(W) over the filter", "ranking": "local (one ratio for every unit)",
           "per-layer constraint": "at least one group of group_size", "calibration samples": "none (weights only)",
           "differences from the authors' code": "one shot to the parameter budget (Li et al. prune chosen layers by "
           "sensitivity, then retrain); a stream unit sums its coupled convs",
           "read from": "Li et al. 2016 (no official code); Torch-Pruning MagnitudeImportance"},
    "l2": {"criterion": "filter L2 norm: Euclidean norm of the filter", "ranking": "local (one ratio for every unit)",
           "per-layer constraint": "at least one group of group_size", "calibration samples": "none (weights only)",
           "differences from the authors' code": "as l1",
           "read from": "Torch-Pruning MagnitudeImportance(p=2) (VainF/Torch-Pruning)"},
    "fpgm": {"criterion": "sum of distances of the raw filter to the layer's other filters",
             "ranking": "local (one ratio for every unit)", "per-layer constraint": "at least one group of group_size",
             "calibration samples": "none (weights only)",
             "differences from the authors' code": "one shot (the authors prune softly every epoch while training)",
             "read from": "he-y/filter-pruning-geometric-median"},
    "taylor": {"criterion": "(gamma * dL/dgamma + beta * dL/dbeta)^2 at the BN gate, per mini-batch, accumulated",
               "ranking": "global (all units together)", "per-layer constraint": "at least one channel",
               "calibration samples": "the training mini-batches while fine-tuning (prune() alone: the calibration "
               "set)",
               "differences from the authors' code": "the schedule scaled to the cpu budgets: ten pruning steps over "
               "the first quarter of the fine-tuning epochs (NVlabs: 100 neurons every 30 mini-batches); a stream "
               "unit sums its coupled BNs' gates (NVlabs: one shared gate per stage, divided by its blocks)",
               "read from": "NVlabs/Taylor_pruning (pruning_engine.py, layers/gate_layer.py, configs/)"},
    "hrank": {"criterion": "average matrix rank of the feature map the network outputs (after the ReLU that follows "
              "the residual addition)", "ranking": "local (one ratio for every unit)",
              "per-layer constraint": "at least one group of group_size", "calibration samples": "the calibration set",
              "differences from the authors' code": "one shot (HRank prunes layer by layer with fine-tuning in "
              "between); a stream unit sums the ranks of the blocks of its stage",
              "read from": "lmbxmu/HRank (rank_generation.py)"},
    "nisp": {"criterion": "Inf-FS importance of the final response layer propagated back through abs(W)",
             "ranking": "local (one ratio for every unit)", "per-layer constraint": "at least one group of group_size",
             "calibration samples": "the calibration set",
             "differences from the authors' code": "no official code; propagation written from the paper",
             "read from": "Yu et al. 2018 (paper only)"},
    "curl": {"criterion": "KL(p_masked || p) of masking one channel (jointly in every coupled BN)",
             "ranking": "global (all units together)",
             "per-layer constraint": "keep >= 30% of a unit (lowered only where 30% cannot reach the budget)",
             "calibration samples": "the calibration set",
             "differences from the authors' code": "no distillation / label refinement; the paper's stage exclusion "
             "(index 29) not copied; floor lowered at rates CURL's 30% cannot reach",
             "read from": "Roll920/CURL (generate_mask.py, generate_index.py)"},
    "rcp": {"criterion": "random per-unit widths; the best of n_samples after a brief training",
            "ranking": "per candidate (random)", "per-layer constraint": "keep fraction in [0.1, 1] before scaling",
            "calibration samples": "a brief training on the training split, validated on a held-out split",
            "differences from the authors' code": "brief training of 1 epoch (the authors train each candidate a few "
            "epochs); channels inside a unit kept by filter L1 norm",
            "read from": "Li et al. 2022, Revisiting Random Channel Pruning (paper)"},
    "otov2": {"criterion": "zero-invariant groups found by DHSPG while training the full network",
              "ranking": "-", "per-layer constraint": "-", "calibration samples": "-",
              "differences from the authors' code": "cannot run here (see the error of every OTOv2 row)",
              "read from": "tianyic/only_train_once"},
}


def method_table(methods: Sequence[str] = PRUNE_METHODS) -> list[dict[str, str]]:
    """The method table of notebook 04 and the README: one row per method (its :data:`METHOD_CARDS`), Table 1's
    baselines first, then the original authors' variants of the sensitivity table."""
    return [{"method": DISPLAY_NAMES[m], "table": "Table 1" if m in BASELINES else "sensitivity (authors' variant)",
             **METHOD_CARDS[m]} for m in methods]

OTOV2_UNAVAILABLE = (
    "OTOv2 cannot run in this environment: only_train_once 3.0.1 (the last release on PyPI) imports "
    f"torch.onnx._globals and calls torch.onnx._optimize_graph, neither of which the installed torch "
    f"{torch.__version__.split('+')[0]} has; it no longer ships "
    "DHSPG, OTOv2's optimizer (`from .dhspg import DHSPG` is commented out in only_train_once/optimizer/__init__.py), "
    "only OTOv3's HESSO, which hard-codes .cuda(); and otoml 2.0.1, the OTOv2 release that has DHSPG, declares "
    "non-PEP 440 requirements ('onnx (>=1.12.*)') that pip >= 24.1 refuses to install.")

_KWARGS = {"tp_l1": set(), "tp_l2": set(), "tp_fpgm": set(), "tp_taylor": {"batch_size"}, "l1": set(), "l2": set(), "fpgm": set(), "taylor": {"batch_size"}, "hrank": {"batch_size"},
           "nisp": {"batch_size"}, "curl": {"floor_fraction", "batch_size"}, "rcp": {"n_samples", "short_train", "batch_size"},
           "otov2": set()}
_DEFAULT_KW = {"batch_size": 64, "floor_fraction": 0.3, "n_samples": 20, "short_train": None}
_CURL_FLOORS = (0.2, 0.1, 0.05, 0.0)      # tried in turn when CURL's floor cannot reach the budget


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


# --------------------------------------------------------------------------- channel units
def _classifier_name(model: nn.Module) -> str:
    """The final classifier: the last nn.Linear (or, with none, the last nn.Conv2d) in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] or \
            [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError(f"model {type(model).__name__} has no nn.Linear or nn.Conv2d layer to prune around")
    return names[-1]


class _Units:
    """The channel units (torch-pruning dependency groups) of ``model`` and how to cut them.

    ``model`` is a working copy in eval mode that is never pruned; ``example`` [1, ...] one input for
    tracing. ``count`` prunes a meta-device copy (no weights allocated), memoised by the units' widths;
    ``apply`` prunes a real deep copy.
    """

    def __init__(self, model: nn.Module, example: Tensor):
        self.model, self.example = model, example
        self.classifier = _classifier_name(model)
        self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        names = {m: n for n, m in model.named_modules()}
        clf = model.get_submodule(self.classifier)
        self.groups = {names[g[0].dep.target.module]: g for g in self.dg.get_all_groups(
            ignored_layers=[clf], root_module_types=[nn.Conv2d, nn.Linear])}
        self.widths = {n: len(g[0].idxs) for n, g in self.groups.items()}
        self._meta = copy.deepcopy(model).to("meta")
        self._counts: dict[tuple, int] = {}

    def scores(self, importance: tp.importance.Importance) -> dict[str, Tensor | None]:
        """Per-channel importance [width] of every unit (None: the importance has nothing to score there)."""
        out = {}
        for name, group in self.groups.items():
            s = importance(group)
            out[name] = None if s is None else s.detach().double().cpu()
        return out

    def out_modules(self, name: str) -> list[nn.Module]:
        """The layers whose output channels make up unit ``name``."""
        return [dep.target.module for dep, _ in self.groups[name] if self.dg.is_out_channel_pruning_fn(dep.handler)]

    @staticmethod
    def _cut(model: nn.Module, example: Tensor, removals: dict[str, Sequence[int]]) -> nn.Module:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        for name, idxs in removals.items():
            if len(idxs):
                root = model.get_submodule(name)
                dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels,
                                     sorted(int(i) for i in idxs)).prune()
        return model

    def count(self, removals: dict[str, Sequence[int]]) -> int:
        """count_params of the model with ``removals`` {unit: channel indices} cut (only the numbers matter)."""
        key = tuple(len(removals.get(n, ())) for n in self.groups)
        if key not in self._counts:
            meta = copy.deepcopy(self._meta)
            plan = {n: range(len(removals.get(n, ()))) for n in self.groups}
            self._counts[key] = models.count_params(self._cut(meta, self.example.to("meta"), plan))
        return self._counts[key]

    def apply(self, removals: dict[str, Sequence[int]]) -> nn.Module:
        """A pruned deep copy of the model, trained weights of the kept channels kept."""
        return self._cut(copy.deepcopy(self.model), self.example, removals)

    def removed_fraction(self, removals: dict[str, Sequence[int]]) -> float:
        return sum(len(v) for v in removals.values()) / sum(self.widths.values())


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


_OUT_CHANNEL_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_batchnorm_out_channels)


class ChannelScoreImportance(tp.importance.Importance):
    """A torch-pruning importance from precomputed per-channel scores {layer module: Tensor[out channels]}.

    The score of a dependency group is the sum, over its layers whose OUTPUT channels are pruned and that
    have scores, of those scores (mapped to the group's root channels); so a ResNet residual-stream group
    sums its coupled layers. Returns None for a group with no scored layer (left unpruned).
    """

    def __init__(self, scores: dict[nn.Module, Tensor]):
        self.scores = scores

    @torch.no_grad()
    def __call__(self, group) -> Tensor | None:
        total = None
        for i, (dep, idxs) in enumerate(group):
            s = self.scores.get(dep.target.module)
            if s is None or dep.handler not in _OUT_CHANNEL_FNS:
                continue
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
            total.index_add_(0, torch.as_tensor(group[i].root_idxs), s.double().cpu()[idxs])
        return total


# --------------------------------------------------------------------------- importances
def _batches(x: Tensor, y: Tensor, batch_size: int, device: torch.device, desc: str, progress: bool):
    starts = range(0, x.shape[0], batch_size)
    for i in tqdm(starts, desc=desc, disable=not progress or len(starts) < 2, leave=False):
        yield x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)


def _conv_filters(work: nn.Module) -> list[nn.Module]:
    """Every Conv2d and Linear of ``work`` but the classifier (the layers whose output channels are pruned)."""
    clf = work.get_submodule(_classifier_name(work))
    return [m for m in work.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not clf]


def _filter_scores(work: nn.Module, kind: str) -> dict[nn.Module, Tensor]:
    """Per-output-channel score of every conv's raw filters: "l1" sum|W|, "l2" ||W||_2, "fpgm" the sum of
    Euclidean distances to the layer's other filters (He et al. 2019: smallest = nearest the geometric median)."""
    out = {}
    for m in _conv_filters(work):
        w = m.weight.detach().double().flatten(1)                    # [out channels, fan-in]
        if kind == "l1":
            out[m] = w.abs().sum(1)
        elif kind == "l2":
            out[m] = w.norm(dim=1)
        else:
            out[m] = torch.cdist(w, w).sum(1)
    return out


def _taylor_scores(work: nn.Module, x: Tensor, y: Tensor, batch_size: int, device,
                   progress: bool) -> dict[nn.Module, Tensor]:
    """Molchanov et al. 2019's gate criterion (NVlabs/Taylor_pruning "method 22", a gate of weight 1 after each BN):
    sum over mini-batches of (gate * dL/dgate)^2 = (gamma * dL/dgamma + beta * dL/dbeta)^2 for every BN channel.

    L is the mini-batch's mean cross-entropy (eval mode: BN running statistics).  Squared per mini-batch
    before accumulating, so gradients that cancel between batches still count.  A layer without BN is
    scored at its own output filters: (sum over the filter of w * dL/dw)^2.
    """
    gates = [m for m in work.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    convs = _conv_filters(work)
    out: dict[nn.Module, Tensor] = {}
    for xb, yb in _batches(x, y, batch_size, device, "taylor", progress):
        work.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(work(xb), yb).backward()
        for bn in gates:
            gate = bn.weight.detach() * bn.weight.grad                  # # Molchanov 2019: d L / d gate ...
            if bn.bias is not None and bn.bias.grad is not None:         # ... of a gate after BN = gamma dL/dgamma
                gate = gate + bn.bias.detach() * bn.bias.grad            # + beta dL/dbeta (NVlabs "method 22")
            c = gate.double().pow(2).cpu()
            out[bn] = out.get(bn, 0) + c
        if not gates:
            for m in convs:
                c = (m.weight.detach() * m.weight.grad).flatten(1).sum(1).double().pow(2).cpu()
                out[m] = out.get(m, 0) + c
    work.zero_grad(set_to_none=True)
    return out


def _produced_maps(work: nn.Module) -> dict[nn.Module, tuple[nn.Module, bool]]:
    """{BN (or conv) module: (module whose output HRank ranks, apply ReLU first)}: the feature map the network
    produces for that layer's channels.  The last BN of a residual block is represented by the block's output
    (after the ReLU that follows the addition); its projection BN is left to the block's last BN (same map);
    any other BN by ReLU(BN output); in a model without BN, every conv by its output."""
    bns = [m for m in work.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return {m: (m, False) for m in work.modules() if isinstance(m, nn.Conv2d)}
    out: dict[nn.Module, tuple[nn.Module, bool]] = {bn: (bn, True) for bn in bns}
    for block in work.modules():
        if isinstance(block, (models.BasicBlock, models.Bottleneck)):
            last = block.bn3 if isinstance(block, models.Bottleneck) else block.bn2
            out[last] = (block, False)
            if block.downsample is not None:
                out.pop(block.downsample[1], None)
    return out


def _hrank_scores(work: nn.Module, x: Tensor, y: Tensor, batch_size: int, device,
                  progress: bool) -> dict[nn.Module, Tensor]:
    """HRank: mean matrix rank of each channel's produced feature map [H, W] over the calibration images,
    keyed by the BN (or conv) whose channels it scores (see :func:`_produced_maps`)."""
    produced = _produced_maps(work)
    if not produced:
        raise _MethodFailure("HRank ranks conv feature maps; the model has no Conv2d layer")
    sums: dict[nn.Module, Tensor] = {}
    handles = []
    for layer, (source, relu) in produced.items():
        def hook(module, inputs, out, layer=layer, relu=relu):
            fm = out.relu() if relu else out
            sums[layer] = sums.get(layer, 0) + torch.linalg.matrix_rank(fm.float()).sum(0).double().cpu()
        handles.append(source.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for xb, _ in _batches(x, y, batch_size, device, "hrank", progress):
                work(xb)
    finally:
        for h in handles:
            h.remove()
    return {m: s / x.shape[0] for m, s in sums.items()}


def inf_fs(features: Tensor, alpha: float = 0.5) -> Tensor:
    """Unsupervised Inf-FS (Roffo et al. 2015) feature scores, the NISP paper's ranking of its final layer.

    features: [n, F] (n >= 2 samples). A_ij = alpha * sigma_ij + (1 - alpha) * (1 - |Spearman rho_ij|) with
    sigma_ij = max(std_i, std_j) min-max normalised; scores = (I - r A)^-1 1 with r = 0.9 / lambda_max(A)
    (the energy of all paths through each feature). Returns [F], higher = more important.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [n, F] with n >= 2, got shape {tuple(features.shape)}")
    f = features.double()
    std = f.std(dim=0)
    sigma = torch.maximum(std[:, None], std[None, :])
    span = sigma.max() - sigma.min()
    sigma = (sigma - sigma.min()) / span if span > 0 else torch.zeros_like(sigma)
    ranks = f.argsort(dim=0).argsort(dim=0).double()
    ranks = ranks - ranks.mean(dim=0)
    norm = ranks.norm(dim=0)
    rho = (ranks.T @ ranks) / (norm[:, None] * norm[None, :])
    rho = torch.nan_to_num(rho, nan=0.0)                 # a constant feature correlates with nothing
    a = alpha * sigma + (1 - alpha) * (1 - rho.abs())
    lam = torch.linalg.eigvalsh(a).max()
    if lam <= 0:
        return torch.ones(f.shape[1], dtype=torch.float64)
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    return torch.linalg.solve(eye - (0.9 / lam) * a, torch.ones(a.shape[0], 1, dtype=torch.float64))[:, 0]


def _abs_weight(layer: nn.Module) -> Tensor:
    """|W| as [out, in]: a conv's kernel summed over its spatial positions."""
    w = layer.weight.detach().double().abs()
    return w.flatten(2).sum(2) if w.ndim > 2 else w


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    scale = torch.ones(bn.num_features, dtype=torch.float64, device=bn.running_var.device) \
        if bn.weight is None else bn.weight.detach().double()
    return (scale / (bn.running_var.double() + bn.eps).sqrt()).abs()


def _nisp_scores(work: nn.Module, x: Tensor, y: Tensor, batch_size: int, device,
                 progress: bool) -> dict[nn.Module, Tensor]:
    """NISP importance of every conv's (and hidden linear's) output channels; see NOTES['nisp']."""
    if not isinstance(work, (models.VGG, models.ResNet)):
        raise _MethodFailure(f"NISP back-propagation is implemented for spvr_lib VGG and ResNet models, "
                             f"got {type(work).__name__}")
    if x.shape[0] < 2:
        raise _MethodFailure("NISP's Inf-FS needs at least 2 calibration samples")
    linears = [m for m in work.modules() if isinstance(m, nn.Linear)]
    frl = []
    handle = linears[-1].register_forward_pre_hook(lambda m, inp: frl.append(inp[0].detach().flatten(1).cpu()))
    try:
        with torch.no_grad():
            for xb, _ in _batches(x, y, batch_size, device, "nisp", progress):
                work(xb)
    finally:
        handle.remove()
    s = inf_fs(torch.cat(frl)).to(device)
    scores: dict[nn.Module, Tensor] = {}
    for lin in reversed(linears[:-1]):                      # VGG "imagenet" head: hidden linears
        scores[lin] = s
        s = _abs_weight(lin).T @ s

    def chain(pairs, s):                                   # [(conv, bn), ...] in forward order
        for conv, bn in reversed(pairs):
            scores[conv] = s
            s = _abs_weight(conv).T @ (s * _bn_scale(bn))
        return s

    if isinstance(work, models.VGG):
        blocks = [b for b in work.features if isinstance(b, nn.Sequential)]
        s = s.view(blocks[-1][0].out_channels, -1).sum(1)  # flattened pooled map -> channels
        chain([(b[0], b[1]) for b in blocks], s)
        return scores
    for name in reversed(work.stage_names):
        for block in reversed(getattr(work, name)):
            k = 3 if isinstance(block, models.Bottleneck) else 2
            pairs = [(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, k + 1)]
            if block.downsample is None:
                shortcut = s
            else:
                scores[block.downsample[0]] = s
                shortcut = _abs_weight(block.downsample[0]).T @ (s * _bn_scale(block.downsample[1]))
            s = chain(pairs, s) + shortcut
    scores[work.conv1] = s
    return scores


def _unit_mask_points(units: "_Units", name: str) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """Where CURL masks unit ``name``: (module, its channel indices, the unit channels they belong to) for
    every BN among the unit's coupled layers (for a residual stream: the stem or projection BN and the
    last BN of every block of the stage); the conv/linear outputs when the unit has no BN."""
    group = units.groups[name]
    points = []
    for i, (dep, idxs) in enumerate(group):
        if dep.handler == tp.prune_batchnorm_out_channels:
            points.append((dep.target.module, torch.as_tensor(idxs), torch.as_tensor(group[i].root_idxs)))
    if not points:
        for i, (dep, idxs) in enumerate(group):
            if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                points.append((dep.target.module, torch.as_tensor(idxs), torch.as_tensor(group[i].root_idxs)))
    return points


@torch.no_grad()
def _curl_scores(work: nn.Module, units: "_Units", x: Tensor, batch_size: int,
                 progress: bool) -> dict[str, Tensor]:
    """{unit: [width] KL(p_masked || p) of masking each single channel}, CURL's generate_mask.py.

    A channel is masked by zeroing it at every mask point of its unit at once (gamma = beta = 0 in each
    coupled BN zeroes that BN's output channel); KL is averaged over the calibration samples.  Several
    masked variants share one batched forward pass (the outputs are the same as one pass per channel).
    """
    device = next(work.parameters()).device
    n = x.shape[0]
    logp = torch.cat([torch.log_softmax(work(xb.to(device)).double(), 1) for xb in x.split(batch_size)])
    variants = max(1, batch_size // max(1, min(n, batch_size)))       # masked copies per forward pass
    scores: dict[str, Tensor] = {}
    names = list(units.groups)
    for name in tqdm(names, desc="curl", disable=not progress, leave=False):
        points = _unit_mask_points(units, name)
        width = units.widths[name]
        kl = torch.zeros(width, dtype=torch.float64)
        current: dict[nn.Module, Tensor] = {}

        def hook(module, inputs, out):
            m = current[module]                                       # [rows, C] of 0/1
            return out * m.view(*m.shape, *([1] * (out.ndim - 2))).to(out.dtype)

        handles = [module.register_forward_hook(hook) for module, _, _ in points]
        try:
            for start in range(0, width, variants):
                chans = list(range(start, min(start + variants, width)))
                for xb_start in range(0, n, batch_size):
                    xb = x[xb_start:xb_start + batch_size].to(device)
                    nb = xb.shape[0]
                    for module, idxs, roots in points:
                        m = torch.ones(len(chans), module.num_features if isinstance(module, nn.BatchNorm2d)
                                       else module.weight.shape[0], device=device)
                        for v, c in enumerate(chans):
                            m[v, idxs[roots == c]] = 0
                        current[module] = m.repeat_interleave(nb, 0)
                    logq = torch.log_softmax(work(xb.repeat(len(chans), *([1] * (xb.ndim - 1)))).double(), 1)
                    logq = logq.view(len(chans), nb, -1)
                    ref = logp[xb_start:xb_start + nb].unsqueeze(0)
                    kl[chans] += (logq.exp() * (logq - ref)).sum(2).sum(1).cpu()
        finally:
            for h in handles:
                h.remove()
        scores[name] = kl / n
    return scores


# --------------------------------------------------------------------------- methods
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


def _global_order(scores: dict[str, Tensor | None], widths: dict[str, int],
                  floor_fraction: float = 0.0) -> list[tuple[str, list[int]]]:
    """Every single (unit, channel) in increasing global importance, in the order they are removed.

    A channel is skipped when its unit would keep no channel, or (CURL's generate_index.py) when the unit
    already keeps less than ``floor_fraction`` of its channels: removal is allowed while kept/width >=
    floor_fraction.  Ties: unit order, then channel index."""
    candidates = []
    for u, (name, s) in enumerate(scores.items()):
        if s is not None:
            candidates.extend((float(s[c]), u, c, name) for c in range(widths[name]))
    candidates.sort(key=lambda t: t[:3])
    left = dict(widths)
    order = []
    for _, _, c, name in candidates:
        if left[name] > 1 and left[name] / widths[name] >= floor_fraction:
            left[name] -= 1
            order.append((name, [c]))
    return order


def _first(order: list[tuple[str, list[int]]], x: float) -> dict[str, list[int]]:
    removals: dict[str, list[int]] = {}
    for name, chunk in order[:math.floor(x * len(order) + 1e-12)]:
        removals.setdefault(name, []).extend(chunk)
    return removals


def _fit_global(units: "_Units", scores: dict[str, Tensor | None], budget: int,
                floor_fraction: float = 0.0) -> tuple[nn.Module, float, dict[str, list[int]]]:
    """Remove channels in global order until the pruned network fits ``budget`` (bisection on the prefix)."""
    order = _global_order(scores, units.widths, floor_fraction)
    frac, _ = bisect_budget(lambda f: units.count(_first(order, f)), budget)
    removals = _first(order, frac)
    return units.apply(removals), units.removed_fraction(removals), removals


def _rcp_removals(scores: dict[str, Tensor], widths: dict[str, int], fractions: dict[str, float],
                  x: float, group_size: int) -> dict[str, list[int]]:
    """Keep int(C * min(1, u * m)) channels per unit (m = (1 - x) / min u; rounded down to a group; at least
    one group), the highest-L1 ones."""
    m = (1 - x) / min(fractions.values())
    out = {}
    for name, s in scores.items():
        width = widths[name]
        keep = int(width * min(1.0, fractions[name] * m))
        if keep < width:
            keep -= keep % group_size
        keep = max(keep, min(group_size, width))
        out[name] = torch.argsort(s, stable=True)[:width - keep].tolist()
    return out


def _adaptive_bn_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device) -> float:
    """Accuracy on (x, y) after re-estimating every BN's running statistics on x (cumulative average)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for xb, _ in _batches(x, y, batch_size, device, "", False):
            model(xb)
        model.eval()
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in _batches(x, y, batch_size, device, "",
                                                                                        False))
    return correct / x.shape[0]


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


class TaylorGates:
    """NVlabs's Taylor pruning while training (Molchanov et al. 2019, NVlabs/Taylor_pruning "method 22"): a gate of
    weight 1 after every BN of every unit (its output multiplied by the gate, 0 once pruned); each training
    mini-batch adds (gate * dL/dgate)^2 per channel, i.e. (sum over the batch and positions of dL/dout * out)^2;
    :meth:`step` masks the least important kept channels, ranked across units (a unit sums its coupled BNs, keeps
    at least one channel), until the network's parameter count meets a target, and starts the criterion afresh.

    Gates and scores are buffers of the BNs (``spvr_gate``, ``spvr_gate_score``), so a training checkpoint carries
    them.  ``model`` is trained in place with the gates on; :meth:`pruned` returns the network with the masked
    channels removed (the same function: a masked channel contributes 0).  ``example``: one input [1, ...]."""

    def __init__(self, model: nn.Module, example: Tensor):
        self.model = model
        training = model.training
        model.eval()                                 # (tracing must not move the BN statistics)
        self.units = _Units(model, example)          # the dependency graph, built before any hook
        model.train(training)
        self.points: dict[str, list[tuple[nn.Module, Tensor, Tensor]]] = {}
        for name, group in self.units.groups.items():
            pts = [(dep.target.module, torch.as_tensor(idxs), torch.as_tensor(group[i].root_idxs))
                   for i, (dep, idxs) in enumerate(group)
                   if isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm)
                   and dep.handler in _OUT_CHANNEL_FNS]
            if pts:
                self.points[name] = pts
        self._hooks = []
        for bn in {bn for pts in self.points.values() for bn, _, _ in pts}:
            if not hasattr(bn, "spvr_gate"):
                bn.register_buffer("spvr_gate", torch.ones(bn.num_features, device=bn.weight.device))
                bn.register_buffer("spvr_gate_score", torch.zeros(bn.num_features, dtype=torch.float64,
                                                                  device=bn.weight.device))
            self._hooks.append(bn.register_forward_hook(self._gate))

    @staticmethod
    def _gate(bn: nn.Module, inputs: Any, out: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (out.ndim - 2)
        gated = out * bn.spvr_gate.to(out.dtype).view(shape)
        if bn.training and gated.requires_grad:
            dims = [d for d in range(out.ndim) if d != 1]
            kept = out.detach()

            def accumulate(grad: Tensor) -> None:    # # gate * dL/dgate per mini-batch, squared, accumulated
                bn.spvr_gate_score.add_((grad.float() * kept.float()).sum(dims).double().pow(2))
            gated.register_hook(accumulate)
        return gated

    def scores(self) -> dict[str, Tensor]:
        """The criterion accumulated since the last step, per unit channel [width]; masked channels -inf."""
        out = {}
        for name, pts in self.points.items():
            total = torch.zeros(self.units.widths[name], dtype=torch.float64)
            for bn, idxs, root in pts:
                total.index_add_(0, root, bn.spvr_gate_score.detach().cpu()[idxs])
            total[self.removed_mask(name)] = -math.inf
            out[name] = total
        return out

    def removed_mask(self, name: str) -> Tensor:
        bn, idxs, root = self.points[name][0]
        mask = torch.zeros(self.units.widths[name], dtype=torch.bool)
        mask[root] = bn.spvr_gate.detach().cpu()[idxs] == 0
        return mask

    def removals(self) -> dict[str, list[int]]:
        """{unit: the channels masked so far}."""
        return {n: torch.nonzero(self.removed_mask(n)).flatten().tolist() for n in self.points}

    def count(self) -> int:
        """Parameters of the network with the masked channels removed."""
        with torch.enable_grad():
            return self.units.count(self.removals())

    def step(self, target: int) -> int:
        """Mask the least important kept channels (the criterion since the last step, across units) until the
        network with them removed has at most ``target`` parameters (as close to it as one channel allows); the
        criterion then starts afresh.  Returns the parameter count.  Raises ValueError when even one channel per
        unit exceeds ``target``."""
        order = _global_order(self.scores(), self.units.widths)
        with torch.enable_grad():                    # (the parameter count traces the dependency graph)
            try:
                frac, count = bisect_budget(lambda f: self.units.count(_first(order, f)), int(target))
            except _MethodFailure as e:
                raise ValueError(f"target={target}: {e}") from None
        removals = _first(order, frac)
        with torch.no_grad():
            for name, pts in self.points.items():
                gone = torch.zeros(self.units.widths[name], dtype=torch.bool)
                gone[removals.get(name, [])] = True
                for bn, idxs, root in pts:
                    bn.spvr_gate[idxs.to(bn.spvr_gate.device)] = (~gone[root]).to(bn.spvr_gate)
            for bn, _, _ in (p for pts in self.points.values() for p in pts):
                bn.spvr_gate_score.zero_()
        return count

    def pruned(self) -> nn.Module:
        """The trained network with the masked channels removed (gates and their buffers gone): a deep copy."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        removals = self.removals()
        for bn in {bn for pts in self.points.values() for bn, _, _ in pts}:
            for buf in ("spvr_gate", "spvr_gate_score"):
                if hasattr(bn, buf):
                    delattr(bn, buf)
        with torch.enable_grad():
            return self.units.apply(removals)


def method_notes(method: str, details: str = "") -> str:
    """How ``method`` is implemented here (:data:`NOTES`), followed by ``details`` from one run."""
    return " ".join(part for part in (NOTES[method], details.strip()) if part)


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
