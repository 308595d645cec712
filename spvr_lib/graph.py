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
``PrunedMultiheadAttention``.  Networks whose channels Torch-Pruning cannot follow (a channel shuffle, layers
called functionally as in Swin) are refused with a ValueError naming the module.
"""
from __future__ import annotations

import copy
import functools
import operator
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.fx as fx
import torch_pruning as tp
from torch import Tensor, nn

from spvr_lib.attention import (MaskableMultiheadAttention, PrunedMultiheadAttention, encoder_forward,
                                encoder_layer_forward, head_positions, make_maskable, plain_attention)


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

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm2d)
_LAYERS = (nn.Conv2d, nn.Linear)
# call_function / call_method targets that act on each channel alone with f(0) = 0 (a chain may pass them)
_PER_CHANNEL_FUNCS = {torch.relu, torch.nn.functional.relu, torch.flatten, torch.nn.functional.max_pool2d,
                      torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool2d,
                      torch.nn.functional.dropout, torch.nn.functional.gelu, torch.nn.functional.silu,
                      torch.nn.functional.hardswish, torch.nn.functional.relu6}
_PER_CHANNEL_METHODS = {"relu", "relu_", "flatten", "view", "reshape", "contiguous"}
_PER_CHANNEL_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Dropout, nn.Identity,
                        nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten)
_ADDS = {operator.add, operator.iadd, torch.add}


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
    """A network's units, parameter table and collapse rules (built once by :func:`trace_units`)."""

    def __init__(self, model: nn.Module, example: Tensor, units: list[Unit], params: list[_Param],
                 gm: fx.GraphModule | None, why_no_fx: str | None, ignored: tuple[str, ...]):
        self.model, self.example, self.units, self.params = model, example, units, params
        self.gm, self.why_no_fx, self.ignored = gm, why_no_fx, ignored
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
        emptied units collapsed (torch.fx).  Weights are the original ones of what is kept."""
        empty = [bool(r.all()) for r in removed]
        if any(empty) and self.gm is None:
            raise ValueError(f"cannot collapse layers: the network is not torch.fx-traceable ({self.why_no_fx})")
        net = copy.deepcopy(self.gm if self.gm is not None else self.model)
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
                DG = _dependency_graph(net, example)
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
class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, also keeping as one call any module that holds parameters itself and has no
    children (e.g. torchvision's LayerNorm2d), so that pruning its parameters keeps the graph valid."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)):
            return True                 # one call: its heads are masked inside (spvr_lib.attention)
        if isinstance(m, (nn.TransformerEncoder, nn.TransformerEncoderLayer)):
            return False                # traced through (call_module), so its branches can collapse
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if isinstance(m, nn.TransformerEncoder):
            forward = functools.partial(encoder_forward, m)        # torch's fast-path checks do not trace
        elif isinstance(m, nn.TransformerEncoderLayer):
            forward = functools.partial(encoder_layer_forward, m)
        return super().call_module(m, forward, args, kwargs)


def trace_graph(model: nn.Module) -> fx.GraphModule:
    """THE torch.fx trace of a network for pruning (leaf modules: torch.nn's, any parameter holder and
    multi-head attentions; nn.TransformerEncoder traced through).  An attention's unused outputs (``x, _ =
    attn(...)``) are dropped, so that its residual branch has no reader outside it."""
    graph = _LeafTracer().trace(model)
    modules = dict(model.named_modules())
    for n in list(graph.nodes):
        if (n.op == "call_function" and n.target is operator.getitem and not n.users
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "call_module"
                and isinstance(modules.get(n.args[0].target), (nn.MultiheadAttention, PrunedMultiheadAttention))):
            graph.erase_node(n)
    return fx.GraphModule(model, graph)


def _dependency_graph(model: nn.Module, example: Tensor) -> tp.DependencyGraph:
    """Torch-Pruning's DependencyGraph of ``model``; a parameter held outside a layer (ConvNeXt's layer
    scale [C, 1, 1]) is pruned along its first non-singleton dim, without tp's warning about it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        # Torch-Pruning first tries model(*example) (an unbatched sample, fine for a CNN); an attention
        # model gets the batch itself, so that no traced shape check fails (and prints) on the way
        attention = any(isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)) for m in model.modules())
        return tp.DependencyGraph().build_dependency(model, example_inputs=(example,) if attention else example)


