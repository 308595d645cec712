"""Table 1's HRank, NISP, CURL and RCP: the criteria and selections of their authors.

- HRank (Lin et al. 2020, read from lmbxmu/HRank rank_generation.py): ``_produced_maps``, ``_hrank_scores``, the
  average matrix rank of the feature map the network produces for a channel.  Local selection (:mod:`.tp_local`).
- NISP (Yu et al. 2018, paper only: no official code): :func:`inf_fs` (unsupervised Inf-FS, Roffo et al. 2015) of
  the final response layer, propagated back through |W| (``_abs_weight``) and each BN's |gamma / sigma|
  (``_bn_scale``) by ``_nisp_scores``.  Local selection.
- CURL (Luo and Wu 2020, read from Roll920/CURL generate_mask.py and generate_index.py): ``_unit_mask_points``,
  ``_curl_scores``, KL(p_masked || p) of masking each channel; global selection with CURL's 30% floor, lowered
  through ``_CURL_FLOORS`` where it cannot reach the budget (:mod:`.authors`'s ``_fit_global``).
- RCP (Li et al. 2022, Revisiting Random Channel Pruning, paper): ``_rcp_removals``, random per-unit keep fractions
  scaled to the budget, channels kept by filter L1 norm; ``_adaptive_bn_accuracy``, the cheap proxy that ranks the
  candidates when no brief training is given (EagleEye-style adaptive BN).

OTOv2 (Chen et al. 2023, tianyic/only_train_once) cannot run here: :data:`.catalogue.OTOV2_UNAVAILABLE`.
"""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import Tensor, nn
from tqdm.auto import tqdm

from spvr_lib import models
from spvr_lib.baselines.common import _MethodFailure, _batches
from spvr_lib.baselines.units import _Units

__all__ = ["inf_fs"]


_CURL_FLOORS = (0.2, 0.1, 0.05, 0.0)      # tried in turn when CURL's floor cannot reach the budget


