"""Networks on disk: THE way to save a trained or pruned network and to load it again, with no pickled code.

- ``save_network(model, path)``: the state dict at ``path`` and its description at ``<path>.json``: the spec
  and every layer's shape (``network_shapes``), or, for a network pruned by the graph engine, the source of
  its original and the plan of what was removed.
- ``load_network(path)``: the network rebuilt from the description, the weights loaded strictly.
- the rebuilding: ``build_network(spec, shapes)`` (a spec's network with layers resized), ``build_source``
  (the original a pruned network came from: a spec, a torchvision name or a function in a file) and
  ``build_pruned(source, plan)``.
- a state dict known by its digest: ``state_dict_digest`` (sha256 of names, dtypes, shapes and bytes; the
  cache key of initial weights) and ``WeightsOnDemand`` (weights made again from a description only when
  read).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import nn

from spvr_lib import graph, store
from spvr_lib.models.networks import reinitialize
from spvr_lib.models.specs import build

_SHAPE_ATTRS = {nn.Conv2d: ("in_channels", "out_channels", "groups"), nn.BatchNorm2d: ("num_features",),
                nn.Linear: ("in_features", "out_features")}


def _shape_attrs(module: nn.Module) -> tuple[str, ...]:
    return next((a for t, a in _SHAPE_ATTRS.items() if isinstance(module, t)), ())


def network_shapes(model: nn.Module) -> dict[str, dict[str, int]]:
    """{module name: {shape attribute: int}} of every Conv2d, BatchNorm2d and Linear of ``model``."""
    return {name: {a: int(getattr(m, a)) for a in _shape_attrs(m)} for name, m in model.named_modules()
            if _shape_attrs(m)}


def save_network(model: nn.Module, path: str | Path, spec: dict | None = None) -> Path:
    """THE way to save a trained or pruned network: ``<path>`` (the state dict, CPU tensors, readable
    with ``torch.load(weights_only=True)``) and ``<path>.json`` (its description: the spec it was
    built from and the shape of every layer, so a network pruned in place by torch-pruning is rebuilt
    too).  ``spec``: the spec the network was built from when ``model.spec`` is gone (a pruned copy).
    Both files are written atomically.  Returns ``path``.
    """
    spec = spec if spec is not None else getattr(model, "spec", None)
    described = getattr(model, "spvr_description", None)
    if spec is None and described is None:
        raise ValueError("spec=None and the model has no .spec: pass the spec the network was built from")
    if spec is None and not described.get("source"):
        raise ValueError("the pruned network does not say how to rebuild its original: pass source= to spvr_prune "
                         "(e.g. {'torchvision': 'resnet50', 'kwargs': {'num_classes': 10}} or "
                         "{'model_file': '/abs/path/net.py:build'})")
    path = Path(path)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    store.atomic_torch_save(state, path)
    desc = {"spec": spec, "shapes": network_shapes(model)} if spec is not None else dict(described)
    store.atomic_write_json(path.with_name(path.name + ".json"), desc)
    return path


def build_network(spec: dict, shapes: Mapping[str, Mapping[str, int]] | None = None) -> nn.Module:
    """``build(spec)`` with every layer named in ``shapes`` resized (freshly initialised weights).

    With ``shapes`` the result is the pruned network the shapes describe; it keeps ``.spec`` only
    when no shape differs from the spec's."""
    model = build(spec)
    if not shapes:
        return model
    modules = dict(model.named_modules())
    changed = False
    for name, attrs in shapes.items():
        if name not in modules:
            raise ValueError(f"shapes names module {name!r}, which the spec's network does not have")
        m = modules[name]
        resized = any(int(getattr(m, a)) != int(v) for a, v in attrs.items())
        if not resized:
            continue
        changed = True
        for a, v in attrs.items():
            setattr(m, a, int(v))
        if isinstance(m, nn.Conv2d):
            m.weight = nn.Parameter(torch.empty(m.out_channels, m.in_channels // m.groups, *m.kernel_size))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_channels))
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            if m.affine:
                m.weight, m.bias = nn.Parameter(torch.empty(c)), nn.Parameter(torch.empty(c))
            if m.track_running_stats:
                m.running_mean, m.running_var = torch.zeros(c), torch.ones(c)
        elif isinstance(m, nn.Linear):
            m.weight = nn.Parameter(torch.empty(m.out_features, m.in_features))
            if m.bias is not None:
                m.bias = nn.Parameter(torch.empty(m.out_features))
    if changed:
        del model.spec          # per-layer widths no longer follow a spec
        reinitialize(model)
    return model


def load_network(path: str | Path) -> nn.Module:
    """The network written by :func:`save_network` at ``path`` (CPU, the mode it is built in: train).

    Rebuilt from ``<path>.json`` (no pickled code), weights loaded strictly with
    ``torch.load(weights_only=True)``.  A missing file raises FileNotFoundError naming it."""
    path = Path(path)
    meta = path.with_name(path.name + ".json")
    for f in (path, meta):
        if not f.exists():
            raise FileNotFoundError(f"network file {str(f)!r} does not exist (written by models.save_network)")
    try:
        desc = json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"network description {str(meta)!r} is not valid JSON ({err}); delete the network "
                         "and recompute it") from err
    if "plan" in desc:
        model = build_pruned(desc["source"], desc["plan"])
    else:
        model = build_network(desc["spec"], desc.get("shapes"))
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model


def build_source(source: Mapping) -> nn.Module:
    """The ORIGINAL network a pruned one came from: {"spec": spec}, {"torchvision": name, "kwargs": {...}} or
    {"model_file": "/path/net.py:build_fn", "kwargs": {...}} (the function is called with the kwargs)."""
    if not isinstance(source, Mapping):
        raise ValueError(f"source must be a dict, got {type(source).__name__}")
    kwargs = dict(source.get("kwargs") or {})
    if "spec" in source:
        return build(source["spec"])
    if "torchvision" in source:
        return torchvision.models.get_model(source["torchvision"], weights=None, **kwargs)
    if "model_file" in source:
        file, _, fn = str(source["model_file"]).rpartition(":")
        if not file or not fn or not Path(file).is_file():
            raise ValueError(f"source model_file={source['model_file']!r}: expected an existing 'path.py:function'")
        mod_spec = importlib.util.spec_from_file_location(f"spvr_user_model_{abs(hash(file))}", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return getattr(module, fn)(**kwargs)
    raise ValueError(f"source {source!r}: expected a key 'spec', 'torchvision' or 'model_file'")


def build_pruned(source: Mapping, plan: Mapping) -> nn.Module:
    """The pruned network a plan describes (``PruneResult.plan``), freshly initialised: the original from
    ``source``, its units traced again, the plan's channels removed and the emptied units collapsed."""
    original = build_source(source).eval()
    g = graph.trace_units(original, torch.zeros(plan["example_shape"]), tuple(plan.get("ignored_layers", ())))
    removed = []
    for u in g.units:
        mask = np.zeros(u.width, dtype=bool)
        mask[list(plan["removed"].get(u.name, []))] = True
        removed.append(mask)
    unknown = set(plan["removed"]) - {u.name for u in g.units}
    if unknown:
        raise ValueError(f"the plan removes channels of {sorted(unknown)[:3]}, which the rebuilt original does not "
                         "have as units: the source builds a different network")
    net = g.build(removed)
    reinitialize(net, strict=False)
    net.spvr_description = {"source": dict(source), "plan": dict(plan)}
    return net


# --------------------------------------------------------------------------- a state dict known by its digest
def state_dict_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) of a state dict: names, dtypes, shapes and raw bytes, in sorted-name order (a
    :class:`WeightsOnDemand` says its own, without making its weights)."""
    if isinstance(state, WeightsOnDemand):
        return state.digest
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class WeightsOnDemand(Mapping):
    """A state dict known by its :func:`state_dict_digest` and made only when read: the weights of a network the
    run cache keeps by description (a pruned baseline, whose weights are pruned again from the committed base in
    seconds), passed as ``init_state`` where a training's cache key needs only their digest.  ``make()``
    returns the state dict; it must have ``digest``, or reading it raises ValueError naming ``name``."""

    def __init__(self, digest: str, make: Callable[[], Mapping[str, torch.Tensor]], name: str = "weights") -> None:
        self.digest, self._make, self.name = digest, make, name
        self._state: dict[str, torch.Tensor] | None = None

    def _weights(self) -> dict[str, torch.Tensor]:
        if self._state is None:
            state = {k: v.detach().cpu() for k, v in self._make().items()}
            got = state_dict_digest(state)
            if got != self.digest:
                raise ValueError(f"{self.name}: the weights made again have digest {got[:16]}, not the "
                                 f"{self.digest[:16]} the records were computed from; delete the description and "
                                 "the records that read it to compute them afresh")
            self._state = state
        return self._state

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._weights()[name]

    def __iter__(self) -> Any:
        return iter(self._weights())

    def __len__(self) -> int:
        return len(self._weights())
