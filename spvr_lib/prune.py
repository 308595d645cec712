"""SPvR: from a trained network, a calibration set and a parameter budget to the smaller
architecture SPvR recommends (Section 3 and Appendix B), ready to be trained from scratch.

One engine for every network, in the paper's order:

1. Grouping (Section 3.2): one forward pass records each unit's activations where it is first
   normalised; Eq. 3/4 and Algorithm 1 (``grouping``) turn them into groups of ``d`` channels
   (:func:`unit_groups`).
2. Ranking (Section 3.1): the importance of each group, Eq. 2 summed over the calibration set, by
   masking the group wherever its unit lives (:func:`spvr_lib.ranking.unit_importance`).
3. Budget (Section 3.2, Appendix B): all groups of all units sorted together, the least important
   discarded until the rebuilt network fits the parameter budget (:func:`budget.global_discard`),
   with layer collapse: a layer, a residual branch or a whole ResNet stage can disappear.

One description of a network, one path (:func:`network_units`): its units, where each is masked and
recorded, the exact parameter count of any removal, and the rebuild.  Any nn.Module is traced
(``spvr_lib.graph``: units of coupled channels from Torch-Pruning's DependencyGraph, collapse by
torch.fx); a ``spvr_lib.models`` network is described by its spec (``spvr_lib.spec_units``: one unit
per prunable layer, Appendix B's stage rule below, the pruned spec rebuilt by ``models.build``, which is
how the paper's Tables 6-8 read).  Grouping, ranking and the budget loop are the same for both.

ResNets (Appendix B).  All layers of a stage share one width (``PrunableLayer.tie``), which is
what the paper's Tables 7 and 8 show (equal widths in every block).  Our rule: when a group of a
layer of a stage is discarded, the least significant remaining group of every OTHER layer of
that stage is discarded too, so the stage width drops by one group (``d`` channels).  A
bottleneck's conv3 has 4w channels, grouped like every layer in groups of ``d``; it loses FOUR
groups per step (the trigger and/or its least significant remaining ones), i.e. 4d channels for
the stage's ``d``.  When ``d`` does not divide the widths (groups of unequal size), the stage
width is the minimum over its layers of (kept channels / expansion) and every layer keeps its
most important channels up to that width.  A stage whose width reaches 0 disappears and its
neighbours are joined by a projection shortcut.  The stem conv and the shortcut convs are not
ranked: their widths follow the stem width (unchanged) and the stage width.  Block counts are
kept; Table 8's "x 6" for ResNet50's last stage in the 70% row is read as a typo for "x 3".
The rule applies to any tie (``PrunableLayer.tie``; e.g. SegNet's encoder conv and the decoder
conv feeding the same unpool): a tie's unit width is its narrowest layer's and a layer's
expansion is its width over that.

Parameter counts are always ``models.spec_params`` / ``models.count_params``: every parameter,
BN and classifier included.  Removing a layer can ADD parameters (its neighbours get joined
directly), so the count is not monotone along the discard order; the loop stops at the FIRST
point where it fits.
"""
from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from spvr_lib import models
from spvr_lib.budget import Budgeted, budget_from_keep, global_discard
from spvr_lib.graph import NetworkGraph, trace_units
from spvr_lib.hf import is_hf_model, logits_of
from spvr_lib.criteria import CRITERIA
from spvr_lib.devices import resolve_device
from spvr_lib.grouping import (
    correlation_matrix,
    group_neurons,
    record_activations,
    reduce_feature_maps,
)
from spvr_lib.ranking import RANKING_PATHS, unit_importance
from spvr_lib.spec_units import SpecGraph
from spvr_lib.store import canonical_json

__all__ = ["network_units", "unit_groups", "budget_step", "PruneResult", "GroupRanking", "rank_groups", "spvr_prune", "inherit_weights",
           "budget_from_keep", "model_spec"]

# leaf modules the engine knows how to mask, rank and rebuild
_SUPPORTED = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.MaxUnpool2d, nn.AdaptiveAvgPool2d, nn.Linear,
              nn.Dropout, nn.Identity)


