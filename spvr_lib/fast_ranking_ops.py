"""The pieces of the fast ranking engine (:mod:`spvr_lib.fast_ranking`): the traced graph's tracer, what a masked
group's partial result is (a patch of channels, a dense tensor), the per-channel ops it passes through unchanged,
and the small tensor helpers (gather, variants, a conv on a channel delta, a BN as an affine map)."""
from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from spvr_lib.graph import MaskSite

_FORMAT = torch.channels_last  # memory format of the fast path's feature maps (faster convs on CPU)



def to_model(model: nn.Module, x: Tensor) -> Tensor:
    """A chunk of calibration inputs on the model's device and in its floating dtype (the calibration set
    itself stays where it is, the CPU by default: only chunks are streamed to the device)."""
    param = next(model.parameters(), None)
    if param is None:
        return x
    return x.to(device=param.device, dtype=param.dtype if param.is_floating_point() else x.dtype,
                non_blocking=True)


def _positions(site: MaskSite, group: Sequence[int]) -> list[int]:
    return [i for c in group for i in site.index[c]]


# =============================================================================================
# The fast path: exact, for any model torch.fx can trace.
#
# ``_FastRanker`` traces the model (standard torch.nn modules and every masked module are leaves),
# runs the graph once per chunk of n calibration samples keeping every node's value, and for a
# batch of g groups of a unit re-runs only the nodes downstream of the unit's earliest mask site,
# the g masked variants stacked along the batch dimension ([g * n, ...]); nodes the mask does not
# reach keep their cached values.  A masked value travels as a ``_Patch`` ("the cached value, except
# on the group's channels") through per-channel ops (activations, BN in eval mode, pooling,
# depthwise convs, flatten, permute, adds and cats) without touching the other channels; at a
# Conv2d / Linear, by linearity, conv(a') = conv(a) + conv_{W[:, G]}(a'[G] - a[G]) (no bias): the
# cached output plus a cheap partial conv on |G| input channels (a grouped conv for all g groups;
# a following eval BN is folded in).  Everything else runs on the stacked variants (``_Dense``).
# =============================================================================================
class _Unsupported(Exception):
    """The fast path cannot run this model (the reason is the message)."""


@dataclass
class _Patch:
    """Variant j equals ``base`` [n, ...] except at positions ``idx[j]`` [k] along ``dim`` (>= 1), which
    hold ``patch[j]``; ``patch``: [g, n, ...] with size k at dim + 1."""
    base: Tensor
    dim: int
    idx: Tensor
    patch: Tensor


@dataclass
class _Dense:
    """The g variants stacked variant-major: [g * n, ...]."""
    t: Tensor


@dataclass
class _Raw:
    """A recomputed non-batched value (an int, a shape, a tuple of tensors), used as it is."""
    v: object


_POINTWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                      nn.LeakyReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d, nn.Dropout1d,
                      nn.AlphaDropout)


_POINTWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, torch.sigmoid,
                        F.sigmoid, torch.tanh, F.dropout, F.leaky_relu, F.elu, F.mish}


_POINTWISE_METHODS = {"relu", "sigmoid", "tanh"}


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d,
          nn.AdaptiveAvgPool1d)


_POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d, F.adaptive_max_pool2d}


_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
            operator.itruediv: operator.truediv}


_ADD = {operator.add, torch.add, operator.sub, torch.sub}


_MUL = {operator.mul, torch.mul}


