"""The original authors' ℓ1, ℓ2, FPGM and Taylor (the sensitivity table's variants), and the global selection.

- ``l1``, ``l2``, ``fpgm`` (``_filter_scores``): the raw conv filter's L1 norm (Li et al. 2016, "Pruning Filters
  for Efficient ConvNets": no official code), its L2 norm (as Torch-Pruning's MagnitudeImportance(p=2)), and
  FPGM's sum of Euclidean distances to the layer's other filters (He et al. 2019, read from
  he-y/filter-pruning-geometric-median).  Selected by the local rule of :mod:`.tp_local`.
- ``taylor``: Molchanov et al. 2019 as NVlabs/Taylor_pruning runs it (pruning_engine.py, layers/gate_layer.py,
  configs/: "method 22", a gate of weight 1 after each BN): (gate * dL/dgate)^2 = (gamma * dL/dgamma + beta *
  dL/dbeta)^2 per mini-batch, accumulated.  ``_taylor_scores`` scores once on the calibration set (what
  ``prune("taylor", ...)`` does); :class:`TaylorGates` prunes while training, as NVlabs does (the harness's
  schedule: paper.pruned_networks).
- the global selection (``_global_order``, ``_first``, ``_fit_global``): every single channel across units in
  increasing importance, removed until the parameter budget, at least one channel per unit, and CURL's floor
  (Roll920/CURL generate_index.py: a unit keeps at least ``floor_fraction`` of its channels); used by ``taylor``,
  :class:`TaylorGates` and ``curl``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from spvr_lib.baselines.common import _MethodFailure, _batches, bisect_budget
from spvr_lib.baselines.units import _OUT_CHANNEL_FNS, _Units, _conv_filters

__all__ = ["TaylorGates"]


def _filter_scores(work: nn.Module, kind: str) -> dict[nn.Module, Tensor]:
    """Per-output-channel score of every conv's raw filters: "l1" sum|W|, "l2" ||W||_2, "fpgm" the sum of
    Euclidean distances to the layer's other filters (He et al. 2019: smallest = nearest the geometric median)."""
    out = {}
    for m in _conv_filters(work):
        w = m.weight.detach().double().flatten(1)                    # [out channels, fan-in]
        if kind == "l1":
            out[m] = w.abs().sum(1)
        elif kind == "l2":
            out[m] = w.norm(dim=1)
        else:
            out[m] = torch.cdist(w, w).sum(1)
    return out


def _taylor_scores(work: nn.Module, x: Tensor, y: Tensor, batch_size: int, device,
                   progress: bool) -> dict[nn.Module, Tensor]:
    """Molchanov et al. 2019's gate criterion (NVlabs/Taylor_pruning "method 22", a gate of weight 1 after each BN):
    sum over mini-batches of (gate * dL/dgate)^2 = (gamma * dL/dgamma + beta * dL/dbeta)^2 for every BN channel.

    L is the mini-batch's mean cross-entropy (eval mode: BN running statistics).  Squared per mini-batch
    before accumulating, so gradients that cancel between batches still count.  A layer without BN is
    scored at its own output filters: (sum over the filter of w * dL/dw)^2.
    """
    gates = [m for m in work.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None]
    convs = _conv_filters(work)
    out: dict[nn.Module, Tensor] = {}
    for xb, yb in _batches(x, y, batch_size, device, "taylor", progress):
        work.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(work(xb), yb).backward()
        for bn in gates:
            gate = bn.weight.detach() * bn.weight.grad                  # # Molchanov 2019: d L / d gate ...
            if bn.bias is not None and bn.bias.grad is not None:         # ... of a gate after BN = gamma dL/dgamma
                gate = gate + bn.bias.detach() * bn.bias.grad            # + beta dL/dbeta (NVlabs "method 22")
            c = gate.double().pow(2).cpu()
            out[bn] = out.get(bn, 0) + c
        if not gates:
            for m in convs:
                c = (m.weight.detach() * m.weight.grad).flatten(1).sum(1).double().pow(2).cpu()
                out[m] = out.get(m, 0) + c
    work.zero_grad(set_to_none=True)
    return out


def _global_order(scores: dict[str, Tensor | None], widths: dict[str, int],
                  floor_fraction: float = 0.0) -> list[tuple[str, list[int]]]:
    """Every single (unit, channel) in increasing global importance, in the order they are removed.

    A channel is skipped when its unit would keep no channel, or (CURL's generate_index.py) when the unit
    already keeps less than ``floor_fraction`` of its channels: removal is allowed while kept/width >=
    floor_fraction.  Ties: unit order, then channel index."""
    candidates = []
    for u, (name, s) in enumerate(scores.items()):
        if s is not None:
            candidates.extend((float(s[c]), u, c, name) for c in range(widths[name]))
    candidates.sort(key=lambda t: t[:3])
    left = dict(widths)
    order = []
    for _, _, c, name in candidates:
        if left[name] > 1 and left[name] / widths[name] >= floor_fraction:
            left[name] -= 1
            order.append((name, [c]))
    return order


def _first(order: list[tuple[str, list[int]]], x: float) -> dict[str, list[int]]:
    removals: dict[str, list[int]] = {}
    for name, chunk in order[:math.floor(x * len(order) + 1e-12)]:
        removals.setdefault(name, []).extend(chunk)
    return removals


def _fit_global(units: "_Units", scores: dict[str, Tensor | None], budget: int,
                floor_fraction: float = 0.0) -> tuple[nn.Module, float, dict[str, list[int]]]:
    """Remove channels in global order until the pruned network fits ``budget`` (bisection on the prefix)."""
    order = _global_order(scores, units.widths, floor_fraction)
    frac, _ = bisect_budget(lambda f: units.count(_first(order, f)), budget)
    removals = _first(order, frac)
    return units.apply(removals), units.removed_fraction(removals), removals


