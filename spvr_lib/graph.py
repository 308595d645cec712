"""Any PyTorch network as SPvR sees it: units of coupled channels, where they are masked and
recorded, the exact parameter count of any choice of kept channels, and the rebuilt network.

A *unit* is a set of channels that must be removed together (Torch-Pruning's DependencyGraph
finds them: a conv and its BN, every conv feeding one residual sum, every consumer of a
concatenation, a depthwise conv and the conv before it).  SPvR groups a unit's channels
(Algorithm 1, on the activations after its normalisation), ranks each group by masking it
everywhere the unit lives (Eq. 2) and removes groups across all units until the rebuilt network
fits the budget.  Layer collapse, where a unit loses every channel (torch.fx graph surgery):

* ``"branch"``: the unit cuts a residual branch (every path through the branch passes through it):
  the branch disappears and its sum becomes the shortcut;
* ``"layer"``: the unit is the output of one stride-1 conv or linear layer feeding only
  conv/linear consumers through per-channel ops (a chain): the layer and its normalisation go and
  the consumers read the layer's input, rebuilt for its width;
* ``"concat"``: the unit is the output of one layer read only by concatenations (a DenseNet layer):
  it is dropped from them, with everything that only fed it.

Any other unit keeps at least one group, and the result says why.

Grouped convolutions (not depthwise): a unit that feeds or leaves one loses the same within-group position
of every conv group at once (one unit channel = that slot, ``groups`` positions), so the conv keeps its
groups with equal widths.  Transformers (``spvr_lib.attention``): an ``nn.MultiheadAttention``'s heads are
one unit (masked at the heads' concatenated output before ``out_proj``; the attention is made maskable in
place), MLP hidden neurons are ordinary units, the embedding width is not pruned; an attention or MLP that
loses everything is a "branch" collapse (its block becomes its shortcut); the rebuilt attentions are
``PrunedMultiheadAttention``.  torchvision's Swin (v1) is handled the same way (``spvr_lib.swin``): each
``ShiftedWindowAttention`` is made maskable in place (its layers called as modules), its heads are one unit (a
head's qkv rows, proj columns and relative-position-bias column), MLP neurons are units, the embedding width is
not pruned, and the rebuilt attentions are ``PrunedShiftedWindowAttention``.  Channel shuffles (ShuffleNetV2's
view, transpose, view; ``nn.ChannelShuffle``; ``spvr_lib.channel_shuffle``): Torch-Pruning traces a copy of the
torch.fx graph with a stand-in layer for each shuffle; the channels a shuffle moves (a ShuffleNetV2 block's
output) are not pruned (``NetworkGraph.fixed``, and a warning), every width that never meets a shuffle (a
branch's inner width) is a unit as usual, and the real network is counted and rebuilt.  Networks whose channels
Torch-Pruning cannot follow (a channel shuffle in a network torch.fx cannot trace, layers called functionally as
in Swin v2's attention) are refused with a ValueError naming the module.
"""
from __future__ import annotations

import copy
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch_pruning as tp
from torch import Tensor, nn

from spvr_lib import swin
from spvr_lib.attention import MaskableMultiheadAttention, PrunedMultiheadAttention, head_positions, make_maskable, plain_attention
from spvr_lib.channel_shuffle import Shuffle, find_shuffles, marker_of, refusal, shuffle_free, shuffles_in_forward
from spvr_lib.graph_collapse import _LAYERS, _NORMS, _branch_of, _chain_of, _concat_member, _drop_from_cats, _find_branch
from spvr_lib.tracing import _channel_dim, _check_module_calls, _dependency_graph, _output_layers, _shapes, _untraceable, trace_graph


__all__ = ["MaskSite", "Unit", "NetworkGraph", "trace_units", "trace_graph"]


@dataclass(frozen=True)
class MaskSite:
    """Where a unit's channels are zeroed: the OUTPUT (where="output") or the first positional INPUT
    (where="input") of module ``module`` (a name from model.named_modules()), along dim ``dim`` (1 or -1);
    ``index[c]``: the positions along that dim that carry the unit's channel c (several for a Linear
    after a flatten)."""
    module: str
    where: str
    dim: int
    index: tuple[tuple[int, ...], ...]