@contextlib.contextmanager
def _kept_heap() -> Iterator[None]:
    """glibc malloc keeps freed memory for reuse inside the block (CPU tensors are plain malloc blocks).

    The fast path allocates and frees the same few MiB-sized stacks thousands of times; by default glibc
    serves blocks above its (dynamic) mmap threshold by mmap and trims the heap top past 2x that, so most of
    them are page-faulted afresh (ResNet50 at cpu scale: ~300k minor faults, 0.55 s of system time and
    slower user time, out of ~5.5 s).  Inside the block: blocks up to 32 MiB from the heap, no trimming;
    after it, the thresholds glibc's dynamic rule settles at after freeing big blocks (mallopt turns that
    rule off) and a trim that gives the memory back.  A no-op without glibc."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
        mallopt, trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        yield
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, (1 << 31) - 1)
    try:
        yield
    finally:
        if ok:
            mallopt(m_mmap_threshold, 32 << 20)       # where glibc's dynamic threshold settles after big frees
            mallopt(m_trim_threshold, 64 << 20)
            trim(0)


@contextlib.contextmanager
def _no_inplace(model: nn.Module) -> Iterator[None]:
    """Modules with ``inplace=True`` (e.g. ReLU) run out of place, so cached values stay intact."""
    changed = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in changed:
        m.inplace = False
    try:
        yield
    finally:
        for m in changed:
            m.inplace = True


def _variants(t: Tensor, g: int) -> Tensor:
    """[g, *t.shape]: g copies of ``t``, a view of a fresh [g * n, ...] tensor in ``t``'s memory format
    (``.flatten(0, 1)`` gives it back without a copy; safe to modify in place)."""
    fmt = _FORMAT if t.ndim == 4 and t.is_contiguous(memory_format=_FORMAT) else torch.contiguous_format
    flat = torch.empty((g * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=fmt)
    view = flat.view(g, *t.shape)
    view.copy_(t.unsqueeze(0).expand_as(view))
    return view


def _index(idx: Tensor, shape: Sequence[int], dim: int) -> Tensor:
    """``idx`` [g, k] broadcast to ``shape`` ([g, n, ...] with size k at dim + 1), for gather / scatter."""
    view = [1] * len(shape)
    view[0], view[dim + 1] = idx.shape[0], idx.shape[1]
    return idx.view(view).expand(*shape)


def _gather(base: Tensor, dim: int, idx: Tensor) -> Tensor:
    """[g, n, ...]: ``base``'s positions ``idx[j]`` along ``dim`` for each variant j."""
    shape = [idx.shape[0], *base.shape]
    shape[dim + 1] = idx.shape[1]
    return base.unsqueeze(0).expand(idx.shape[0], *base.shape).gather(dim + 1, _index(idx, shape, dim))


def _materialize(p: _Patch) -> Tensor:
    """[g * n, ...]: the variants of a patch, written out."""
    out = _variants(p.base, p.idx.shape[0])
    out.scatter_(p.dim + 1, _index(p.idx, p.patch.shape, p.dim), p.patch.to(out.dtype))
    return out.flatten(0, 1)


def _channel_view(v: Tensor, dim: int, ndim: int) -> Tensor:
    """A per-channel vector [g, k] shaped to broadcast against a patch [g, n, ...] (channels at dim + 1)."""
    shape = [1] * (ndim + 1)
    shape[0], shape[dim + 1] = v.shape[0], v.shape[1]
    return v.view(shape)


def _conv_partial(conv: nn.Conv2d, weight: Tensor, delta: Tensor, idx: Tensor) -> Tensor:
    """[g, n, out, H', W']: conv_{weight[:, idx[j]]}(delta[j]) (no bias) for each variant j, as ONE grouped
    conv (a block-diagonal weight); ``delta`` [g, n, k, H, W]."""
    g, n, k = delta.shape[:3]
    w = weight[:, idx].transpose(0, 1).reshape(g * weight.shape[0], k, *weight.shape[2:])
    inp = delta.transpose(0, 1).reshape(n, g * k, *delta.shape[3:]).contiguous(memory_format=_FORMAT)
    y = F.conv2d(inp, w.contiguous(memory_format=_FORMAT), None, conv.stride, conv.padding, conv.dilation, groups=g)
    return y.view(n, g, weight.shape[0], *y.shape[2:]).transpose(0, 1)


def _bn_affine(bn: nn.Module) -> tuple[Tensor, Tensor]:
    """Eval-mode batch norm as a per-channel affine map: (scale, shift) [C]."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _eval_bn(m: nn.Module) -> bool:
    return (isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and not m.training and m.running_mean is not None
            and m.running_var is not None)
