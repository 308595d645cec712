"""The ranking module (Section 3.1): how much does masking a group change the network's output?

``spvr_loss`` is the paper's Eq. 2; ``kl_loss`` is the KL-divergence criterion used by CURL
(Luo and Wu, 2020), which Section 3.1.1 and Appendix A compare it with.  Both take the softmax
output of the original network and the outputs of ``g`` masked variants and return one
importance per variant, summed over the samples (and, for segmentation, over the pixels).
``group_importance`` masks channel groups of a network (``mask_output``) and scores each one
over a calibration set, by the paper's algorithm ("naive") or an exact, faster one ("fast").
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from spvr_lib import criteria, models

__all__ = ["MaskSite", "unit_importance", "mask_output", "group_importance", "RANKING_PATHS"]








# =============================================================================================
# Group importance: Eq. 2 (or KL) for every group of channels of every layer.
#
# ``group_importance`` masks one group at a time and scores the change of the network's softmax
# output over a calibration set.  ``method="naive"`` is the paper's algorithm, kept as the
# reference: one full forward pass of the calibration set per group, the group zeroed by a
# forward hook.  ``method="fast"`` computes the same numbers (to float rounding) for the networks
# of ``spvr_lib.models`` with a BN-folded inference copy of the network that
#   * runs the network once per chunk of calibration samples and caches, at every layer, the
#     input and the (BN-folded) pre-activation of each conv,
#   * evaluates a chunk of groups of one layer as ONE batch of [g * n] masked variants,
#   * does not recompute the conv that consumes the masked channels: by linearity,
#     bn(conv(a')) = bn(conv(a)) - gamma / sqrt(var + eps) * conv_{W[:, G]}(a[G]) in eval mode,
#     i.e. the cached pre-activation minus the contribution of the masked input channels alone,
#   * recomputes only what follows (the rest of the block, the residual add, later blocks, head).
# =============================================================================================
RANKING_PATHS = ("fast", "naive")
_MEMORY_BYTES = 1 << 30      # working memory the fast path aims for (caches, and masked variants)
_FORMAT = torch.channels_last  # memory format of the fast path's feature maps (faster convs on CPU)


@contextlib.contextmanager
def mask_output(module: nn.Module, channels: Sequence[int]) -> Iterator[nn.Module]:
    """Zero ``channels`` (dim 1) of ``module``'s output while inside the ``with`` block.

    This is how SPvR masks a group (M_j^i of Section 3.1): the hook sits on the layer's mask point
    (``models.PrunableLayer.mask_module``: the BN after a conv, the ReLU after an MLP hidden
    layer), so the next layer sees exactly what it would see if the filters were removed.
    Zeroing only the conv's filters W[G] (and bias) would NOT do that: batch norm in eval mode
    maps a zero input to ``beta - gamma * mu / sqrt(var + eps)``, a per-channel constant that
    still leaks through the ReLU into the next layer.  Masking after BN removes that too.
    """
    idx = [int(c) for c in channels]

    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> Tensor:
        if idx and (max(idx) >= output.shape[1] or min(idx) < 0):
            raise ValueError(f"channels {idx} are out of range for a module output with {output.shape[1]} "
                             f"channels (shape {tuple(output.shape)})")
        output = output.clone()
        output[:, idx] = 0
        return output

    handle = module.register_forward_hook(hook)
    try:
        yield module
    finally:
        handle.remove()


def _check_groups(groups: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, list[list[int]]]:
    if not isinstance(groups, Mapping) or not groups:
        raise ValueError(f"groups must be a non-empty dict {{layer name: [[channel, ...], ...]}}, got {groups!r:.80}")
    out = {}
    for name, gs in groups.items():
        if not isinstance(gs, Sequence) or not gs:
            raise ValueError(f"groups[{name!r}] must be a non-empty list of channel groups, got {gs!r:.80}")
        clean = []
        for j, g in enumerate(gs):
            if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or not g or not all(
                    isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0 for c in g):
                raise ValueError(f"groups[{name!r}][{j}] must be a non-empty list of channel indices >= 0, "
                                 f"got {g!r:.80}")
            clean.append([int(c) for c in g])
        out[name] = clean
    return out


def _resolve_targets(model: nn.Module, names: Sequence[str]) -> tuple[dict[str, nn.Module], dict[str, object]]:
    """For each key: the module whose output is masked, and the models.PrunableLayer (or None)."""

    layers = {}
    spec = getattr(model, "spec", None)
    if isinstance(spec, dict) and isinstance(model, tuple(models._CLASSES.values())):
        module_names = {id(m): n for n, m in model.named_modules()}
        for layer in models.prunable_layers(model, spec):
            layers[layer.name] = layer                                      # the conv's name
            layers.setdefault(module_names[id(layer.mask_module)], layer)   # or its mask point's
    modules = dict(model.named_modules())
    targets, found = {}, {}
    for name in names:
        if name in layers:
            targets[name], found[name] = layers[name].mask_module, layers[name]
        elif name in modules and name != "":
            targets[name], found[name] = modules[name], None
        else:
            raise ValueError(f"groups key {name!r} names no module of the model; expected a prunable layer "
                             f"({list(layers)[:4]}...) or a module name from model.named_modules()")
    return targets, found


def to_model(model: nn.Module, x: Tensor) -> Tensor:
    """A chunk of calibration inputs on the model's device and in its floating dtype (the calibration set
    itself stays where it is, the CPU by default: only chunks are streamed to the device)."""
    param = next(model.parameters(), None)
    if param is None:
        return x
    return x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else x.dtype,
                non_blocking=True)


def _outputs(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Softmax over dim 1 of the model's outputs on ``x``, in batches: [n, c] (or [n, c, *pixels])."""
    return torch.cat([torch.softmax(model(to_model(model, xb)), dim=1) for xb in x.split(batch_size)])


