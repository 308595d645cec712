"""Where a unit that loses every channel can collapse (layer collapse, Section 3.2): the residual branch it cuts,
the chain of one layer it is the output of, the concatenation it feeds; the torch.fx graph surgery that removes it.
Used by :mod:`spvr_lib.graph` (``trace_units`` finds the rule of each unit, ``NetworkGraph.build`` applies it)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import operator
from collections.abc import Mapping

import torch
import torch.fx as fx
from torch import nn

if TYPE_CHECKING:
    from spvr_lib.graph import Unit

# ops that act on each channel alone: a unit passes through them unchanged
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
