"""Channel units: the network's units in the one network description, scored by Torch-Pruning's importances, the
exact parameter count of a cut, and the cut itself.

A *unit* is a unit of :func:`spvr_lib.graph.trace_units` (the description SPvR ranks and prunes any traced network
with): one Torch-Pruning dependency group (VainF/Torch-Pruning's ``DependencyGraph``, as the paper's Section 4.3
built its baselines on it), i.e. the output channels of one conv/linear layer together with everything coupled
to them (its BN, the next layer's input channels, and in a ResNet the whole residual stream of a stage: stem or
projection conv, every block's last conv and BN).  The final classifier's outputs are never pruned.  Units are the
same for every method.

``_Units`` keeps Torch-Pruning's groups of those units (``NetworkGraph.tp_groups``, in Torch-Pruning's order) for
the importances, counts the parameters of a cut with the description's one counter (``NetworkGraph.count``,
which equals ``models.count_params`` of the rebuilt network) and applies a cut with its rebuild
(``NetworkGraph.build``: Torch-Pruning's pruning of the removed channels, trained weights of the kept channels
kept, the model's own class).  :class:`ChannelScoreImportance` turns per-layer channel scores (the authors'
criteria of :mod:`.authors` and :mod:`.others`) into a Torch-Pruning importance summed over a unit's coupled
layers.  ``_conv_filters``: the layers whose output channels are pruned.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch_pruning as tp
from torch import Tensor, nn

from spvr_lib.graph import trace_units

__all__ = ["ChannelScoreImportance"]


# --------------------------------------------------------------------------- channel units
def _classifier_name(model: nn.Module) -> str:
    """The final classifier: the last nn.Linear (or, with none, the last nn.Conv2d) in module order."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)] or \
            [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if not names:
        raise ValueError(f"model {type(model).__name__} has no nn.Linear or nn.Conv2d layer to prune around")
    return names[-1]


class _Units:
    """The channel units of ``model`` (:func:`spvr_lib.graph.trace_units`) and how to cut them.

    ``model`` is a working copy in eval mode that is never pruned; ``example`` [1, ...] one input for
    tracing.  ``groups``: {unit: its Torch-Pruning dependency group}; ``widths``: {unit: channels};
    ``count`` and ``apply`` take {unit: channel indices to remove}.
    """

    def __init__(self, model: nn.Module, example: Tensor):
        self.model, self.example = model, example
        self.classifier = _classifier_name(model)
        self.graph = trace_units(model, example, ignored_layers=[self.classifier])
        units = {u.name: u for u in self.graph.units}
        self.groups = {n: g for n, g in self.graph.tp_groups.items() if n in units}
        self.widths = {n: len(g[0].idxs) for n, g in self.groups.items()}
        odd = [n for n in self.groups if units[n].width != self.widths[n]]
        missing = [u.name for u in self.graph.units if u.name not in self.groups]
        if odd or missing:
            raise ValueError(f"units {(odd + missing)[:3]} of {type(model).__name__} are not plain channel groups "
                             "(grouped convolution slots or attention heads): the baselines prune channels of "
                             "convolutions and linear layers only")

    def scores(self, importance: tp.importance.Importance) -> dict[str, Tensor | None]:
        """Per-channel importance [width] of every unit (None: the importance has nothing to score there)."""
        out = {}
        for name, group in self.groups.items():
            s = importance(group)
            out[name] = None if s is None else s.detach().double().cpu()
        return out

    def out_modules(self, name: str) -> list[nn.Module]:
        """The layers whose output channels make up unit ``name``."""
        return [dep.target.module for dep, _ in self.groups[name] if dep.handler in _OUT_CHANNEL_FNS]

    def _removed(self, removals: dict[str, Sequence[int]]) -> list[np.ndarray]:
        """``removals`` as the description's [width] bool masks, one per unit in its order."""
        out = []
        for u in self.graph.units:
            mask = np.zeros(u.width, dtype=bool)
            mask[np.asarray(list(removals.get(u.name, ())), dtype=np.int64)] = True
            out.append(mask)
        return out

    def count(self, removals: dict[str, Sequence[int]]) -> int:
        """count_params of the model with ``removals`` {unit: channel indices} cut (only the numbers matter)."""
        return self.graph.count(self._removed(removals))

    def apply(self, removals: dict[str, Sequence[int]]) -> nn.Module:
        """A pruned copy of the model, trained weights of the kept channels kept."""
        return self.graph.build(self._removed(removals))

    def removed_fraction(self, removals: dict[str, Sequence[int]]) -> float:
        return sum(len(v) for v in removals.values()) / sum(self.widths.values())


_OUT_CHANNEL_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_batchnorm_out_channels)


class ChannelScoreImportance(tp.importance.Importance):
    """A torch-pruning importance from precomputed per-channel scores {layer module: Tensor[out channels]}.

    The score of a dependency group is the sum, over its layers whose OUTPUT channels are pruned and that
    have scores, of those scores (mapped to the group's root channels); so a ResNet residual-stream group
    sums its coupled layers. Returns None for a group with no scored layer (left unpruned).
    """

    def __init__(self, scores: dict[nn.Module, Tensor]):
        self.scores = scores

    @torch.no_grad()
    def __call__(self, group) -> Tensor | None:
        total = None
        for i, (dep, idxs) in enumerate(group):
            s = self.scores.get(dep.target.module)
            if s is None or dep.handler not in _OUT_CHANNEL_FNS:
                continue
            if total is None:
                total = torch.zeros(len(group[0].idxs), dtype=torch.float64)
            total.index_add_(0, torch.as_tensor(group[i].root_idxs), s.double().cpu()[idxs])
        return total


def _conv_filters(work: nn.Module) -> list[nn.Module]:
    """Every Conv2d and Linear of ``work`` but the classifier (the layers whose output channels are pruned)."""
    clf = work.get_submodule(_classifier_name(work))
    return [m for m in work.modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and m is not clf]