def _sample_bytes(model: nn.Module, x1: Tensor) -> int:
    """Bytes of the largest output of any leaf module for ONE sample (a batch-size heuristic)."""
    biggest = [x1[0].numel()]

    def hook(_m, _i, out):
        if isinstance(out, Tensor):
            biggest.append(out[0].numel())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        model(x1)
    finally:
        for h in handles:
            h.remove()
    return max(biggest) * x1.element_size()


# =============================================================================================
# Mask sites and unit importance: Eq. 2 (or KL) for channel groups of ANY model (Section 3.1).
#
# A unit is a set of coupled channels (e.g. a residual stage's channels, pruned together); it is
# masked at one or more sites, the outputs or first inputs of modules.  ``unit_importance`` scores
# groups of a unit's channels by zeroing them at every site at once.
# =============================================================================================
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


def _is_index(c) -> bool:
    return isinstance(c, (int, np.integer)) and not isinstance(c, bool)


def _check_units(model: nn.Module, units) -> dict[str, tuple[list[MaskSite], list[list[int]]]]:
    """Validated units: {key: (sites, groups)} with plain-int groups (ValueError naming the culprit)."""
    if not isinstance(units, Mapping) or not units:
        raise ValueError(f"units must be a non-empty dict {{key: (sites, groups)}}, got {units!r:.80}")
    modules = dict(model.named_modules())
    out = {}
    for key, value in units.items():
        if not isinstance(key, str):
            raise ValueError(f"units keys must be strings, got {key!r}")
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
            raise ValueError(f"units[{key!r}] must be a pair (sites, groups), got {value!r:.80}")
        sites, groups = value
        if isinstance(sites, MaskSite):
            sites = [sites]
        if not isinstance(sites, Sequence) or not sites or not all(isinstance(s, MaskSite) for s in sites):
            raise ValueError(f"units[{key!r}] sites must be a non-empty list of MaskSite, got {sites!r:.80}")
        for s in sites:
            if s.module not in modules:
                raise ValueError(f"units[{key!r}]: MaskSite.module={s.module!r} names no module of the model; "
                                 f"expected a name from model.named_modules() such as {list(modules)[1:4]}")
            if s.where not in ("output", "input"):
                raise ValueError(f"units[{key!r}]: MaskSite.where={s.where!r} for module {s.module!r}; "
                                 f"expected 'output' or 'input'")
            if s.dim not in (1, -1) or isinstance(s.dim, bool):
                raise ValueError(f"units[{key!r}]: MaskSite.dim={s.dim!r} for module {s.module!r}; expected 1 or -1")
            if (not isinstance(s.index, Sequence) or not s.index or not all(
                    isinstance(pos, Sequence) and all(_is_index(i) and i >= 0 for i in pos) for pos in s.index)):
                raise ValueError(f"units[{key!r}]: MaskSite.index for module {s.module!r} must be a non-empty tuple "
                                 f"(one per unit channel) of tuples of positions >= 0, got {s.index!r:.80}")
        width = min(len(s.index) for s in sites)
        if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
            raise ValueError(f"units[{key!r}] groups must be a non-empty list of channel groups, got {groups!r:.80}")
        clean = []
        for j, g in enumerate(groups):
            if isinstance(g, (str, bytes)) or not isinstance(g, Sequence) or not g or not all(
                    _is_index(c) and 0 <= c < width for c in g):
                raise ValueError(f"units[{key!r}] groups[{j}] must be a non-empty list of unit channels in "
                                 f"[0, {width}) (the sites index {width} channels), got {g!r:.80}")
            clean.append([int(c) for c in g])
        out[key] = ([MaskSite(s.module, s.where, int(s.dim), tuple(tuple(int(i) for i in pos) for pos in s.index))
                     for s in sites], clean)
    return out


