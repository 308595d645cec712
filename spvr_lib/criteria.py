"""Eq. 2 (SPvR's loss: 1[prediction changes] + |drop in the predicted class's probability|) and the KL
divergence it is compared with (Section 3.1.1, Appendix A)."""
from __future__ import annotations

import torch
from torch import Tensor


def _check_probs(p: Tensor, p_masked: Tensor) -> None:
    if not isinstance(p, Tensor) or not isinstance(p_masked, Tensor):
        raise ValueError(f"p and p_masked must be torch tensors, got {type(p).__name__} and {type(p_masked).__name__}")
    if p.ndim < 2:
        raise ValueError(f"p must be [n, c] softmax outputs (or [n, c, *pixels]), got shape {tuple(p.shape)}")
    if p_masked.ndim != p.ndim + 1 or tuple(p_masked.shape[1:]) != tuple(p.shape):
        raise ValueError(f"p_masked must be [g, n, c] = [g, {', '.join(map(str, p.shape))}] for p of shape "
                         f"{tuple(p.shape)}, got {tuple(p_masked.shape)}")
    if p.shape[1] < 2:
        raise ValueError(f"p must have at least 2 classes on dim 1, got shape {tuple(p.shape)}")


def spvr_loss(p: Tensor, p_masked: Tensor) -> Tensor:
    """Importance of each masked variant, the paper's Eq. 2.

    ``p``: [n, c] softmax output of the original network (or [n, c, *pixels] for segmentation,
    Section 5.5); ``p_masked``: [g, n, c] outputs of ``g`` masked networks.  Returns [g]:
    ``sum_k 1[argmax p'_k != q_k] + |p_{k,q} - p'_{k,q}|`` with ``q_k = argmax p_k``, summed over
    the n samples (and the pixels).  Ties in argmax go to the lowest class index.
    """
    _check_probs(p, p_masked)
    q = p.argmax(dim=1, keepdim=True)                                     # [n, 1, *pixels]
    p_q = p.gather(1, q)                                                  # [n, 1, *pixels]
    pm_q = p_masked.gather(2, q.unsqueeze(0).expand(p_masked.shape[0], *q.shape))
    flipped = (p_masked.argmax(dim=2, keepdim=True) != q.unsqueeze(0)).to(p_masked.dtype)
    per_sample = flipped + (p_q.unsqueeze(0) - pm_q).abs()               # Eq. 2: L = I + |f_q - f'_q|
    return per_sample.flatten(1).sum(dim=1)


def kl_loss(p: Tensor, p_masked: Tensor, eps: float = 1e-12) -> Tensor:
    """KL criterion (CURL): [g] = ``sum_k KL(p_k || p'_k)`` in nats, summed over samples (and pixels).

    Shapes as in :func:`spvr_loss`.  ``p'`` is clamped at ``eps`` so a class the masked network
    gives probability 0 yields a large finite value rather than infinity.
    """
    _check_probs(p, p_masked)
    p = p.unsqueeze(0)
    kl = torch.xlogy(p, p) - torch.xlogy(p, p_masked.clamp_min(eps).expand_as(p_masked))
    return kl.sum(dim=2).flatten(1).sum(dim=1)


CRITERIA = {"spvr": spvr_loss, "kl": kl_loss}


def _check_token_probs(p: Tensor, p_masked: Tensor) -> None:
    if not isinstance(p, Tensor) or not isinstance(p_masked, Tensor):
        raise ValueError(f"p and p_masked must be torch tensors, got {type(p).__name__} and {type(p_masked).__name__}")
    if p.ndim != 3 or p.shape[2] < 2:
        raise ValueError(f"p must be [n, seq, vocab] next-token softmax outputs (vocab >= 2), got shape "
                         f"{tuple(p.shape)}")
    if p_masked.ndim != 4 or tuple(p_masked.shape[1:]) != tuple(p.shape):
        raise ValueError(f"p_masked must be [g, n, seq, vocab] = [g, {', '.join(map(str, p.shape))}] for p of "
                         f"shape {tuple(p.shape)}, got {tuple(p_masked.shape)}")


def spvr_next_token_loss(p: Tensor, p_masked: Tensor) -> Tensor:
    """Eq. 2 for a language model, at every position: [g] = the MEAN over the n * seq positions of
    ``1[argmax p'_t != q_t] + |p_{t,q} - p'_{t,q}|``, ``q_t = argmax p_t`` (the predicted next token).

    ``p``: [n, seq, vocab] softmax over the vocabulary of the original network; ``p_masked``: [g, n, seq,
    vocab] of ``g`` masked networks.  Each position is one prediction (:func:`spvr_loss` on [n * seq, vocab]),
    divided by n * seq so that the value does not grow with the sequence length."""
    _check_token_probs(p, p_masked)
    n, s, v = p.shape
    return spvr_loss(p.reshape(n * s, v), p_masked.reshape(p_masked.shape[0], n * s, v)) / (n * s)


def kl_next_token_loss(p: Tensor, p_masked: Tensor, eps: float = 1e-12) -> Tensor:
    """The KL criterion at every position of a language model: [g] = mean over the n * seq positions of
    ``KL(p_t || p'_t)`` in nats; shapes as in :func:`spvr_next_token_loss`."""
    _check_token_probs(p, p_masked)
    n, s, v = p.shape
    return kl_loss(p.reshape(n * s, v), p_masked.reshape(p_masked.shape[0], n * s, v), eps) / (n * s)


TOKEN_CRITERIA = {"spvr_next_token": spvr_next_token_loss, "kl_next_token": kl_next_token_loss}
"""Criteria for language-model logits [n, seq, vocab] (``spvr_lib.hf.rank_token_groups``)."""