def _output_layers(model: nn.Module, example: Tensor) -> list[str]:
    """Layers whose output is (a view of) the network's output: the classifier, never pruned."""
    outs: dict[str, Tensor] = {}
    handles = [m.register_forward_hook(lambda _m, _i, o, n=n: outs.__setitem__(n, o))
               for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    try:
        with torch.no_grad():
            y = model(example)
    finally:
        for h in handles:
            h.remove()
    y = y if isinstance(y, Tensor) else next(t for t in (y.values() if isinstance(y, dict) else y)
                                               if isinstance(t, Tensor))
    hits = [n for n, o in outs.items() if isinstance(o, Tensor) and o.untyped_storage().data_ptr()
            == y.untyped_storage().data_ptr()]
    return hits or [list(outs)[-1]]


def _shapes(model: nn.Module, example: Tensor) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """{module name: (input shape, output shape)} of every leaf module, from one forward pass."""
    shapes = {}
    handles = []
    for n, m in model.named_modules():
        if not list(m.children()):
            def hook(_m, inputs, out, n=n):
                i = inputs[0] if inputs and isinstance(inputs[0], Tensor) else None
                if n not in shapes and isinstance(out, Tensor):
                    shapes[n] = (tuple(i.shape) if i is not None else (), tuple(out.shape))
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return shapes


def _channel_dim(shape: tuple[int, ...], size: int) -> int:
    if len(shape) >= 2 and shape[1] == size:
        return 1
    if shape and shape[-1] == size:
        return -1
    raise ValueError(f"no dim of size {size} in {shape}")


def _ancestors(node: fx.Node, memo: dict) -> frozenset:
    if node in memo:
        return memo[node]
    stack, seen = [node], set()
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    memo[node] = frozenset(seen)
    return memo[node]


def _is_add(n: fx.Node) -> bool:
    return (n.op == "call_function" and n.target in _ADDS) or (n.op == "call_method" and n.target in ("add", "add_"))


def _branch_of(graph: fx.Graph, unit: Unit) -> tuple[fx.Node, fx.Node]:
    """The residual sum whose branch ``unit`` cuts, and the sum's other operand (its shortcut)."""
    found = _find_branch(graph, unit, {})
    if found is None:
        raise ValueError(f"unit {unit.name!r} no longer cuts a residual branch")
    return found[0], found[1]


def _find_branch(graph: fx.Graph, unit: Unit, memo: dict) -> tuple[fx.Node, fx.Node, set] | None:
    """(sum node, shortcut operand, branch nodes) of the smallest residual branch that ``unit``
    cuts: all of the unit's modules lie in the branch, and removing its producers leaves no path
    from outside the branch to the branch's output."""
    mods = set(unit.producers) | set(unit.consumers)
    best = None
    for n in graph.nodes:
        if not _is_add(n):
            continue
        ops = [a for a in n.args[:2] if isinstance(a, fx.Node)]
        if len(ops) != 2:
            continue
        for a, b in (ops, ops[::-1]):
            anc_b = _ancestors(b, memo) | {b}
            branch = (_ancestors(a, memo) | {a}) - anc_b
            targets = {x.target for x in branch if x.op == "call_module"}
            if not mods <= targets:
                continue
            if any(u not in branch and u is not n for x in branch for u in x.users):
                continue                    # something outside reads into the branch: not a clean branch
            producers = {x for x in branch if x.op == "call_module" and x.target in unit.producers}
            # is a reachable from outside the branch without passing through the producers?
            frontier = [x for x in branch if any(i not in branch for i in x.all_input_nodes)]
            reach, stack = set(), [x for x in frontier if x not in producers]
            while stack:
                x = stack.pop()
                if x in reach:
                    continue
                reach.add(x)
                stack.extend(u for u in x.users if u in branch and u not in producers)
            if a in reach:
                continue                    # the branch's signal bypasses the unit (e.g. a gate)
            if best is None or len(branch) < len(best[2]):
                best = (n, b, branch)
    return best


def _is_cat(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (torch.cat, torch.concat)


def _concat_member(graph: fx.Graph, unit: Unit, modules: Mapping[str, nn.Module]) -> tuple[str, ...] | None:
    """The modules that vanish when ``unit``, the output of one layer read only as a member of concatenations
    (a DenseNet layer), is dropped from them; None when the unit is not such a member."""
    layers = [p for p in unit.producers if isinstance(modules[p], _LAYERS)]
    if len(layers) != 1:
        return None
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == layers[0]), None)
    if node is None or not node.users or not all(_is_cat(u) and isinstance(u.args[0], (list, tuple))
                                                  and len(u.args[0]) > 1 for u in node.users):
        return None
    dead, changed = {node}, True
    while changed:
        changed = False
        for n in graph.nodes:
            if n not in dead and n.op != "placeholder" and n.users and all(u in dead for u in n.users):
                dead.add(n)
                changed = True
    return tuple(sorted({n.target for n in dead if n.op in ("call_module", "get_attr")}))


