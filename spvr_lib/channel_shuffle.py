"""Channel shuffles in the graph engine: found in the torch.fx trace, hidden from Torch-Pruning behind a stand-in
layer, and the channels they move kept whole (see ``spvr_lib.graph``).

A channel shuffle (ShuffleNet's ``channel_shuffle``: a view that splits the channels into groups, a transpose, a
view back; ``nn.ChannelShuffle``; ``torch.channel_shuffle``) permutes the channels of a tensor [N, C, ...].
Torch-Pruning's DependencyGraph cannot map channel indices through it (on ShuffleNetV2 it fails with a
ZeroDivisionError), so the network could not be traced at all.  :func:`find_shuffles` finds every such chain of
reshapes and transposes in a traced graph and checks, by running it on a tensor of indices, that it only permutes
dim 1; :func:`shuffle_free` gives a copy of the traced network in which each one is replaced by a stand-in layer
(a 1x1 convolution, or a linear layer for [N, C], whose weight is the permutation) that shares every other module
with the network.  Torch-Pruning traces that copy: the stand-in separates the channels written before a shuffle
from those read after it, and every Torch-Pruning group that reaches a stand-in (``marker_of``) is a set of
channels that passes through a shuffle, which ``trace_units`` does not prune.  Every other group (e.g. the
inner width of a ShuffleNetV2 branch, which never meets a shuffle) is exact and prunes the real network.
"""
from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["Shuffle", "find_shuffles", "shuffle_free", "marker_of", "shuffles_in_forward", "refusal"]

# single-input ops a channel shuffle is made of (call_method names, or the __name__ of a torch function)
_RESHAPES = {"view", "reshape", "unflatten", "flatten"}
_SWAPS = {"transpose", "permute", "swapaxes", "swapdims"}
_PASS = {"contiguous"}
_ONE_CALL = {torch.channel_shuffle, torch.native_channel_shuffle}
_STAND_IN = {2: nn.Linear, 3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}


@dataclass(frozen=True)
class Shuffle:
    """One channel shuffle of a traced graph: the nodes ``nodes`` (names, in order) turn the output of node
    ``source`` [N, C, ...] (``ndim`` dims, ``channels`` C) into a tensor of the same shape whose channel c is
    ``source``'s channel ``order[c]``; ``module``: the module whose forward runs it ('' at the top), ``kind``
    its class name."""

    source: str
    nodes: tuple[str, ...]
    order: tuple[int, ...]
    ndim: int
    module: str
    kind: str

    @property
    def channels(self) -> int:
        return len(self.order)

    def where(self) -> str:
        """Its place, for messages: "module 'stage2.0' (InvertedResidual)"."""
        return f"module {self.module!r} ({self.kind})" if self.module else "the model's own forward"


def _op(n: fx.Node) -> str:
    if n.op == "call_method":
        return str(n.target)
    if n.op == "call_function":
        return getattr(n.target, "__name__", "")
    return ""