def _produced_maps(work: nn.Module) -> dict[nn.Module, tuple[nn.Module, bool]]:
    """{BN (or conv) module: (module whose output HRank ranks, apply ReLU first)}: the feature map the network
    produces for that layer's channels.  The last BN of a residual block is represented by the block's output
    (after the ReLU that follows the addition); its projection BN is left to the block's last BN (same map);
    any other BN by ReLU(BN output); in a model without BN, every conv by its output."""
    bns = [m for m in work.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        return {m: (m, False) for m in work.modules() if isinstance(m, nn.Conv2d)}
    out: dict[nn.Module, tuple[nn.Module, bool]] = {bn: (bn, True) for bn in bns}
    for block in work.modules():
        if isinstance(block, (models.BasicBlock, models.Bottleneck)):
            last = block.bn3 if isinstance(block, models.Bottleneck) else block.bn2
            out[last] = (block, False)
            if block.downsample is not None:
                out.pop(block.downsample[1], None)
    return out


def _hrank_scores(work: nn.Module, x: Tensor, y: Tensor, batch_size: int, device,
                  progress: bool) -> dict[nn.Module, Tensor]:
    """HRank: mean matrix rank of each channel's produced feature map [H, W] over the calibration images,
    keyed by the BN (or conv) whose channels it scores (see :func:`_produced_maps`)."""
    produced = _produced_maps(work)
    if not produced:
        raise _MethodFailure("HRank ranks conv feature maps; the model has no Conv2d layer")
    sums: dict[nn.Module, Tensor] = {}
    handles = []
    for layer, (source, relu) in produced.items():
        def hook(module, inputs, out, layer=layer, relu=relu):
            fm = out.relu() if relu else out
            sums[layer] = sums.get(layer, 0) + torch.linalg.matrix_rank(fm.float()).sum(0).double().cpu()
        handles.append(source.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for xb, _ in _batches(x, y, batch_size, device, "hrank", progress):
                work(xb)
    finally:
        for h in handles:
            h.remove()
    return {m: s / x.shape[0] for m, s in sums.items()}


def inf_fs(features: Tensor, alpha: float = 0.5) -> Tensor:
    """Unsupervised Inf-FS (Roffo et al. 2015) feature scores, the NISP paper's ranking of its final layer.

    features: [n, F] (n >= 2 samples). A_ij = alpha * sigma_ij + (1 - alpha) * (1 - |Spearman rho_ij|) with
    sigma_ij = max(std_i, std_j) min-max normalised; scores = (I - r A)^-1 1 with r = 0.9 / lambda_max(A)
    (the energy of all paths through each feature). Returns [F], higher = more important.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be [n, F] with n >= 2, got shape {tuple(features.shape)}")
    f = features.double()
    std = f.std(dim=0)
    sigma = torch.maximum(std[:, None], std[None, :])
    span = sigma.max() - sigma.min()
    sigma = (sigma - sigma.min()) / span if span > 0 else torch.zeros_like(sigma)
    ranks = f.argsort(dim=0).argsort(dim=0).double()
    ranks = ranks - ranks.mean(dim=0)
    norm = ranks.norm(dim=0)
    rho = (ranks.T @ ranks) / (norm[:, None] * norm[None, :])
    rho = torch.nan_to_num(rho, nan=0.0)                 # a constant feature correlates with nothing
    a = alpha * sigma + (1 - alpha) * (1 - rho.abs())
    lam = torch.linalg.eigvalsh(a).max()
    if lam <= 0:
        return torch.ones(f.shape[1], dtype=torch.float64)
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    return torch.linalg.solve(eye - (0.9 / lam) * a, torch.ones(a.shape[0], 1, dtype=torch.float64))[:, 0]


def _abs_weight(layer: nn.Module) -> Tensor:
    """|W| as [out, in]: a conv's kernel summed over its spatial positions."""
    w = layer.weight.detach().double().abs()
    return w.flatten(2).sum(2) if w.ndim > 2 else w


def _bn_scale(bn: nn.BatchNorm2d) -> Tensor:
    scale = torch.ones(bn.num_features, dtype=torch.float64, device=bn.running_var.device) \
        if bn.weight is None else bn.weight.detach().double()
    return (scale / (bn.running_var.double() + bn.eps).sqrt()).abs()


def _nisp_scores(work: nn.Module, x: Tensor, y: Tensor, batch_size: int, device,
                 progress: bool) -> dict[nn.Module, Tensor]:
    """NISP importance of every conv's (and hidden linear's) output channels; see NOTES['nisp']."""
    if not isinstance(work, (models.VGG, models.ResNet)):
        raise _MethodFailure(f"NISP back-propagation is implemented for spvr_lib VGG and ResNet models, "
                             f"got {type(work).__name__}")
    if x.shape[0] < 2:
        raise _MethodFailure("NISP's Inf-FS needs at least 2 calibration samples")
    linears = [m for m in work.modules() if isinstance(m, nn.Linear)]
    frl = []
    handle = linears[-1].register_forward_pre_hook(lambda m, inp: frl.append(inp[0].detach().flatten(1).cpu()))
    try:
        with torch.no_grad():
            for xb, _ in _batches(x, y, batch_size, device, "nisp", progress):
                work(xb)
    finally:
        handle.remove()
    s = inf_fs(torch.cat(frl)).to(device)
    scores: dict[nn.Module, Tensor] = {}
    for lin in reversed(linears[:-1]):                      # VGG "imagenet" head: hidden linears
        scores[lin] = s
        s = _abs_weight(lin).T @ s

    def chain(pairs, s):                                   # [(conv, bn), ...] in forward order
        for conv, bn in reversed(pairs):
            scores[conv] = s
            s = _abs_weight(conv).T @ (s * _bn_scale(bn))
        return s

    if isinstance(work, models.VGG):
        blocks = [b for b in work.features if isinstance(b, nn.Sequential)]
        s = s.view(blocks[-1][0].out_channels, -1).sum(1)  # flattened pooled map -> channels
        chain([(b[0], b[1]) for b in blocks], s)
        return scores
    for name in reversed(work.stage_names):
        for block in reversed(getattr(work, name)):
            k = 3 if isinstance(block, models.Bottleneck) else 2
            pairs = [(getattr(block, f"conv{i}"), getattr(block, f"bn{i}")) for i in range(1, k + 1)]
            if block.downsample is None:
                shortcut = s
            else:
                scores[block.downsample[0]] = s
                shortcut = _abs_weight(block.downsample[0]).T @ (s * _bn_scale(block.downsample[1]))
            s = chain(pairs, s) + shortcut
    scores[work.conv1] = s
    return scores


def _unit_mask_points(units: "_Units", name: str) -> list[tuple[nn.Module, Tensor, Tensor]]:
    """Where CURL masks unit ``name``: (module, its channel indices, the unit channels they belong to) for
    every BN among the unit's coupled layers (for a residual stream: the stem or projection BN and the
    last BN of every block of the stage); the conv/linear outputs when the unit has no BN."""
    group = units.groups[name]
    points = []
    for i, (dep, idxs) in enumerate(group):
        if dep.handler == tp.prune_batchnorm_out_channels:
            points.append((dep.target.module, torch.as_tensor(idxs), torch.as_tensor(group[i].root_idxs)))
    if not points:
        for i, (dep, idxs) in enumerate(group):
            if dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels):
                points.append((dep.target.module, torch.as_tensor(idxs), torch.as_tensor(group[i].root_idxs)))
    return points


@torch.no_grad()
def _curl_scores(work: nn.Module, units: "_Units", x: Tensor, batch_size: int,
                 progress: bool) -> dict[str, Tensor]:
    """{unit: [width] KL(p_masked || p) of masking each single channel}, CURL's generate_mask.py.

    A channel is masked by zeroing it at every mask point of its unit at once (gamma = beta = 0 in each
    coupled BN zeroes that BN's output channel); KL is averaged over the calibration samples.  Several
    masked variants share one batched forward pass (the outputs are the same as one pass per channel).
    """
    device = next(work.parameters()).device
    n = x.shape[0]
    logp = torch.cat([torch.log_softmax(work(xb.to(device)).double(), 1) for xb in x.split(batch_size)])
    variants = max(1, batch_size // max(1, min(n, batch_size)))       # masked copies per forward pass
    scores: dict[str, Tensor] = {}
    names = list(units.groups)
    for name in tqdm(names, desc="curl", disable=not progress, leave=False):
        points = _unit_mask_points(units, name)
        width = units.widths[name]
        kl = torch.zeros(width, dtype=torch.float64)
        current: dict[nn.Module, Tensor] = {}

        def hook(module, inputs, out):
            m = current[module]                                       # [rows, C] of 0/1
            return out * m.view(*m.shape, *([1] * (out.ndim - 2))).to(out.dtype)

        handles = [module.register_forward_hook(hook) for module, _, _ in points]
        try:
            for start in range(0, width, variants):
                chans = list(range(start, min(start + variants, width)))
                for xb_start in range(0, n, batch_size):
                    xb = x[xb_start:xb_start + batch_size].to(device)
                    nb = xb.shape[0]
                    for module, idxs, roots in points:
                        m = torch.ones(len(chans), module.num_features if isinstance(module, nn.BatchNorm2d)
                                       else module.weight.shape[0], device=device)
                        for v, c in enumerate(chans):
                            m[v, idxs[roots == c]] = 0
                        current[module] = m.repeat_interleave(nb, 0)
                    logq = torch.log_softmax(work(xb.repeat(len(chans), *([1] * (xb.ndim - 1)))).double(), 1)
                    logq = logq.view(len(chans), nb, -1)
                    ref = logp[xb_start:xb_start + nb].unsqueeze(0)
                    kl[chans] += (logq.exp() * (logq - ref)).sum(2).sum(1).cpu()
        finally:
            for h in handles:
                h.remove()
        scores[name] = kl / n
    return scores


def _rcp_removals(scores: dict[str, Tensor], widths: dict[str, int], fractions: dict[str, float],
                  x: float, group_size: int) -> dict[str, list[int]]:
    """Keep int(C * min(1, u * m)) channels per unit (m = (1 - x) / min u; rounded down to a group; at least
    one group), the highest-L1 ones."""
    m = (1 - x) / min(fractions.values())
    out = {}
    for name, s in scores.items():
        width = widths[name]
        keep = int(width * min(1.0, fractions[name] * m))
        if keep < width:
            keep -= keep % group_size
        keep = max(keep, min(group_size, width))
        out[name] = torch.argsort(s, stable=True)[:width - keep].tolist()
    return out


def _adaptive_bn_accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device) -> float:
    """Accuracy on (x, y) after re-estimating every BN's running statistics on x (cumulative average)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for xb, _ in _batches(x, y, batch_size, device, "", False):
            model(xb)
        model.eval()
        correct = sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in _batches(x, y, batch_size, device, "",
                                                                                        False))
    return correct / x.shape[0]