def _drop_from_cats(graph: fx.Graph, layer: str) -> None:
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == layer)
    for cat in list(node.users):
        members = [a for a in cat.args[0] if a is not node]
        cat.args = (type(cat.args[0])(members), *cat.args[1:])
    graph.eliminate_dead_code()


def _chain_of(graph: fx.Graph, unit: Unit, modules: Mapping[str, nn.Module],
              shapes: Mapping[str, tuple]) -> tuple[str | None, tuple[str, ...], str | None]:
    """("layer" producer, its dead modules, None) when the unit is a collapsible chain, else (None, (), why)."""
    layers = [p for p in unit.producers if isinstance(modules[p], _LAYERS)]
    if len(layers) != 1:
        return None, (), "produced by several layers (coupled by a sum, a concatenation or a depthwise conv)"
    name = layers[0]
    layer = modules[name]
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            return None, (), "a grouped convolution"
        i_shape, o_shape = shapes[name]
        if tuple(i_shape[2:]) != tuple(o_shape[2:]):
            return None, (), f"its layer {name} changes the spatial size (stride {layer.stride})"
    others = [p for p in unit.producers if p != name]
    if any(not isinstance(modules[p], _NORMS) for p in others):
        return None, (), "it feeds other layers than convolutions and linear layers"
    for c in unit.consumers:
        m = modules[c]
        if not isinstance(m, _LAYERS) or (isinstance(m, nn.Conv2d) and m.groups != 1):
            return None, (), f"it is read by {c} ({type(m).__name__}), not a plain conv or linear layer"
    node = next((n for n in graph.nodes if n.op == "call_module" and n.target == name), None)
    if node is None or len([a for a in node.all_input_nodes]) != 1:
        return None, (), f"layer {name} has not exactly one input in the traced graph"
    # walk from the layer to its consumers: only per-channel ops and the unit's own normalisations
    allowed = set(unit.producers)
    stack, seen = [node], set()
    while stack:
        x = stack.pop()
        for u in x.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op == "call_module" and u.target in unit.consumers:
                continue
            ok = (u.op == "call_module" and (u.target in allowed or isinstance(modules.get(u.target), _PER_CHANNEL_MODULES))) \
                or (u.op == "call_function" and u.target in _PER_CHANNEL_FUNCS) \
                or (u.op == "call_method" and u.target in _PER_CHANNEL_METHODS)
            if not ok or u.op == "output":
                return None, (), f"its channels pass through {u.format_node()[:60]!r} before reaching the next layer"
            stack.append(u)
    return name, tuple([name, *others]), None


