"""Hugging Face transformers in the graph engine (duck-typed: spvr_lib never imports ``transformers``).

A model built the Hugging Face way (a ``config`` with a ``model_type``) takes integer token ids [n, seq] and
returns a ModelOutput whose ``logits`` are [n, classes] (a sequence classifier) or [n, seq, vocab] (a language
model).  Two block families are recognised by their attributes:

* BERT-style (BERT, RoBERTa, ...): a self-attention with ``query``/``key``/``value`` Linear layers and
  ``num_attention_heads``/``attention_head_size``, whose output projection is the sibling ``output.dense``;
  the MLP is ``intermediate.dense`` -> ``output.dense`` (post-norm: the LayerNorm after the residual sum stays);
* GPT-2-style: an attention with a fused ``c_attn`` (q, k, v in one Conv1D, weight [E, 3 E]) and ``c_proj``,
  ``num_heads``/``head_dim``/``split_size``; the MLP is ``mlp.c_fc`` -> ``mlp.c_proj`` (pre-norm: ``ln_1``
  and ``ln_2`` only feed their branch and go with it).

Units, as for ``nn.MultiheadAttention`` (``spvr_lib.graph``): an attention's heads (channel j = head j, masked
at the input of its output projection, positions [j hd, (j + 1) hd) of the last dim) and an MLP's hidden
neurons (masked at the input of its second layer); and, unlike ``nn.MultiheadAttention`` networks, the
residual stream (the embedding width E: every embedding's columns, every LayerNorm, every projection's rows or
columns along it, a tied output layer), without which these models, whose token embedding alone is about half
of their parameters, could not reach a 50% budget.  The stream is masked at every output written into it and
at every LayerNorm output (so it is zero wherever it is read); removing it also changes the LayerNorms'
statistics, which masking does not reproduce (heads and neurons: masking is exactly removal).  A unit that loses
everything is a "branch" collapse: its modules are replaced by parameter-free :class:`ZeroBranch` modules (the
residual sum adds zero: exactly the network without the branch).  The pruned network is a copy of the model
itself (same class, call signature and outputs), the kept heads and neurons sliced with their weights.

Ranking: the frozen ranking path feeds float inputs and expects one tensor of class scores, so a token model
is ranked by :func:`rank_token_groups` (Eq. 2 per sample, or per position for a language model:
``criteria.spvr_next_token_loss``), whose result ``spvr_prune(..., ranking=...)`` takes.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from spvr_lib.criteria import CRITERIA, TOKEN_CRITERIA
from spvr_lib.graph import MaskSite, NetworkGraph, Unit, _Param, _ParamDim
from spvr_lib.grouping import correlation_matrix, group_neurons, reduce_feature_maps

__all__ = ["is_hf_model", "logits_of", "token_example", "transformer_parts", "trace_token_units", "TokenGraph",
           "ZeroBranch", "rank_token_groups", "token_groups"]


# --------------------------------------------------------------------------- inputs and outputs
def is_hf_model(model: nn.Module) -> bool:
    """A model built the Hugging Face way: a ``config`` carrying a ``model_type``."""
    return isinstance(getattr(getattr(model, "config", None), "model_type", None), str)


def logits_of(out) -> Tensor | None:
    """The class scores of a model's output: the tensor itself, a ModelOutput's / dict's ``logits``, or the
    first tensor of a tuple; None when there is none."""
    if isinstance(out, Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, Mapping):
        if isinstance(out.get("logits"), Tensor):
            return out["logits"]
        out = tuple(out.values())
    if isinstance(out, (tuple, list)):
        return next((t for t in out if isinstance(t, Tensor)), None)
    return None


def token_example(model: nn.Module, example: Tensor) -> Tensor:
    """``example`` as token ids (int64) when the model reads token ids: it holds an ``nn.Embedding`` and the
    example is a float tensor of non-negative integers (the graph engine receives the calibration sample cast
    to the model's dtype); otherwise ``example`` unchanged."""
    if not example.is_floating_point() or not any(isinstance(m, nn.Embedding) for m in model.modules()):
        return example
    if example.numel() and bool((example >= 0).all()) and torch.equal(example, example.round()):
        return example.long()
    return example


# --------------------------------------------------------------------------- recognising the blocks
def _is_conv1d(m: nn.Module) -> bool:
    """Hugging Face's Conv1D (GPT-2): a linear layer whose weight is [in (nx), out (nf)]."""
    w = getattr(m, "weight", None)
    return isinstance(w, nn.Parameter) and hasattr(m, "nf") and hasattr(m, "nx") and tuple(w.shape) == (m.nx, m.nf)


def _is_dense(m: nn.Module | None) -> bool:
    return isinstance(m, nn.Linear) or (m is not None and _is_conv1d(m))


@dataclass
class _Part:
    """One prunable part of a block: an attention's heads ("heads") or an MLP's hidden neurons ("mlp").
    ``rows``: the layers whose OUTPUT features are the unit's ([(name, per channel)]), ``out``: the projection
    whose INPUT they are; ``attn``: the attention module (its head attributes change); ``replace``: what a
    collapse replaces ([(module name, output width or None for nn.Identity)]); ``dead``: the modules whose
    parameters vanish with it."""

    kind: str
    name: str
    layout: str
    width: int
    per: int
    rows: tuple[str, ...]
    out: str
    attn: str | None
    replace: tuple[tuple[str, int | None], ...]
    dead: tuple[str, ...]


def transformer_parts(model: nn.Module, ignored_layers: Sequence[str] = ()) -> list[_Part] | None:
    """The attentions and MLPs of a Hugging Face model, in module order (None for any other model).  A module
    named in ``ignored_layers`` (an attention, its output projection or an MLP layer) is left whole.  Raises a
    ValueError naming the first attention it does not know (a class whose name holds "Attention" outside a
    recognised one) and what to try."""
    if not is_hf_model(model):
        return None
    modules = dict(model.named_modules())
    ignored = set(ignored_layers)
    parts: list[_Part] = []
    known: set[str] = set()
    for name, m in modules.items():
        parent_name = name.rpartition(".")[0]
        parent = modules.get(parent_name) if name else None
        if all(isinstance(getattr(m, a, None), nn.Linear) for a in ("query", "key", "value")) \
                and isinstance(getattr(m, "num_attention_heads", None), int) \
                and isinstance(getattr(m, "attention_head_size", None), int) and parent is not None \
                and getattr(parent, "self", None) is m and isinstance(getattr(getattr(parent, "output", None), "dense", None), nn.Linear):
            out = f"{parent_name}.output.dense"
            known.add(name)
            if not ignored & {name, out}:
                E = modules[out].out_features
                parts.append(_Part("heads", name, "bert", m.num_attention_heads, m.attention_head_size,
                                   (f"{name}.query", f"{name}.key", f"{name}.value"), out, name,
                                   ((name, 0), (out, E)), (name, out)))
        elif _is_dense(getattr(m, "c_attn", None)) and _is_dense(getattr(m, "c_proj", None)) \
                and isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "head_dim", None), int) \
                and isinstance(getattr(m, "split_size", None), int) and not hasattr(m, "q_attn") \
                and parent is not None and getattr(parent, "attn", None) is m \
                and isinstance(getattr(parent, "ln_1", None), nn.LayerNorm):
            known.add(name)
            out = f"{name}.c_proj"
            if not ignored & {name, out, f"{name}.c_attn"}:
                ln = f"{parent_name}.ln_1"
                parts.append(_Part("heads", name, "gpt2", m.num_heads, m.head_dim, (f"{name}.c_attn",), out, name,
                                   ((name, m.c_proj.nf), (ln, None)), (ln, name)))
        elif isinstance(getattr(getattr(m, "intermediate", None), "dense", None), nn.Linear) \
                and isinstance(getattr(getattr(m, "output", None), "dense", None), nn.Linear) \
                and isinstance(getattr(m.output, "LayerNorm", None), nn.LayerNorm):
            first, out = f"{name}.intermediate.dense", f"{name}.output.dense"
            if not ignored & {first, out}:
                parts.append(_Part("mlp", first, "bert", m.intermediate.dense.out_features, 1, (first,), out, None,
                                   ((f"{name}.intermediate", 0), (out, m.output.dense.out_features)),
                                   (f"{name}.intermediate", out)))
        elif _is_dense(getattr(m, "c_fc", None)) and _is_dense(getattr(m, "c_proj", None)) and parent is not None \
                and getattr(parent, "mlp", None) is m and isinstance(getattr(parent, "ln_2", None), nn.LayerNorm):
            first, out = f"{name}.c_fc", f"{name}.c_proj"
            if not ignored & {first, out, name}:
                ln = f"{parent_name}.ln_2"
                parts.append(_Part("mlp", first, "gpt2", m.c_fc.nf, 1, (first,), out, None,
                                   ((name, m.c_proj.nf), (ln, None)), (ln, name)))
    position = {n: i for i, n in enumerate(modules)}
    parts.sort(key=lambda p: position[p.name])
    for name, m in modules.items():
        if "Attention" in type(m).__name__ and name not in ignored and not any(
                name == k or name.startswith(k + ".") or k.startswith(name + ".") for k in known):
            raise ValueError(
                f"model ({type(model).__name__}) cannot be pruned by SPvR's graph engine: it stopped at module "
                f"{name!r} ({type(m).__name__}), an attention it does not know.  It knows nn.MultiheadAttention, "
                "BERT-style self-attention (query/key/value Linear layers and the sibling output.dense) and "
                "GPT-2-style attention (a fused c_attn and c_proj).  Name that module in ignored_layers to keep it "
                "whole (its MLPs are then still pruned where recognised), or prune a model with a known attention")
    return parts


