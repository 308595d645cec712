"""Notebook 02: the grouping module (Section 3.2) seen on a trained network: activations, groups, forward passes."""
from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from spvr_lib import grouping, models
from spvr_lib.models import build, prunable_layers


@torch.no_grad()
def layer_activations(model: torch.nn.Module, x: torch.Tensor, layer: str, batch_size: int = 256) -> torch.Tensor:
    """The output of prunable layer ``layer`` at its mask point (after BN), [n, m, h, w], for inputs ``x``."""
    layers = {pl.name: pl for pl in models.prunable_layers(model, model.spec)}
    if layer not in layers:
        raise ValueError(f"layer={layer!r} is not a prunable layer; expected one of {list(layers)}")
    return grouping.record_activations(model, x, {layer: layers[layer].mask_module}, batch_size)[layer]


def forward_passes(spec: dict, group_sizes: Sequence[int]) -> pd.DataFrame:
    """Section 3.2's cost: the ranking needs sum_i ceil(m_i / d) forward passes (one per group)."""

    with torch.device("meta"):
        widths = [pl.width for pl in prunable_layers(build(spec), spec)]
    return pd.DataFrame([{"d": d, "layers": len(widths), "channels": sum(widths),
                          "forward passes": sum(-(-m // d) for m in widths)} for d in group_sizes])
