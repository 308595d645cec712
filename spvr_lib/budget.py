"""The budget step of SPvR (Section 3.2): every group of every layer sorted together, the least
important removed until the rebuilt network fits an exact parameter budget, with layer collapse."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from torch import Tensor

from spvr_lib import models


def budget_from_keep(keep: int | float, params_before: int) -> int:
    """Parameter budget: ``keep`` parameters (int) or a fraction of ``params_before`` (float in (0, 1])."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.integer, np.floating)):
        raise ValueError(f"keep={keep!r}; expected a parameter count (int) or a fraction in (0, 1] (float)")
    if isinstance(keep, (int, np.integer)):
        if not 0 < keep <= params_before:
            raise ValueError(f"keep={keep}; expected a parameter count in [1, {params_before}] (the original size)")
        return int(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep!r}; expected a fraction of the original parameters in (0, 1]")
    return max(1, int(np.floor(keep * params_before)))


@dataclass
class Budgeted:
    """What :func:`apply_budget` decided.

    spec: the pruned spec; kept: {layer: sorted kept channel indices of the ORIGINAL layer};
    removed: {layer: per group, True if none of its channels is kept}; order: {layer: per group,
    its rank in the global ascending sort}; params_after: parameters of the pruned spec;
    last_step: parameters removed by the last discarding step (0 if none was needed); steps:
    how many groups were discarded as triggers (stage partners not counted).
    """

    spec: dict
    kept: dict[str, list[int]]
    removed: dict[str, list[bool]]
    order: dict[str, list[int]]
    params_after: int
    last_step: int
    steps: int


def apply_budget(spec: dict, layers: Sequence[models.PrunableLayer], groups: Mapping[str, Sequence[Sequence[int]]],
                 scores: Mapping[str, Sequence[float] | Tensor], budget: int) -> Budgeted:
    """Discard the least important groups until ``models.spec_params`` of the rebuilt spec <= ``budget``.

    ``layers``: ``models.prunable_layers(model, spec)``; ``groups``/``scores``: per layer name,
    its channel groups (a partition of its channels) and one importance per group.  All groups
    are sorted together by (importance, layer position, group index), ascending, and discarded
    in that order (skipping those already gone with their stage) until the first point where the
    network fits.  See the module docstring for ResNet stages.  ValueError if even discarding
    every group does not fit.
    """
    models.validate(spec)
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget={budget!r}; expected a positive parameter count")
    tie_width: dict[str, int] = {}       # a tie's unit width: its narrowest layer (a ResNet stage width)
    for layer in layers:
        if layer.tie is not None:
            tie_width[layer.tie] = min(tie_width.get(layer.tie, layer.width), layer.width)
    imp: dict[str, np.ndarray] = {}
    expansion: dict[str, int] = {}
    for layer in layers:
        gs = groups.get(layer.name)
        if gs is None or layer.name not in scores:
            raise ValueError(f"groups and scores need an entry for layer {layer.name!r}")
        s = np.asarray(scores[layer.name].cpu() if isinstance(scores[layer.name], Tensor) else scores[layer.name],
                       dtype=np.float64).reshape(-1)
        if len(s) != len(gs):
            raise ValueError(f"scores[{layer.name!r}] has {len(s)} values for {len(gs)} groups")
        if not np.isfinite(s).all():
            raise ValueError(f"scores[{layer.name!r}] holds NaN or infinite values")
        flat = sorted(int(c) for g in gs for c in g)
        if flat != list(range(layer.width)):
            raise ValueError(f"groups[{layer.name!r}] must partition the layer's {layer.width} channels "
                             f"(each channel in exactly one group)")
        imp[layer.name] = s
        if layer.tie is not None:
            w = tie_width[layer.tie]
            if layer.width % w:
                raise ValueError(f"layer {layer.name!r} has {layer.width} channels, not a multiple of the "
                                 f"width {w} of its tie {layer.tie!r}")
            expansion[layer.name] = layer.width // w
    by_name = {layer.name: layer for layer in layers}
    stage_layers: dict[str, list[models.PrunableLayer]] = {}
    for layer in layers:
        if layer.tie is not None:
            stage_layers.setdefault(layer.tie, []).append(layer)
    # least significant first, within each layer and globally
    remaining = {layer.name: sorted(range(len(groups[layer.name])), key=lambda j, n=layer.name: (imp[n][j], j))
                 for layer in layers}
    global_order = sorted(((imp[layer.name][j], pos, j) for pos, layer in enumerate(layers)
                           for j in range(len(groups[layer.name]))))
    order = {layer.name: [0] * len(groups[layer.name]) for layer in layers}
    for rank, (_, pos, j) in enumerate(global_order):
        order[layers[pos].name][j] = rank

    def kept_count(name: str) -> int:
        return sum(len(groups[name][j]) for j in remaining[name])

    def width_of_stage(stage: str) -> int:
        return min(kept_count(layer.name) // expansion[layer.name] for layer in stage_layers[stage])

    def current_spec() -> dict:
        widths = {}
        for layer in layers:
            widths[layer.ref] = kept_count(layer.name) if layer.tie is None else width_of_stage(layer.tie)
        return models.with_widths(spec, widths)

    params = models.spec_params(spec)
    last_step, steps = 0, 0
    if params > budget:
        for _, pos, j in global_order:
            layer = layers[pos]
            if j not in remaining[layer.name]:
                continue                                  # already gone with its stage
            if layer.tie is None:
                remaining[layer.name].remove(j)
            else:
                for partner in stage_layers[layer.tie]:
                    take = expansion[partner.name]
                    if partner is layer:
                        remaining[layer.name].remove(j)
                        take -= 1
                    del remaining[partner.name][:take]    # its least significant remaining groups
            steps += 1
            before, params = params, models.spec_params(current_spec())
            if params <= budget:
                last_step = before - params
                break
        else:
            raise ValueError(f"budget={budget} parameters is below the smallest network the pruner can reach "
                             f"({params} parameters with every prunable layer removed)")
    new_spec = current_spec()
    kept: dict[str, list[int]] = {}
    for layer in layers:
        most_important_first = [c for j in reversed(remaining[layer.name]) for c in groups[layer.name][j]]
        n_keep = len(most_important_first) if layer.tie is None else \
            width_of_stage(layer.tie) * expansion[layer.name]
        kept[layer.name] = sorted(most_important_first[:n_keep])
    removed = {name: [not (set(g) & set(kept[name])) for g in groups[name]] for name in by_name}
    return Budgeted(spec=new_spec, kept=kept, removed=removed, order=order, params_after=int(params),
                    last_step=int(last_step), steps=steps)