def _stream(model: nn.Module, parts: list[_Part]) -> tuple[str, list[tuple[str, str]], list[tuple[str, int]]] | None:
    """The residual stream (the embedding width E) of a BERT- or GPT-2-style model: (its name, the input
    embedding's; the sites [(module, "output")] where it is masked: every output written into the stream and
    every LayerNorm reading it; the parameters along it [(name, dim)]).  None for another layout."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    modules = dict(model.named_modules())
    names = {m: n for n, m in modules.items()}
    if not isinstance(emb, nn.Embedding) or emb not in names or not parts:
        return None
    name = names[emb]
    base = name.rpartition(".")[0]
    E = emb.embedding_dim
    params: list[tuple[str, int]] = []
    sites: list[tuple[str, str]] = []

    def norm(n: str) -> None:
        params.extend([(f"{n}.weight", 0), (f"{n}.bias", 0)])
        sites.append((n, "output"))

    def write(n: str, conv1d: bool) -> None:             # a projection into the stream
        params.extend([(f"{n}.weight", 1 if conv1d else 0), (f"{n}.bias", 0)])

    if all(p.layout == "bert" for p in parts) and isinstance(getattr(modules.get(base), "LayerNorm", None), nn.LayerNorm):
        for n, m in modules[base].named_children():
            if isinstance(m, nn.Embedding):
                params.append((f"{base}.{n}.weight", 1))
        norm(f"{base}.LayerNorm")
        for p in parts:
            params.extend((f"{r}.weight", 1) for r in p.rows)
            write(p.out, False)
            norm(f"{p.out.rpartition('.')[0]}.LayerNorm")
        params.extend((f"{n}.weight", 1) for n, m in modules.items()
                      if n.endswith("pooler.dense") and isinstance(m, nn.Linear) and m.in_features == E)
    elif all(p.layout == "gpt2" for p in parts) and isinstance(getattr(modules.get(base), "wpe", None), nn.Embedding) \
            and isinstance(getattr(modules.get(base), "ln_f", None), nn.LayerNorm):
        params.extend([(f"{name}.weight", 1), (f"{base}.wpe.weight", 1)])
        sites.extend([(name, "output"), (f"{base}.wpe", "output")])
        for p in parts:
            norm(p.replace[1][0])
            params.extend((f"{r}.weight", 0) for r in p.rows)
            write(p.out, True)
            sites.append((p.out, "output"))
        norm(f"{base}.ln_f")
        head = getattr(model, "get_output_embeddings", lambda: None)()
        if isinstance(head, nn.Linear) and head in names and head.weight is not emb.weight:
            params.append((f"{names[head]}.weight", 1))
    else:
        return None
    have = dict(model.named_parameters())
    return name, sites, [(n, d) for n, d in params if n in have]


# --------------------------------------------------------------------------- the units
class ZeroBranch(nn.Module):
    """What a collapsed attention or MLP becomes: no parameters, zeros [*input.shape[:-1], width] (a tuple
    padded with None when the replaced module returned ``arity`` values), so the residual sum it fed adds
    nothing: exactly the network without the branch."""

    def __init__(self, width: int, arity: int = 0):
        super().__init__()
        self.width, self.arity = int(width), int(arity)

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        z = x.new_zeros(*x.shape[:-1], self.width)
        return (z, *([None] * (self.arity - 1))) if self.arity else z

    def extra_repr(self) -> str:
        return f"width={self.width}, arity={self.arity}"


def _head_positions(part: _Part) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(range(j * part.per, (j + 1) * part.per)) for j in range(part.width))


def trace_token_units(model: nn.Module, example: Tensor, parts: list[_Part],
                      ignored_layers: Sequence[str] = ()) -> "TokenGraph":
    """The units of a Hugging Face model (heads and MLP neurons of ``parts``, see :func:`transformer_parts`) and
    its parameter table, for one example ``example`` [1, seq] of token ids."""
    model.eval()
    modules = dict(model.named_modules())
    arity: dict[str, int] = {}

    def note(name: str):
        def hook(_m: nn.Module, _i: tuple, out) -> None:
            arity.setdefault(name, len(out) if isinstance(out, tuple) else 0)
        return hook

    handles = [modules[n].register_forward_hook(note(n)) for p in parts for n, w in p.replace if w is not None]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    units: list[Unit] = []
    terms: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    for ui, p in enumerate(parts):
        index = _head_positions(p) if p.kind == "heads" else tuple((c,) for c in range(p.width))
        site = MaskSite(p.out, "input", -1, index)
        units.append(Unit(name=p.name, width=p.width, sites=(site,), record=site, producers=p.rows,
                          consumers=(p.out,), collapse="branch", dead=p.dead, heads=p.kind == "heads"))
        fused = 3 if p.layout == "gpt2" and p.kind == "heads" else 1      # c_attn: q, k and v rows of a head
        per = np.full(p.width, p.per * fused, dtype=np.int64)
        for r in p.rows:
            conv1d = _is_conv1d(modules[r])
            terms.setdefault((f"{r}.weight", 1 if conv1d else 0), []).append((ui, per))
            if getattr(modules[r], "bias", None) is not None:
                terms.setdefault((f"{r}.bias", 0), []).append((ui, per))
        terms.setdefault((f"{p.out}.weight", 0 if _is_conv1d(modules[p.out]) else 1), []).append(
            (ui, np.full(p.width, p.per, dtype=np.int64)))
    stream = _stream(model, parts) if not ignored_layers else None
    if stream is not None:
        name, where, along = stream
        ui, E = len(units), modules[name].embedding_dim
        index = tuple((c,) for c in range(E))
        sites = tuple(MaskSite(m, w, -1, index) for m, w in where)
        units.append(Unit(name=name, width=E, sites=sites, record=sites[0], producers=(name,), consumers=(),
                          why_not="the residual stream (the embedding width) cannot lose every channel"))
        for pname, d in along:
            terms.setdefault((pname, d), []).append((ui, np.ones(E, dtype=np.int64)))
    params = []
    for pname, prm in model.named_parameters():
        module = pname.rsplit(".", 1)[0] if "." in pname else ""
        dims = [_ParamDim(int(s), terms.get((pname, d), [])) for d, s in enumerate(prm.shape)]
        params.append(_Param(pname, module if pname.rsplit(".", 1)[-1] in ("weight", "bias") else pname, dims))
    return TokenGraph(model, example, units, params, parts, arity, tuple(ignored_layers),
                      stream[2] if stream is not None else [])


def _keep(m: nn.Module, side: str, idx: Sequence[int]) -> None:
    """Keep output (``side="out"``) or input features ``idx`` of a Linear or Conv1D, in place."""
    conv1d = _is_conv1d(m)
    dim = (1 if conv1d else 0) if side == "out" else (0 if conv1d else 1)
    t = torch.as_tensor(list(idx), dtype=torch.long, device=m.weight.device)
    with torch.no_grad():
        m.weight = nn.Parameter(m.weight.index_select(dim, t).clone())
        if side == "out" and m.bias is not None:
            m.bias = nn.Parameter(m.bias.index_select(0, t).clone())
    setattr(m, ("nf" if side == "out" else "nx") if conv1d else ("out_features" if side == "out" else "in_features"),
            len(idx))


class TokenGraph(NetworkGraph):
    """A Hugging Face model's units (:func:`trace_token_units`); :meth:`count` as for any network, :meth:`build`
    slices a copy of the model itself (no torch.fx): kept heads and neurons with their weights, collapsed
    branches replaced by :class:`ZeroBranch`."""

    token_inputs = True

    def __init__(self, model: nn.Module, example: Tensor, units: list[Unit], params: list[_Param],
                 parts: list[_Part], arity: Mapping[str, int], ignored: tuple[str, ...],
                 stream: Sequence[tuple[str, int]] = ()):
        super().__init__(model, example, units, params, None, None, ignored)
        self.parts = {p.name: p for p in parts}
        self.arity = dict(arity)
        self.stream = list(stream)

    def build(self, removed: Sequence[np.ndarray]) -> nn.Module:
        """A copy of the model with ``removed[i]`` ([width] bool) channels of unit i gone."""
        net = copy.deepcopy(self.model).eval()
        modules = dict(net.named_modules())
        width_of = {}
        for u, r in zip(self.units, removed):
            if u.name not in self.parts and r.any():            # the residual stream: every parameter along it
                kept = torch.as_tensor(np.flatnonzero(~r), dtype=torch.long)
                width_of[u.width] = len(kept)
                params = dict(net.named_parameters())
                for pname, d in self.stream:
                    old = params[pname]
                    new = nn.Parameter(old.detach().index_select(d, kept.to(old.device)).clone())
                    for m in net.modules():                     # every holder (a tied output layer too)
                        for attr, v in list(m._parameters.items()):
                            if v is old:
                                setattr(m, attr, new)
                _fit_sizes(net)
        for u, r in zip(self.units, removed):
            if not r.any() or u.name not in self.parts:
                continue
            p = self.parts[u.name]
            if r.all():
                for name, width in p.replace:
                    net.set_submodule(name, nn.Identity() if width is None else
                                      ZeroBranch(width_of.get(width, width), self.arity[name]))
                continue
            kept = np.flatnonzero(~r).tolist()
            cols = [j * p.per + i for j in kept for i in range(p.per)]
            _keep(modules[p.out], "in", cols)
            if p.layout == "gpt2" and p.kind == "heads":
                inner = p.width * p.per
                _keep(modules[p.rows[0]], "out", [c + s * inner for s in range(3) for c in cols])
            else:
                for row in p.rows:
                    _keep(modules[row], "out", cols)
            if p.kind == "heads":
                attn = modules[p.attn]
                if p.layout == "bert":
                    attn.num_attention_heads, attn.all_head_size = len(kept), len(cols)
                else:
                    attn.num_heads, attn.split_size = len(kept), len(cols)
        _fit_sizes(net)
        return net


def _fit_sizes(net: nn.Module) -> None:
    """Every Linear, Conv1D, Embedding and LayerNorm's size attributes set from its (sliced) weight."""
    for m in net.modules():
        w = getattr(m, "weight", None)
        if isinstance(m, nn.Linear):
            m.out_features, m.in_features = w.shape
        elif isinstance(m, nn.Embedding):
            m.embedding_dim = w.shape[1]
        elif isinstance(m, nn.LayerNorm) and w is not None:
            m.normalized_shape = (w.shape[0],)
        elif isinstance(w, nn.Parameter) and w.ndim == 2 and hasattr(m, "nf") and hasattr(m, "nx"):
            m.nx, m.nf = w.shape