class TaylorGates:
    """NVlabs's Taylor pruning while training (Molchanov et al. 2019, NVlabs/Taylor_pruning "method 22"): a gate of
    weight 1 after every BN of every unit (its output multiplied by the gate, 0 once pruned); each training
    mini-batch adds (gate * dL/dgate)^2 per channel, i.e. (sum over the batch and positions of dL/dout * out)^2;
    :meth:`step` masks the least important kept channels, ranked across units (a unit sums its coupled BNs, keeps
    at least one channel), until the network's parameter count meets a target, and starts the criterion afresh.

    Gates and scores are buffers of the BNs (``spvr_gate``, ``spvr_gate_score``), so a training checkpoint carries
    them.  ``model`` is trained in place with the gates on; :meth:`pruned` returns the network with the masked
    channels removed (the same function: a masked channel contributes 0).  ``example``: one input [1, ...]."""

    def __init__(self, model: nn.Module, example: Tensor):
        self.model = model
        training = model.training
        model.eval()                                 # (tracing must not move the BN statistics)
        self.units = _Units(model, example)          # the dependency graph, built before any hook
        model.train(training)
        self.points: dict[str, list[tuple[nn.Module, Tensor, Tensor]]] = {}
        for name, group in self.units.groups.items():
            pts = [(dep.target.module, torch.as_tensor(idxs), torch.as_tensor(group[i].root_idxs))
                   for i, (dep, idxs) in enumerate(group)
                   if isinstance(dep.target.module, nn.modules.batchnorm._BatchNorm)
                   and dep.handler in _OUT_CHANNEL_FNS]
            if pts:
                self.points[name] = pts
        self._hooks = []
        for bn in {bn for pts in self.points.values() for bn, _, _ in pts}:
            if not hasattr(bn, "spvr_gate"):
                bn.register_buffer("spvr_gate", torch.ones(bn.num_features, device=bn.weight.device))
                bn.register_buffer("spvr_gate_score", torch.zeros(bn.num_features, dtype=torch.float64,
                                                                  device=bn.weight.device))
            self._hooks.append(bn.register_forward_hook(self._gate))

    @staticmethod
    def _gate(bn: nn.Module, inputs: Any, out: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (out.ndim - 2)
        gated = out * bn.spvr_gate.to(out.dtype).view(shape)
        if bn.training and gated.requires_grad:
            dims = [d for d in range(out.ndim) if d != 1]
            kept = out.detach()

            def accumulate(grad: Tensor) -> None:    # # gate * dL/dgate per mini-batch, squared, accumulated
                bn.spvr_gate_score.add_((grad.float() * kept.float()).sum(dims).double().pow(2))
            gated.register_hook(accumulate)
        return gated

    def scores(self) -> dict[str, Tensor]:
        """The criterion accumulated since the last step, per unit channel [width]; masked channels -inf."""
        out = {}
        for name, pts in self.points.items():
            total = torch.zeros(self.units.widths[name], dtype=torch.float64)
            for bn, idxs, root in pts:
                total.index_add_(0, root, bn.spvr_gate_score.detach().cpu()[idxs])
            total[self.removed_mask(name)] = -math.inf
            out[name] = total
        return out

    def removed_mask(self, name: str) -> Tensor:
        bn, idxs, root = self.points[name][0]
        mask = torch.zeros(self.units.widths[name], dtype=torch.bool)
        mask[root] = bn.spvr_gate.detach().cpu()[idxs] == 0
        return mask

    def removals(self) -> dict[str, list[int]]:
        """{unit: the channels masked so far}."""
        return {n: torch.nonzero(self.removed_mask(n)).flatten().tolist() for n in self.points}

    def count(self) -> int:
        """Parameters of the network with the masked channels removed."""
        with torch.enable_grad():
            return self.units.count(self.removals())

    def step(self, target: int) -> int:
        """Mask the least important kept channels (the criterion since the last step, across units) until the
        network with them removed has at most ``target`` parameters (as close to it as one channel allows); the
        criterion then starts afresh.  Returns the parameter count.  Raises ValueError when even one channel per
        unit exceeds ``target``."""
        order = _global_order(self.scores(), self.units.widths)
        with torch.enable_grad():                    # (the parameter count traces the dependency graph)
            try:
                frac, count = bisect_budget(lambda f: self.units.count(_first(order, f)), int(target))
            except _MethodFailure as e:
                raise ValueError(f"target={target}: {e}") from None
        removals = _first(order, frac)
        with torch.no_grad():
            for name, pts in self.points.items():
                gone = torch.zeros(self.units.widths[name], dtype=torch.bool)
                gone[removals.get(name, [])] = True
                for bn, idxs, root in pts:
                    bn.spvr_gate[idxs.to(bn.spvr_gate.device)] = (~gone[root]).to(bn.spvr_gate)
            for bn, _, _ in (p for pts in self.points.values() for p in pts):
                bn.spvr_gate_score.zero_()
        return count

    def pruned(self) -> nn.Module:
        """The trained network with the masked channels removed (gates and their buffers gone): a deep copy."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        removals = self.removals()
        for bn in {bn for pts in self.points.values() for bn, _, _ in pts}:
            for buf in ("spvr_gate", "spvr_gate_score"):
                if hasattr(bn, buf):
                    delattr(bn, buf)
        with torch.enable_grad():
            return self.units.apply(removals)
