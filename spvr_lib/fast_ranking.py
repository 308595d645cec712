"""The fast ranking engine (Section 3.1, exact): the same importances as ``ranking``'s naive path (the paper's
algorithm, one forward pass of the calibration set per group), from one traced pass per chunk of calibration
samples and many masked groups re-run at once on what follows the mask.  ``ranking.group_importance`` and
``ranking.unit_importance`` choose it with ``method="fast"`` and fall back to the naive path where it cannot run
(``_Unsupported``, its reason in a warning); tests hold the two paths equal.
"""
from __future__ import annotations

import operator
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spvr_lib.fast_ranking_ops import (_ADD, _bn_affine, _channel_view, _conv_partial, _Dense, _eval_bn, _FORMAT,
                                       _gather, _index, _INPLACE, _materialize, _MUL, _Patch, _POINTWISE_FUNCTIONS,
                                       _POINTWISE_METHODS, _POINTWISE_MODULES, _POOL_FUNCTIONS, _POOLS, _positions,
                                       _Raw, to_model, _Unsupported, _variants)
from spvr_lib.graph import MaskSite
from spvr_lib.tracing import trace

_MEMORY_BYTES = 1 << 30      # working memory the fast path aims for (caches, and masked variants)
# The largest single tensor the fast path aims to allocate per masked re-run (it bounds the groups stacked
# in one pass).  Blocks above glibc's mmap threshold (at most 32 MiB) are page-faulted afresh on every
# allocation (a conv writing > 32 MiB measured ~2x slower per sample), and below that, stacks that stay
# in cache run faster still: 1-3 MiB measured best here (ResNet34 at cpu scale: 2.5 s at 24 MiB, 1.9 s at 3).
_TENSOR_BYTES = 3 << 20


