"""Notebook 14's baselines: Torch-Pruning's head and neuron pruning of a torchvision ViT, to an exact budget.

Torch-Pruning (1.6, the installed ``torch_pruning``) prunes ``nn.MultiheadAttention`` only along its embedding
width (``MultiheadAttentionPruner``); its head pruning (``MetaPruner(num_heads=..., prune_num_heads=True,
prune_head_dims=False)``) needs the q/k/v projection as a ``nn.Linear``, as timm's ViT has.  So the trained
torchvision ViT is seen through :class:`LinearAttention` (the same parameters and outputs: packed q/k/v as one
``qkv`` Linear, ``proj`` the out projection), and ``MetaPruner`` runs on that view with

* the importance (:data:`TP_METHODS`: ``GroupMagnitudeImportance(p=2)`` or ``GroupTaylorImportance``, whose
  gradients are those of the mean cross-entropy over the calibration set, ``tp_local._accumulate_gradients``),
* local pruning (``global_pruning=False``): each attention loses ``ceil(r * heads)`` heads (its head importance
  is the mean over the head's channels) and each MLP ``int``-rounded ``r`` of its hidden neurons, one ratio ``r``
  for both (``pruning_ratio = head_pruning_ratio = r``),
* the embedding width never pruned (``ignored_layers``: the patch embedding and the classifier, which the
  residual stream's group holds).

``MetaPruner.step(interactive=True)`` yields the groups it would prune; their indices are read (heads: the out
projection's input channels // head_dim; neurons: the first MLP layer's outputs) and nothing is pruned in
the view.  As in ``tp_local`` (Torch-Pruning skips a layer that would lose every channel), each layer keeps at
least one head and one neuron, so nothing collapses.  ``r`` is bisected to the parameter budget and the last step
is split across layers (``tp_local._fit_local``'s rule: the first k units in model order keep the lighter
ratio's selection) so that the count is as close under the budget as the units allow.  The selection becomes a
plan of the graph engine (``spvr_lib.graph``), which builds the pruned ViT with the kept trained weights (the same
``PrunedMultiheadAttention`` as SPvR's network, so that latencies compare like with like) and counts parameters
exactly.  Cached (kind ``vit_tp``).
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import Tensor, nn

from spvr_lib import models, store
from spvr_lib.baselines.common import bisect_budget
from spvr_lib.baselines.tp_local import _accumulate_gradients
from spvr_lib.budget import budget_from_keep
from spvr_lib.graph import NetworkGraph, trace_units

TP_METHODS = ("tp_l2", "tp_taylor")
_IMPORTANCES = {"tp_l2": ("GroupMagnitudeImportance", {"p": 2}), "tp_taylor": ("GroupTaylorImportance", {})}


class LinearAttention(nn.Module):
    """An ``nn.MultiheadAttention`` (batch first, self-attention) as timm writes it: ``qkv`` Linear [3E, E] and
    ``proj`` Linear [E, heads*head_dim]; called as the attention it replaces (query, key, value, ...) and
    returning (output [n, tokens, E], None)."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not mha.batch_first or mha.in_proj_weight is None:
            raise ValueError("LinearAttention takes a batch-first nn.MultiheadAttention with packed q/k/v")
        e = mha.embed_dim
        self.num_heads = mha.num_heads
        self.qkv = nn.Linear(e, 3 * e, bias=mha.in_proj_bias is not None)
        self.proj = nn.Linear(e, e, bias=mha.out_proj.bias is not None)
        with torch.no_grad():
            self.qkv.weight.copy_(mha.in_proj_weight)
            if mha.in_proj_bias is not None:
                self.qkv.bias.copy_(mha.in_proj_bias)
            self.proj.load_state_dict(mha.out_proj.state_dict())

    def forward(self, query: Tensor, key: Tensor | None = None, value: Tensor | None = None,
                need_weights: bool = False, **_: Any) -> tuple[Tensor, None]:
        n, tokens, _e = query.shape
        qkv = self.qkv(query).reshape(n, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, tokens, -1)
        return self.proj(out), None