def _chains(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Candidate shuffles: a one-call shuffle, or a chain of single-user reshapes and transposes with a reshape
    before its first transpose (splitting the channels) and one after its last (merging them back)."""
    out, used = [], set()
    for n in gm.graph.nodes:
        if n in used:
            continue
        if (n.op == "call_module" and isinstance(gm.get_submodule(n.target), nn.ChannelShuffle)) or \
                (n.op == "call_function" and n.target in _ONE_CALL):
            out.append([n])
            continue
        if _op(n) not in _SWAPS or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        chain = [n]
        cur = n.args[0]
        while isinstance(cur, fx.Node) and _op(cur) in _RESHAPES | _SWAPS | _PASS and len(cur.users) == 1 \
                and cur.args and isinstance(cur.args[0], fx.Node):
            chain.insert(0, cur)
            cur = cur.args[0]
        cur = n
        while len(cur.users) == 1:
            (u,) = cur.users
            if _op(u) not in _RESHAPES | _SWAPS | _PASS or not u.args or u.args[0] is not cur:
                break
            chain.append(u)
            cur = u
        ops = [_op(x) for x in chain]
        swaps = [i for i, o in enumerate(ops) if o in _SWAPS]
        if any(o in _RESHAPES for o in ops[:swaps[0]]) and any(o in _RESHAPES for o in ops[swaps[-1] + 1:]):
            out.append(chain)
            used.update(chain)
    return out


class _Record(fx.Interpreter):
    """torch.fx's interpreter, keeping the values of the nodes in ``wanted``."""

    def __init__(self, gm: fx.GraphModule, wanted: set):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


def _replay(gm: fx.GraphModule, chain: Sequence[fx.Node], probe: Tensor, values: dict) -> Tensor:
    """The chain's ops run on ``probe`` in place of the chain's input (its other arguments, e.g. sizes, as
    recorded)."""
    env = {chain[0].args[0]: probe}
    for n in chain:
        args = fx.node.map_arg(n.args, lambda a: env[a] if a in env else values[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: env[a] if a in env else values[a])
        if n.op == "call_method":
            env[n] = getattr(args[0], n.target)(*args[1:], **kwargs)
        elif n.op == "call_function":
            env[n] = n.target(*args, **kwargs)
        else:
            env[n] = gm.get_submodule(n.target)(*args, **kwargs)
    return env[chain[-1]]


def _permutation(out: Tensor, shape: torch.Size) -> tuple[int, ...] | None:
    """The channel order when ``out`` (the flat input positions, moved by the chain) moved only dim 1 of
    ``shape`` [N, C, ...], and not as the identity; else None."""
    if tuple(out.shape) != tuple(shape) or len(shape) not in _STAND_IN:
        return None
    c = shape[1]
    inner = int(torch.Size(shape[2:]).numel())
    flat = out.to(torch.int64)
    at = torch.arange(flat.numel(), dtype=torch.int64, device=flat.device).reshape(shape)
    src_c = (flat // inner) % c
    same_rest = torch.equal(flat // (c * inner), at // (c * inner)) and torch.equal(flat % inner, at % inner)
    order = src_c.reshape(shape[0], c, inner)[0, :, 0]
    if not same_rest or not torch.equal(src_c, order.view(1, c, *[1] * (len(shape) - 2)).expand(shape)):
        return None
    order = tuple(int(i) for i in order.tolist())
    return None if order == tuple(range(c)) else order


def find_shuffles(gm: fx.GraphModule, example: Tensor) -> tuple[Shuffle, ...] | None:
    """Every channel shuffle of the traced network ``gm`` (on ``example`` [1, ...]): chains of reshapes and
    transposes (or one shuffle call) that give back their input's shape with only the channels (dim 1)
    permuted, checked by running them on a tensor of indices.  () when there is none; None when the graph
    could not be run here to check its candidates."""
    chains = _chains(gm)
    if not chains:
        return ()
    wanted = {a for ch in chains for n in ch for a in n.all_input_nodes if a not in ch}
    try:
        rec = _Record(gm, wanted)
        with torch.no_grad():
            rec.run(example)
    except Exception:  # noqa: BLE001 - unchecked: the caller looks in a plain forward pass instead
        return None
    found = []
    for ch in chains:
        x = rec.values.get(ch[0].args[0])
        if not isinstance(x, Tensor) or x.ndim not in _STAND_IN or x.numel() >= 2 ** 53:
            continue
        probe = torch.arange(x.numel(), dtype=torch.float64, device=x.device).reshape(x.shape)
        try:
            with torch.no_grad():
                out = _replay(gm, ch, probe, rec.values)
        except Exception:  # noqa: BLE001 - not a plain reshape chain: not a shuffle we can hide
            continue
        order = _permutation(out, x.shape) if isinstance(out, Tensor) else None
        if order is None:
            continue
        if ch[0].op == "call_module":
            module, kind = ch[0].target, type(gm.get_submodule(ch[0].target)).__name__
        else:                                   # torch.fx's module stack: {key: (qualified name, class)}
            module, cls = next(reversed(ch[0].meta.get("nn_module_stack", {}).values()), ("", None))
            kind = getattr(cls, "__name__", str(cls or ""))
        found.append(Shuffle(ch[0].args[0].name, tuple(n.name for n in ch), order, x.ndim, module, kind))
    return tuple(found)


def shuffle_free(gm: fx.GraphModule, shuffles: Sequence[Shuffle]) -> fx.GraphModule:
    """A copy of the traced network ``gm`` (sharing its modules and parameters) in which each shuffle still
    present is replaced by a stand-in layer on its input: a 1x1 convolution (a linear layer on [N, C])
    whose weight is the shuffle's permutation matrix (the same outputs), tagged with the :class:`Shuffle`
    (:func:`marker_of`)."""
    net = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    graph = net.graph
    nodes = {n.name: n for n in graph.nodes}
    param = next(gm.parameters(), None)
    for k, s in enumerate(shuffles):
        if s.source not in nodes or any(n not in nodes for n in s.nodes):
            continue                            # gone with a collapsed branch
        c = s.channels
        cls = _STAND_IN[s.ndim]
        stand_in = cls(c, c, bias=False) if cls is nn.Linear else cls(c, c, 1, bias=False)
        with torch.no_grad():                  # output channel j = input channel order[j]
            perm = torch.zeros(c, c)
            perm[torch.arange(c), torch.tensor(s.order)] = 1.0
            stand_in.weight.copy_(perm.view(c, c, *[1] * (stand_in.weight.ndim - 2)))
        if param is not None:
            stand_in = stand_in.to(device=param.device, dtype=param.dtype)
        stand_in.spvr_shuffle = s
        name = f"spvr_channel_shuffle_{k}"
        while hasattr(net, name):
            name += "_"
        net.add_submodule(name, stand_in)
        last = nodes[s.nodes[-1]]
        with graph.inserting_after(last):
            new = graph.call_module(name, (nodes[s.source],))
        last.replace_all_uses_with(new)
    graph.eliminate_dead_code()
    net.recompile()
    return net


def marker_of(m: object) -> Shuffle | None:
    """The :class:`Shuffle` that ``m`` (a module of a :func:`shuffle_free` copy) stands in for, else None."""
    return getattr(m, "spvr_shuffle", None)


class _Ops(TorchFunctionMode):
    """Records, in one forward pass, every reshape, transpose or shuffle call (its input, output, arguments) and
    the module running it."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack, self.made = stack, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if (name in _RESHAPES | _SWAPS | _PASS or func in _ONE_CALL) and args and isinstance(args[0], Tensor) \
                and isinstance(out, Tensor):
            self.made[id(out)] = (out, args[0], func, args[1:], kwargs, self.stack[-1] if self.stack else "")
        return out


def shuffles_in_forward(model: nn.Module, example: Tensor) -> list[tuple[str, str, tuple[str, ...]]]:
    """The channel shuffles of one plain forward pass of ``model`` on ``example`` [1, ...] (no torch.fx: for a
    network it cannot trace): chains of reshape and transpose calls (or one shuffle call) that give back
    their input's shape with only the channels (dim 1) permuted.  [(module, its class name, the calls)]."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    def enter(m: nn.Module, _inputs) -> None:
        stack.append(names[m])

    def leave(_m: nn.Module, _inputs, _out) -> None:
        stack.pop()

    handles = [m.register_forward_pre_hook(enter) for m in model.modules()]
    handles += [m.register_forward_hook(leave) for m in model.modules()]
    ops = _Ops(stack)
    try:
        with torch.no_grad(), ops:
            model(example)
    finally:
        for h in handles:
            h.remove()
    found, inner = [], set()
    for key in ops.made:
        inner.add(id(ops.made[key][1]))
    for key, (out, _, func, _, _, module) in ops.made.items():
        if key in inner:
            continue                            # not the end of a chain
        chain, t = [], out
        while id(t) in ops.made:
            rec = ops.made[id(t)]
            chain.insert(0, rec)
            t = rec[1]
        names_ = [getattr(r[2], "__name__", "") for r in chain]
        swaps = [i for i, n in enumerate(names_) if n in _SWAPS]
        one_call = len(chain) == 1 and chain[0][2] in _ONE_CALL
        if not one_call and not (swaps and any(n in _RESHAPES for n in names_[:swaps[0]])
                                 and any(n in _RESHAPES for n in names_[swaps[-1] + 1:])):
            continue
        if tuple(t.shape) != tuple(out.shape) or t.ndim not in _STAND_IN:
            continue
        probe = torch.arange(t.numel(), dtype=torch.float64, device=t.device).reshape(t.shape)
        try:
            with torch.no_grad():
                for _, _, f, rest, kw, _ in chain:
                    probe = f(probe, *rest, **kw)
        except Exception:  # noqa: BLE001 - not a plain reshape chain
            continue
        if isinstance(probe, Tensor) and _permutation(probe, t.shape) is not None:
            found.append((module, kinds.get(module, ""), tuple(names_)))
    return found


def refusal(model: nn.Module, found: Sequence[tuple[str, str, tuple[str, ...]]], why: str | None) -> ValueError:
    """The ValueError for a network with channel shuffles (``found``, from :func:`shuffles_in_forward`) that
    cannot be hidden from Torch-Pruning because the torch.fx trace is missing (``why``: why) or could not be
    run."""
    module, kind, calls = found[0]
    where = f"module {module!r} ({kind})" if module else "the model's own forward"
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    cause = f"torch.fx cannot trace this model ({why})" if why else "its torch.fx trace could not be run to check it"
    return ValueError(
        f"model ({type(model).__name__}) has a channel shuffle ({', '.join(repr(c) for c in calls)}) in {where}{more}, "
        "a permutation of channels that Torch-Pruning's DependencyGraph cannot follow (it would map them wrongly).  "
        f"SPvR hides a shuffle from it in the network's torch.fx trace, but {cause}; make the model traceable by "
        "torch.fx (e.g. no Python control flow on tensor values in forward), remove the shuffle, or prune a network "
        "without it")
