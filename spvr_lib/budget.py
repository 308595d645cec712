"""The budget step of SPvR (Section 3.2): every group of every layer sorted together, the least
important removed until the rebuilt network fits an exact parameter budget, with layer collapse."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor



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
    """What :func:`global_discard` decided.

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
    kept_one: dict[str, str] = field(default_factory=dict)


def global_discard(names: Sequence[str], widths: Mapping[str, int], groups: Mapping[str, Sequence[Sequence[int]]],
                   scores: Mapping[str, Sequence[float] | Tensor], budget: int,
                   params_of: Callable[[Mapping[str, list[int]]], int], ties: Mapping[str, str | None] | None = None,
                   cannot_empty: Mapping[str, str] | None = None, fill_back: int | None = None) -> Budgeted:
    """THE budget loop of SPvR (Section 3.2, Appendix B), for any network.

    ``names``: the layers (or units of coupled channels) in forward order; ``groups``/``scores``: per
    name its channel groups (a partition of its ``widths[name]`` channels) and one importance each.
    All groups are sorted together by (importance, position, group index), ascending, and discarded in
    that order until the first point where ``params_of(kept)`` <= ``budget`` (``kept``: {name: sorted
    kept channels}).  ``ties``: {name: tie id}; a tie's layers shrink together (Appendix B's identity
    shortcut rule): when a group of one is discarded, every other loses its least significant remaining
    group(s), ``expansion`` = its width / the tie's narrowest width of them.  ``cannot_empty``: {name:
    why}; such a layer keeps its last group (the step is skipped).  ``fill_back``: one step can overshoot
    (a collapse removes a whole branch at once).  With ``fill_back`` set (None: never), a step that would end
    the sweep more than ``fill_back`` parameters under the budget is skipped (its group kept) and the sweep
    goes on with the next groups; where no later step ends closer, the first such fit is taken.  Then, when
    the network is still more than ``fill_back`` under the budget, the most important discarded groups of
    untied layers are restored, one at a time, wherever the network still fits: a collapsed layer's group too,
    which brings its branch back.  ValueError if nothing fits.
    """
    ties = dict(ties or {})
    cannot_empty = dict(cannot_empty or {})
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget={budget!r}; expected a positive parameter count")
    tie_width: dict[str, int] = {}
    for name in names:
        if ties.get(name) is not None:
            tie_width[ties[name]] = min(tie_width.get(ties[name], widths[name]), widths[name])
    imp: dict[str, np.ndarray] = {}
    expansion: dict[str, int] = {}
    for name in names:
        gs = groups.get(name)
        if gs is None or name not in scores:
            raise ValueError(f"groups and scores need an entry for layer {name!r}")
        s = np.asarray(scores[name].cpu() if isinstance(scores[name], Tensor) else scores[name],
                       dtype=np.float64).reshape(-1)
        if len(s) != len(gs):
            raise ValueError(f"scores[{name!r}] has {len(s)} values for {len(gs)} groups")
        if not np.isfinite(s).all():
            raise ValueError(f"scores[{name!r}] holds NaN or infinite values")
        if sorted(int(c) for g in gs for c in g) != list(range(widths[name])):
            raise ValueError(f"groups[{name!r}] must partition the layer's {widths[name]} channels "
                             f"(each channel in exactly one group)")
        imp[name] = s
        if ties.get(name) is not None:
            w = tie_width[ties[name]]
            if widths[name] % w:
                raise ValueError(f"layer {name!r} has {widths[name]} channels, not a multiple of the "
                                 f"width {w} of its tie {ties[name]!r}")
            expansion[name] = widths[name] // w
    members: dict[str, list[str]] = {}
    for name in names:
        if ties.get(name) is not None:
            members.setdefault(ties[name], []).append(name)
    # least significant first, within each layer and globally
    remaining = {n: sorted(range(len(groups[n])), key=lambda j, n=n: (imp[n][j], j)) for n in names}
    global_order = sorted((imp[n][j], pos, j) for pos, n in enumerate(names) for j in range(len(groups[n])))
    order = {n: [0] * len(groups[n]) for n in names}
    for rank, (_, pos, j) in enumerate(global_order):
        order[names[pos]][j] = rank

    def kept_count(name: str) -> int:
        return sum(len(groups[name][j]) for j in remaining[name])

    def tie_units(tie: str) -> int:
        return min(kept_count(n) // expansion[n] for n in members[tie])

    kept_cache: dict[str, list[int]] = {}

    def kept_of(name: str) -> list[int]:
        most_important_first = [c for j in reversed(remaining[name]) for c in groups[name][j]]
        n_keep = len(most_important_first) if ties.get(name) is None else tie_units(ties[name]) * expansion[name]
        return sorted(most_important_first[:n_keep])

    def refresh(changed: Sequence[str]) -> dict[str, list[int]]:
        for n in changed:
            kept_cache[n] = kept_of(n)
        return kept_cache

    refresh(names)
    params = params_of(kept_cache)
    last_step, steps = 0, 0
    kept_one: dict[str, str] = {}
    far_fit = None              # (params, remaining, step) of the first fit more than fill_back under the budget
    if params > budget:
        for _, pos, j in global_order:
            name = names[pos]
            if j not in remaining[name]:
                continue                                  # already gone with its tie
            tie = ties.get(name)
            partners = [name] if tie is None else members[tie]
            take = {p: expansion.get(p, 1) for p in partners}
            blocked = [p for p in partners if p in cannot_empty and len(remaining[p]) <= take[p]]
            if blocked:
                kept_one.update({p: cannot_empty[p] for p in blocked})
                continue
            saved = {p: list(remaining[p]) for p in partners}
            for p in partners:
                t = take[p]
                if p == name:
                    remaining[p].remove(j)
                    t -= 1
                del remaining[p][:t]                     # its least significant remaining groups
            steps += 1
            before, params = params, params_of(refresh(partners))
            if params <= budget and fill_back is not None and budget - params > fill_back:
                if far_fit is None:                      # too far under: keep this group, go on with the next
                    far_fit = (params, {n: list(v) for n, v in remaining.items()}, before - params, steps)
                remaining.update(saved)
                params = params_of(refresh(partners))
                continue
            if params <= budget:
                last_step = before - params
                break
        else:
            if far_fit is None:
                raise ValueError(f"budget={budget} parameters is below the smallest network the pruner can reach "
                                 f"({params} parameters with every removable group removed)")
            params, first_remaining, last_step, steps = far_fit
            remaining.update(first_remaining)
            params = params_of(refresh(names))
    if fill_back is not None and budget - params > fill_back:
        gone = sorted(((imp[n][j], pos, j) for pos, n in enumerate(names) if ties.get(n) is None
                       for j in range(len(groups[n])) if j not in remaining[n]), reverse=True)
        for _, pos, j in gone:
            name = names[pos]
            remaining[name] = sorted([*remaining[name], j], key=lambda k, n=name: (imp[n][k], k))
            trial = params_of(refresh([name]))
            if trial <= budget:
                params = trial
            else:
                remaining[name].remove(j)
                refresh([name])
    kept = {n: list(kept_cache[n]) for n in names}
    removed = {n: [not (set(g) & set(kept[n])) for g in groups[n]] for n in names}
    return Budgeted(spec={}, kept=kept, removed=removed, order=order, params_after=int(params),
                    last_step=int(last_step), steps=steps, kept_one=kept_one)