@dataclass
class Unit:
    """One set of coupled channels.

    name: the unit's root layer (a module name); width: its channels; sites: where masking a group
    zeroes it (every module output and consumer input it lives in); record: where Eq. 3-4 read
    its activations (after its first normalisation, else the root's output); producers: layers
    whose OUTPUT channels are the unit; consumers: layers that READ it; collapse: "branch",
    "layer" or None; why_not: why a unit cannot collapse (None when it can); dead: module names
    whose parameters vanish when it collapses.  Collapse kinds: "branch" (a residual branch it cuts
    goes), "layer" (a stride-1 layer in a chain goes, its consumers read its input), "concat" (a layer
    read only by concatenations, e.g. a DenseNet layer, is dropped from them).
    """

    name: str
    width: int
    sites: tuple[MaskSite, ...]
    record: MaskSite
    producers: tuple[str, ...]
    consumers: tuple[str, ...]
    collapse: str | None = None
    why_not: str | None = None
    dead: tuple[str, ...] = ()
    chain_input: str | None = None     # "layer" collapse: the producer whose INPUT the consumers then read
    out_sites: dict[str, MaskSite] = field(default_factory=dict)   # producer name -> its output site
    heads: bool = False                # an attention's heads (channel j: head j; producers: the attention)


# --------------------------------------------------------------------------- parameter bookkeeping
@dataclass
class _ParamDim:
    """How the units change one dimension of one parameter: size = base - sum over units of removed * mult."""

    base: int
    terms: list[tuple[int, np.ndarray]] = field(default_factory=list)   # (unit index, [width] positions per channel)


@dataclass
class _Param:
    name: str
    module: str           # the owning module's name (an unwrapped parameter, e.g. a layer scale: its own name)
    dims: list[_ParamDim]


