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

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from spvr_lib import criteria, models
from spvr_lib.fast_ranking import _MEMORY_BYTES, _FastRanker
from spvr_lib.fast_ranking_ops import _kept_heap, _no_inplace, _positions, _Unsupported, to_model
from spvr_lib.graph import MaskSite

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


def _outputs(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Softmax over dim 1 of the model's outputs on ``x``, in batches: [n, c] (or [n, c, *pixels])."""
    return torch.cat([torch.softmax(model(to_model(model, xb)), dim=1) for xb in x.split(batch_size)])


# =============================================================================================
# Mask sites and unit importance: Eq. 2 (or KL) for channel groups of ANY model (Section 3.1).
#
# A unit is a set of coupled channels (e.g. a residual stage's channels, pruned together); it is
# masked at one or more sites, the outputs or first inputs of modules.  ``unit_importance`` scores
# groups of a unit's channels by zeroing them at every site at once.
# =============================================================================================
# MaskSite (where a unit is masked) lives in spvr_lib.graph, with the units that carry it


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
    """Scores of ``units`` on this process, by the fast path (naive when it cannot trace the model)."""
    if not units:
        return {}
    bar = tqdm(total=sum(len(g) for _, g in units.values()), desc=f"ranking groups ({method})",
               disable=not progress, leave=False)
    try:
        if method == "fast":
            try:
                ranker = _FastRanker(model, units)
                with _no_inplace(model), _kept_heap():
                    return ranker.importance(x, units, loss, bar)
            except _Unsupported as why:
                warnings.warn(f"fast ranking cannot run this model ({why}); using the naive method", stacklevel=4)
                bar.reset()
        bs = batch_size or max(1, min(len(x), _MEMORY_BYTES // (4 * sample_bytes)))
        return _naive_units(model, x, units, loss, bs, bar)
    finally:
        bar.close()


def _distributed(units: dict, compute) -> dict[str, Tensor]:
    """``compute(units)`` on this rank's share of the (key, group) pairs, then one all_reduce (SUM of a
    zero-filled float64 vector) so every rank returns all scores.  Pairs go round-robin, in key order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return compute(units)
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = [(key, j) for key, (_, groups) in units.items() for j in range(len(groups))]
    mine: dict[str, list[int]] = {}
    for i, (key, j) in enumerate(pairs):
        if i % world == rank:
            mine.setdefault(key, []).append(j)
    part = {key: (units[key][0], [units[key][1][j] for j in js]) for key, js in mine.items()}
    scores = compute(part)
    flat = torch.zeros(len(pairs), dtype=torch.float64)
    where = {pair: i for i, pair in enumerate(pairs)}
    for key, js in mine.items():
        flat[[where[key, j] for j in js]] = scores[key].to(torch.float64).cpu()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flat = flat.to(device)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat = flat.cpu()
    out, start = {}, 0
    for key, (_, groups) in units.items():
        out[key] = flat[start:start + len(groups)].clone()
        start += len(groups)
    return out


def group_importance(model: nn.Module, x: Tensor, groups: Mapping[str, Sequence[Sequence[int]]],
                     criterion: str = "spvr", method: str = "fast", batch_size: int | None = None,
                     progress: bool = True) -> dict[str, Tensor]:
    """Importance of every channel group of a layer: Eq. 2 (``criterion="spvr"``) or KL, summed over ``x``.

    ``groups``: {layer name: [[channel, ...], ...]}; a name is a prunable layer of a
    ``spvr_lib.models`` network (its conv, e.g. ``"features.0.0"``, or its mask point), masked at
    ``PrunableLayer.mask_module``'s output (see :func:`mask_output`), or any module name of
    ``model.named_modules()`` whose OUTPUT is then masked directly (dim 1 = channels).
    Returns {layer name: float64 CPU tensor [number of groups]}.  A thin adapter over
    :func:`unit_importance` (one output site per key, identity index); other arguments as there.
    """
    _check_common(model, x, criterion, method, batch_size)
    groups = _check_groups(groups)
    targets, layers = _resolve_targets(model, list(groups))
    names = {id(m): n for n, m in model.named_modules()}
    units = {}
    for name, gs in groups.items():
        top = max(c for g in gs for c in g)
        width = top + 1
        if layers[name] is not None:
            width = layers[name].width
            if top >= width:
                raise ValueError(f"groups[{name!r}] holds channel {top}, out of range for a layer with "
                                 f"{width} channels")
        index = tuple((c,) for c in range(width))
        units[name] = ([MaskSite(names[id(targets[name])], "output", 1, index)], gs)
    return unit_importance(model, x, units, criterion, method, batch_size, progress)


