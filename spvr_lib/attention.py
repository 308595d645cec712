"""Attention heads as SPvR units: a multi-head attention whose heads can be masked one by one, the same
attention rebuilt with fewer heads, and torch.fx traces of ``nn.TransformerEncoder`` (Section 3's units
generalised to transformers, see ``spvr_lib.graph``).

A head of ``nn.MultiheadAttention`` (``embed_dim`` E, ``num_heads`` h, ``head_dim`` = E / h) is its q, k and
v rows [j * head_dim, (j + 1) * head_dim) and the same columns of ``out_proj``.  torch computes the whole
attention in one fused call, so there is no module boundary at which one head's output could be zeroed.
:func:`make_maskable` turns every ``nn.MultiheadAttention`` of a model, in place, into
:class:`MaskableMultiheadAttention`: a subclass with the same parameters, state dict and outputs (to float
rounding) that runs the heads' concatenated output [n, L, E] (batch first) through an ``nn.Identity`` child
``heads`` before ``out_proj``; SPvR masks and records a head there.  :class:`PrunedMultiheadAttention`
is the rebuilt attention: the kept heads' q/k/v/out projections, the same ``embed_dim`` and call signature.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MaskableMultiheadAttention", "PrunedMultiheadAttention", "make_maskable", "plain_attention",
           "head_positions"]


def head_positions(m: nn.Module) -> tuple[tuple[int, ...], ...]:
    """The positions along the last dim of the heads' concatenated output that belong to each head: [h] x [hd]."""
    hd = m.head_dim
    return tuple(tuple(range(j * hd, (j + 1) * hd)) for j in range(m.num_heads))


class MaskableMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` with the heads' output [n, L, E] (batch first, heads concatenated along the
    last dim) passing through the child ``heads`` (an ``nn.Identity``) before ``out_proj``: a forward hook on
    ``heads`` sees and may zero one head's slice.  Made from an existing module by :func:`make_maskable`
    (same parameters and state dict); outputs equal the parent class's to float rounding."""

    heads: nn.Module

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        eye = torch.eye(self.embed_dim, dtype=query.dtype, device=query.device)
        # torch's own attention with an identity output projection: the heads' output, [L, n, E] or [L, E]
        heads, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, eye, None, training=self.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            use_separate_proj_weight=not self._qkv_same_embed_dim, q_proj_weight=self.q_proj_weight,
            k_proj_weight=self.k_proj_weight, v_proj_weight=self.v_proj_weight,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        heads = heads.transpose(0, 1) if batched else heads.unsqueeze(0)
        out = self.out_proj(self.heads(heads))                      # [n, L, E]
        if not batched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights


def make_maskable(model: nn.Module) -> list[str]:
    """Every ``nn.MultiheadAttention`` of ``model`` becomes, in place, a :class:`MaskableMultiheadAttention`
    (its class changes and it gains the parameter-free child ``heads``; parameters and state dict are
    untouched).  Returns the names of all maskable attentions, in module order."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            if not isinstance(m, MaskableMultiheadAttention):
                m.__class__ = MaskableMultiheadAttention
                m.add_module("heads", nn.Identity())
            out.append(name)
    return out


@contextlib.contextmanager
def plain_attention(model: nn.Module) -> Iterator[None]:
    """Inside the block every :class:`MaskableMultiheadAttention` of ``model`` runs as a plain
    ``nn.MultiheadAttention`` (Torch-Pruning's DependencyGraph knows that one)."""
    changed = [m for m in model.modules() if type(m) is MaskableMultiheadAttention]
    for m in changed:
        m.__class__ = nn.MultiheadAttention
    try:
        yield
    finally:
        for m in changed:
            m.__class__ = MaskableMultiheadAttention


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """torch's attention mask convention (bool: True = not allowed; float: added) as an additive float mask."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


class PrunedMultiheadAttention(nn.Module):
    """A multi-head attention with ``num_heads`` heads of ``head_dim`` each on an ``embed_dim`` residual
    stream (``num_heads * head_dim`` may be < ``embed_dim``): the call signature, outputs and parameter
    names of ``nn.MultiheadAttention`` (``in_proj_weight`` [3 h hd, E] or ``q/k/v_proj_weight`` [h hd, E / kdim /
    vdim], ``in_proj_bias`` [3 h hd], ``bias_k``/``bias_v`` [1, 1, h hd], ``out_proj``: Linear(h hd, E)).
    ``kept_heads``: which heads of the original attention it holds (to slice a 3-D ``attn_mask`` given for
    ``heads_before`` heads).  forward: query [L, n, E] ([n, L, E] when ``batch_first``, [L, E] unbatched),
    key/value [S, n, kdim/vdim] -> ([L, n, E], attention weights [n, L, S] or None)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, bias: bool = True, add_bias_kv: bool = False,
                 add_zero_attn: bool = False, kdim: int | None = None, vdim: int | None = None,
                 batch_first: bool = False, dropout: float = 0.0, kept_heads: Sequence[int] | None = None,
                 heads_before: int | None = None):
        super().__init__()
        for arg, v in (("embed_dim", embed_dim), ("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg}={v!r}; expected a positive int")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, head_dim
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.batch_first, self.dropout, self.add_zero_attn = batch_first, float(dropout), add_zero_attn
        self.kept_heads = tuple(int(j) for j in (kept_heads if kept_heads is not None else range(num_heads)))
        if len(self.kept_heads) != num_heads:
            raise ValueError(f"kept_heads={kept_heads!r} names {len(self.kept_heads)} heads; expected num_heads="
                             f"{num_heads}")
        self.heads_before = int(heads_before) if heads_before is not None else num_heads
        inner = num_heads * head_dim
        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * inner, embed_dim))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = nn.Parameter(torch.empty(inner, embed_dim))
            self.k_proj_weight = nn.Parameter(torch.empty(inner, self.kdim))
            self.v_proj_weight = nn.Parameter(torch.empty(inner, self.vdim))
            self.register_parameter("in_proj_weight", None)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * inner)) if bias else None
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, inner))
            self.bias_v = nn.Parameter(torch.empty(1, 1, inner))
        else:
            self.bias_k = self.bias_v = None
        self.heads = nn.Identity()
        self.out_proj = nn.Linear(inner, embed_dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.MultiheadAttention's initialisation (xavier-uniform projections, zero biases)."""
        for w in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if w is not None:
                nn.init.xavier_uniform_(w)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
        self.out_proj.reset_parameters()
        if self.out_proj.bias is not None:
            nn.init.zeros_(self.out_proj.bias)
        for b in (self.bias_k, self.bias_v):
            if b is not None:
                nn.init.xavier_normal_(b)

    @classmethod
    def from_attention(cls, m: nn.MultiheadAttention, kept: Sequence[int]) -> "PrunedMultiheadAttention":
        """The heads ``kept`` (indices of ``m``'s heads, non-empty) of ``m`` with their weights."""
        kept = sorted(int(j) for j in kept)
        if not kept or kept[0] < 0 or kept[-1] >= m.num_heads:
            raise ValueError(f"kept={kept}; expected a non-empty list of heads in [0, {m.num_heads})")
        hd, E = m.head_dim, m.embed_dim
        new = cls(E, len(kept), hd, bias=m.in_proj_bias is not None, add_bias_kv=m.bias_k is not None,
                  add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim, batch_first=m.batch_first,
                  dropout=m.dropout, kept_heads=[getattr(m, "kept_heads", range(m.num_heads))[j] for j in kept],
                  heads_before=getattr(m, "heads_before", m.num_heads))
        rows = torch.tensor([j * hd + i for j in kept for i in range(hd)], device=m.out_proj.weight.device)
        inner = m.num_heads * hd
        qkv = torch.cat([rows, rows + inner, rows + 2 * inner])
        with torch.no_grad():
            if new._qkv_same_embed_dim:
                new.in_proj_weight.copy_(m.in_proj_weight[qkv])
            else:
                for attr in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    getattr(new, attr).copy_(getattr(m, attr)[rows])
            if new.in_proj_bias is not None:
                new.in_proj_bias.copy_(m.in_proj_bias[qkv])
            if new.bias_k is not None:
                new.bias_k.copy_(m.bias_k[..., rows])
                new.bias_v.copy_(m.bias_v[..., rows])
            new.out_proj.weight.copy_(m.out_proj.weight[:, rows])
            if new.out_proj.bias is not None:
                new.out_proj.bias.copy_(m.out_proj.bias)
        return new.to(device=m.out_proj.weight.device, dtype=m.out_proj.weight.dtype)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = (t.transpose(1, 0) for t in (query, key, value))
        L, n, _ = query.shape
        h, hd = self.num_heads, self.head_dim
        inner = h * hd
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.split(inner)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = self.in_proj_bias.split(inner) if self.in_proj_bias is not None else (None, None, None)
        q, k, v = F.linear(query, wq, bq), F.linear(key, wk, bk), F.linear(value, wv, bv)   # [L|S, n, inner]
        attn_mask = _float_mask(attn_mask, q.dtype)
        key_padding_mask = _float_mask(key_padding_mask, q.dtype)
        if attn_mask is not None and attn_mask.dim() == 3:            # [n * heads_before, L, S]: our heads
            attn_mask = attn_mask.view(n, self.heads_before, *attn_mask.shape[1:])[:, list(self.kept_heads)]
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, n, inner)])
            v = torch.cat([v, self.bias_v.expand(1, n, inner)])
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        q, k, v = (t.reshape(t.shape[0], n, h, hd).permute(1, 2, 0, 3) for t in (q, k, v))   # [n, h, L|S, hd]
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(n, h, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(n, h, 1, hd)], dim=2)
            attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
            key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        causal = is_causal and key_padding_mask is None and not need_weights
        mask = None
        if not causal:
            if attn_mask is not None:
                mask = attn_mask if attn_mask.dim() == 4 else attn_mask.view(1, 1, *attn_mask.shape)
            if key_padding_mask is not None:
                kpm = key_padding_mask.view(n, 1, 1, -1)
                mask = kpm if mask is None else mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(hd)
            if mask is not None:
                scores = scores + mask
            w = torch.softmax(scores, dim=-1)
            o = F.dropout(w, p) @ v if p > 0 else w @ v
            weights = w.mean(dim=1) if average_attn_weights else w
            if not batched:
                weights = weights.squeeze(0)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        out = self.out_proj(self.heads(o.permute(0, 2, 1, 3).reshape(n, L, inner)))      # [n, L, E]
        if not batched:
            return out.squeeze(0), weights
        return (out if self.batch_first else out.transpose(0, 1)), weights


# --------------------------------------------------------------------------- torch.fx
def encoder_forward(enc: nn.TransformerEncoder, src: Tensor, mask: Tensor | None = None,
                    src_key_padding_mask: Tensor | None = None, is_causal: bool | None = None) -> Tensor:
    """``nn.TransformerEncoder.forward`` without its inference fast path (which torch.fx cannot trace):
    the layers in turn, then the norm; the same outputs."""
    out = src
    for layer in enc.layers:
        out = layer(out, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    return enc.norm(out) if enc.norm is not None else out


def encoder_layer_forward(layer: nn.TransformerEncoderLayer, src: Tensor, src_mask: Tensor | None = None,
                          src_key_padding_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
    """``nn.TransformerEncoderLayer.forward`` without its fast path: attention and feed-forward blocks, each
    a residual branch (pre- or post-norm); the same outputs."""
    x = src
    if layer.norm_first:
        x = x + layer._sa_block(layer.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        return x + layer._ff_block(layer.norm2(x))
    x = layer.norm1(x + layer._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
    return layer.norm2(x + layer._ff_block(x))
