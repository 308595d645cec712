"""The grouping module (Section 3.2): partition a layer's neurons or filters into groups of
similar ones, so that one forward pass ranks a whole group.

``correlation_matrix`` is Eq. 3 (with Eq. 4's reduction for feature maps); ``group_neurons`` is
Algorithm 1.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["reduce_feature_maps", "correlation_matrix", "group_neurons"]


def reduce_feature_maps(S: Tensor) -> Tensor:
    """Eq. 4: [n, m, h, w] feature maps -> [n, m], the sum of |S| over the spatial positions.

    [n, m] activations are returned unchanged.
    """
    if not isinstance(S, Tensor):
        raise ValueError(f"S must be a torch tensor, got {type(S).__name__}")
    if S.ndim == 2:
        return S
    if S.ndim < 2:
        raise ValueError(f"S must be [n, m] activations or [n, m, h, w] feature maps, got shape {tuple(S.shape)}")
    return S.abs().flatten(2).sum(dim=2)


def correlation_matrix(S: Tensor) -> Tensor:
    """Eq. 3: the [m, m] Pearson correlation between the m channels of a layer's output.

    ``S``: [n, m] activations or [n, m, h, w] feature maps (first reduced by Eq. 4).  Computed in
    float64 and returned as float64; the paper's constant factor 1/n is dropped, so the diagonal
    is 1.  A channel whose output is constant over the n samples (a dead ReLU) has correlation
    0 with every other channel and 1 with itself, never NaN.
    """
    S = reduce_feature_maps(S)
    n, m = S.shape
    if n < 2:
        raise ValueError(f"S needs at least 2 samples to correlate, got n={n} (shape {tuple(S.shape)})")
    S = S.detach().to(torch.float64)
    if not torch.isfinite(S).all():
        raise ValueError("S contains NaN or infinite values")
    dead = (S.amax(dim=0) - S.amin(dim=0)) == 0                          # [m] constant channels
    S_bar = S - S.mean(dim=0, keepdim=True)                              # S - 1/n 1 1^T S
    norms = S_bar.norm(dim=0)                                            # sqrt(diag(S_bar^T S_bar))
    norms = torch.where(dead | (norms == 0), torch.ones_like(norms), norms)
    S_hat = S_bar / norms                                                # S_bar Diag(.)^(-1/2)
    S_hat[:, dead] = 0.0
    C = (S_hat.T @ S_hat).clamp_(-1.0, 1.0)                              # Eq. 3: C = S_hat^T S_hat
    C.fill_diagonal_(1.0)
    return C


def group_neurons(C: Tensor, d: int) -> list[list[int]]:
    """Algorithm 1: split ``m`` channels into groups of ``d`` using the [m, m] correlation ``C``.

    Rows are visited in index order, skipping channels already grouped; each visited row takes
    the ``d`` ungrouped columns with the highest correlation (ties to the lower index), and those
    columns leave the pool.  The last group may hold fewer than ``d`` channels.  Returns the
    groups in the order they were formed, each a sorted list of channel indices.
    """
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"group size d must be an integer >= 1, got {d!r}")
    if not isinstance(C, Tensor):
        raise ValueError(f"C must be a torch tensor, got {type(C).__name__}")
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise ValueError(f"C must be a square [m, m] correlation matrix, got shape {tuple(C.shape)}")
    C_np = C.detach().to(torch.float64).cpu().numpy()
    if np.isnan(C_np).any():
        raise ValueError("C contains NaN values")
    m = C_np.shape[0]
    ungrouped = np.ones(m, dtype=bool)
    groups: list[list[int]] = []
    for j in range(m):
        while ungrouped[j]:                        # j stays the first ungrouped row until taken
            cols = np.flatnonzero(ungrouped)
            order = np.argsort(-C_np[j, cols], kind="stable")   # stable: ties keep the lower index first
            T = np.sort(cols[order[:d]])
            ungrouped[T] = False                   # C[:, T] = -inf; Q = Q \ T
            groups.append([int(t) for t in T])
    return groups


def record_activations(model: nn.Module, x: Tensor, modules: dict[str, nn.Module], batch_size: int = 256,
                       reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """THE activation recorder: the outputs of ``modules`` ({name: submodule of ``model``}) for inputs ``x``.

    One forward pass over ``x`` in batches of ``batch_size``, in eval mode and without gradients (the
    model's mode is restored).  ``reduce`` maps each batch's output before it is kept (e.g.
    :func:`reduce_feature_maps`, Eq. 4, so a whole layer never sits in memory); the kept parts are
    concatenated along the sample axis.  Returns {name: [n, ...] tensor} on the CPU.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
    recorded: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = []
    for name, module in modules.items():
        def hook(_m: nn.Module, _i: object, out: Tensor, name: str = name) -> None:
            recorded[name].append((reduce(out) if reduce is not None else out.detach()).cpu())
        handles.append(module.register_forward_hook(hook))
    param = next(model.parameters(), None)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for xb in x.split(batch_size):     # the inputs stay where they are; chunks go to the model
                model(xb if param is None else xb.to(device=param.device, dtype=param.dtype, non_blocking=True))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: torch.cat(parts) for name, parts in recorded.items()}
