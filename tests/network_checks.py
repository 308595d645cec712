"""Checks that several test files make of a pruned network, written once.

Imported as a plain module (``tests/`` is put on ``sys.path`` by the importing file, as ``ddp_worker`` is):
pytest collects only ``test_*.py``, so nothing here runs by itself.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from spvr_lib import models
from spvr_lib.prune import GroupRanking, network_units, unit_groups


def random_removals(graph, rng: np.random.Generator) -> list[np.ndarray]:
    """One random removal mask per unit of ``graph`` (a ``NetworkGraph``): each channel removed with
    probability 1/2; a unit that may collapse loses everything with probability 0.3; a unit that may not
    collapse keeps at least its first channel."""
    removed = []
    for u in graph.units:
        r = rng.random(u.width) < 0.5
        if u.collapse and rng.random() < 0.3:
            r[:] = True
        if r.all() and not u.collapse:
            r[0] = False
        removed.append(r)
    return removed


def assert_exact_count_for_random_removals(graph, rng: np.random.Generator, repeats: int) -> None:
    """``graph.count`` (the budget loop's counter) == ``count_params`` of the rebuilt network, for
    ``repeats`` random removals (collapses included)."""
    for _ in range(repeats):
        removed = random_removals(graph, rng)
        assert graph.count(removed) == models.count_params(graph.build(removed))


def assert_saved_network_reloads(model: nn.Module, params: int, tmp_path: Path,
                                 input_shape: tuple[int, ...]) -> Path:
    """``model`` saved (a state dict + a JSON plan) and rebuilt by ``models.load_network``: the same
    parameter count ``params`` and the same outputs on a random batch of ``input_shape`` ([N, C, H, W]).
    Returns the saved file."""
    path = models.save_network(model, tmp_path / "pruned.pt")
    again = models.load_network(path).eval()
    assert models.count_params(again) == params
    x = torch.randn(*input_shape)
    with torch.no_grad():
        assert torch.allclose(again(x), model.eval()(x), atol=1e-5)
    return path


def randomly_ranked(name: str, calib: tuple[torch.Tensor, torch.Tensor], group_size: int, cache: dict):
    """A randomly initialised torchvision network ``name`` (10 classes), its units and a seeded random ranking of
    Algorithm 1's groups on ``calib`` (the masking scores are tested against the naive path in
    test_ranking_paths.py), built once per ``cache``: (model, calib, units, ranking)."""
    import torchvision

    if name not in cache:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, num_classes=10).eval()
        x, _ = calib
        g = network_units(model, x)
        groups = unit_groups(model, g, x, group_size)
        gen = torch.Generator().manual_seed(1)
        scores = {k: torch.rand(len(v), generator=gen, dtype=torch.float64) for k, v in groups.items()}
        cache[name] = (model, calib, g, GroupRanking(groups, scores, group_size, "spvr", "fast", len(x)))
    return cache[name]


def assert_same_scores(naive: dict, fast: dict, tol: float = 1e-4) -> None:
    """The fast ranking's scores equal the naive path's to ``tol`` (absolute and relative: float32 probabilities
    summed over a calibration set) and order the groups alike: the naive scores, read in the fast path's order,
    never fall by more than ``tol`` (two groups closer than that may swap)."""
    assert list(naive) == list(fast)
    for k, v in naive.items():
        assert torch.allclose(fast[k], v, rtol=tol, atol=tol), k
        in_fast_order = v[torch.argsort(fast[k], stable=True)]
        assert bool((in_fast_order.diff() >= -tol).all()), k