class NetworkGraph:
    """A network's units, parameter table and collapse rules (built once by :func:`trace_units`).

    ``shuffles``: the channel shuffles of ``gm`` (``spvr_lib.channel_shuffle``), hidden from Torch-Pruning
    when it traces; ``fixed``: {layer: why} for every conv or linear layer whose output channels pass through
    a shuffle, which no unit prunes; ``tp_groups``: {unit name: the Torch-Pruning dependency group it is made
    of}, in Torch-Pruning's order (the baselines score these groups with Torch-Pruning's importances)."""

    def __init__(self, model: nn.Module, example: Tensor, units: list[Unit], params: list[_Param],
                 gm: fx.GraphModule | None, why_no_fx: str | None, ignored: tuple[str, ...], *,
                 shuffles: Sequence[Shuffle] = (), fixed: Mapping[str, str] | None = None,
                 tp_groups: Mapping[str, Any] | None = None):
        self.model, self.example, self.units, self.params = model, example, units, params
        self.gm, self.why_no_fx, self.ignored = gm, why_no_fx, ignored
        self.shuffles, self.fixed = tuple(shuffles), dict(fixed or {})
        self.tp_groups = dict(tp_groups or {})
        self.index = {u.name: i for i, u in enumerate(units)}
        self._modules = dict(model.named_modules())
        self._by_name = {p.name: p for p in params}

    # ------------------------------------------------------------------ exact count
    def count(self, removed: Sequence[np.ndarray]) -> int:
        """Parameters of the network with ``removed[i]`` ([width] bool) channels of unit i gone, units
        with every channel gone collapsed (each must have a collapse rule).  Equals
        ``count_params(self.build(...))``."""
        empty = [bool(r.all()) for r in removed]
        dead_modules: set[str] = set()
        chain: dict[int, str] = {}
        for i, u in enumerate(self.units):
            if empty[i]:
                if u.collapse is None:
                    raise ValueError(f"unit {u.name!r} cannot lose every channel ({u.why_not})")
                dead_modules.update(u.dead)
                if u.collapse == "layer":
                    chain[i] = u.chain_input
        total = 0
        for p in self.params:
            if p.module in dead_modules or any(p.module.startswith(d + ".") for d in dead_modules):
                continue                    # (a dead attention takes its out_proj and in_proj_weight along)
            n = 1
            for d in range(len(p.dims)):
                n *= self._dim_size(p, d, removed, chain)
            total += n
        return int(total)

    def _dim_size(self, p: _Param, d: int, removed: Sequence[np.ndarray], chain: Mapping[int, str]) -> int:
        """Size of dim ``d`` of parameter ``p``: its base less the removed channels of each unit along it; a
        consumer of a collapsed layer (``chain``: unit -> layer) reads that layer's input width instead."""
        dim = p.dims[d]
        size = dim.base
        for i, mult in dim.terms:
            if i in chain and d == 1:                      # the consumer reads the collapsed layer's input
                per = mult.sum() / max(1, len(mult))
                src = self._by_name.get(f"{chain[i]}.weight")
                src_in = self._dim_size(src, 1, removed, chain) if src else 0
                size += int(round(per * src_in)) - int(mult.sum())
            else:
                size -= int(mult[removed[i]].sum())
        return max(0, size)

    # ------------------------------------------------------------------ the rebuilt network
    def build(self, removed: Sequence[np.ndarray]) -> nn.Module:
        """A standalone copy of the network with the removed channels pruned (Torch-Pruning) and the
        emptied units collapsed (torch.fx).  Weights are the original ones of what is kept.  The copy is of the
        model's own class where nothing collapsed and the network has no channel shuffle and no attention, else
        the torch.fx GraphModule of its trace (whose forward calls a thinned attention as :mod:`spvr_lib.attention`
        rebuilds it, e.g. inside nn.TransformerEncoder)."""
        empty = [bool(r.all()) for r in removed]
        if any(empty) and self.gm is None:
            raise ValueError(f"cannot collapse layers: the network is not torch.fx-traceable ({self.why_no_fx})")
        traced = self.gm is not None and (any(empty) or bool(self.shuffles) or any(u.heads for u in self.units))
        net = copy.deepcopy(self.gm if traced else self.model)
        concat = [u for u, e in zip(self.units, empty) if e and u.collapse == "concat"]
        if any(e and u.collapse in ("branch", "layer") for u, e in zip(self.units, empty)):
            graph = net.graph
            for i, u in enumerate(self.units):
                if not empty[i] or u.collapse not in ("branch", "layer"):
                    continue
                present = {n.target for n in graph.nodes if n.op == "call_module"}
                if not set(u.producers) & present:
                    continue                # already gone with an enclosing collapsed branch
                if u.collapse == "branch":
                    add, keep = _branch_of(graph, u)
                    add.replace_all_uses_with(keep)
                    graph.erase_node(add)
                    graph.eliminate_dead_code()
                else:                       # "layer": bypass the producer and its normalisations
                    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
                    for name in u.dead:
                        if name in nodes:
                            nodes[name].replace_all_uses_with(nodes[name].args[0])
            graph.eliminate_dead_code()
            net.recompile()
            net.delete_all_unused_submodules()
            _fit_inputs(net, self.example)
        net.eval()
        survivors = dict(net.named_modules())
        # a concatenation member is pruned to zero channels first (its readers shrink with it), then dropped
        todo = [(i, u) for i, u in enumerate(self.units)
                if removed[i].any() and (not empty[i] or u.collapse == "concat") and not u.heads]
        if todo:
            example = self.example.to(next(net.parameters()).device)
            with plain_attention(net):
                DG = _dependency_graph(shuffle_free(net, self.shuffles) if self.shuffles else net, example)
            for i, u in todo:
                root = next((p for p in u.producers if p in survivors and isinstance(survivors[p], _LAYERS)), None)
                if root is None:
                    continue                # every producer went with a collapsed branch
                module = survivors[root]
                site = u.out_sites[root]
                idxs = sorted({j for c in np.flatnonzero(removed[i]) for j in site.index[c]})
                fn = tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels
                DG.get_pruning_group(module, fn, idxs=idxs).prune()
        _rebuild_attention(net, self.units, removed)
        if concat:
            for u in concat:
                layer = next(p for p in u.producers if isinstance(self._modules[p], _LAYERS))
                if any(n.op == "call_module" and n.target == layer for n in net.graph.nodes):
                    _drop_from_cats(net.graph, layer)
            net.recompile()
            net.delete_all_unused_submodules()
        return net


# --------------------------------------------------------------------------- tracing


