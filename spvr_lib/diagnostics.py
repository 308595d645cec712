"""What a pruned network is, beside its accuracy: its narrowest layer, what its classifier sees, the layers it
lost, and whether its output depends on its input at all (a dead network cannot be fine-tuned back)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["output_spread", "layer_summary"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _width(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features


@torch.no_grad()
def output_spread(model: nn.Module, x: Tensor, batch_size: int = 256) -> float:
    """How much the network's outputs vary over the inputs ``x`` [n, ...]: the largest, over output units, of
    the standard deviation over the n inputs of that unit's output (logits: same units as the output), in eval
    mode.  0 (up to rounding) for a network whose output does not depend on its input, e.g. one whose only kept
    stem channel is zero after its ReLU on every image."""
    if x.shape[0] < 2:
        raise ValueError(f"x must hold at least 2 inputs to measure a spread, got shape {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    outs = [model(x[i:i + batch_size].to(device)).double().flatten(1).cpu() for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return float(torch.cat(outs).std(dim=0).max())


def layer_summary(model: nn.Module, base: nn.Module | None = None) -> dict[str, Any]:
    """The shape facts a runs table shows beside a network's accuracy.

    ``narrowest layer``: "<name>: <width>", the conv or linear layer (the classifier excepted) with the fewest
    output channels; ``classifier inputs``: the number of features the last linear layer receives (None without
    one); ``layers``: conv and linear layers kept; ``layers removed``: how many of ``base``'s are gone
    (None without ``base``)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    linears = [m for _, m in layers if isinstance(m, nn.Linear)]
    classifier = linears[-1] if linears else None
    inner = [(n, m) for n, m in layers if m is not classifier]
    narrow = min(inner, key=lambda nm: _width(nm[1])) if inner else None
    base_layers = None if base is None else sum(isinstance(m, _LAYERS) for m in base.modules())
    return {"narrowest layer": None if narrow is None else f"{narrow[0]}: {_width(narrow[1])}",
            "classifier inputs": None if classifier is None else int(classifier.in_features),
            "layers": len(layers),
            "layers removed": None if base_layers is None else base_layers - len(layers)}