# --------------------------------------------------------------------------- input checks
def model_spec(model: nn.Module) -> dict:
    """The spec a ``spvr_lib.models`` network carries; ValueError naming what cannot be pruned."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict) or not isinstance(model, tuple(models._CLASSES.values())):
        raise ValueError(f"model is a {type(model).__module__}.{type(model).__name__} without a spvr_lib spec; "
                         "the pruner handles networks built by spvr_lib.models.build (VGG, ResNet, MLP)")
    for name, m in model.named_modules():
        if not list(m.children()) and not isinstance(m, _SUPPORTED):
            raise ValueError(f"layer {name!r} is a {type(m).__name__}, which the pruner cannot prune; expected "
                             f"only {[t.__name__ for t in _SUPPORTED]}")
    models.prunable_layers(model, spec)     # raises if the model does not match its spec
    return spec



def _check_group_size(group_size: int) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or group_size < 1:
        raise ValueError(f"group_size={group_size!r}; expected an integer >= 1 (d of Section 3.2)")


def _check_calib(calib, n_classes: int) -> tuple[Tensor, Tensor]:
    if not isinstance(calib, (tuple, list)) or len(calib) != 2:
        raise ValueError(f"calib must be a pair (x, y) of tensors, got {type(calib).__name__}")
    x, y = calib
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise ValueError(f"calib must hold tensors (x, y), got ({type(x).__name__}, {type(y).__name__})")
    if y.ndim < 1 or len(y) != len(x) or len(x) < 2:
        raise ValueError(f"calib: x {tuple(x.shape)} and y {tuple(y.shape)} must hold the same n >= 2 samples, "
                         "y one class label per sample (or one mask [H, W] per image)")
    present = set(int(c) for c in y.unique().tolist())
    missing = sorted(set(range(n_classes)) - present)
    if y.ndim > 1:      # segmentation masks: other values are ignore labels; a rare class may be absent
        if missing:
            warnings.warn(f"the calibration masks contain no pixel of class(es) {missing}", stacklevel=3)
        return x, y
    if missing:
        raise ValueError(f"calib has no sample of class(es) {missing}; expected every one of the "
                         f"{n_classes} classes at least once")
    if extra := sorted(present - set(range(n_classes))):
        raise ValueError(f"calib labels {extra} are outside 0..{n_classes - 1} (the model's classes)")
    return x, y


# --------------------------------------------------------------------------- 3. the budget



# --------------------------------------------------------------------------- the whole method
@dataclass
class PruneResult:
    """The architecture SPvR recommends, and how it got there.

    spec: the pruned spec; model: ``models.build(spec)``, freshly initialised (train it from
    scratch); scores: one row per group (layer, group, channels, size, importance, order = rank
    in the global ascending sort, removed); params_before/params_after/budget: parameter counts
    (every parameter, BN and classifier included); kept: {layer name: sorted kept channel indices
    in the ORIGINAL model}; groups: {layer name: its channel groups}.
    """

    spec: dict
    model: nn.Module
    scores: pd.DataFrame
    params_before: int
    params_after: int
    budget: int
    kept: dict[str, list[int]]
    groups: dict[str, list[list[int]]]
    last_step: int = 0
    original_spec: dict = field(default_factory=dict)
    collapsed: list[dict] = field(default_factory=list)
    kept_one: list[dict] = field(default_factory=list)
    architecture_before: str = ""
    architecture: str = ""
    plan: dict = field(default_factory=dict)


@dataclass
class GroupRanking:
    """The rate-independent part of SPvR: every layer's groups (Algorithm 1) and their importances (Eq. 2).

    Computed once per (network, calibration set, d, criterion) by :func:`rank_groups`; every budget
    then only reruns the global sort (:func:`spvr_prune` with ``ranking=``).  ``groups``: {layer:
    [[channel, ...], ...]}; ``scores``: {layer: float64 [groups]}; ``seconds``: grouping + ranking time.
    ``to_dict``/``from_dict`` give a JSON form for the run cache.
    """

    groups: dict[str, list[list[int]]]
    scores: dict[str, Tensor]
    group_size: int
    criterion: str
    method: str
    n_calib: int
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"groups": self.groups, "scores": {k: v.tolist() for k, v in self.scores.items()},
                "group_size": self.group_size, "criterion": self.criterion, "method": self.method,
                "n_calib": self.n_calib, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, d: Mapping) -> "GroupRanking":
        return cls(groups={k: [list(map(int, g)) for g in v] for k, v in d["groups"].items()},
                   scores={k: torch.tensor(v, dtype=torch.float64) for k, v in d["scores"].items()},
                   group_size=int(d["group_size"]), criterion=d["criterion"], method=d["method"],
                   n_calib=int(d["n_calib"]), seconds=float(d.get("seconds", 0.0)))


def _on_device(model: nn.Module, device: str | torch.device | None) -> nn.Module:
    """``model`` itself when it already lives on ``device`` (None: where it is), else a copy moved there."""
    if device is None:
        return model
    dev = resolve_device(device)
    param = next(model.parameters(), None)
    if param is None or param.device == dev:
        return model
    return copy.deepcopy(model).to(dev)


FILL_BACK = 0.005   # fraction of the original parameters a first fit may fall short of the budget before
                    # the most important discarded groups are given back (budget.global_discard)


def _is_spec_network(model: nn.Module) -> bool:
    return isinstance(getattr(model, "spec", None), dict) and isinstance(model, tuple(models._CLASSES.values()))


def _classes_of(model: nn.Module, g, x: Tensor) -> int:
    """The classes the calibration labels must cover: a spvr_lib network's spec's, else :func:`_num_classes`."""
    return model_spec(model)["num_classes"] if isinstance(g, SpecGraph) else _num_classes(model, x)


def _num_classes(model: nn.Module, x: Tensor) -> int:
    """Classes of a general model: the size of dim 1 of its output on one calibration sample (a Hugging Face
    model: of its logits; 0 for a language model, whose labels need not hold any given token)."""
    param = next(model.parameters(), None)
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x[:1].to(param.device) if param is not None else x[:1])
    finally:
        model.train(was)
    if not isinstance(out, Tensor) and is_hf_model(model):
        out = logits_of(out)                # a Hugging Face ModelOutput: its logits
        if isinstance(out, Tensor) and out.ndim == 3 and not x.is_floating_point() and x.ndim == 2 \
                and out.shape[1] == x.shape[1]:
            return 0                        # a language model [n, seq, vocab]: no class must be in the labels
    if not isinstance(out, Tensor) or out.ndim < 2:
        raise ValueError(f"model output must be a tensor [n, classes, ...], got {type(out).__name__} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    return int(out.shape[1])


def network_units(model: nn.Module, x: Tensor, engine: str | None = None,
                  ignored_layers: Sequence[str] | None = None) -> NetworkGraph | SpecGraph:
    """The one description of ``model`` SPvR works on (units, where each is masked, the exact count of any removal,
    the rebuild), for one example ``x[:1]``: a ``spvr_lib.models`` network's from its spec (its prunable layers,
    Appendix B's stage rule: :class:`spvr_lib.spec_units.SpecGraph`), any other model's traced (units of coupled
    channels from Torch-Pruning's DependencyGraph, collapse by torch.fx: :func:`spvr_lib.graph.trace_units`).
    ``engine``: None (automatic), "spec" or "graph" (trace a spvr_lib network like any model)."""
    if engine not in (None, "spec", "graph"):
        raise ValueError(f"engine={engine!r}; expected None (automatic), 'spec' or 'graph'")
    if engine is None:
        engine = "spec" if _is_spec_network(model) and not ignored_layers else "graph"
    if engine == "spec":
        if ignored_layers:
            raise ValueError("ignored_layers applies to a traced network (engine='graph'); a spvr_lib network's "
                             "prunable layers are its spec's")
        return SpecGraph(model, model_spec(model), x[:1])
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("model has no parameters: nothing to prune")
    was = model.training
    try:
        g = trace_units(model, x[:1].to(device=param.device, dtype=param.dtype), tuple(ignored_layers or ()))
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - tracing errors come in many types
        raise ValueError(f"model ({type(model).__name__}) could not be traced by Torch-Pruning's "
                         f"DependencyGraph: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from err
    finally:
        model.train(was)
    if not g.units:
        raise ValueError(f"model ({type(model).__name__}) has no prunable conv or linear layer besides its output layer")
    return g


def unit_groups(model: nn.Module, g: NetworkGraph, x: Tensor, group_size: int,
                batch_size: int = 256) -> dict[str, list[list[int]]]:
    """Section 3.2 for any model: {unit: groups of ``group_size`` channels} from one pass over ``x``, each
    unit's activations read where it is first normalised (``Unit.record``), reduced by Eq. 4 and grouped
    by Eq. 3 and Algorithm 1."""
    if getattr(g, "token_inputs", False):
        raise ValueError(f"model ({type(model).__name__}) is a Hugging Face transformer (token ids in, a ModelOutput "
                         "out), which rank_groups cannot run; rank it with spvr_lib.hf.rank_token_groups(model, calib, "
                         "group_size, criterion) and pass the result: spvr_prune(model, calib, keep, group_size, "
                         "criterion=criterion, ranking=ranking)")
    modules = dict(model.named_modules())
    sites = {u.name: u.record for u in g.units}
    reduced: dict[str, Tensor] = {}
    for dim in sorted({site.dim for site in sites.values()}):
        # one pass per channel dim: Eq. 4's reduction of every position of every recorded module, per batch
        # ([n, positions]); a unit channel at several positions (a slot of a grouped conv, an attention head)
        # sums its positions' reductions
        at = {site.module for site in sites.values() if site.dim == dim}
        per = record_activations(model, x, {m: modules[m] for m in at}, batch_size,
                                 reduce=lambda out, dim=dim: reduce_feature_maps(out.detach().float().movedim(dim, 1)).double())
        for name, site in sites.items():
            if site.dim == dim:
                cols = per[site.module]
                reduced[name] = cols[:, [p[0] for p in site.index]] if all(len(p) == 1 for p in site.index) else \
                    torch.stack([cols[:, list(p)].sum(dim=1) for p in site.index], dim=1)
    return {u.name: group_neurons(correlation_matrix(reduced[u.name]), int(group_size)) for u in g.units}


def rank_groups(model: nn.Module, calib: tuple[Tensor, Tensor], group_size: int = 2, criterion: str = "spvr",
                method: str = "fast", device: str | torch.device | None = None, progress: bool = True,
                engine: str | None = None, ignored_layers: Sequence[str] | None = None) -> GroupRanking:
    """Groups (Section 3.2, Algorithm 1) and their importances (Eq. 2 or KL) on ``device``.

    ``device``: where the forward passes run ("cuda", "cpu"; None: where the model is); the
    calibration set stays on the CPU and is streamed to the device a chunk at a time.  The
    model is not moved: a copy is, when it lives elsewhere.  See :func:`spvr_prune`.
    """
    _check_group_size(group_size)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r}; expected one of {sorted(CRITERIA)}")
    if method not in RANKING_PATHS:
        raise ValueError(f"method={method!r}; expected one of {list(RANKING_PATHS)}")
    t0 = time.perf_counter()
    work = _on_device(model, device)
    x = _calib_x(calib)
    g = network_units(work, x, engine, ignored_layers)
    x, _ = _check_calib(calib, _classes_of(work, g, x))
    groups = unit_groups(work, g, x, int(group_size))
    units = {u.name: (u.sites, groups[u.name]) for u in g.units}
    scores = unit_importance(work, x, units, criterion=criterion, method=method, progress=progress)
    return GroupRanking(groups=groups, scores=scores, group_size=int(group_size), criterion=criterion,
                        method=method, n_calib=len(x), seconds=round(time.perf_counter() - t0, 3))


def _calib_x(calib) -> Tensor:
    if not isinstance(calib, (tuple, list)) or len(calib) != 2 or not isinstance(calib[0], Tensor):
        raise ValueError(f"calib must be a pair (x, y) of tensors, got {type(calib).__name__}")
    if calib[0].ndim < 2 or len(calib[0]) < 2:
        raise ValueError(f"calib x must hold n >= 2 samples [n, ...], got shape {tuple(calib[0].shape)}")
    return calib[0]


def _removed_of(g, kept: Mapping[str, Sequence[int]]) -> list[np.ndarray]:
    """[width] bool per unit of ``g``: True where ``kept`` ({unit: kept channels}) does not keep the channel."""
    out = []
    for u in g.units:
        mask = np.ones(u.width, dtype=bool)
        mask[list(kept[u.name])] = False
        out.append(mask)
    return out


def budget_step(g: NetworkGraph | SpecGraph, groups: Mapping[str, Sequence[Sequence[int]]],
                scores: Mapping[str, Tensor], budget: int, ties: Mapping[str, str] | None = None,
                fill_back: int | None = None) -> Budgeted:
    """Section 3.2's budget step on a network's description ``g`` (:func:`network_units`): every group of every
    unit sorted together and discarded, least important first, until ``g.count`` of the rest is <= ``budget``
    parameters (:func:`budget.global_discard`), with ``g``'s ties (a ResNet stage) and ``ties`` ({unit: tie id});
    a unit without a collapse rule keeps its last group.  A spvr_lib network's result carries its pruned spec."""
    decided = global_discard([u.name for u in g.units], {u.name: u.width for u in g.units}, groups, scores, budget,
                             lambda kept: g.count(_removed_of(g, kept)), {**getattr(g, "ties", {}), **(ties or {})},
                             {u.name: u.why_not for u in g.units if u.collapse is None}, fill_back=fill_back)
    if isinstance(g, SpecGraph):
        decided.spec = g.spec_of(_removed_of(g, decided.kept))
    return decided


def describe(model: nn.Module) -> str:
    """A one-line architecture: the output width of every conv and linear layer, in module order."""
    widths = [str(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
              for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return f"{len(widths)} layers: " + "-".join(widths)


def spvr_prune(model: nn.Module, calib: tuple[Tensor, Tensor], keep: int | float, group_size: int = 2,
               criterion: str = "spvr", method: str = "fast", progress: bool = True,
               device: str | torch.device | None = None, ranking: GroupRanking | None = None, *,
               ignored_layers: Sequence[str] | None = None, ties: Sequence[Sequence[str]] | None = None,
               inherit: bool = False, source: Mapping | None = None, engine: str | None = None) -> PruneResult:
    """SPvR on ``model`` to ``keep`` parameters: the smaller architecture to retrain from scratch.

    ``model``: any trained nn.Module that Torch-Pruning's DependencyGraph can trace (a torchvision or
    timm network, your own), or a ``spvr_lib.models`` network.  ``calib``: (x [n, C, H, W], y [n])
    calibration samples; y only checks that every class is present (segmentation: masks [n, H, W]).
    ``keep``: a parameter count (int) or a fraction of the original count (float in (0, 1]).
    ``group_size``: d of Section 3.2.  ``criterion``: "spvr" (Eq. 2) or "kl"; ``method``: "fast" or
    "naive" ranking (same numbers).  ``device``: where grouping and ranking run (None: where the model
    is).  ``ranking``: a :func:`rank_groups` result for this model, calibration set, d and criterion,
    so that several budgets share one ranking.

    For a general model (``engine="graph"``, automatic unless the model is a spvr_lib network): channels
    coupled by sums, concatenations and depthwise convs form one unit (Torch-Pruning's DependencyGraph),
    masked everywhere it lives; all groups of all units are sorted together and removed until the
    rebuilt network has <= budget parameters (every parameter counted); a unit that empties collapses
    (a residual branch it cuts disappears; a stride-1 layer in a chain is removed and its consumer
    rebuilt), or, where the structure allows no collapse, keeps one group (``result.kept_one``).
    ``ignored_layers``: module names never pruned (the output layer never is).  ``ties``: lists of layer
    names whose units shrink together (Appendix B's identity-shortcut rule).  ``inherit``: keep the
    original weights of what is kept (default: re-initialised, SPvR trains from scratch; the new model
    is initialised with torch's global RNG).  ``source``: how to rebuild the ORIGINAL model (e.g.
    {"torchvision": "resnet50", "kwargs": {"num_classes": 10}} or {"model_file": "net.py:build"}), so that
    ``models.save_network`` / ``load_network`` can save and rebuild the pruned one.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    x = _calib_x(calib)
    g = network_units(model, x, engine, ignored_layers)
    spec_net = isinstance(g, SpecGraph)
    if spec_net and (ties or inherit or source is not None):
        raise ValueError("ties, inherit and source apply to a traced network (engine='graph'); a spvr_lib network "
                         "ties its ResNet stages itself, and inherit_weights gives its fine-tuning start")
    _check_calib(calib, _classes_of(model, g, x))
    if ranking is None:
        ranking = rank_groups(model, calib, group_size, criterion, method, device, progress, engine, ignored_layers)
    elif (ranking.group_size, ranking.criterion) != (int(group_size), criterion):
        raise ValueError(f"ranking was computed with group_size={ranking.group_size}, criterion="
                         f"{ranking.criterion!r}; this call asks for group_size={group_size}, criterion={criterion!r}")
    if set(ranking.groups) != {u.name for u in g.units}:
        raise ValueError("ranking does not hold the groups of this model's units: "
                         f"{sorted(set(ranking.groups) ^ {u.name for u in g.units})[:5]}")
    params_before = models.count_params(model)
    budget = budget_from_keep(keep, params_before)
    unit_of = {p: u.name for u in g.units for p in u.producers}
    tie_of: dict[str, str] = {}
    for t, layers in enumerate(ties or ()):
        for layer in layers:
            if layer not in unit_of:
                raise ValueError(f"ties names {layer!r}, which is not a prunable layer of the model "
                                 f"(e.g. {[u.name for u in g.units][:3]})")
            tie_of[unit_of[layer]] = f"tie{t}"
    decided = budget_step(g, ranking.groups, ranking.scores, budget, tie_of,
                          int(FILL_BACK * params_before) if getattr(g, "fill_back", True) else None)
    removed = _removed_of(g, decided.kept)
    new_model = g.build(removed)
    if not inherit and not spec_net:
        models.reinitialize(new_model, strict=False)
    params_after = models.count_params(new_model)
    if params_after != decided.params_after:
        raise RuntimeError(f"internal error: the rebuilt network has {params_after} parameters, the exact count "
                           f"predicted {decided.params_after}; please report this model")
    collapsed = [{"unit": u.name, "kind": u.collapse, "modules": list(u.dead)}
                 for u, r in zip(g.units, removed) if r.all()]
    rows = [{"layer": name, "group": j, "channels": list(grp), "size": len(grp),
             "importance": float(ranking.scores[name][j]), "order": decided.order[name][j],
             "removed": decided.removed[name][j]}
            for name, gs in ranking.groups.items() for j, grp in enumerate(gs)]
    if spec_net:                            # a spvr_lib network: its pruned spec says it all
        spec = decided.spec
        return PruneResult(spec=spec, model=new_model, scores=pd.DataFrame(rows), params_before=params_before,
                           params_after=params_after, budget=budget, kept=decided.kept, groups=ranking.groups,
                           last_step=decided.last_step, original_spec=copy.deepcopy(g.spec), collapsed=collapsed,
                           kept_one=[{"unit": k, "why": v} for k, v in decided.kept_one.items()],
                           architecture_before=models.spec_to_str(g.spec), architecture=models.spec_to_str(spec),
                           plan={"engine": "spec"})
    plan = {"engine": "graph", "example_shape": list(x[:1].shape), "ignored_layers": list(g.ignored),
            "removed": {u.name: np.flatnonzero(r).tolist() for u, r in zip(g.units, removed) if r.any()},
            "inherit": bool(inherit)}
    new_model.spvr_description = {"source": dict(source) if source is not None else None, "plan": plan}
    return PruneResult(spec=None, model=new_model, scores=pd.DataFrame(rows), params_before=params_before,
                       params_after=params_after, budget=budget, kept=decided.kept, groups=ranking.groups,
                       last_step=decided.last_step, original_spec={}, collapsed=collapsed,
                       kept_one=[{"unit": k, "why": v} for k, v in decided.kept_one.items()],
                       architecture_before=describe(model), architecture=describe(new_model), plan=plan)


# --------------------------------------------------------------------------- fine-tuning start
def _copy_conv_bn(dst_conv: nn.Module, dst_bn: nn.Module | None, src_conv: nn.Module, src_bn: nn.Module | None,
                  rows: list[int], cols: list[int]) -> None:
    r, c = torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)
    dst_conv.weight.copy_(src_conv.weight[r][:, c])
    if src_conv.bias is not None:
        dst_conv.bias.copy_(src_conv.bias[r])
    if src_bn is not None:
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(dst_bn, attr).copy_(getattr(src_bn, attr)[r])
        dst_bn.num_batches_tracked.copy_(src_bn.num_batches_tracked)


def _selection_shortcut(ds: nn.Sequential, rows: list[int], cols: list[int]) -> None:
    """A projection that passes channel ``rows[i]`` (found among ``cols``) through unchanged."""
    conv, bn = ds[0], ds[1]
    conv.weight.zero_()
    where = {c: j for j, c in enumerate(cols)}
    for i, r in enumerate(rows):
        conv.weight[i, where[r], 0, 0] = 1.0
    bn.weight.fill_(1.0)
    bn.bias.zero_()
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)          # sqrt(var + eps) = 1: BN is the identity


def inherit_weights(original: nn.Module, result: PruneResult) -> nn.Module:
    """The pruned architecture holding the ORIGINAL weights of the kept channels (Table 2's fine-tune).

    Only meaningful when no layer collapsed (ValueError otherwise).  VGG/MLP: every layer keeps
    the rows of its kept channels and the columns of the previous layer's.  ResNet: a stage's
    residual stream (every block output, the shortcuts and each block's last conv) uses ONE
    channel set, the kept channels of the stage's last conv (last block); the inner convs use their
    own kept channels.  Where the pruned network needs a projection the original did not have
    (a stage narrower than the stem), it is set to pass the stream's channels through (1x1
    selection, identity BN).  The stem is not pruned.
    """
    spec = model_spec(original)
    if canonical(spec) != canonical(result.original_spec):
        raise ValueError("original is not the model result was pruned from (its spec differs from "
                         "result.original_spec)")
    collapsed = [name for name, k in result.kept.items() if not k]
    if collapsed:
        raise ValueError(f"inherit_weights needs every layer to survive, but {len(collapsed)} collapsed "
                         f"(e.g. {collapsed[:3]}); train the pruned architecture from scratch instead")
    if spec["arch"] not in ("vgg", "resnet", "mlp"):
        raise ValueError(f"inherit_weights supports vgg, resnet and mlp specs, got arch={spec['arch']!r}")
    param = next(original.parameters())
    new = models.build(result.spec).to(device=param.device, dtype=param.dtype)
    kept = result.kept
    with torch.no_grad():
        if spec["arch"] == "vgg":
            prev = list(range(spec["in_channels"]))
            convs_old = [m for m in original.features if isinstance(m, nn.Sequential)]
            convs_new = [m for m in new.features if isinstance(m, nn.Sequential)]
            for i, (old, nw) in enumerate(zip(convs_old, convs_new)):
                name = f"features.{list(original.features).index(old)}.0"
                _copy_conv_bn(nw[0], nw[1], old[0], old[1], kept[name], prev)
                prev = kept[name]
            fc_old = original.classifier if isinstance(original.classifier, nn.Linear) else original.classifier[0]
            fc_new = new.classifier if isinstance(new.classifier, nn.Linear) else new.classifier[0]
            per = fc_old.in_features // convs_old[-1][0].out_channels if convs_old else 1
            cols = [c * per + k for c in prev for k in range(per)]
            fc_new.weight.copy_(fc_old.weight[:, cols])
            fc_new.bias.copy_(fc_old.bias)
            if isinstance(original.classifier, nn.Sequential):
                for a, b in zip(list(original.classifier)[1:], list(new.classifier)[1:]):
                    b.load_state_dict(a.state_dict())
        elif spec["arch"] == "resnet":
            for attr in ("conv1", "bn1"):
                getattr(new, attr).load_state_dict(getattr(original, attr).state_dict())
            stream = list(range(spec["stem_width"]))
            n_convs = 2 if spec["block"] == "basic" else 3
            for st in spec["stages"]:
                name = st["name"]
                S = kept[f"{name}.{st['blocks'] - 1}.conv{n_convs}"]
                for b, (old, nw) in enumerate(zip(getattr(original, name), getattr(new, name))):
                    cols = stream
                    for k in range(1, n_convs + 1):
                        rows = S if k == n_convs else kept[f"{name}.{b}.conv{k}"]
                        _copy_conv_bn(getattr(nw, f"conv{k}"), getattr(nw, f"bn{k}"), getattr(old, f"conv{k}"),
                                      getattr(old, f"bn{k}"), rows, cols)
                        cols = rows
                    if nw.downsample is not None:
                        if old.downsample is not None:
                            _copy_conv_bn(nw.downsample[0], nw.downsample[1], old.downsample[0], old.downsample[1],
                                          S, stream)
                        else:
                            _selection_shortcut(nw.downsample, S, stream)
                    stream = S
            new.fc.weight.copy_(original.fc.weight[:, stream])
            new.fc.bias.copy_(original.fc.bias)
        else:
            prev = list(range(spec["in_features"]))
            for i in range(len(spec["hidden"])):
                name = f"fc{i + 1}"
                _copy_conv_bn(getattr(new, name), None, getattr(original, name), None, kept[name], prev)
                prev = kept[name]
            last = f"fc{len(spec['hidden']) + 1}"
            getattr(new, last).weight.copy_(getattr(original, last).weight[:, prev])
            getattr(new, last).bias.copy_(getattr(original, last).bias)
    return new


def canonical(spec: dict) -> str:

    return canonical_json(spec)
