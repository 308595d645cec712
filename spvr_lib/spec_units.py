"""A ``spvr_lib.models`` network in the one description of a network (``spvr_lib.graph``'s interface):
its units, where each is masked and recorded, the exact parameter count of any removal and the rebuild.

Its units are the spec's prunable layers (``models.prunable_layers``: every VGG / SegNet / MLP hidden layer, every
conv of a ResNet block but the stem and the shortcuts), each masked and recorded at its ``mask_module``'s output
(the BN after a conv, the ReLU after an MLP hidden layer).  What Torch-Pruning's tracing cannot say of these
networks is the stage rule of Appendix B, which this description adds:

* ties: every layer of a ResNet stage shares one width (a bottleneck's conv3 four times it), and a SegNet encoder
  stage's last conv shares its width with the decoder conv feeding that stage's unpool (``PrunableLayer.tie``);
  each stage's residual stream is its own, even where an identity shortcut joins it to the stem (the rebuilt
  spec gets a projection there);
* collapse: a layer, or a whole stage, at width 0 goes (``models.with_widths``), its neighbours joined;
* count and rebuild: ``models.spec_params`` / ``models.build`` of the pruned spec (a fresh network: SPvR trains
  it from scratch; ``prune.inherit_weights`` gives a fine-tuning start);
* no fill-back: the budget loop stops at the first fit, as the committed architectures were found.

Measured on the committed cpu cache: the traced description (Torch-Pruning's units) gives the same
architectures on VGG16 at every rate and on ResNet50 until a stage collapses, but not on ResNet34, whose first
stage's stream is coupled to the stem by identity shortcuts (docs/architecture.md, "One description of a network").
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor, nn

from spvr_lib import models
from spvr_lib.graph import MaskSite, Unit

__all__ = ["SpecGraph"]


class SpecGraph:
    """The units, ties, count and rebuild of a ``spvr_lib.models`` network (the interface of
    ``spvr_lib.graph.NetworkGraph``: ``units``, ``count(removed)``, ``build(removed)``, ``ignored``, plus ``ties``
    {unit: tie id}, ``fill_back`` False and :meth:`spec_of`)."""

    fill_back = False

    def __init__(self, model: nn.Module, spec: dict, example: Tensor):
        self.model, self.spec, self.example = model, spec, example
        self.layers = models.prunable_layers(model, spec)
        names = {id(m): n for n, m in model.named_modules()}
        self.units: list[Unit] = []
        for layer in self.layers:
            site = MaskSite(names[id(layer.mask_module)], "output", 1, tuple((c,) for c in range(layer.width)))
            self.units.append(Unit(name=layer.name, width=layer.width, sites=(site,), record=site,
                                   producers=(layer.name,), consumers=(),
                                   collapse="stage" if layer.tie is not None else "layer",
                                   dead=(layer.name,), out_sites={layer.name: site}))
        self.ties = {layer.name: layer.tie for layer in self.layers if layer.tie is not None}
        self.ignored: tuple[str, ...] = ()
        self._tie_width: dict[str, int] = {}
        for layer in self.layers:
            if layer.tie is not None:
                self._tie_width[layer.tie] = min(self._tie_width.get(layer.tie, layer.width), layer.width)

    def spec_of(self, removed: Sequence[np.ndarray]) -> dict:
        """The pruned spec: each layer at its kept width (a tied layer at the tie's width: kept / expansion)."""
        widths = {}
        for layer, r in zip(self.layers, removed):
            kept = int(layer.width - np.count_nonzero(r))
            widths[layer.ref] = kept if layer.tie is None else kept // (layer.width // self._tie_width[layer.tie])
        return models.with_widths(self.spec, widths)

    def count(self, removed: Sequence[np.ndarray]) -> int:
        """Parameters of the pruned spec's network (every parameter, BN and classifier included)."""
        return models.spec_params(self.spec_of(removed))

    def build(self, removed: Sequence[np.ndarray]) -> nn.Module:
        """The pruned spec's network, freshly initialised (torch's global RNG)."""
        return models.build(self.spec_of(removed))