class _FastRanker:
    """The traced graph of ``model`` and the rules that re-run it on masked variants (see above)."""

    def __init__(self, model: nn.Module, units: dict):
        self.model = model
        self.modules = dict(model.named_modules())
        leaves = {s.module for sites, _ in units.values() for s in sites}
        if "" in leaves:
            raise _Unsupported("a mask site is the whole model")
        try:
            self.graph = trace(model, leaves)
        except Exception as e:  # noqa: BLE001 -- any tracing failure means: use the naive path
            raise _Unsupported(f"torch.fx could not trace it: {type(e).__name__}: {str(e)[:200]}") from None
        self.nodes = list(self.graph.nodes)
        self.order = {node: i for i, node in enumerate(self.nodes)}
        self.inputs = {node: tuple(node.all_input_nodes) for node in self.nodes}
        self.last_use = {node: max((self.order[u] for u in node.users), default=self.order[node])
                         for node in self.nodes}
        placeholders = [nd for nd in self.nodes if nd.op == "placeholder"]
        outputs = [nd for nd in self.nodes if nd.op == "output"]
        if not placeholders or len(outputs) != 1 or not isinstance(outputs[0].args[0], torch.fx.Node):
            raise _Unsupported("its graph does not map one input to one output tensor")
        self.input, self.output = placeholders[0], outputs[0].args[0]
        for nd in self.nodes:
            if nd.op == "call_method" and nd.target.endswith("_") and not nd.target.startswith("__"):
                raise _Unsupported(f"it calls the in-place method {nd.target!r}")
        self.at: dict[str, list[torch.fx.Node]] = {}
        for nd in self.nodes:
            if nd.op == "call_module":
                self.at.setdefault(nd.target, []).append(nd)
        # a site inside a module the trace keeps whole (an attention's heads): that module is re-run on the
        # stacked variants with the site masked by a forward hook (``_rerun_inside``)
        self.host: dict[str, str] = {}
        for name in sorted(leaves - set(self.at)):
            host = next((h for h in self.at if name.startswith(h + ".")), None)
            if host is None:
                raise _Unsupported(f"module {name!r} is not called as a module in its traced graph")
            self.host[name] = host
        self._how: dict[tuple, tuple] = {}     # (conv node, input shape) -> how _dense_conv runs it
        self.fused: dict[torch.fx.Node, tuple[torch.fx.Node, Tensor, Tensor]] = {}
        for nd in self.nodes:          # conv -> eval BN with the conv's output used only there: fold the BN
            m = self.modules.get(nd.target) if nd.op == "call_module" else None
            if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and len(nd.users) == 1:
                (user,) = nd.users
                bn = self.modules.get(user.target) if user.op == "call_module" else None
                if bn is not None and _eval_bn(bn) and isinstance(bn, nn.BatchNorm2d) and user.args[0] is nd:
                    scale, shift = _bn_affine(bn)
                    w = (m.weight * scale.view(-1, 1, 1, 1)).to(m.weight.dtype)
                    b = shift if m.bias is None else m.bias * scale + shift
                    self.fused[nd] = (user, w.contiguous(memory_format=_FORMAT), b.to(m.weight.dtype))
        self.bn_of = {bn_node: nd for nd, (bn_node, _, _) in self.fused.items()}

    # ------------------------------------------------------------------ plain execution
    def _attr(self, target: str):
        obj = self.model
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _call(self, node: torch.fx.Node, args: tuple, kwargs: dict):
        if node.op == "call_module":
            return self.modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            fn = _INPLACE.get(node.target, node.target)
            if kwargs.get("inplace") is True:
                kwargs = {**kwargs, "inplace": False}
            return fn(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        raise _Unsupported(f"node op {node.op!r}")

    def reference(self, xb: Tensor) -> tuple[dict, set]:
        """Every node's value on the chunk ``xb`` [n, ...], and the nodes whose value is batched ([n, ...])."""
        vals, batched, n = {}, {self.input}, len(xb)
        self.dep = {self.input}            # the nodes whose value depends on the input (through any value)
        for nd in self.nodes:
            if nd.op == "placeholder":
                vals[nd] = xb if nd is self.input else (nd.args[0] if nd.args else None)
            elif nd.op == "get_attr":
                vals[nd] = self._attr(nd.target)
            elif nd.op == "output":
                continue
            else:
                args = torch.fx.node.map_arg(nd.args, lambda a: vals[a])
                kwargs = torch.fx.node.map_arg(nd.kwargs, lambda a: vals[a])
                conv_nd = self.bn_of.get(nd)
                x_in = vals[conv_nd.args[0]] if conv_nd is not None else None
                if isinstance(x_in, Tensor) and x_in.ndim == 4 and x_in.shape[0] == n and n > 1:
                    # a BN after a conv: the folded conv, computed as the masked variants compute it, so
                    # that a variant the mask barely changes rounds like the reference (no error floor)
                    _, w, b = self.fused[conv_nd]
                    vals[nd] = self._dense_conv(conv_nd, self.modules[conv_nd.target],
                                                x_in.contiguous(memory_format=_FORMAT), w, b)
                else:
                    vals[nd] = self._call(nd, args, kwargs)
                if any(a in self.dep for a in nd.all_input_nodes):
                    self.dep.add(nd)
                    if isinstance(vals[nd], Tensor) and vals[nd].ndim and vals[nd].shape[0] == n:
                        batched.add(nd)
        return vals, batched

    def check_batch_major(self, vals: dict) -> None:
        """Raises _Unsupported unless every tensor that depends on the input keeps the samples along dim 0 (the
        variants are stacked there), checked on a one-sample chunk: a sequence-first transformer, or a
        statistic over the batch, runs on the naive path."""
        for nd in self.nodes:
            v = vals.get(nd)
            if nd in self.dep and isinstance(v, Tensor) and (v.ndim == 0 or v.shape[0] != 1):
                raise _Unsupported(f"node {nd.name!r} ({nd.op} {getattr(nd.target, '__name__', nd.target)}) has "
                                   f"shape {tuple(v.shape)} for one sample: the samples are not along its dim 0")

    # ------------------------------------------------------------------ masked re-runs
    def _note(self, diff: Tensor) -> None:
        """Marks the variants j with any nonzero ``diff[j]`` as changed (the others stay exactly the cached network)."""
        self.changed |= diff.reshape(diff.shape[0], -1).ne(0).any(1).cpu()

    def _mat(self, p: _Patch) -> Tensor:
        self._note(p.patch - _gather(p.base, p.dim, p.idx))
        return _materialize(p)

    def _mask(self, v, base: Tensor, dim: int, idx: Tensor, n: int):
        """``v`` (a cached tensor, _Patch or _Dense) with positions ``idx[j]`` along ``dim`` zeroed in variant j."""
        g = idx.shape[0]
        if isinstance(v, Tensor):
            shape = [g, *v.shape]
            shape[dim + 1] = idx.shape[1]
            return _Patch(v, dim, idx, v.new_zeros(shape))
        if isinstance(v, _Patch) and v.dim == dim and torch.equal(v.idx, idx):
            return _Patch(v.base, dim, idx, torch.zeros_like(v.patch))
        t = self._mat(v) if isinstance(v, _Patch) else v.t.clone(
            memory_format=_FORMAT if v.t.ndim == 4 and v.t.is_contiguous(memory_format=_FORMAT)
            else torch.contiguous_format)
        view = t.view(g, n, *t.shape[1:])
        shape = list(view.shape)
        shape[dim + 1] = idx.shape[1]
        where = _index(idx, shape, dim)
        self._note(view.gather(dim + 1, where))
        view.scatter_(dim + 1, where, 0.0)
        return _Dense(t)

    def _dense_arg(self, a: torch.fx.Node, cur: dict, vals: dict, batched: set, g: int):
        v = cur.get(a, vals[a])
        if isinstance(v, _Patch):
            return self._mat(v)
        if isinstance(v, _Dense):
            return v.t
        if isinstance(v, _Raw):
            return v.v
        if a in batched:
            return _variants(v, g).flatten(0, 1)
        return v

    def _rerun(self, nd: torch.fx.Node, cur: dict, vals: dict, batched: set, g: int, n: int, first=None):
        """The value of node ``nd`` in the g variants (``first``: an override of its first argument)."""
        get = (lambda a: cur.get(a, vals[a]))
        args0 = nd.args[0] if nd.args else None
        v0 = first if first is not None else (get(args0) if isinstance(args0, torch.fx.Node) else None)
        others = [a for a in self.inputs[nd] if a is not args0]
        only_first = isinstance(v0, _Patch) and not any(a in cur for a in others)
        m = self.modules.get(nd.target) if nd.op == "call_module" else None
        out_val = vals[nd]

        if only_first:
            p = v0
            if m is not None:
                if isinstance(m, _POINTWISE_MODULES):
                    return _Patch(out_val, p.dim, p.idx, m(p.patch))
                if _eval_bn(m) and p.dim == 1:
                    scale, shift = _bn_affine(m)
                    nd_ = p.patch.ndim - 1
                    return _Patch(out_val, 1, p.idx, p.patch * _channel_view(scale[p.idx], 1, nd_)
                                  + _channel_view(shift[p.idx], 1, nd_))
                if isinstance(m, _POOLS) and p.dim == 1 and not getattr(m, "return_indices", False):
                    y = m(p.patch.flatten(0, 1))
                    return _Patch(out_val, 1, p.idx, y.reshape(*p.patch.shape[:3], *y.shape[2:]))
                if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                    return self._flatten(p, out_val)
                if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros" and p.dim == 1 and p.base.ndim == 4:
                    if m.groups == 1:
                        return self._conv(nd, m, p, cur, vals, g)
                    if m.groups == m.in_channels == m.out_channels:      # depthwise: channel by channel
                        k = p.idx.shape[1]
                        flat = p.idx.flatten()
                        inp = p.patch.transpose(0, 1).reshape(n, g * k, *p.patch.shape[3:])
                        y = F.conv2d(inp, m.weight[flat], None if m.bias is None else m.bias[flat],
                                     m.stride, m.padding, m.dilation, groups=g * k)
                        return _Patch(out_val, 1, p.idx, y.reshape(n, g, k, *y.shape[2:]).transpose(0, 1))
                if isinstance(m, nn.Linear) and p.dim == p.base.ndim - 1:
                    delta = (p.patch - _gather(p.base, p.dim, p.idx)).reshape(g, -1, p.idx.shape[1])
                    self._note(delta)
                    part = torch.bmm(delta, m.weight.t()[p.idx])                      # [g, n * ..., out]
                    out = _variants(out_val, g)
                    out += part.view(out.shape)
                    return _Dense(out.flatten(0, 1))
            else:
                fn = nd.target
                if nd.op == "call_function" and (fn in _POINTWISE_FUNCTIONS or fn in _POOL_FUNCTIONS) and (
                        fn in _POINTWISE_FUNCTIONS or p.dim == 1) and not any(
                        isinstance(a, torch.fx.Node) for a in (*nd.args[1:], *nd.kwargs.values())):
                    kwargs = {k: v for k, v in nd.kwargs.items() if k != "inplace"}
                    if fn in _POOL_FUNCTIONS:
                        y = fn(p.patch.flatten(0, 1), *nd.args[1:], **kwargs)
                        return _Patch(out_val, 1, p.idx, y.reshape(*p.patch.shape[:3], *y.shape[2:]))
                    return _Patch(out_val, p.dim, p.idx, fn(p.patch, *nd.args[1:], **kwargs))
                if nd.op == "call_method" and fn in _POINTWISE_METHODS and len(nd.args) == 1 and not nd.kwargs:
                    return _Patch(out_val, p.dim, p.idx, getattr(p.patch, fn)())
                if (nd.op == "call_function" and fn is torch.flatten or nd.op == "call_method" and fn == "flatten"):
                    start = nd.args[1] if len(nd.args) > 1 else nd.kwargs.get("start_dim", 0)
                    end = nd.args[2] if len(nd.args) > 2 else nd.kwargs.get("end_dim", -1)
                    if start == 1 and end == -1:
                        return self._flatten(p, out_val)
                if (nd.op == "call_function" and fn is torch.permute) or (nd.op == "call_method" and fn == "permute"):
                    perm = nd.args[1] if len(nd.args) == 2 and isinstance(nd.args[1], (list, tuple)) else nd.args[1:]
                    perm = [int(d) % p.base.ndim for d in perm]
                    if perm and perm[0] == 0:
                        return _Patch(out_val, perm.index(p.dim), p.idx, p.patch.permute(0, *[d + 1 for d in perm]))
                if nd.op == "call_function" and fn in _MUL | {operator.truediv} and len(nd.args) == 2 \
                        and isinstance(nd.args[1], (int, float)) and not nd.kwargs:
                    return _Patch(out_val, p.dim, p.idx, fn(p.patch, nd.args[1]))

        fn = _INPLACE.get(nd.target, nd.target) if nd.op == "call_function" else None
        if fn in _ADD and len(nd.args) == 2 and not nd.kwargs:
            a, b = (get(x) if isinstance(x, torch.fx.Node) else x for x in nd.args)
            if first is not None:
                a = first
            sign = -1.0 if fn in (operator.sub, torch.sub) else 1.0
            if isinstance(a, _Patch) and isinstance(b, _Patch) and a.dim == b.dim and torch.equal(a.idx, b.idx):
                return _Patch(out_val, a.dim, a.idx, a.patch + sign * b.patch)
            for pa, other, pa_first in ((a, b, True), (b, a, False)):
                if isinstance(pa, _Patch) and isinstance(other, Tensor) and other.shape == pa.base.shape:
                    o = _gather(other, pa.dim, pa.idx)
                    patch = (pa.patch + sign * o) if pa_first else (o + sign * pa.patch)
                    return _Patch(out_val, pa.dim, pa.idx, patch)
                if isinstance(pa, _Patch) and isinstance(other, (int, float)):
                    return _Patch(out_val, pa.dim, pa.idx, pa.patch + sign * other if pa_first
                                  else other + sign * pa.patch)
        if fn in _ADD | _MUL and len(nd.args) == 2 and not nd.kwargs:   # variants [g, n, ...] op shared [n, ...]
            a, b = (get(x) if isinstance(x, torch.fx.Node) else x for x in nd.args)
            if first is not None:
                a = first
            if fn in _ADD:    # variants + patch: variants + base, plus the patch's change where it is (no copy)
                for d, pa, d_first in ((a, b, True), (b, a, False)):
                    if (isinstance(d, _Dense) and isinstance(pa, _Patch) and d.t.shape[0] == g * n
                            and d.t.shape[1:] == pa.base.shape[1:] and pa.base.shape[0] == n
                            and (pa.idx.shape[1] == 1 or bool((pa.idx.sort(1).values.diff(1) != 0).all()))):
                        diff = pa.patch - _gather(pa.base, pa.dim, pa.idx)
                        self._note(diff)
                        dv = d.t.view(g, n, *d.t.shape[1:])
                        y = fn(dv, pa.base) if d_first else fn(pa.base, dv)
                        if d_first and fn in (operator.sub, torch.sub):
                            diff = diff.neg_()
                        y.scatter_add_(pa.dim + 1, _index(pa.idx, diff.shape, pa.dim), diff.to(y.dtype))
                        return _Dense(y.flatten(0, 1))
            a = _Dense(self._mat(a)) if isinstance(a, _Patch) else a
            b = _Dense(self._mat(b)) if isinstance(b, _Patch) else b
            if isinstance(a, _Dense) != isinstance(b, _Dense) and all(
                    isinstance(v, (_Dense, Tensor)) for v in (a, b)):
                d, s = (a, b) if isinstance(a, _Dense) else (b, a)
                if s.shape == d.t.shape[1:] or (s.ndim == d.t.ndim and s.shape[0] == n):
                    dv = d.t.view(g, n, *d.t.shape[1:])
                    s_b = s.unsqueeze(0) if s.ndim == d.t.ndim else s
                    y = fn(dv, s_b) if d is a else fn(s_b, dv)
                    return _Dense(y.flatten(0, 1))

        if nd.op == "call_function" and nd.target is torch.cat:
            got = self._cat(nd, get, out_val, first)
            if got is not None:
                return got

        if (isinstance(m, nn.Conv2d) and nd in self.fused and nd not in self.nofuse and isinstance(v0, _Dense)
                and not others):
            bn_node, w, b = self.fused[nd]
            x_in = v0.t.contiguous(memory_format=_FORMAT) if v0.t.ndim == 4 else v0.t
            cur[bn_node] = _Dense(self._dense_conv(nd, m, x_in, w, b))
            return None                                            # consumed by its BN

        if (isinstance(v0, _Dense) and not others and len(args0.users) == 1 and first is None
                and (isinstance(m, nn.ReLU) or nd.op == "call_function" and nd.target in (F.relu, torch.relu))
                and self._fresh(args0)):
            return _Dense(v0.t.relu_())                          # the variants' only user: in place

        # anything else: run the node on the stacked variants
        def arg(a):
            return self._dense_arg(a, cur, vals, batched, g)
        args = torch.fx.node.map_arg(nd.args, arg)
        if first is not None:
            f0 = first
            args = ((self._mat(f0) if isinstance(f0, _Patch) else f0.t if isinstance(f0, _Dense) else f0),
                    *args[1:])
        kwargs = torch.fx.node.map_arg(nd.kwargs, arg)
        y = self._call(nd, args, kwargs)
        if isinstance(y, Tensor) and nd in batched and y.ndim and y.shape[0] == g * n:
            return _Dense(y)
        return _Raw(y)

    def _dense_conv(self, nd, m: nn.Conv2d, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """``F.conv2d(x, w, b)`` with ``m``'s geometry on the stacked variants, or the same linear map as one
        matmul where that measured faster for this layer and input shape (chosen once per shape, by timing both):
        a 1x1 conv (stride 1, no padding) is a matmul per pixel of the channels_last map; a conv whose input has
        no more pixels than its kernel taps (a 3x3 conv on a 2x2 or 1x1 map) is one dense matrix over all its
        input values (built by running the conv on the basis), cheaper than a conv mostly over padding."""
        conv = lambda: F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)  # noqa: E731
        if x.ndim != 4 or m.groups != 1 or not x.is_contiguous(memory_format=_FORMAT) or x.shape[0] < 2:
            return conv()
        key = (nd, tuple(x.shape[1:]))
        how = self._how.get(key)
        if how is None:
            how = self._how[key] = ("conv", None)
            c, h, wd = x.shape[1:]
            kh, kw = w.shape[2:]
            mat = None
            if (kh, kw) == (1, 1) and tuple(m.padding) == (0, 0) and tuple(m.dilation) == (1, 1):
                # a strided 1x1 conv (a ResNet downsample) is the same matmul on every stride-th pixel
                mat = ("pixel", w.reshape(w.shape[0], c).t().contiguous(), b, tuple(m.stride))
            elif h * wd <= 4 * kh * kw and c * h * wd <= 4096:
                eye = torch.eye(c * h * wd, dtype=x.dtype, device=x.device)
                basis = eye.view(-1, h, wd, c).permute(0, 3, 1, 2)
                a = F.conv2d(basis, w, None, m.stride, m.padding, m.dilation)          # [c*h*w, out, h', w']
                ho, wo = a.shape[2:]
                a = a.permute(0, 2, 3, 1).reshape(c * h * wd, -1).contiguous()
                mat = ("whole", a, None if b is None else b.repeat(ho * wo), (ho, wo))
            if mat is not None and x.device.type == "cpu":
                times = {}
                for name, fn in (("conv", conv), ("mat", lambda: self._mat_conv(mat, x, w.shape[0]))):
                    best = float("inf")
                    for _ in range(2):
                        t0 = time.perf_counter()
                        fn()
                        best = min(best, time.perf_counter() - t0)
                    times[name] = best
                if times["mat"] < 0.9 * times["conv"]:
                    how = self._how[key] = ("mat", mat)
        return conv() if how[0] == "conv" else self._mat_conv(how[1], x, w.shape[0])

    @staticmethod
    def _mat_conv(mat: tuple, x: Tensor, out_c: int) -> Tensor:
        n, c, h, wd = x.shape
        flat = x.permute(0, 2, 3, 1)                                   # a view: x is channels_last
        if mat[0] == "pixel":
            _, a, b, (sh, sw) = mat
            if (sh, sw) != (1, 1):
                flat = flat[:, ::sh, ::sw]
                h, wd = flat.shape[1:3]
            y = flat.reshape(-1, c) @ a if b is None else torch.addmm(b, flat.reshape(-1, c), a)
            return y.view(n, h, wd, out_c).permute(0, 3, 1, 2)
        _, a, b, (ho, wo) = mat
        y = flat.reshape(n, -1) @ a if b is None else torch.addmm(b, flat.reshape(n, -1), a)
        return y.view(n, ho, wo, out_c).permute(0, 3, 1, 2)

    def _fresh(self, nd: torch.fx.Node) -> bool:
        """Whether ``nd``'s re-run value is a fresh tensor (not a view of another value)."""
        m = self.modules.get(nd.target) if nd.op == "call_module" else None
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear)) or (
            nd.op == "call_function" and nd.target in (operator.add, operator.iadd, torch.add))

    def _flatten(self, p: _Patch, out_val: Tensor) -> _Patch:
        inner = int(np.prod(p.base.shape[p.dim + 1:])) if p.dim == 1 else None
        if inner is None:
            raise _Unsupported("flatten of a patch along a dim other than 1")
        g, k = p.idx.shape
        idx = (p.idx.unsqueeze(-1) * inner + torch.arange(inner, device=p.idx.device)).reshape(g, k * inner)
        return _Patch(out_val, 1, idx, p.patch.reshape(g, p.patch.shape[1], k * inner))

    def _conv(self, nd, m: nn.Conv2d, p: _Patch, cur: dict, vals: dict, g: int):
        """Conv2d (groups 1) on a patch: cached output + a partial conv of the change (BN folded if fused)."""
        delta = p.patch - _gather(p.base, 1, p.idx)
        self._note(delta)
        fused = nd in self.fused and nd not in self.nofuse
        bn_node, w = (self.fused[nd][0], self.fused[nd][1]) if fused else (nd, m.weight)
        out = _variants(vals[bn_node], g)
        out += _conv_partial(m, w, delta, p.idx)               # cached output + the change's partial conv
        flat = out.flatten(0, 1)
        if fused:
            cur[bn_node] = _Dense(flat)
            return None
        return _Dense(flat)

    def _cat(self, nd, get, out_val, first):
        tensors = nd.args[0] if nd.args else nd.kwargs.get("tensors")
        dim = nd.args[1] if len(nd.args) > 1 else nd.kwargs.get("dim", 0)
        if first is not None or not isinstance(tensors, (list, tuple)) or not all(
                isinstance(t, torch.fx.Node) for t in tensors):
            return None
        vs = [get(t) for t in tensors]
        if any(isinstance(v, (_Dense, _Raw)) for v in vs) or not any(isinstance(v, _Patch) for v in vs):
            return None
        dim = dim % out_val.ndim
        offset, idxs, patches = 0, [], []
        for v in vs:
            base = v.base if isinstance(v, _Patch) else v
            if isinstance(v, _Patch):
                if v.dim != dim:
                    return None
                idxs.append(v.idx + offset)
                patches.append(v.patch)
            offset += base.shape[dim]
        return _Patch(out_val, dim, torch.cat(idxs, 1), torch.cat(patches, dim + 1))

    def run_masked(self, vals: dict, batched: set, sites: list, idx: list[Tensor], n: int):
        """The output of the g masked variants: a [g, n, ...] tensor (or None when no change reaches it);
        ``self.changed`` [g] is False for the variants whose mask provably changed nothing (their output is
        then exactly the cached one, as in the naive path).

        ``sites[i]``: a MaskSite, ``idx[i]``: [g, k_i] its positions for each group."""
        g = idx[0].shape[0]
        out_sites: dict[torch.fx.Node, list] = {}
        in_sites: dict[torch.fx.Node, list] = {}
        inside: dict[torch.fx.Node, list] = {}          # host node -> the sites within it
        for s, ix in zip(sites, idx):
            if s.module in self.host:
                for nd in self.at[self.host[s.module]]:
                    inside.setdefault(nd, []).append((s, ix))
                continue
            for nd in self.at[s.module]:
                t = vals[nd] if s.where == "output" else vals[nd.args[0]]
                spec = (s.dim % t.ndim, ix.to(t.device))
                (out_sites if s.where == "output" else in_sites).setdefault(nd, []).append(spec)
        start = min(self.order[nd] for nd in (*out_sites, *in_sites, *inside))
        self.nofuse = {nd for nd, (bn_node, _, _) in self.fused.items() if nd in out_sites or bn_node in in_sites}
        self.changed = torch.zeros(g, dtype=torch.bool)
        cur: dict = {}
        for nd in self.nodes[start:]:
            if nd.op == "output":
                break
            if nd in inside:
                cur[nd] = self._rerun_inside(nd, cur, vals, batched, g, n, inside[nd])
            elif nd not in cur:
                first = None
                if nd in in_sites:
                    a0 = nd.args[0]
                    first = cur.get(a0, vals[a0])
                    for dim, ix in in_sites[nd]:
                        first = self._mask(first, vals[a0], dim, ix, n)
                if first is not None or any(a in cur for a in self.inputs[nd]):
                    v = self._rerun(nd, cur, vals, batched, g, n, first)
                    if v is not None:
                        cur[nd] = v
            if nd in out_sites:
                v = cur.get(nd, vals[nd])
                for dim, ix in out_sites[nd]:
                    v = self._mask(v, vals[nd], dim, ix, n)
                cur[nd] = v
            for a in self.inputs[nd]:
                if self.last_use[a] <= self.order[nd] and a in cur and a is not self.output:
                    del cur[a]
        v = cur.get(self.output)
        if v is None:
            return None
        t = self._mat(v) if isinstance(v, _Patch) else v.t if isinstance(v, _Dense) else v.v
        return t.view(g, n, *t.shape[1:])

    def _rerun_inside(self, nd: torch.fx.Node, cur: dict, vals: dict, batched: set, g: int, n: int, specs: list):
        """Module node ``nd`` run on the g stacked variants, with each site of ``specs`` [(MaskSite, [g, k] positions)]
        inside it masked by a hook: variant j's positions ``ix[j]`` zeroed (the samples of variant j are the j-th
        of g equal blocks along dim 0 there too, e.g. an attention's windows)."""
        def zeroed(t: Tensor, site: MaskSite, ix: Tensor) -> Tensor:
            dim = site.dim % t.ndim
            view = t.reshape(g, -1, *t.shape[1:])
            shape = list(view.shape)
            shape[dim + 1] = ix.shape[1]
            where = _index(ix.to(t.device), shape, dim)
            self._note(view.gather(dim + 1, where))
            return view.scatter(dim + 1, where, 0.0).reshape(t.shape)

        hooks = []
        for site, ix in specs:
            m = self.modules[site.module]
            if site.where == "output":
                hooks.append(m.register_forward_hook(lambda _m, _i, out, s=site, ix=ix: zeroed(out, s, ix)))
            else:
                hooks.append(m.register_forward_pre_hook(
                    lambda _m, inp, s=site, ix=ix: (zeroed(inp[0], s, ix), *inp[1:])))
        args = torch.fx.node.map_arg(nd.args, lambda a: self._dense_arg(a, cur, vals, batched, g))
        kwargs = torch.fx.node.map_arg(nd.kwargs, lambda a: self._dense_arg(a, cur, vals, batched, g))
        try:
            y = self._call(nd, args, kwargs)
        finally:
            for h in hooks:
                h.remove()
        if isinstance(y, Tensor) and y.ndim and y.shape[0] == g * n:
            return _Dense(y)
        return _Raw(y)

    def _chunk(self, x: Tensor) -> Tensor:
        xb = to_model(self.model, x)
        return xb.contiguous(memory_format=_FORMAT) if xb.ndim == 4 else xb

    def importance(self, x: Tensor, units: dict, loss, bar) -> dict[str, Tensor]:
        """{key: float64 CPU [len(groups)]}: ``loss`` summed over chunks of samples (Section 3.1, Eq. 2)."""
        vals, _ = self.reference(self._chunk(x[:1]))
        self.check_batch_major(vals)
        sizes = {nd: v[0].numel() * v.element_size() for nd, v in vals.items()
                 if isinstance(v, Tensor) and v.ndim and v.shape[0] == 1 and nd.op != "get_attr"}
        n_chunk = max(1, min(len(x), _MEMORY_BYTES // max(1, sum(sizes.values()))))
        totals = {key: torch.zeros(len(gs), dtype=torch.float64) for key, (_, gs) in units.items()}
        work = []                 # (key, sites, positions of the batch's groups, [g, k] index per site)
        for key, (sites, groups) in units.items():
            start = min(self.order[nd] for s in sites for nd in self.at[self.host.get(s.module, s.module)])
            per_variant = 4 * max([b for nd, b in sizes.items() if self.order[nd] >= start] or [1])
            # the stack size the tensor cap bounds: the mean output of the convs that follow (where the work
            # is); the largest tensor over-counts a bottleneck, whose 4x-wide outputs only its last conv writes
            convs = [b for nd, b in sizes.items() if self.order[nd] >= start and (
                nd in self.bn_of or nd.op == "call_module" and isinstance(self.modules[nd.target], nn.Conv2d))]
            per_variant = (per_variant, int(np.mean(convs)) if convs else per_variant // 4)
            by_shape: dict[tuple, list[int]] = {}
            for j, grp in enumerate(groups):
                by_shape.setdefault(tuple(len(_positions(s, grp)) for s in sites), []).append(j)
            for js in by_shape.values():
                work.append((key, sites, js, per_variant))
        for s0 in range(0, len(x), n_chunk):
            xb = self._chunk(x[s0:s0 + n_chunk])
            n = len(xb)
            vals, batched = self.reference(xb)
            p = torch.softmax(vals[self.output], dim=1).double()
            for key, sites, js, per_variant in work:
                groups = units[key][1]
                g_chunk = max(1, min(len(js), _MEMORY_BYTES // max(1, n * per_variant[0]),
                                     _TENSOR_BYTES // max(1, n * per_variant[1])))
                for c0 in range(0, len(js), g_chunk):
                    part = js[c0:c0 + g_chunk]
                    idx = [torch.tensor([_positions(s, groups[j]) for j in part], dtype=torch.long) for s in sites]
                    out = self.run_masked(vals, batched, sites, idx, n)
                    if out is None:
                        pm = p.unsqueeze(0).expand(len(part), *p.shape)
                    else:
                        pm = torch.softmax(out, dim=2).double()
                        pm[~self.changed.to(pm.device)] = p          # provably unchanged: exactly the cached output
                    totals[key][part] += loss(p, pm).cpu()
                    bar.update(len(part) * n / len(x))
        return totals