def trace_units(model: nn.Module, example: Tensor, ignored_layers: Sequence[str] = ()) -> NetworkGraph:
    """The units of ``model`` (eval mode) for one example input ``example`` [1, ...] (Section 3.2's layers,
    generalised to coupled channel sets).  ``ignored_layers``: module names never pruned (the classifier,
    found automatically as the layer whose output is the network's output, always is).

    Transformers: every ``nn.MultiheadAttention`` is made head-maskable IN PLACE
    (:func:`spvr_lib.attention.make_maskable`: same parameters, state dict and outputs) and its heads are
    one unit (channel j: head j, masked at its ``heads`` child); MLP hidden neurons are units like any
    linear layer's outputs; the embedding width (every Torch-Pruning group that reaches an attention) is
    not pruned.  Name an attention in ``ignored_layers`` to keep all its heads."""
    model = model.eval()
    attentions = make_maskable(model)
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
        with plain_attention(model):
            DG = _dependency_graph(model, example)
    except Exception as err:  # noqa: BLE001 - Torch-Pruning fails in many ways; say where and why
        raise _untraceable(model, err) from err
    groups = DG.get_all_groups(root_module_types=[nn.Conv2d, nn.Linear], ignored_layers=[modules[n] for n in ignored])
    try:
        gm = trace_graph(model)
        why_no_fx = None
    except Exception as err:  # noqa: BLE001 - any tracing failure means: no collapse
        gm, why_no_fx = None, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    units: list[Unit] = []
    param_terms: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    for group in groups:
        root_item = group[0]
        root_mod = root_item.dep.target.module
        root = names.get(root_mod)
        if root is None or root in ignored:
            continue
        if any(isinstance(item.dep.target.module, nn.MultiheadAttention) for item in group):
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
    return NetworkGraph(model, example, units, params, gm, why_no_fx, ignored)


_RESHAPES = {"view", "reshape", "flatten", "unflatten", "permute", "transpose"}


def _untraceable(model: nn.Module, err: Exception) -> ValueError:
    """The ValueError for a model Torch-Pruning's DependencyGraph failed on: the operation where it stopped
    (the Torch-Pruning node being processed, found in the traceback), the module that runs it (torch.fx's
    module stack) and what the user can do."""
    import traceback

    names = {m: n for n, m in model.named_modules()}
    node = None
    for frame, _ in traceback.walk_tb(err.__traceback__):
        for value in frame.f_locals.values():
            if isinstance(value, tp.dependency.Node) and getattr(value, "grad_fn", None) is not None:
                node = value
    op, after = "an operation", None
    if node is not None:
        op = f"the operation {type(node.grad_fn).__name__}"
        stack, seen = [node], set()
        while stack and after is None:              # the nearest module before it
            n = stack.pop(0)
            for i in n.inputs:
                if id(i) in seen:
                    continue
                seen.add(id(i))
                if isinstance(i.module, nn.Module) and i.module in names:
                    after = names[i.module]
                    break
                stack.append(i)
    where, shuffle = None, False
    if after is not None:
        try:
            gm = trace_graph(model)
        except Exception:  # noqa: BLE001 - the location is a nicety
            gm = None
        if gm is not None:
            start = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == after), None)
            todo, seen_fx = ([start] if start is not None else []), set()
            while todo and where is None:
                n = todo.pop(0)
                for u in n.users:
                    if u in seen_fx:
                        continue
                    seen_fx.add(u)
                    target = u.target if u.op == "call_method" else getattr(u.target, "__name__", "")
                    if u.op in ("call_method", "call_function") and target in _RESHAPES:
                        stack_ = list(u.meta.get("nn_module_stack", {}))
                        where = stack_[-1] if stack_ else None
                        shuffle = any(getattr(v.target, "__name__", v.target) == "transpose" for v in u.users)
                        op = f"{target!r} ({u.name} in the traced graph)"
                        break
                    todo.append(u)
    what = ", a channel shuffle (a view that splits the channels, a transpose, a view back)," if shuffle else ""
    inside = f" in module {where!r} ({type(dict(model.named_modules())[where]).__name__})" if where else ""
    before = f" after module {after!r}" if after else ""
    first = str(err).splitlines()[0][:160] if str(err) else ""
    return ValueError(
        f"model ({type(model).__name__}) could not be traced by Torch-Pruning's DependencyGraph: it stopped at {op}"
        f"{what}{inside}{before}, whose channel mapping it cannot follow ({type(err).__name__}: {first}).  "
        "SPvR's graph engine needs every channel traced from layer to layer, so this network cannot be pruned as "
        "it is (ignored_layers does not help: the whole network is traced first); replace the operation by one "
        "that keeps channels in place (e.g. remove the channel shuffle), or prune a network without it")