def tp_view(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose every ``nn.MultiheadAttention`` is a :class:`LinearAttention` (same module
    names, parameters and outputs)."""
    view = copy.deepcopy(model).eval()
    for name, m in list(view.named_modules()):
        if isinstance(m, nn.MultiheadAttention):
            parent, _, child = name.rpartition(".")
            setattr(view.get_submodule(parent) if parent else view, child, LinearAttention(m))
    return view


def graph_of(model: nn.Module, example: Tensor) -> NetworkGraph:
    """The graph engine's units of ``model`` (a copy is traced: tracing makes attentions maskable in place)."""
    return trace_units(copy.deepcopy(model).eval(), example[:1])


class _HeadNeuronSelector:
    """Torch-Pruning's MetaPruner on the :func:`tp_view` of a ViT; ``removed(r)``: {unit: removed indices} at ratio
    ``r`` (heads of ``<block>.self_attention``, neurons of ``<block>.mlp.0``), at least one of each kept."""

    def __init__(self, model: nn.Module, calib: tuple[Tensor, Tensor], method: str, num_heads: int) -> None:
        if method not in _IMPORTANCES:
            raise ValueError(f"method={method!r}; expected one of {list(_IMPORTANCES)}")
        cls, kwargs = _IMPORTANCES[method]
        self.view = tp_view(model)
        x, y = calib
        if method == "tp_taylor":
            _accumulate_gradients(self.view, x, y, 64, torch.device("cpu"), False)
        attns = [m for m in self.view.modules() if isinstance(m, LinearAttention)]
        self.names = {m: n for n, m in self.view.named_modules()}
        self.widths = {n.removesuffix(".proj"): num_heads for m, n in self.names.items()
                       if n.endswith("self_attention.proj")}
        self.widths.update({n: m.out_features for m, n in self.names.items()
                            if n.endswith("mlp.0") and isinstance(m, nn.Linear)})
        ignored = [m for n, m in self.view.named_modules() if n in ("conv_proj", "heads.head")]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")              # the unwrapped class token and position embedding
            self.pruner = tp.pruner.MetaPruner(
                self.view, x[:1], getattr(tp.importance, cls)(**kwargs), global_pruning=False, pruning_ratio=0.5,
                head_pruning_ratio=0.5, num_heads={a.qkv: num_heads for a in attns}, prune_num_heads=True,
                prune_head_dims=False, ignored_layers=ignored)
        self.heads0 = dict(self.pruner.num_heads)
        self.groups0 = dict(self.pruner.out_channel_groups)
        self.head_dim = {a.proj: a.proj.in_features // num_heads for a in attns}
        self._memo: dict[float, dict[str, list[int]]] = {}

    def removed(self, r: float) -> dict[str, list[int]]:
        r = float(r)
        if r in self._memo:
            return self._memo[r]
        p = self.pruner                     # one pass of MetaPruner's selection at r; the view is never pruned
        p.reset()
        p.num_heads.clear()
        p.num_heads.update(self.heads0)
        p.out_channel_groups.clear()
        p.out_channel_groups.update(self.groups0)
        p.per_step_pruning_ratio = [0.0, r]
        p.per_step_head_pruning_ratio = [0.0, r]
        out: dict[str, list[int]] = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for group in p.step(interactive=True):
                module, idxs = group[0].dep.target.module, list(group[0].idxs)
                name = self.names.get(module, "")
                if module in self.head_dim:
                    out[name.removesuffix(".proj")] = sorted({i // self.head_dim[module] for i in idxs})
                elif name in self.widths:
                    out[name] = sorted(int(i) for i in idxs)
        for unit, width in self.widths.items():    # Torch-Pruning refuses to empty a layer (no group is yielded):
            if _rule_removes(r, width, unit.endswith("self_attention")) >= width:   # keep its most important one,
                safe = (width - 1) / width - 1e-9 if unit.endswith("self_attention") else 1 - 1.5 / width
                out[unit] = self.removed(safe)[unit]          # the selection of the largest ratio keeping one
        self._memo[r] = out
        return out


def _masks(g: NetworkGraph, removed: Mapping[str, list[int]]) -> list[np.ndarray]:
    out = []
    for u in g.units:
        mask = np.zeros(u.width, dtype=bool)
        mask[list(removed.get(u.name, []))] = True
        out.append(mask)
    return out


def select(model: nn.Module, calib: tuple[Tensor, Tensor], budget: int, method: str,
           num_heads: int) -> tuple[dict[str, list[int]], float, int]:
    """({unit: removed indices}, ratio, parameters) of Torch-Pruning ``method`` on ``model`` at ``budget``: the
    smallest ratio whose network fits, the last step split across units (module order) to come closest under it.
    Raises ValueError when even the largest ratio leaves more than ``budget`` parameters."""
    g = graph_of(model, calib[0])
    names = {u.name for u in g.units}
    sel = _HeadNeuronSelector(model, calib, method, num_heads)
    missing = set(sel.widths) - names
    if missing:
        raise ValueError(f"Torch-Pruning's units {sorted(missing)[:3]} are not units of the graph engine")

    def count(removed: Mapping[str, list[int]]) -> int:
        return g.count(_masks(g, removed))

    try:
        ratio, _ = bisect_budget(lambda r: count(sel.removed(r)), budget)
    except Exception as err:       # baselines' _MethodFailure: the budget cannot be reached
        raise ValueError(f"{method}: {err}") from err
    at, lighter = sel.removed(ratio), sel.removed(max(0.0, ratio - 1e-8))
    order = [u.name for u in g.units if len(lighter.get(u.name, ())) < len(at.get(u.name, ()))]

    def mixed(k: int) -> dict[str, list[int]]:
        return {**at, **{n: lighter.get(n, []) for n in order[:k]}}

    lo, hi = 0, len(order)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if count(mixed(mid)) <= budget else (lo, mid - 1)
    chosen = {k: v for k, v in mixed(lo).items() if v}
    return chosen, float(ratio), count(chosen)


def tp_prune(model: nn.Module, calib: tuple[Tensor, Tensor], keep: float, method: str, source: Mapping[str, Any],
             base_hash: str, num_heads: int) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """(pruned ViT with the kept trained weights, its plan, info) of Torch-Pruning ``method`` at ``keep`` (fraction
    of ``model``'s parameters).  The selection is cached (kind ``vit_tp``, keyed by the base run ``base_hash``,
    method, budget and calibration set).  Info: params_before, budget, params, ratio, prune_s."""
    params_before = models.count_params(model)
    budget = budget_from_keep(float(keep), params_before)
    key = {"base": base_hash, "method": method, "budget": budget, "calib": list(calib[0].shape),
           "calib_digest": store.run_hash([float(calib[0].double().sum()), calib[1].tolist()]),
           "torch_pruning": tp.__version__ if hasattr(tp, "__version__") else None}

    def compute() -> dict[str, Any]:
        t0 = time.perf_counter()
        removed, ratio, params = select(model, calib, budget, method, num_heads)
        return {"removed": removed, "ratio": ratio, "params": params, "budget": budget,
                "params_before": params_before, "prune_s": round(time.perf_counter() - t0, 3)}

    rec = store.cached(key, compute, kind="vit_tp")
    g = graph_of(model, calib[0])
    net = g.build(_masks(g, rec["removed"]))
    plan = {"engine": "graph", "example_shape": list(calib[0][:1].shape), "ignored_layers": list(g.ignored),
            "removed": {u: list(v) for u, v in rec["removed"].items()}, "inherit": True}
    net.spvr_description = {"source": dict(source), "plan": plan}
    params = models.count_params(net)
    if params != rec["params"]:
        raise RuntimeError(f"{method}: the built network has {params} parameters, the selection counted "
                           f"{rec['params']}")
    return net, plan, {"params_before": params_before, "budget": budget, "params": params, "ratio": rec["ratio"],
                       "prune_s": rec["prune_s"]}


def _rule_removes(r: float, width: int, heads: bool) -> int:
    """What MetaPruner's local rule removes from a unit of ``width`` at ratio ``r``: ceil(r * heads) heads of an
    attention, width - int(width * (1 - r)) neurons of an MLP."""
    return math.ceil(float(r) * width) if heads else width - int(width * (1 - float(r)))