# --------------------------------------------------------------------------- grouping and ranking
def _run(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    """Softmax over the last dim of the model's logits on token ids ``x``, in batches: float64 [n, c] or
    [n, seq, vocab] on the CPU."""
    param = next(model.parameters())
    outs = []
    for xb in x.split(batch_size):
        logits = logits_of(model(xb.to(param.device)))
        outs.append(torch.softmax(logits.double(), dim=-1).cpu())
    return torch.cat(outs)


def token_groups(model: nn.Module, g: NetworkGraph, x: Tensor, group_size: int,
                 batch_size: int = 64) -> dict[str, list[list[int]]]:
    """Section 3.2 for a token model: each unit's activations at its record site (the input of its output
    projection, [n, seq, width]), Eq. 4 over the positions (a head: summed over its positions), Eq. 3 and
    Algorithm 1 -> {unit: groups of ``group_size`` channels}."""
    modules = dict(model.named_modules())
    by_module: dict[tuple[str, str], list[Tensor]] = {(u.record.module, u.record.where): [] for u in g.units}
    handles = [modules[m].register_forward_pre_hook(lambda _m, i, k=(m, w): by_module[k].append(i[0].detach().float().cpu()))
               if w == "input" else
               modules[m].register_forward_hook(lambda _m, _i, o, k=(m, w): by_module[k].append(o.detach().float().cpu()))
               for m, w in by_module]
    try:
        with torch.inference_mode():
            for xb in x.split(batch_size):
                model(xb.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    out = {}
    for u in g.units:
        per = reduce_feature_maps(torch.cat(by_module[u.record.module, u.record.where]).movedim(-1, 1)).double()   # [n, positions]
        S = torch.stack([per[:, list(pos)].sum(dim=1) for pos in u.record.index], dim=1)             # [n, width]
        out[u.name] = group_neurons(correlation_matrix(S), int(group_size))
    return out


def rank_token_groups(model: nn.Module, calib: tuple[Tensor, Tensor], group_size: int = 2, criterion: str = "spvr",
                      batch_size: int = 64, ignored_layers: Sequence[str] | None = None):
    """Groups (Algorithm 1) and importances of a Hugging Face model's heads and MLP neurons: a
    ``prune.GroupRanking`` for ``spvr_prune(model, calib, keep, group_size, criterion=criterion, ranking=...)``.

    ``calib``: (input_ids int64 [n, seq], labels: [n] classes for a sequence classifier, [n, seq] next tokens
    for a language model).  ``criterion``: "spvr" or "kl" for class logits [n, c] (Eq. 2 / KL summed over the
    samples, as ``rank_groups``); "spvr_next_token" or "kl_next_token" for language-model logits [n, seq,
    vocab] (the same at every position, averaged over positions and samples).  Each group is masked at its
    unit's site and the whole calibration set run again (the paper's naive algorithm)."""
    from spvr_lib.prune import GroupRanking, _check_calib, _check_group_size, _num_classes, network_units
    from spvr_lib.ranking import _masked_sites

    _check_group_size(group_size)
    if not isinstance(calib, (tuple, list)) or len(calib) != 2 or not isinstance(calib[0], Tensor):
        raise ValueError(f"calib must be a pair (input_ids, labels) of tensors, got {type(calib).__name__}")
    x = calib[0]
    if x.is_floating_point() or x.is_complex() or x.ndim != 2 or len(x) < 2:
        raise ValueError(f"calib input_ids must be an integer tensor [n, seq] with n >= 2, got {x.dtype} "
                         f"{tuple(x.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}; expected a positive int")
    t0 = time.perf_counter()
    g = network_units(model, x, "graph", ignored_layers)
    if not isinstance(g, TokenGraph):
        raise ValueError(f"model ({type(model).__name__}) is not a Hugging Face transformer with known blocks; "
                         "rank it with spvr_lib.prune.rank_groups")
    _check_calib(calib, _num_classes(model, x))
    was = model.training
    model.eval()
    try:
        with torch.inference_mode():
            p = _run(model, x, batch_size)
            table = TOKEN_CRITERIA if p.ndim == 3 else CRITERIA
            if criterion not in table:
                other = "language-model logits [n, seq, vocab]" if p.ndim == 3 else "class logits [n, c]"
                raise ValueError(f"criterion={criterion!r}; model ({type(model).__name__}) returns {other}, for "
                                 f"which the criteria are {sorted(table)}")
            loss = table[criterion]
            groups = token_groups(model, g, x, int(group_size), batch_size)
            scores = {}
            for u in g.units:
                vals = []
                for grp in groups[u.name]:
                    with _masked_sites(model, u.sites, grp):
                        vals.append(float(loss(p, _run(model, x, batch_size).unsqueeze(0))[0]))
                scores[u.name] = torch.tensor(vals, dtype=torch.float64)
    finally:
        model.train(was)
    return GroupRanking(groups=groups, scores=scores, group_size=int(group_size), criterion=criterion,
                        method="naive", n_calib=len(x), seconds=round(time.perf_counter() - t0, 3))