def trace_units(model: nn.Module, example: Tensor, ignored_layers: Sequence[str] = ()) -> NetworkGraph:
    """The units of ``model`` (eval mode) for one example input ``example`` [1, ...] (Section 3.2's layers,
    generalised to coupled channel sets).  ``ignored_layers``: module names never pruned (the classifier,
    found automatically as the layer whose output is the network's output, always is).

    Transformers: every ``nn.MultiheadAttention`` is made head-maskable IN PLACE
    (:func:`spvr_lib.attention.make_maskable`: same parameters, state dict and outputs) and its heads are
    one unit (channel j: head j, masked at its ``heads`` child); MLP hidden neurons are units like any
    linear layer's outputs; the embedding width (every Torch-Pruning group that reaches an attention) is
    not pruned.  Name an attention in ``ignored_layers`` to keep all its heads.  torchvision's Swin v1 attentions
    (``ShiftedWindowAttention``) are made maskable in place the same way (:func:`spvr_lib.swin.make_maskable`).

    Hugging Face models (``spvr_lib.hf``): a float ``example`` of token ids is read as int64; BERT- and
    GPT-2-style heads, MLP neurons and the residual stream's width are the units (:func:`spvr_lib.hf.trace_token_units`)."""
    from spvr_lib import hf                 # hf builds on this module's units: imported when needed

    model = model.eval()
    example = hf.token_example(model, example)
    parts = hf.transformer_parts(model, ignored_layers)
    if parts is not None:
        modules = dict(model.named_modules())
        for n in ignored_layers:
            if n not in modules:
                raise ValueError(f"ignored_layers names {n!r}, which is not a module of the model")
        return hf.trace_token_units(model, example, parts, ignored_layers)
    attentions = make_maskable(model) + swin.make_maskable(model)
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    pnames = {p: n for n, p in model.named_parameters()}
    for n in ignored_layers:
        if n not in modules:
            raise ValueError(f"ignored_layers names {n!r}, which is not a module of the model")
    ignored = tuple(dict.fromkeys([*_output_layers(model, example), *ignored_layers]))
    shapes = _shapes(model, example)
    _check_module_calls(model, example)
    try:
        gm = trace_graph(model)
        why_no_fx = None
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no collapse
        gm, why_no_fx = None, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    # channel shuffles: Torch-Pruning traces a copy with a stand-in layer for each (spvr_lib.channel_shuffle);
    # without a trace that can be run, a shuffle found in a plain forward pass is refused
    shuffles = find_shuffles(gm, example) if gm is not None else None
    if shuffles is None:
        found = shuffles_in_forward(model, example)
        if found:
            raise refusal(model, found, why_no_fx)
        shuffles = ()
    try:
        with plain_attention(model):
            DG = _dependency_graph(shuffle_free(gm, shuffles) if shuffles else model, example)
    except Exception as err:  # noqa: BLE001 - Torch-Pruning fails in many ways; say where and why
        raise _untraceable(model, err) from err
    groups = DG.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear], ignored_layers=[modules[n] for n in ignored])
    # a Swin attention's layers and bias table: only its head unit prunes them (Torch-Pruning's groups through
    # its window reshapes couple qkv's 3 C rows with proj's C columns)
    in_swin = {id(t) for m in modules.values() if swin.swin_attention(m) for t in (*m.modules(), *m.parameters())}
    units: list[Unit] = []
    tp_groups: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    param_terms: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    for group in groups:
        root_item = group[0]
        root_mod = root_item.dep.target.module
        root = names.get(root_mod)
        crossed = [s for s in (marker_of(item.dep.target.module) for item in group) if s is not None]
        if crossed:                         # channels a shuffle moves: Torch-Pruning cannot map them, kept whole
            _keep_whole(group, crossed, names, fixed)
            continue
        if root is None or root in ignored:
            continue
        if any(isinstance(item.dep.target.module, nn.MultiheadAttention) or id(item.dep.target.module) in in_swin
               for item in group):
            continue                        # the embedding width (an attention's input/output): not pruned
        width = len(root_item.idxs)
        # a grouped conv (not depthwise) among the unit's layers: its channels go in slots, the same
        # position of every conv group at once (unit channel = one slot class, see _grouped_classes)
        cls_of, width = _grouped_classes(group, width)
        ui = len(units)
        sites, producers, consumers, out_sites = [], [], [], {}
        record = None
        for item in group:
            target = item.dep.target.module
            handler = getattr(item.dep.handler, "__name__", "")
            out = "out_channels" in handler
            idx = [int(i) for i in item.idxs]
            ridx = [int(i) for i in item.root_idxs]
            per: list[list[int]] = [[] for _ in range(width)]
            for i, r in zip(idx, ridx):
                per[cls_of[r]].append(i)
            mult = np.array([len(p) for p in per], dtype=np.int64)
            if isinstance(target, nn.Parameter):
                pname = pnames.get(target)
                if pname is not None:
                    dim = next(d for d, s in enumerate(target.shape) if s == int(mult.sum()) or s >= len(idx))
                    param_terms.setdefault((pname, dim), []).append((ui, mult))
                continue
            name = names.get(target)
            if name is None or name not in shapes:
                continue
            if name in ignored and out:
                continue
            i_shape, o_shape = shapes[name]
            if out:
                size = _out_size(target)
                if size is None:
                    continue
                dim = _channel_dim(o_shape, size)
                site = MaskSite(name, "output", dim, tuple(tuple(p) for p in per))
                sites.append(site)
                producers.append(name)
                out_sites[name] = site
                if record is None and isinstance(target, _NORMS):
                    record = site
                for pn, p in target.named_parameters(recurse=False):
                    param_terms.setdefault((f"{name}.{pn}", 0), []).append((ui, mult))
            else:
                if not isinstance(target, _LAYERS):
                    continue
                size = target.in_channels if isinstance(target, nn.Conv2d) else target.in_features
                dim = _channel_dim(i_shape, size)
                sites.append(MaskSite(name, "input", dim, tuple(tuple(p) for p in per)))
                consumers.append(name)
                if isinstance(target, nn.Conv2d) and target.groups > 1:
                    if _is_depthwise(target):
                        continue            # depthwise: its out item carries the change
                    # grouped: weight [out, in / groups, k, k]; a slot class holds the same number of
                    # channels in every group, so dim 1 loses that number over groups
                    param_terms.setdefault((f"{name}.weight", 1), []).append((ui, mult // target.groups))
                    continue
                param_terms.setdefault((f"{name}.weight", 1), []).append((ui, mult))
        if not producers:
            continue
        if record is None:
            record = out_sites.get(root) or out_sites[producers[0]]
        units.append(Unit(name=root, width=width, sites=tuple(sites), record=record, producers=tuple(producers),
                          consumers=tuple(dict.fromkeys(consumers)), out_sites=out_sites))
        tp_groups[root] = group
    for name in attentions:                                # one unit per attention: its heads
        if name in ignored:
            continue
        _head_unit(name, modules[name], units, param_terms)
    position = {n: i for i, n in enumerate(modules)}      # forward (module) order, as Section 3.2 lists layers
    order = sorted(range(len(units)), key=lambda i: position[units[i].name])
    renumber = {old: new for new, old in enumerate(order)}
    units = [units[i] for i in order]
    param_terms = {k: [(renumber[i], mult) for i, mult in v] for k, v in param_terms.items()}
    params = []
    for pname, p in model.named_parameters():
        module = pname.rsplit(".", 1)[0] if "." in pname else ""
        dims = [_ParamDim(int(s), param_terms.get((pname, d), [])) for d, s in enumerate(p.shape)]
        params.append(_Param(pname, module if pname.rsplit(".", 1)[-1] in ("weight", "bias") else pname, dims))
    # collapse rules
    if gm is None:
        for u in units:
            u.why_not = f"the network is not torch.fx-traceable ({why_no_fx})"
    else:
        memo: dict = {}
        for u in units:
            found = _find_branch(gm.graph, u, memo)
            if found is not None:
                _, _, branch = found
                u.collapse = "branch"
                u.dead = tuple(sorted({x.target for x in branch if x.op in ("call_module", "get_attr")}))
                continue
            if u.heads:
                u.why_not = f"attention {u.name} is not a residual branch (no sum with a shortcut around it)"
                continue
            dead = _concat_member(gm.graph, u, modules)
            if dead is not None:
                u.collapse, u.dead = "concat", dead
                continue
            layer, dead, why = _chain_of(gm.graph, u, modules, shapes)
            if layer is not None:
                u.collapse, u.dead, u.chain_input = "layer", dead, layer
            else:
                u.why_not = why
    if shuffles and model not in _NOTED:
        _NOTED.add(model)                   # once per model (rank_groups and spvr_prune both trace it)
        warnings.warn(_shuffle_note(model, shuffles, fixed, len(units)), stacklevel=2)
    return NetworkGraph(model, example, units, params, gm, why_no_fx, ignored, shuffles=shuffles, fixed=fixed,
                        tp_groups=tp_groups)


_NOTED: weakref.WeakSet = weakref.WeakSet()      # models whose channel shuffles were warned about


def _keep_whole(group, crossed: Sequence[Shuffle], names: Mapping[nn.Module, str], fixed: dict[str, str]) -> None:
    """Record in ``fixed`` the conv and linear layers whose output channels are in ``group``, a Torch-Pruning
    group that reaches the stand-in of a channel shuffle (``crossed``): no unit prunes them."""
    where = crossed[0].where()
    for item in group:
        m = item.dep.target.module
        if isinstance(m, _LAYERS) and names.get(m) is not None and "out_channels" in getattr(item.dep.handler,
                                                                                              "__name__", ""):
            fixed.setdefault(names[m], f"its output channels pass through the channel shuffle in {where}, a "
                                       "permutation of channels that Torch-Pruning cannot follow: kept whole")


def _shuffle_note(model: nn.Module, shuffles: Sequence[Shuffle], fixed: Mapping[str, str], n_units: int) -> str:
    """The warning of a network with channel shuffles: what is kept whole, and why."""
    return (f"model ({type(model).__name__}) has {len(shuffles)} channel shuffle(s) (the first in "
            f"{shuffles[0].where()}): the channels they move, the outputs of {len(fixed)} conv/linear layers (e.g. "
            f"{', '.join(list(fixed)[:3])}), are not pruned, since Torch-Pruning's DependencyGraph cannot follow a "
            f"permutation of channels; the {n_units} units that never pass a shuffle (e.g. each block's inner width) "
            "are pruned as usual (spvr_lib.graph.trace_units(model, example).fixed lists the layers kept whole)")


def _head_unit(name: str, m: nn.Module, units: list[Unit],
               param_terms: dict[tuple[str, int], list[tuple[int, np.ndarray]]]) -> None:
    """Append the unit of attention ``name``'s heads (channel j = head j: its q, k, v rows and out_proj
    columns, masked and recorded at the output of its ``heads`` child, [n, L, E] along dim -1) and its
    parameter terms: per head 3 * head_dim rows of in_proj, head_dim of q/k/v_proj and of bias_k/bias_v's
    last dim, head_dim columns of out_proj (a Swin attention: :func:`spvr_lib.swin.head_params`)."""
    ui, h, hd = len(units), m.num_heads, m.head_dim
    site = MaskSite(f"{name}.heads", "output", -1, head_positions(m))
    units.append(Unit(name=name, width=h, sites=(site,), record=site, producers=(name,), consumers=(),
                      heads=True))
    if swin.swin_attention(m):
        for pn, dim, per in swin.head_params(m):
            param_terms.setdefault((f"{name}.{pn}", dim), []).append((ui, np.full(h, per, dtype=np.int64)))
        return
    for pn, p in m.named_parameters(recurse=False):
        if p is None:
            continue
        if pn in ("in_proj_weight", "in_proj_bias"):
            dim, per = 0, 3 * hd
        elif pn in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
            dim, per = 0, hd
        elif pn in ("bias_k", "bias_v"):
            dim, per = p.ndim - 1, hd
        else:
            continue
        param_terms.setdefault((f"{name}.{pn}", dim), []).append((ui, np.full(h, per, dtype=np.int64)))
    param_terms.setdefault((f"{name}.out_proj.weight", 1), []).append((ui, np.full(h, hd, dtype=np.int64)))


def _rebuild_attention(net: nn.Module, units: Sequence[Unit], removed: Sequence[np.ndarray]) -> None:
    """Every head-maskable attention left in ``net`` becomes a :class:`PrunedMultiheadAttention` (a Swin one a
    :class:`spvr_lib.swin.PrunedShiftedWindowAttention`) holding the heads its unit keeps (all of them when it
    has no unit or lost none), with their weights."""
    gone = {u.name: r for u, r in zip(units, removed) if u.heads}
    for name, m in list(net.named_modules()):
        pruned = {MaskableMultiheadAttention: PrunedMultiheadAttention,
                  swin.MaskableShiftedWindowAttention: swin.PrunedShiftedWindowAttention}.get(type(m))
        if pruned is not None:
            r = gone.get(name, np.zeros(m.num_heads, dtype=bool))
            net.set_submodule(name, pruned.from_attention(m, np.flatnonzero(~r).tolist()))


def _is_depthwise(m: nn.Module) -> bool:
    """Torch-Pruning's depthwise rule: input and output channels of the conv are one coupled set."""
    return isinstance(m, nn.Conv2d) and m.groups == m.out_channels and m.out_channels > 1


def _grouped_classes(group, width: int) -> tuple[list[int], int]:
    """Root channel -> unit channel for a Torch-Pruning group that feeds or leaves a grouped convolution.

    A conv with ``groups`` G > 1 that is not depthwise holds its weight as [out, in / G, k, k]: its input
    can only lose the same within-group position j from every group at once (channels j, j + in/G, ...),
    and its output the same number of channels per group (we take the same position too, which keeps
    the out-channel order of each group).  Root channels tied that way (by every grouped conv the unit
    meets, union-find) form one unit channel, whose positions are a multiple of G at that conv.  Returns
    ([width] class of each root channel, number of classes); the identity when no grouped conv is in it."""
    parent = list(range(width))

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    tied = False
    for item in group:
        m = item.dep.target.module
        if not isinstance(m, nn.Conv2d) or m.groups == 1 or _is_depthwise(m):
            continue
        out = "out_channels" in getattr(item.dep.handler, "__name__", "")
        per_group = (m.out_channels if out else m.in_channels) // m.groups
        first: dict[int, int] = {}
        for i, r in zip(item.idxs, item.root_idxs):
            slot = int(i) % per_group
            if slot in first:
                a, b = find(first[slot]), find(int(r))
                if a != b:
                    parent[max(a, b)] = min(a, b)
            else:
                first[slot] = int(r)
            tied = True
    if not tied:
        return list(range(width)), width
    roots = sorted({find(r) for r in range(width)})
    number = {r: k for k, r in enumerate(roots)}
    return [number[find(r)] for r in range(width)], len(roots)


def _out_size(m: nn.Module) -> int | None:
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.InstanceNorm2d)):
        return m.num_features
    if isinstance(m, nn.LayerNorm):
        return int(m.normalized_shape[-1])
    if isinstance(m, nn.GroupNorm):
        return m.num_channels
    return None


def _fit_inputs(net: nn.Module, example: Tensor) -> None:
    """Rebuild every conv/linear layer whose input width changed (a collapsed layer's consumer now reads
    that layer's input): one forward pass, resizing each mismatched layer just before it runs."""
    def fix(m: nn.Module, inputs: tuple) -> None:
        x = inputs[0]
        if isinstance(m, nn.Conv2d) and x.shape[1] != m.in_channels:
            m.in_channels = int(x.shape[1])
            m.weight = nn.Parameter(torch.empty(m.out_channels, m.in_channels // m.groups, *m.kernel_size,
                                                dtype=m.weight.dtype, device=m.weight.device))
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.Linear) and x.shape[-1] != m.in_features:
            m.in_features = int(x.shape[-1])
            m.weight = nn.Parameter(torch.empty(m.out_features, m.in_features, dtype=m.weight.dtype,
                                                device=m.weight.device))
            nn.init.normal_(m.weight, 0, 0.01)
    handles = [m.register_forward_pre_hook(fix) for m in net.modules() if isinstance(m, _LAYERS)]
    try:
        with torch.no_grad():
            net.eval()(example.to(next(net.parameters()).device))
    finally:
        for h in handles:
            h.remove()
