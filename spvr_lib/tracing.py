"""Tracing a network for the graph engine: the one torch.fx tracer (leaf modules kept whole), Torch-Pruning's
DependencyGraph, the shapes of every layer, and, for what cannot be traced, an error that names the module and the
operation where tracing stopped and what to try."""
from __future__ import annotations

import functools
import operator
import warnings
from collections.abc import Collection

import torch
import torch.fx as fx
import torch_pruning as tp
from torch import Tensor, nn

from spvr_lib.attention import PrunedMultiheadAttention, encoder_forward, encoder_layer_forward, plain_attention
from spvr_lib.swin import swin_attention
from spvr_lib.graph_collapse import _LAYERS


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, also keeping as one call any module that holds parameters itself and has no
    children (e.g. torchvision's LayerNorm2d), so that pruning its parameters keeps the graph valid, and every
    module named in ``leaves`` (the fast ranking's mask sites, so that their places exist in the graph)."""

    def __init__(self, leaves: Collection[str] = ()):
        super().__init__()
        self.leaves = frozenset(leaves)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves:
            return True
        if isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)) or swin_attention(m):
            return True                 # one call: its heads are masked inside (spvr_lib.attention, .swin)
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


def trace(model: nn.Module, leaves: Collection[str] = ()) -> fx.Graph:
    """THE torch.fx trace of a network (the graph engine's and the fast ranking's): leaf modules are torch.nn's,
    any parameter holder, multi-head and Swin attentions and the modules named in ``leaves``;
    nn.TransformerEncoder and its layers are traced through."""
    return _LeafTracer(leaves).trace(model)


def trace_graph(model: nn.Module) -> fx.GraphModule:
    """:func:`trace` as a GraphModule for pruning.  An attention's unused outputs (``x, _ = attn(...)``) are
    dropped, so that its residual branch has no reader outside it."""
    graph = trace(model)
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
        attention = any(isinstance(m, (nn.MultiheadAttention, PrunedMultiheadAttention)) or swin_attention(m)
                        for m in model.modules())
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
    the layer (torchvision's Swin attention passes ``qkv.weight`` to ``F.linear``): Torch-Pruning cannot follow
    such channels (on Swin its shape inference does not finish).  Swin v1's attentions pass once made maskable
    (``spvr_lib.swin.make_maskable`` calls their layers as modules); Swin v2's are refused here.  A layer counts
    when its weight reaches the output in autograd's graph but the layer never runs; attentions' ``out_proj``
    are exempt (spvr_lib.attention handles them); a layer the forward pass does not use at all is harmless."""
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