def _site_tensor(where: str, inputs: tuple, output) -> Tensor | None:
    t = output if where == "output" else (inputs[0] if inputs else None)
    return t if isinstance(t, Tensor) else None


def _probe_sites(model: nn.Module, x1: Tensor, units: dict) -> int:
    """One forward pass of one sample: checks every site's tensor and index range (ValueError), and
    returns the bytes of the largest leaf-module output for that sample (a batch-size heuristic)."""
    modules = dict(model.named_modules())
    sites = {(s.module, s.where) for sites, _ in units.values() for s in sites}
    seen: dict[tuple[str, str], tuple[int, ...]] = {}
    biggest = [x1[0].numel()]

    def leaf_hook(_m, _i, out):
        if isinstance(out, Tensor) and out.ndim:
            biggest.append(out[0].numel())

    def site_hook(name):
        def hook(_m, inputs, output):
            for where in ("output", "input"):
                t = _site_tensor(where, inputs, output)
                if (name, where) in sites and t is not None:
                    seen.setdefault((name, where), tuple(t.shape))
        return hook

    handles = [m.register_forward_hook(leaf_hook) for m in model.modules() if not list(m.children())]
    handles += [modules[name].register_forward_hook(site_hook(name)) for name in {n for n, _ in sites}]
    try:
        model(x1)
    finally:
        for h in handles:
            h.remove()
    for key, (sites_, _) in units.items():
        for s in sites_:
            if (s.module, s.where) not in seen:
                raise ValueError(f"units[{key!r}]: the {s.where} of module {s.module!r} is not a tensor the forward "
                                 f"pass computes (the module never runs, or its {s.where} is not a Tensor)")
            shape = seen[s.module, s.where]
            if len(shape) < 2:
                raise ValueError(f"units[{key!r}]: the {s.where} of {s.module!r} has shape {shape}; expected [n, ...]")
            size = shape[s.dim]
            top = max(i for pos in s.index for i in pos)
            if top >= size:
                raise ValueError(f"units[{key!r}]: MaskSite.index for the {s.where} of {s.module!r} holds position "
                                 f"{top}, out of range for dim {s.dim} of size {size} (shape {shape})")
    return max(biggest) * x1.element_size()


def _positions(site: MaskSite, group: Sequence[int]) -> list[int]:
    return [i for c in group for i in site.index[c]]


def _zero_along(t: Tensor, dim: int, positions: list[int]) -> Tensor:
    """A copy of ``t`` with ``positions`` along ``dim`` zeroed."""
    return t.index_fill(dim, torch.tensor(positions, device=t.device), 0)


@contextlib.contextmanager
def _masked_sites(model: nn.Module, sites: Sequence[MaskSite], group: Sequence[int]) -> Iterator[None]:
    """Hooks that zero ``group``'s positions at every site (Section 3.1's M_j^i) inside the block."""
    modules = dict(model.named_modules())
    handles = []
    for s in sites:
        pos = _positions(s, group)
        if s.where == "output":
            handles.append(modules[s.module].register_forward_hook(
                lambda _m, _i, out, d=s.dim, p=pos: _zero_along(out, d, p)))
        else:
            handles.append(modules[s.module].register_forward_pre_hook(
                lambda _m, inputs, d=s.dim, p=pos: (_zero_along(inputs[0], d, p), *inputs[1:])))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _naive_units(model: nn.Module, x: Tensor, units: dict, loss, batch_size: int, bar) -> dict[str, Tensor]:
    """The paper's algorithm: for each group, a forward pass of all of ``x`` with it masked at every site."""
    p = _outputs(model, x, batch_size).double()
    out = {}
    for key, (sites, groups) in units.items():
        scores = []
        for g in groups:
            with _masked_sites(model, sites, g):
                scores.append(loss(p, _outputs(model, x, batch_size).double().unsqueeze(0))[0])
            bar.update()
        out[key] = torch.stack(scores).cpu()
    return out


