"""Swin Transformer heads as SPvR units: torchvision's shifted-window attention with its layers called as modules
and its heads maskable one by one, and the same attention rebuilt with fewer heads (see ``spvr_lib.attention`` for
``nn.MultiheadAttention``, whose scheme this follows).

torchvision's ``ShiftedWindowAttention`` (Swin v1: ``swin_t``, ``swin_s``, ``swin_b``) hands ``qkv.weight`` and
``proj.weight`` to ``F.linear`` inside one function, which Torch-Pruning cannot follow and where no head's output
can be zeroed.  :func:`make_maskable` turns each one of a model, in place, into
:class:`MaskableShiftedWindowAttention`: a subclass with the same parameters, state dict and outputs (to float
rounding) whose forward calls ``qkv`` and ``proj`` as modules and runs the heads' concatenated output
[n * windows, window tokens, C] through an ``nn.Identity`` child ``heads`` before ``proj``, where SPvR masks and
records a head.  A head j of h (``head_dim`` hd = C / h) is qkv's rows [j hd, (j + 1) hd) of each of q, k and v,
proj's columns [j hd, (j + 1) hd) and column j of ``relative_position_bias_table`` [(2 Wh - 1)(2 Ww - 1), h].
:class:`PrunedShiftedWindowAttention` is the rebuilt attention: the kept heads, the same ``dim`` (the embedding
width is not pruned), window, shift and parameter names.  Swin v2's attention (``ShiftedWindowAttentionV2``:
cosine attention, a bias MLP) is not handled and stays refused.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.swin_transformer import ShiftedWindowAttention, _get_relative_position_bias

__all__ = ["MaskableShiftedWindowAttention", "PrunedShiftedWindowAttention", "make_maskable", "head_params",
           "swin_attention"]


def _window_attention(m: nn.Module, x: Tensor) -> Tensor:
    """torchvision's ``shifted_window_attention`` (Swin v1) for attention ``m`` (``qkv``, ``heads``, ``proj``,
    ``num_heads``, ``head_dim``, ``window_size``, ``shift_size``, dropouts, ``get_relative_position_bias()``), with
    its layers called as modules: x [B, H, W, C] -> [B, H, W, C].  The heads' width h * hd may be below C."""
    relative_position_bias = m.get_relative_position_bias()                     # [1, h, N, N]
    window_size, h, hd = m.window_size, m.num_heads, m.head_dim
    B, H, W, C = x.shape
    pad_r = (window_size[1] - W % window_size[1]) % window_size[1]
    pad_b = (window_size[0] - H % window_size[0]) % window_size[0]
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, pad_H, pad_W, _ = x.shape
    shift_size = list(m.shift_size)
    if window_size[0] >= pad_H:
        shift_size[0] = 0
    if window_size[1] >= pad_W:
        shift_size[1] = 0
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(-shift_size[0], -shift_size[1]), dims=(1, 2))
    num_windows = (pad_H // window_size[0]) * (pad_W // window_size[1])
    x = x.view(B, pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B * num_windows, window_size[0] * window_size[1], C)
    n, N = x.size(0), x.size(1)
    qkv = m.qkv(x).reshape(n, N, 3, h, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q * hd ** -0.5).matmul(k.transpose(-2, -1)) + relative_position_bias
    if sum(shift_size) > 0:
        attn_mask = x.new_zeros((pad_H, pad_W))
        h_slices = ((0, -window_size[0]), (-window_size[0], -shift_size[0]), (-shift_size[0], None))
        w_slices = ((0, -window_size[1]), (-window_size[1], -shift_size[1]), (-shift_size[1], None))
        count = 0
        for hs in h_slices:
            for ws in w_slices:
                attn_mask[hs[0]:hs[1], ws[0]:ws[1]] = count
                count += 1
        attn_mask = attn_mask.view(pad_H // window_size[0], window_size[0], pad_W // window_size[1], window_size[1])
        attn_mask = attn_mask.permute(0, 2, 1, 3).reshape(num_windows, window_size[0] * window_size[1])
        attn_mask = attn_mask.unsqueeze(1) - attn_mask.unsqueeze(2)
        attn_mask = attn_mask.masked_fill(attn_mask != 0, float(-100.0)).masked_fill(attn_mask == 0, float(0.0))
        attn = attn.view(n // num_windows, num_windows, h, N, N) + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, h, N, N)
    attn = F.dropout(F.softmax(attn, dim=-1), p=m.attention_dropout, training=m.training)
    x = m.proj(m.heads(attn.matmul(v).transpose(1, 2).reshape(n, N, h * hd)))   # heads: [n, N, h * hd]
    x = F.dropout(x, p=m.dropout, training=m.training)
    x = x.view(B, pad_H // window_size[0], pad_W // window_size[1], window_size[0], window_size[1], C)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(B, pad_H, pad_W, C)
    if sum(shift_size) > 0:
        x = torch.roll(x, shifts=(shift_size[0], shift_size[1]), dims=(1, 2))
    return x[:, :H, :W, :].contiguous()


class MaskableShiftedWindowAttention(ShiftedWindowAttention):
    """torchvision's ``ShiftedWindowAttention`` (Swin v1) with ``qkv`` and ``proj`` called as modules and the
    heads' output [n * windows, window tokens, C] (heads concatenated along the last dim) passing through the
    child ``heads`` (an ``nn.Identity``) before ``proj``: a forward hook on ``heads`` sees and may zero one head's
    slice.  Made from an existing module by :func:`make_maskable` (same parameters and state dict); outputs equal
    the parent class's to float rounding.  forward: x [B, H, W, C] -> [B, H, W, C]."""

    heads: nn.Module

    @property
    def head_dim(self) -> int:
        return self.qkv.in_features // self.num_heads

    def forward(self, x: Tensor) -> Tensor:
        return _window_attention(self, x)


def make_maskable(model: nn.Module) -> list[str]:
    """Every torchvision ``ShiftedWindowAttention`` (v1, not a subclass such as v2's) of ``model`` becomes, in
    place, a :class:`MaskableShiftedWindowAttention` (its class changes and it gains the parameter-free child
    ``heads``; parameters and state dict are untouched).  Returns the names of all maskable Swin attentions, in
    module order."""
    out = []
    for name, m in model.named_modules():
        if type(m) is ShiftedWindowAttention:
            m.__class__ = MaskableShiftedWindowAttention
            m.add_module("heads", nn.Identity())
        if type(m) is MaskableShiftedWindowAttention:
            out.append(name)
    return out


def head_params(m: nn.Module) -> Iterator[tuple[str, int, int]]:
    """(parameter name in ``m``, dim, positions per head) of every parameter of Swin attention ``m`` that loses
    positions with a head: qkv's weight and bias (dim 0, 3 hd), proj's weight (dim 1, hd) and the relative
    position bias table (dim 1, one column)."""
    hd = m.head_dim
    yield "qkv.weight", 0, 3 * hd
    if m.qkv.bias is not None:
        yield "qkv.bias", 0, 3 * hd
    yield "proj.weight", 1, hd
    yield "relative_position_bias_table", 1, 1


def swin_attention(m: nn.Module) -> bool:
    """Whether ``m`` is a Swin attention this module handles (maskable or rebuilt)."""
    return isinstance(m, (MaskableShiftedWindowAttention, PrunedShiftedWindowAttention))


class PrunedShiftedWindowAttention(nn.Module):
    """A shifted-window attention with ``num_heads`` heads of ``head_dim`` each on a ``dim``-wide residual stream
    (``num_heads * head_dim`` may be < ``dim``): torchvision's parameter names (``qkv``: Linear(dim, 3 h hd),
    ``proj``: Linear(h hd, dim), ``relative_position_bias_table`` [(2 Wh - 1)(2 Ww - 1), h], the buffer
    ``relative_position_index``) and outputs.  ``kept_heads``: which heads of the original attention it holds.
    forward: x [B, H, W, dim] -> [B, H, W, dim]."""

    def __init__(self, dim: int, window_size: Sequence[int], shift_size: Sequence[int], num_heads: int,
                 head_dim: int, qkv_bias: bool = True, proj_bias: bool = True, attention_dropout: float = 0.0,
                 dropout: float = 0.0, kept_heads: Sequence[int] | None = None):
        super().__init__()
        for arg, v in (("dim", dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg}={v!r}; expected a positive int")
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ValueError(f"window_size={window_size!r}, shift_size={shift_size!r}: expected two ints each")
        self.window_size, self.shift_size = [int(w) for w in window_size], [int(s) for s in shift_size]
        self.num_heads, self.head_dim = num_heads, head_dim
        self.attention_dropout, self.dropout = float(attention_dropout), float(dropout)
        self.kept_heads = tuple(int(j) for j in (kept_heads if kept_heads is not None else range(num_heads)))
        if len(self.kept_heads) != num_heads:
            raise ValueError(f"kept_heads={kept_heads!r} names {len(self.kept_heads)} heads; expected num_heads="
                             f"{num_heads}")
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.heads = nn.Identity()
        self.proj = nn.Linear(inner, dim, bias=proj_bias)
        self.relative_position_bias_table = nn.Parameter(
            torch.empty((2 * self.window_size[0] - 1) * (2 * self.window_size[1] - 1), num_heads))
        ShiftedWindowAttention.define_relative_position_index(self)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchvision's initialisation of the relative position bias table (truncated normal, std 0.02); the
        layers are re-initialised as layers."""
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def get_relative_position_bias(self) -> Tensor:
        return _get_relative_position_bias(self.relative_position_bias_table, self.relative_position_index,
                                           self.window_size)

    @classmethod
    def from_attention(cls, m: nn.Module, kept: Sequence[int]) -> "PrunedShiftedWindowAttention":
        """The heads ``kept`` (indices of ``m``'s heads, non-empty) of Swin attention ``m`` with their weights."""
        kept = sorted(int(j) for j in kept)
        if not kept or kept[0] < 0 or kept[-1] >= m.num_heads:
            raise ValueError(f"kept={kept}; expected a non-empty list of heads in [0, {m.num_heads})")
        hd, dim = m.head_dim, m.proj.out_features
        new = cls(dim, m.window_size, m.shift_size, len(kept), hd, qkv_bias=m.qkv.bias is not None,
                  proj_bias=m.proj.bias is not None, attention_dropout=m.attention_dropout, dropout=m.dropout,
                  kept_heads=[getattr(m, "kept_heads", range(m.num_heads))[j] for j in kept])
        w = m.proj.weight
        rows = torch.tensor([j * hd + i for j in kept for i in range(hd)], device=w.device)
        inner = m.num_heads * hd
        qkv = torch.cat([rows, rows + inner, rows + 2 * inner])
        with torch.no_grad():
            new.qkv.weight.copy_(m.qkv.weight[qkv])
            if new.qkv.bias is not None:
                new.qkv.bias.copy_(m.qkv.bias[qkv])
            new.proj.weight.copy_(w[:, rows])
            if new.proj.bias is not None:
                new.proj.bias.copy_(m.proj.bias)
            new.relative_position_bias_table.copy_(m.relative_position_bias_table[:, kept])
        return new.to(device=w.device, dtype=w.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _window_attention(self, x)
