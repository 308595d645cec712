"""Channel units: torch-pruning's dependency groups, the parameter count of a cut, and the cut itself.

A *unit* is one torch-pruning dependency group (VainF/Torch-Pruning's ``DependencyGraph``, as the paper's
Section 4.3 built its baselines on it): the output channels of one conv/linear layer together with everything
coupled to them (its BN, the next layer's input channels, and in a ResNet the whole residual stream of a stage:
stem or projection conv, every block's last conv and BN).  The final classifier's outputs are never pruned.
Units are the same for every method.

``_Units`` builds them, scores them with a torch-pruning importance, counts the parameters of a cut on a meta-device
copy (no weights allocated; ``models.count_params``, memoised by the units' widths) and applies a cut to a real
copy, trained weights of the kept channels kept.  :class:`ChannelScoreImportance` turns per-layer channel scores
(the authors' criteria of :mod:`.authors` and :mod:`.others`) into a torch-pruning importance summed over a
unit's coupled layers.  ``_conv_filters``: the layers whose output channels are pruned.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch_pruning as tp
from torch import Tensor, nn

from spvr_lib import models

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
    """The channel units (torch-pruning dependency groups) of ``model`` and how to cut them.

    ``model`` is a working copy in eval mode that is never pruned; ``example`` [1, ...] one input for
    tracing. ``count`` prunes a meta-device copy (no weights allocated), memoised by the units' widths;
    ``apply`` prunes a real deep copy.
    """

    def __init__(self, model: nn.Module, example: Tensor):
        self.model, self.example = model, example
        self.classifier = _classifier_name(model)
        self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        names = {m: n for n, m in model.named_modules()}
        clf = model.get_submodule(self.classifier)
        self.groups = {names[g[0].dep.target.module]: g for g in self.dg.get_all_groups(
            ignored_layers=[clf], root_module_types=[nn.Conv2d, nn.Linear])}
        self.widths = {n: len(g[0].idxs) for n, g in self.groups.items()}
        self._meta = copy.deepcopy(model).to("meta")
        self._counts: dict[tuple, int] = {}

    def scores(self, importance: tp.importance.Importance) -> dict[str, Tensor | None]:
        """Per-channel importance [width] of every unit (None: the importance has nothing to score there)."""
        out = {}
        for name, group in self.groups.items():
            s = importance(group)
            out[name] = None if s is None else s.detach().double().cpu()
        return out

    def out_modules(self, name: str) -> list[nn.Module]:
        """The layers whose output channels make up unit ``name``."""
        return [dep.target.module for dep, _ in self.groups[name] if self.dg.is_out_channel_pruning_fn(dep.handler)]

    @staticmethod
    def _cut(model: nn.Module, example: Tensor, removals: dict[str, Sequence[int]]) -> nn.Module:
        dg = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        for name, idxs in removals.items():
            if len(idxs):
                root = model.get_submodule(name)
                dg.get_pruning_group(root, dg.get_pruner_of_module(root).prune_out_channels,
                                     sorted(int(i) for i in idxs)).prune()
        return model

    def count(self, removals: dict[str, Sequence[int]]) -> int:
        """count_params of the model with ``removals`` {unit: channel indices} cut (only the numbers matter)."""
        key = tuple(len(removals.get(n, ())) for n in self.groups)
        if key not in self._counts:
            meta = copy.deepcopy(self._meta)
            plan = {n: range(len(removals.get(n, ()))) for n in self.groups}
            self._counts[key] = models.count_params(self._cut(meta, self.example.to("meta"), plan))
        return self._counts[key]

    def apply(self, removals: dict[str, Sequence[int]]) -> nn.Module:
        """A pruned deep copy of the model, trained weights of the kept channels kept."""
        return self._cut(copy.deepcopy(self.model), self.example, removals)

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