def _check_common(model, x, criterion, method, batch_size) -> None:
    if criterion not in criteria.CRITERIA:
        raise ValueError(f"criterion={criterion!r}; expected one of {sorted(criteria.CRITERIA)}")
    if method not in RANKING_PATHS:
        raise ValueError(f"method={method!r}; expected one of {list(RANKING_PATHS)}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.ndim < 2 or len(x) < 1:
        raise ValueError(f"x must be a tensor of calibration inputs [n, ...] with n >= 1, got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r}; expected a positive int or None")


def unit_importance(model: nn.Module, x: Tensor,
                    units: Mapping[str, tuple[Sequence[MaskSite], Sequence[Sequence[int]]]],
                    criterion: str = "spvr", method: str = "fast", batch_size: int | None = None,
                    progress: bool = True) -> dict[str, Tensor]:
    """Importance of groups of a unit's channels, Eq. 2 (``criterion="spvr"``) or KL, summed over ``x``.

    ``units``: {key: (sites, groups)}; masking group G zeroes, at EVERY site s at once, the positions
    ``[i for c in G for i in s.index[c]]`` along ``s.dim`` of that module's output or first input.
    ``x``: calibration inputs [n, ...] (moved chunk by chunk to the model's device and dtype).
    Returns {key: float64 CPU tensor [len(groups)]} in the groups' order.  ``method="naive"``: one
    forward pass of ``x`` per group (the paper's algorithm); ``"fast"``: the same numbers (to float
    rounding) by re-running only what follows the mask on many groups at once (see ``_FastRanker``).
    Under torch.distributed with world_size > 1 the groups are split across ranks and every rank
    returns the full, identical result.  The model is run in eval mode; its training flag is restored.
    """
    _check_common(model, x, criterion, method, batch_size)
    units = _check_units(model, units)
    loss = criteria.CRITERIA[criterion]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            sample_bytes = _probe_sites(model, to_model(model, x[:1]), units)
            return _distributed(units, lambda part: _unit_scores(model, x, part, loss, method, batch_size,
                                                                 sample_bytes, progress))
    finally:
        model.train(was_training)


def _unit_scores(model, x, units, loss, method, batch_size, sample_bytes, progress) -> dict[str, Tensor]:
    bar = tqdm(total=sum(len(g) for _, g in units.values()), desc=f"ranking groups ({method})",
               disable=not progress, leave=False)
    try:
        if method == "fast":
            warnings.warn("fast ranking is not available yet; using the naive method", stacklevel=3)
        bs = batch_size or max(1, min(len(x), _MEMORY_BYTES // (4 * sample_bytes)))
        return _naive_units(model, x, units, loss, bs, bar)
    finally:
        bar.close()


def _distributed(units: dict, compute) -> dict[str, Tensor]:
    """``compute(units)`` on this rank's share of the (key, group) pairs; all ranks get every score."""
    return compute(units)


def group_importance(model: nn.Module, x: Tensor, groups: Mapping[str, Sequence[Sequence[int]]],
                     criterion: str = "spvr", method: str = "fast", batch_size: int | None = None,
                     progress: bool = True) -> dict[str, Tensor]:
    """Importance of every channel group: Eq. 2 (``criterion="spvr"``) or KL, summed over ``x``.

    ``model``: a trained classifier (put in eval mode for the call; its training flag is
    restored).  ``x``: the calibration inputs [n, C, H, W] (or [n, features]), moved to the
    model's device and dtype.  ``groups``: {layer name: [[channel, ...], ...]}; a name is a
    prunable layer of a ``spvr_lib.models`` network (its conv, e.g. ``"features.0.0"``, or its
    mask point), resolved to ``PrunableLayer.mask_module``, or any module name of
    ``model.named_modules()`` whose OUTPUT is then masked directly (dim 1 = channels).
    Returns {layer name: float64 tensor [number of groups]} on the CPU, in the groups' order:
    ``sum_k L(f(x_k), f_masked(x_k))`` with the group's channels zeroed (see :func:`mask_output`).

    ``method="naive"``: one forward pass of the whole calibration set per group (the paper's
    algorithm; ``batch_size`` samples at a time, default: as many as fit in ~1 GiB).
    ``method="fast"``: the same numbers (to float rounding), much faster, as described in the
    comment above this function; ``batch_size`` does not apply (it sizes its batches itself).
    For a network that is not one of ``spvr_lib.models`` (or a key that is not a prunable
    layer) it falls back to naive with a warning.
    """
    if criterion not in criteria.CRITERIA:
        raise ValueError(f"criterion={criterion!r}; expected one of {sorted(criteria.CRITERIA)}")
    if method not in RANKING_PATHS:
        raise ValueError(f"method={method!r}; expected one of {list(RANKING_PATHS)}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or x.ndim < 2 or len(x) < 1:
        raise ValueError(f"x must be a tensor of calibration inputs [n, ...] with n >= 1, got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size={batch_size!r}; expected a positive int or None")
    groups = _check_groups(groups)
    loss = criteria.CRITERIA[criterion]
    targets, layers = _resolve_targets(model, list(groups))
    for name, gs in groups.items():
        top = max(c for g in gs for c in g)
        if layers[name] is not None and top >= layers[name].width:
            raise ValueError(f"groups[{name!r}] holds channel {top}, out of range for a layer with "
                             f"{layers[name].width} channels")
    was_training = model.training
    model.eval()
    bar = tqdm(total=sum(len(g) for g in groups.values()), desc=f"ranking groups ({method})",
               disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            plan = _fast_plan(model) if method == "fast" else None
            fast = [n for n in groups if plan is not None and layers[n] is not None]
            naive = {n: groups[n] for n in groups if n not in fast}
            if method == "fast" and naive:
                why = ("it is not a network built by spvr_lib.models" if plan is None
                       else "they are not prunable layers of the network")
                warnings.warn(f"fast ranking does not support {list(naive)[:5]}{'...' if len(naive) > 5 else ''} "
                              f"({why}); using the naive method for them", stacklevel=2)
            out: dict[str, Tensor] = {}
            if fast:
                out.update(_fast_importance(model, plan, x, {n: (layers[n].name, groups[n]) for n in fast}, loss, bar))
            if naive:
                out.update(_naive_importance(model, x, {n: (targets[n], naive[n]) for n in naive}, loss,
                                             batch_size, bar))
            return {n: out[n] for n in groups}
    finally:
        bar.close()
        model.train(was_training)


def _naive_importance(model: nn.Module, x: Tensor, work: dict[str, tuple[nn.Module, list[list[int]]]], loss,
                      batch_size: int | None, bar) -> dict[str, Tensor]:
    """The paper's algorithm: for each group, a forward pass of all of ``x`` with it masked.

    ``work``: {key: (module whose output is masked, groups)}."""
    bs = batch_size or max(1, min(len(x), _MEMORY_BYTES // (4 * _sample_bytes(model, to_model(model, x[:1])))))
    p = _outputs(model, x, bs).double()
    out = {}
    for key, (module, gs) in work.items():
        scores = []
        for g in gs:
            with mask_output(module, g):
                scores.append(loss(p, _outputs(model, x, bs).double().unsqueeze(0))[0])
            bar.update()
        out[key] = torch.stack(scores).cpu()
    return out


# --------------------------------------------------------------------------- the fast path
class _Affine:
    """A conv (or linear) layer with its eval-mode BN folded in: ``y = W_f x + b_f``."""

    def __init__(self, layer: nn.Module, bn: nn.BatchNorm2d | None = None):
        W = layer.weight.detach()
        b = layer.bias.detach() if layer.bias is not None else torch.zeros(W.shape[0], dtype=W.dtype, device=W.device)
        if bn is not None:
            gamma = bn.weight.detach() if bn.weight is not None else torch.ones_like(b)
            beta = bn.bias.detach() if bn.bias is not None else torch.zeros_like(b)
            s = gamma / torch.sqrt(bn.running_var + bn.eps)
            W = W * s.reshape(-1, *[1] * (W.ndim - 1))
            b = (b - bn.running_mean) * s + beta
        self.conv = isinstance(layer, nn.Conv2d)
        self.W, self.b = W.contiguous(memory_format=_FORMAT) if self.conv else W.contiguous(), b.contiguous()
        if self.conv:
            self.kw = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation)

    def __call__(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.W, self.b, **self.kw) if self.conv else F.linear(x, self.W, self.b)

    def partials(self, x_sub: Tensor, groups: list[list[int]]) -> Tensor:
        """[g, n, out, ...]: the contribution of each group's input channels alone (no bias).

        ``x_sub`` [n, sum |G_j|, ...] holds the groups' input channels, concatenated in order.
        Groups of equal size go through ONE grouped conv (a block-diagonal weight).
        """
        g, n = len(groups), x_sub.shape[0]
        flat = [c for grp in groups for c in grp]
        W = self.W[:, flat]                                              # [out, sum |G|, *k]
        if not self.conv:
            parts = [F.linear(part, w) for part, w in zip(x_sub.split([len(grp) for grp in groups], dim=1),
                                                           W.split([len(grp) for grp in groups], dim=1))]
            return torch.stack(parts)
        d, out = len(groups[0]), W.shape[0]
        if any(len(grp) != d for grp in groups):
            sizes = [len(grp) for grp in groups]
            return torch.stack([F.conv2d(part, w, None, **self.kw)
                                for part, w in zip(x_sub.split(sizes, dim=1), W.split(sizes, dim=1))])
        W = W.reshape(out, g, d, *W.shape[2:]).transpose(0, 1).reshape(g * out, d, *W.shape[2:])
        y = F.conv2d(x_sub, W.contiguous(memory_format=_FORMAT), None, groups=g, **self.kw)
        return y.view(n, g, out, *y.shape[2:]).transpose(0, 1)


def _foldable(model: nn.Module) -> bool:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d) and (m.running_mean is None or m.running_var is None):
            return False
        if isinstance(m, nn.Conv2d) and (m.groups != 1 or m.padding_mode != "zeros"):
            return False
    return True


def _fast_plan(model: nn.Module) -> "_Plan | None":

    spec = getattr(model, "spec", None)
    if not isinstance(spec, dict) or not _foldable(model):
        return None
    try:
        layers = models.prunable_layers(model, spec)
    except ValueError:
        return None
    if isinstance(model, models.VGG):
        return _VGGPlan(model, layers)
    if isinstance(model, models.ResNet):
        return _ResNetPlan(model, layers)
    if isinstance(model, models.MLP):
        return _MLPPlan(model, layers)
    return None


class _Plan:
    """A BN-folded inference copy of a network that evaluates many masks of one layer at once.

    ``prepare(x)`` runs the network on a chunk of samples, caching what ``masked(name, groups)``
    needs, and returns the logits; ``masked`` returns the logits of the ``g`` masked networks,
    [g * n, classes] (variant-major).  ``numel_after(name)``: per-sample size of the largest
    activation computed after the mask point (for choosing how many variants to batch).
    """

    cache: dict

    def prepare(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def masked(self, name: str, groups: list[list[int]]) -> Tensor:
        raise NotImplementedError

    def numel_after(self, name: str) -> int:
        raise NotImplementedError

    def cache_bytes(self) -> int:
        seen, total = set(), 0
        for t in _tensors(self.cache):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def _tensors(obj) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def _variants(t: Tensor, g: int) -> Tensor:
    """[g, *t.shape]: g copies of ``t``, a view of a fresh [g * n, ...] tensor in ``t``'s memory
    format (``.flatten(0, 1)`` gives it back without a copy; safe to modify in place)."""
    fmt = _FORMAT if t.ndim == 4 else torch.contiguous_format
    flat = torch.empty((g * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=fmt)
    view = flat.view(g, *t.shape)
    view.copy_(t.unsqueeze(0).expand_as(view))
    return view


def _minus_partials(z: Tensor, x: Tensor, op: _Affine, groups: list[list[int]]) -> Tensor:
    """[g * n, ...]: ``z - op.partial(x[:, G_j])`` for each group j (x, z: [n, ...]): op's output
    with the groups' input channels zeroed, one group per variant."""
    out = _variants(z, len(groups))
    out.sub_(op.partials(x[:, [c for g in groups for c in g]], groups))
    return out.flatten(0, 1)


class _VGGPlan(_Plan):
    def __init__(self, model: nn.Module, layers: list) -> None:
        by_conv = {id(layer.conv): layer.name for layer in layers}
        self.ops: list[tuple[str, _Affine | None]] = []
        self.index: dict[str, int] = {}
        for item in model.features:
            if isinstance(item, nn.MaxPool2d):
                self.ops.append(("pool", None))
            else:
                conv, bn = item[0], item[1]
                self.index[by_conv[id(conv)]] = len(self.ops)
                self.ops.append(("conv", _Affine(conv, bn)))
        self.pool, self.classifier = model.pool, model.classifier
        self.cache = {}

    def _run(self, x: Tensor, start: int, record: bool = False) -> Tensor:
        for j in range(start, len(self.ops)):
            kind, op = self.ops[j]
            if kind == "pool":
                x = F.max_pool2d(x, 2)
            else:
                z = op(x)
                if record:
                    self.cache[j] = (x, z)
                    x = F.relu(z)
                else:
                    x = F.relu_(z)
        if record:
            self.cache["head"] = x
        return self.classifier(torch.flatten(self.pool(x), 1))

    def prepare(self, x: Tensor) -> Tensor:
        self.cache = {}
        return self._run(x, 0, record=True)

    def _next_conv(self, j: int) -> int | None:
        return next((k for k in range(j + 1, len(self.ops)) if self.ops[k][0] == "conv"), None)

    def masked(self, name: str, groups: list[list[int]]) -> Tensor:
        k = self._next_conv(self.index[name])
        if k is None:                                       # last conv: mask the head's input
            h = _variants(self.cache["head"], len(groups))
            for j, g in enumerate(groups):
                h[j][:, g] = 0
            return self.classifier(torch.flatten(self.pool(h.flatten(0, 1)), 1))
        x, z = self.cache[k]                                # relu and max-pool keep zeros zero
        return self._run(F.relu_(_minus_partials(z, x, self.ops[k][1], groups)), k + 1)

    def numel_after(self, name: str) -> int:
        k = self._next_conv(self.index[name])
        if k is None:
            return self.cache["head"][0].numel()
        return max(self.cache[j][1][0].numel() for j in self.cache if j != "head" and j >= k)


class _ResNetPlan(_Plan):
    def __init__(self, model: nn.Module, layers: list) -> None:
        self.stem, self.maxpool = _Affine(model.conv1, model.bn1), model.maxpool
        self.blocks: list[dict] = []
        self.where: dict[str, tuple[int, int]] = {}
        by_conv = {id(layer.conv): layer.name for layer in layers}
        for stage in model.stage_names:
            for block in getattr(model, stage):
                k_convs = 3 if hasattr(block, "conv3") else 2
                convs = [getattr(block, f"conv{k}") for k in range(1, k_convs + 1)]
                bns = [getattr(block, f"bn{k}") for k in range(1, k_convs + 1)]
                for k, conv in enumerate(convs):
                    self.where[by_conv[id(conv)]] = (len(self.blocks), k)
                ds = None if block.downsample is None else _Affine(block.downsample[0], block.downsample[1])
                self.blocks.append({"convs": [_Affine(c, b) for c, b in zip(convs, bns)], "ds": ds})
        self.fc = model.fc
        self.cache = {}

    def _head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def _finish_block(self, b: int, k: int, z: Tensor, sc: Tensor) -> Tensor:
        """Block ``b`` from conv ``k``'s pre-activation ``z`` [g*n, ...] on, with shortcut ``sc``."""
        convs = self.blocks[b]["convs"]
        for op in convs[k + 1:]:
            z = op(F.relu_(z))
        g = z.shape[0] // sc.shape[0] if sc.shape[0] != z.shape[0] else 1
        if g > 1:   # sc [n, ...] shared by the g variants
            z = z.view(g, sc.shape[0], *z.shape[1:]).add_(sc.unsqueeze(0)).flatten(0, 1)
        else:
            z = z.add_(sc)
        return F.relu_(z)

    def _run(self, x: Tensor, start: int, record: bool = False) -> Tensor:
        for b in range(start, len(self.blocks)):
            convs, ds = self.blocks[b]["convs"], self.blocks[b]["ds"]
            inp, xs, zs = x, [x], []
            for k, op in enumerate(convs):
                zs.append(op(xs[k]))
                if k + 1 < len(convs):
                    xs.append(F.relu(zs[k]) if record else F.relu_(zs[k]))
            sc = inp if ds is None else ds(inp)
            if record:
                x = F.relu(zs[-1] + sc)
                self.cache[b] = {"xs": xs, "zs": zs, "sc": sc, "out": x}
            else:
                x = F.relu_(zs[-1].add_(sc))
        return self._head(x)

    def prepare(self, x: Tensor) -> Tensor:
        self.cache = {}
        x = self.maxpool(F.relu(self.stem(x)))
        return self._run(x, 0, record=True)

    def masked(self, name: str, groups: list[list[int]]) -> Tensor:
        b, k = self.where[name]
        c = self.cache[b]
        convs = self.blocks[b]["convs"]
        if k + 1 < len(convs):      # inside the block: correct the next conv, finish the block
            z = _minus_partials(c["zs"][k + 1], c["xs"][k + 1], convs[k + 1], groups)
            return self._run(self._finish_block(b, k + 1, z, c["sc"]), b + 1)
        # last conv of the block: its branch adds nothing on channels G, out'[G] = relu(sc[G])
        flat = [ch for g in groups for ch in g]
        new = F.relu(c["sc"][:, flat])                       # [n, sum |G|, ...]
        delta = new - c["out"][:, flat]                      # change of the block output on G
        out = _variants(c["out"], len(groups))
        start = 0
        for j, g in enumerate(groups):
            out[j][:, g] = new[:, start:start + len(g)]
            start += len(g)
        out = out.flatten(0, 1)
        if b + 1 == len(self.blocks):
            return self._head(out)
        nxt, cn = self.blocks[b + 1], self.cache[b + 1]
        z = _variants(cn["zs"][0], len(groups))             # the next block's first conv by linearity
        z.add_(nxt["convs"][0].partials(delta, groups))
        if nxt["ds"] is None:
            sc = out
        else:                                               # and its projection shortcut
            sc = _variants(cn["sc"], len(groups))
            sc = sc.add_(nxt["ds"].partials(delta, groups)).flatten(0, 1)
        return self._run(self._finish_block(b + 1, 0, z.flatten(0, 1), sc), b + 2)

    def numel_after(self, name: str) -> int:
        b, _ = self.where[name]
        return max(t[0].numel() for bb in range(b, len(self.blocks)) for t in _tensors(self.cache[bb]))


class _MLPPlan(_Plan):
    def __init__(self, model: nn.Module, layers: list) -> None:
        self.fcs = [_Affine(m) for m in model if isinstance(m, nn.Linear)]
        self.index = {layer.name: int(layer.name[2:]) - 1 for layer in layers}   # "fc3" -> 2
        self.cache = {}

    def _run(self, z: Tensor, start: int, record: bool = False) -> Tensor:
        """From fc ``start``'s pre-activation ``z`` on."""
        for i in range(start + 1, len(self.fcs)):
            x = F.relu(z) if record else F.relu_(z)
            z = self.fcs[i](x)
            if record:
                self.cache[i] = (x, z)
        return z

    def prepare(self, x: Tensor) -> Tensor:
        self.cache = {}
        return self._run(self.fcs[0](x.flatten(1)), 0, record=True)

    def masked(self, name: str, groups: list[list[int]]) -> Tensor:
        i = self.index[name] + 1
        x, z = self.cache[i]
        return self._run(_minus_partials(z, x, self.fcs[i], groups), i)

    def numel_after(self, name: str) -> int:
        return max(z[0].numel() for i, (x, z) in self.cache.items() if i > self.index[name])


def _fast_chunk(model: nn.Module, xb: Tensor) -> Tensor:
    xb = to_model(model, xb)
    return xb.contiguous(memory_format=_FORMAT) if xb.ndim == 4 else xb


def _fast_importance(model: nn.Module, plan: _Plan, x: Tensor, work: dict[str, tuple[str, list[list[int]]]], loss,
                     bar) -> dict[str, Tensor]:
    """``work``: {key: (prunable layer name, groups)}.  Sums ``loss`` over chunks of samples."""
    plan.prepare(_fast_chunk(model, x[:1]))
    n_chunk = max(1, min(len(x), _MEMORY_BYTES // max(1, plan.cache_bytes())))
    totals = {key: torch.zeros(len(gs), dtype=torch.float64) for key, (_, gs) in work.items()}
    for start in range(0, len(x), n_chunk):
        xb = _fast_chunk(model, x[start:start + n_chunk])
        p = torch.softmax(plan.prepare(xb), dim=1).double()
        n = len(xb)
        for key, (name, gs) in work.items():
            per_variant = 4 * plan.numel_after(name) * x.element_size()
            g_chunk = max(1, min(len(gs), _MEMORY_BYTES // max(1, n * per_variant)))
            for j in range(0, len(gs), g_chunk):
                chunk = gs[j:j + g_chunk]
                logits = plan.masked(name, chunk)
                pm = torch.softmax(logits.view(len(chunk), n, *logits.shape[1:]), dim=2).double()
                totals[key][j:j + len(chunk)] += loss(p, pm).cpu()
                bar.update(len(chunk) * n / len(x))
    return totals