def _check_module_calls(model: nn.Module, example: Tensor) -> None:
    """ValueError when a module uses a conv or linear layer's weight in a functional call instead of calling
    the layer (torchvision's Swin passes ``qkv.weight`` to ``F.linear``): Torch-Pruning cannot follow such
    channels (on Swin its shape inference does not finish).  A layer counts when its weight reaches the
    output in autograd's graph but the layer never runs; attentions' ``out_proj`` are exempt
    (spvr_lib.attention handles them); a layer the forward pass does not use at all is harmless."""
    ran: set[str] = set()
    handles = [m.register_forward_hook(lambda _m, _i, _o, n=n: ran.add(n)) for n, m in model.named_modules()]
    try:
        with torch.enable_grad(), plain_attention(model):
            y = model(example)
    finally:
        for h in handles:
            h.remove()
    outs = [y] if isinstance(y, Tensor) else [t for t in (y.values() if isinstance(y, dict) else
                                                         y if isinstance(y, (list, tuple)) else ()) if isinstance(t, Tensor)]
    used: set[int] = set()
    stack, seen = [t.grad_fn for t in outs if t.grad_fn is not None], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            used.add(id(fn.variable))
        stack.extend(f for f, _ in fn.next_functions)
    modules = dict(model.named_modules())
    odd = [name for name, m in modules.items()
           if isinstance(m, _LAYERS) and name not in ran and id(m.weight) in used
           and not isinstance(modules.get(name.rpartition(".")[0]), (nn.MultiheadAttention, PrunedMultiheadAttention))]
    if odd:
        parent = odd[0].rpartition(".")[0]
        raise ValueError(
            f"model ({type(model).__name__}) cannot be pruned by SPvR's graph engine: module {parent!r} "
            f"({type(modules[parent]).__name__}) uses the weights of its layer(s) {odd[:3]} without calling them "
            f"({len(odd)} such layers in the model), in functional calls (e.g. F.linear) whose channels Torch-Pruning's "
            "DependencyGraph cannot follow.  ignored_layers does not help (the whole network is traced); call the "
            "layers as modules (layer(x)) in that module's forward, or prune a network without it")


def _head_unit(name: str, m: nn.MultiheadAttention, units: list[Unit],
               param_terms: dict[tuple[str, int], list[tuple[int, np.ndarray]]]) -> None:
    """Append the unit of attention ``name``'s heads (channel j = head j: its q, k, v rows and out_proj
    columns, masked and recorded at the output of its ``heads`` child, [n, L, E] along dim -1) and its
    parameter terms: per head 3 * head_dim rows of in_proj, head_dim of q/k/v_proj and of bias_k/bias_v's
    last dim, head_dim columns of out_proj."""
    ui, h, hd = len(units), m.num_heads, m.head_dim
    site = MaskSite(f"{name}.heads", "output", -1, head_positions(m))
    units.append(Unit(name=name, width=h, sites=(site,), record=site, producers=(name,), consumers=(),
                      heads=True))
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
    """Every head-maskable attention left in ``net`` becomes a :class:`PrunedMultiheadAttention` holding the
    heads its unit keeps (all of them when it has no unit or lost none), with their weights."""
    gone = {u.name: r for u, r in zip(units, removed) if u.heads}
    for name, m in list(net.named_modules()):
        if type(m) is MaskableMultiheadAttention:
            r = gone.get(name, np.zeros(m.num_heads, dtype=bool))
            net.set_submodule(name, PrunedMultiheadAttention.from_attention(m, np.flatnonzero(~r).tolist()))


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
