"""Model specs, builders and the width bookkeeping used by the SPvR pruner.

A model is described by a JSON-serialisable *spec* (a plain dict); ``build(spec)`` returns a
freshly initialised ``nn.Module``. Three architectures:

- ``"vgg"``: ``cfg`` in the paper's Table 6 notation (ints = 3x3 conv+BN+ReLU, "M" = MaxPool2d(2)).
- ``"resnet"``: torchvision module names, ONE width per stage (paper Tables 7/8).
- ``"mlp"``: the one-hidden-layer network of the paper's Appendix A.
- ``"mobilenetv3"``: torchvision's MobileNetV3-small and the "minimalistic" variant (Table 4; not prunable).
- ``"segnet"``: SegNet with a VGG encoder and a mirrored decoder (Section 5.5).

Pruning changes widths through ``with_widths`` (a width of 0 removes the layer / stage:
"layer collapse"); ``prunable_layers`` lists what the pruner may mask.
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import io
import json
import numbers
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torchvision.models import mobilenetv3 as tv_mobilenetv3

from spvr_lib import graph, store
from spvr_lib.store import canonical_json

# required keys, optional keys per arch
_KEYS = {
    "vgg": ({"arch", "cfg", "in_channels", "num_classes"}, {"head"}),
    "resnet": ({"arch", "block", "stem", "stem_width", "in_channels", "num_classes", "stages"}, set()),
    "mlp": ({"arch", "in_features", "hidden", "num_classes"}, set()),
}
_STAGE_KEYS = {"name", "width", "blocks", "stride"}
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_RESNET_WIDTHS = (64, 128, 256, 512)
_RESNET_STRIDES = (1, 2, 2, 2)


# --------------------------------------------------------------------------- validation
def _check_pos_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def _check_choice(value, what: str, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {list(choices)}, got {value!r}")


def _check_list(value, what: str) -> None:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{what} must be a list, got {type(value).__name__}")


def validate(spec: dict) -> None:
    """Raise ValueError naming the offending key/value if ``spec`` is not a buildable spec."""
    if not isinstance(spec, dict):
        raise ValueError(f"spec must be a dict, got {type(spec).__name__}")
    arch = spec.get("arch")
    _check_choice(arch, "spec['arch']", tuple(_KEYS))
    required, optional = _KEYS[arch]
    if missing := required - spec.keys():
        raise ValueError(f"{arch} spec is missing key(s) {sorted(missing)}")
    if unknown := spec.keys() - required - optional:
        raise ValueError(f"{arch} spec has unknown key(s) {sorted(unknown)}; allowed: {sorted(required | optional)}")
    for key in ("in_channels", "num_classes", "in_features", "stem_width"):
        if key in spec:
            _check_pos_int(spec[key], f"spec[{key!r}]")
    if arch == "vgg":
        _check_list(spec["cfg"], "spec['cfg']")
        for i, c in enumerate(spec["cfg"]):
            if c != "M":
                _check_pos_int(c, f"spec['cfg'][{i}] (a conv width, or \"M\")")
        _check_choice(spec.get("head", "cifar"), "spec['head']", ("cifar", "imagenet"))
    elif arch == "resnet":
        _check_choice(spec["block"], "spec['block']", ("basic", "bottleneck"))
        _check_choice(spec["stem"], "spec['stem']", ("cifar", "imagenet"))
        _check_list(spec["stages"], "spec['stages']")
        names = set()
        for i, st in enumerate(spec["stages"]):
            if not isinstance(st, dict) or st.keys() != _STAGE_KEYS:
                raise ValueError(f"spec['stages'][{i}] must be a dict with keys {sorted(_STAGE_KEYS)}, got {st!r}")
            name = st["name"]
            if not isinstance(name, str) or not name.isidentifier() or hasattr(ResNet, name) or name in names \
                    or name in ("conv1", "bn1", "relu", "maxpool", "avgpool", "fc", "stage_names"):
                raise ValueError(f"spec['stages'][{i}]['name'] must be a new identifier, e.g. 'layer1', got {name!r}")
            names.add(name)
            for key in ("width", "blocks", "stride"):
                _check_pos_int(st[key], f"spec['stages'][{i}][{key!r}]")
    elif arch == "mobilenetv3":
        _validate_mobilenetv3(spec)
    elif arch == "segnet":
        _validate_segnet(spec)
    else:
        _check_list(spec["hidden"], "spec['hidden']")
        for i, h in enumerate(spec["hidden"]):
            _check_pos_int(h, f"spec['hidden'][{i}]")


# --------------------------------------------------------------------------- modules
def _init_module(m: nn.Module, linear_init: str) -> None:
    """torchvision's init: kaiming-normal (fan_out) convs, BN 1/0, Linear normal(0, 0.01) or default."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
        m.reset_running_stats()
    elif isinstance(m, nn.Linear):
        if linear_init == "normal":
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        else:
            m.reset_parameters()


class VGG(nn.Module):
    """VGG-BN. Input [n, in_channels, H, W] -> logits [n, num_classes]."""

    linear_init = "normal"

    def __init__(self, spec: dict):
        super().__init__()
        layers, c = [], spec["in_channels"]
        for item in spec["cfg"]:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers.append(nn.Sequential(nn.Conv2d(c, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()))
                c = item
        self.features = nn.Sequential(*layers)
        n = spec["num_classes"]
        if spec.get("head", "cifar") == "cifar":
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(c, n)
        else:  # torchvision's VGG head
            self.pool = nn.AdaptiveAvgPool2d(7)
            self.classifier = nn.Sequential(
                nn.Linear(c * 49, 4096), nn.ReLU(), nn.Dropout(),
                nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(), nn.Linear(4096, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def _conv(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Sequential | None:
    """Projection shortcut (1x1 conv + BN) when the shape changes, else None (identity)."""
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_conv(c_in, c_out, 1, stride), nn.BatchNorm2d(c_out))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(c_in, width, 3, stride), nn.BatchNorm2d(width)
        self.relu = nn.ReLU()
        self.conv2, self.bn2 = _conv(width, width, 3), nn.BatchNorm2d(width)
        self.downsample = _shortcut(c_in, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """torchvision v1.5 bottleneck: 1x1, 3x3 (stride), 1x1 to 4*width."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        self.conv1, self.bn1 = _conv(c_in, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, width * 4, 1), nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU()
        self.downsample = _shortcut(c_in, width * 4, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """ResNet with torchvision module names. Input [n, in_channels, H, W] -> logits [n, num_classes].

    The "cifar" stem has ``maxpool = nn.Identity()`` (no parameters, so state_dicts still match).
    """

    linear_init = "default"

    def __init__(self, spec: dict):
        super().__init__()
        block = BasicBlock if spec["block"] == "basic" else Bottleneck
        c = spec["stem_width"]
        if spec["stem"] == "imagenet":
            self.conv1, self.maxpool = _conv(spec["in_channels"], c, 7, 2), nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1, self.maxpool = _conv(spec["in_channels"], c, 3, 1), nn.Identity()
        self.bn1, self.relu = nn.BatchNorm2d(c), nn.ReLU()
        self.stage_names = tuple(st["name"] for st in spec["stages"])
        for st in spec["stages"]:
            blocks = []
            for b in range(st["blocks"]):
                blocks.append(block(c, st["width"], st["stride"] if b == 0 else 1))
                c = st["width"] * block.expansion
            setattr(self, st["name"], nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, spec["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


class MLP(nn.Sequential):
    """fc1, act1, ..., fc{k+1}. Input [n, in_features] (flattened) -> logits [n, num_classes]."""

    linear_init = "default"

    def __init__(self, spec: dict):
        layers, c = OrderedDict(), spec["in_features"]
        for i, h in enumerate(spec["hidden"], start=1):
            layers[f"fc{i}"], layers[f"act{i}"] = nn.Linear(c, h), nn.ReLU()
            c = h
        layers[f"fc{len(spec['hidden']) + 1}"] = nn.Linear(c, spec["num_classes"])
        super().__init__(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))


_CLASSES = {"vgg": VGG, "resnet": ResNet, "mlp": MLP}


def build(spec: dict) -> nn.Module:
    """A freshly initialised model for ``spec`` (validated first; widths of 0 are not allowed).

    The model carries a copy of its spec as ``model.spec``, so the pruner can find its
    prunable layers from the model alone (``prunable_layers(model, model.spec)``).
    """
    validate(spec)
    model = _CLASSES[spec["arch"]](spec)
    model.spec = copy.deepcopy(spec)
    return reinitialize(model)


def reinitialize(model: nn.Module, strict: bool = True) -> nn.Module:
    """THE re-initialisation (SPvR retrains from scratch): every parameter and BN statistic, in place.

    Conv2d, BatchNorm2d and Linear get ``build``'s init (kaiming-normal fan_out convs, BN 1/0 with
    running stats reset, Linear N(0, 0.01) when the model's ``linear_init`` is "normal" (VGG,
    MobileNetV3) else PyTorch's default); any other module holding parameters must have
    ``reset_parameters()``.  Works on any nn.Module: spvr_lib's own, a pruned copy, a user's.
    Raises ValueError naming the module types it cannot re-initialise (``strict=False``: leaves their
    parameters as they are, e.g. ConvNeXt's layer scale, a constant at construction).
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={type(model).__name__}: expected an nn.Module")
    handled = (nn.Conv2d, nn.BatchNorm2d, nn.Linear)
    odd = sorted({type(m).__name__ for m in model.modules()
                  if not isinstance(m, handled) and not callable(getattr(m, "reset_parameters", None))
                  and any(True for _ in m.parameters(recurse=False))})
    if odd and strict:
        raise ValueError(f"model holds parameters in {odd}, which have no reset_parameters(): cannot re-initialise")
    linear_init = getattr(model, "linear_init", "default")
    for m in model.modules():
        if isinstance(m, handled):
            _init_module(m, linear_init)
        elif any(True for _ in m.parameters(recurse=False)) and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()
    return model


# --------------------------------------------------------------------------- save and load
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


# --------------------------------------------------------------------------- sizes
def count_params(model: nn.Module) -> int:
    """THE parameter counter: numel of every parameter (BN and classifier included, buffers not)."""
    return sum(p.numel() for p in model.parameters())


@functools.lru_cache(maxsize=1 << 16)
def _params_of_json(spec_json: str) -> int:
    spec = json.loads(spec_json)
    with torch.device("meta"):  # no weights allocated; init skipped (it does not change the count)
        return count_params(_CLASSES[spec["arch"]](spec))


def spec_params(spec: dict) -> int:
    """count_params(build(spec)) without allocating weights (meta device, memoised)."""
    validate(spec)
    return _params_of_json(canonical_json(spec))


def model_size_mb(model: nn.Module) -> float:
    """Size in MB (1e6 bytes) of ``torch.save(model.state_dict())``: the paper's "size on disk"."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes / 1e6


def spec_to_str(spec: dict) -> str:
    """The paper's notation: VGG ``64, 64, "M", ...``; ResNet ``[64, 64] × 3, ...``; MLP ``100-64-2``."""
    validate(spec)
    if spec["arch"] == "vgg":
        return ", ".join('"M"' if c == "M" else str(c) for c in spec["cfg"])
    if spec["arch"] == "mobilenetv3":
        return f"MobileNetV3-{spec['variant']} (width {float(spec['width'])}" + \
            (", stride-1 stem)" if spec["small_input"] else ")")
    if spec["arch"] == "segnet":
        def notation(items):
            return ", ".join(f'"{c}"' if c in ("M", "U") else str(c) for c in items)
        return f"encoder: {notation(spec['cfg'])}; decoder: {notation(spec['decoder'])}"
    if spec["arch"] == "resnet":
        per_block = 2 if spec["block"] == "basic" else 3
        return ", ".join(f"[{', '.join([str(st['width'])] * per_block)}] × {st['blocks']}" for st in spec["stages"])
    return "-".join(str(c) for c in [spec["in_features"], *spec["hidden"], spec["num_classes"]])


# --------------------------------------------------------------------------- pruning interface
@dataclass(eq=False)
class PrunableLayer:
    """One prunable layer, in forward order.

    conv: the nn.Conv2d (VGG/ResNet) or hidden nn.Linear (MLP); width: its out channels/features
    (for a bottleneck conv3 this is 4 * the stage width); ref: key for ``with_widths``
    (("cfg", i) VGG, ("stage", name) ResNet, ("hidden", i) MLP, ("enc", i) / ("dec", j) SegNet);
    tie: ResNet stage name (all layers of a stage share one width), SegNet "pool{s}" (the last conv
    of encoder stage s and the decoder conv feeding its unpool share one width and the encoder's
    ref), else None; mask_module: the module whose OUTPUT is masked
    (the BN after a conv, the ReLU ``act{i}`` after an MLP hidden layer).
    """

    name: str
    conv: nn.Module
    bn: nn.BatchNorm2d | None
    width: int
    ref: tuple
    tie: str | None
    mask_module: nn.Module


def prunable_layers(model: nn.Module, spec: dict) -> list[PrunableLayer]:
    """The layers the pruner may shrink, in forward order (not the ResNet stem or shortcut convs,
    not the SegNet classifier conv)."""
    validate(spec)
    _check_prunable(spec)
    if not isinstance(model, _CLASSES[spec["arch"]]) or count_params(model) != spec_params(spec):
        raise ValueError(f"model ({type(model).__name__}, {count_params(model)} params) was not built from spec "
                         f"{spec_to_str(spec)!r} ({spec_params(spec)} params)")
    layers = []
    if spec["arch"] == "vgg":
        for i, c in enumerate(spec["cfg"]):
            if c != "M":
                conv, bn = model.features[i][0], model.features[i][1]
                layers.append(PrunableLayer(f"features.{i}.0", conv, bn, conv.out_channels, ("cfg", i), None, bn))
    elif spec["arch"] == "resnet":
        convs = ("1", "2") if spec["block"] == "basic" else ("1", "2", "3")
        for st in spec["stages"]:
            name = st["name"]
            for b, block in enumerate(getattr(model, name)):
                for k in convs:
                    conv, bn = getattr(block, f"conv{k}"), getattr(block, f"bn{k}")
                    layers.append(PrunableLayer(f"{name}.{b}.conv{k}", conv, bn, conv.out_channels,
                                                ("stage", name), name, bn))
    elif spec["arch"] == "segnet":
        layers = _segnet_prunable_layers(model, spec)
    else:
        for i in range(len(spec["hidden"])):
            fc = getattr(model, f"fc{i + 1}")
            layers.append(PrunableLayer(f"fc{i + 1}", fc, None, fc.out_features, ("hidden", i), None,
                                        getattr(model, f"act{i + 1}")))
    return layers


def _ref_width(spec: dict, ref) -> int:
    """Current width of ``ref`` in ``spec``; ValueError if ``ref`` names nothing prunable."""
    if spec["arch"] == "segnet":
        return _segnet_ref_width(spec, ref)
    kind = {"vgg": "cfg", "resnet": "stage", "mlp": "hidden"}[spec["arch"]]
    if isinstance(ref, tuple) and len(ref) == 2 and ref[0] == kind:
        key = ref[1]
        if kind == "stage":
            for st in spec["stages"]:
                if st["name"] == key:
                    return st["width"]
        elif isinstance(key, numbers.Integral) and not isinstance(key, bool):
            items = spec["cfg"] if kind == "cfg" else spec["hidden"]
            if 0 <= key < len(items) and items[key] != "M":
                return items[key]
    raise ValueError(f"unknown ref {ref!r} for a {spec['arch']} spec; expected ({kind!r}, ...) "
                     f"naming a layer of the spec")


def with_widths(spec: dict, widths: dict[tuple, int]) -> dict:
    """A NEW spec with ``widths[ref]`` for each ref; width 0 removes the layer (layer collapse).

    VGG: a removed conv leaves cfg, and an "M" whose stage lost all its convs goes too.
    ResNet: ("stage", name) sets the (unexpanded) stage width; 0 removes the stage.
    MLP: ("hidden", i); 0 removes the hidden layer. Indices in the new spec are renumbered.
    SegNet: ("enc", i) / ("dec", j); a decoder conv feeding an unpool always takes the width of the
    last kept conv of the paired encoder stage; a stage whose convs all go takes its pool, its
    unpool and that decoder conv with it.
    """
    validate(spec)
    _check_prunable(spec)
    new_width = {}
    for ref, w in widths.items():
        original = _ref_width(spec, ref)
        if isinstance(w, bool) or not isinstance(w, numbers.Integral) or not 0 <= w <= original:
            raise ValueError(f"width for {ref!r} must be an int in [0, {original}], got {w!r}")
        new_width[ref] = int(w)
    new = copy.deepcopy(spec)
    if spec["arch"] == "vgg":
        cfg, had_conv, kept_conv = [], False, False
        for i, c in enumerate(spec["cfg"]):
            if c == "M":
                if kept_conv or not had_conv:
                    cfg.append("M")
                had_conv = kept_conv = False
            else:
                w = new_width.get(("cfg", i), c)
                had_conv, kept_conv = True, kept_conv or w > 0
                if w > 0:
                    cfg.append(w)
        new["cfg"] = cfg
    elif spec["arch"] == "resnet":
        stages = [dict(st, width=new_width.get(("stage", st["name"]), st["width"])) for st in new["stages"]]
        new["stages"] = [st for st in stages if st["width"] > 0]
    elif spec["arch"] == "segnet":
        new["cfg"], new["decoder"] = _segnet_with_widths(spec, new_width)
    else:
        hidden = [new_width.get(("hidden", i), h) for i, h in enumerate(spec["hidden"])]
        new["hidden"] = [h for h in hidden if h > 0]
    return new


# --------------------------------------------------------------------------- presets
def _scaled(c: int, width: float) -> int:
    return max(1, round(c * width))


def _check_width(width: float) -> None:
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width (multiplier) must be a positive number, got {width!r}")


def vgg16_bn(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, head: str = "cifar") -> dict:
    """VGG16-BN spec; every channel count c becomes max(1, round(c * width))."""
    _check_width(width)
    cfg = [c if c == "M" else _scaled(c, width) for c in _VGG16_CFG]
    spec = {"arch": "vgg", "cfg": cfg, "in_channels": in_channels, "num_classes": num_classes, "head": head}
    validate(spec)
    return spec


def _resnet(block: str, blocks: tuple, num_classes: int, in_channels: int, width: float, stem: str) -> dict:
    _check_width(width)
    stages = [{"name": f"layer{i + 1}", "width": _scaled(w, width), "blocks": n, "stride": s}
              for i, (w, n, s) in enumerate(zip(_RESNET_WIDTHS, blocks, _RESNET_STRIDES))]
    spec = {"arch": "resnet", "block": block, "stem": stem, "stem_width": _scaled(64, width),
            "in_channels": in_channels, "num_classes": num_classes, "stages": stages}
    validate(spec)
    return spec


def resnet18(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, stem: str = "cifar") -> dict:
    return _resnet("basic", (2, 2, 2, 2), num_classes, in_channels, width, stem)


def resnet34(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, stem: str = "cifar") -> dict:
    return _resnet("basic", (3, 4, 6, 3), num_classes, in_channels, width, stem)


def resnet50(num_classes: int = 10, in_channels: int = 3, width: float = 1.0, stem: str = "cifar") -> dict:
    return _resnet("bottleneck", (3, 4, 6, 3), num_classes, in_channels, width, stem)


PRESETS = {"vgg16_bn": vgg16_bn, "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}


def preset(name: str, **kw) -> dict:
    """The spec of preset ``name`` (a key of PRESETS) with keyword options passed on."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset name {name!r}; expected one of {sorted(PRESETS)}")
    return PRESETS[name](**kw)


# --------------------------------------------------------------------------- MobileNetV3 (Table 4)
# torchvision's mobilenet_v3_small table (Howard et al., 2019, Table 2), one row per inverted residual:
# (input channels, depthwise kernel, expanded channels, output channels, squeeze-excite, activation, stride)
_MOBILENETV3_SMALL = (
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
)
_MOBILENETV3_VARIANTS = ("small", "small-minimal")


def _validate_mobilenetv3(spec: dict) -> None:
    _check_choice(spec["variant"], "spec['variant']", _MOBILENETV3_VARIANTS)
    width = spec["width"]
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"spec['width'] (the width multiplier) must be a positive number, got {width!r}")
    if not isinstance(spec["small_input"], bool):
        raise ValueError(f"spec['small_input'] must be True or False, got {spec['small_input']!r}")


class MobileNetV3(tv_mobilenetv3.MobileNetV3):
    """torchvision's MobileNetV3 for a "mobilenetv3" spec. Input [n, in_channels, H, W] -> logits [n, num_classes].

    ``variant="small"``: torchvision's ``mobilenet_v3_small(num_classes=N, width_mult=width)`` (same
    module names and state_dict). ``"small-minimal"``: TF-slim's ``mobilenet_v3_small_minimalistic``
    (timm ``tf_mobilenetv3_small_minimal_100``) built from the same blocks: the same channel counts
    but no squeeze-excite, ReLU instead of hard-swish everywhere (stem, blocks, last conv, classifier)
    and 3x3 instead of 5x5 depthwise kernels. The stem conv takes ``in_channels``; ``small_input=True``
    gives it stride 1 instead of 2 (for 32x32 images: total stride 16, last feature map 2x2).
    """

    linear_init = "normal"  # torchvision's MobileNetV3 init: Linear N(0, 0.01) and zero bias

    def __init__(self, spec: dict):
        minimal = spec["variant"] == "small-minimal"
        rows = [(c_in, 3, e, c_out, False, "RE", s) if minimal else (c_in, k, e, c_out, se, act, s)
                for c_in, k, e, c_out, se, act, s in _MOBILENETV3_SMALL]
        setting = [tv_mobilenetv3.InvertedResidualConfig(*row, dilation=1, width_mult=spec["width"])
                   for row in rows]
        last_channel = tv_mobilenetv3.InvertedResidualConfig.adjust_channels(1024, spec["width"])
        super().__init__(setting, last_channel, num_classes=spec["num_classes"])
        stem = self.features[0]  # Conv2dNormActivation: [conv, bn, activation]
        stem[0] = nn.Conv2d(spec["in_channels"], stem[0].out_channels, 3, stride=1 if spec["small_input"] else 2,
                            padding=1, bias=False)
        if minimal:
            for module in list(self.modules()):
                for name, child in module.named_children():
                    if isinstance(child, nn.Hardswish):
                        setattr(module, name, nn.ReLU(inplace=True))
            # torchvision's in-place Dropout after an in-place ReLU breaks backward
            self.classifier[2] = nn.Dropout(p=self.classifier[2].p)


def mobilenetv3(variant: str = "small", num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                small_input: bool = False) -> dict:
    """MobileNetV3 spec (paper Table 4): variant "small" (2.54M params at 1000 classes) or "small-minimal" (2.04M)."""
    spec = {"arch": "mobilenetv3", "variant": variant, "num_classes": num_classes, "in_channels": in_channels,
            "width": width, "small_input": small_input}
    validate(spec)
    return spec


_KEYS["mobilenetv3"] = ({"arch", "variant", "num_classes", "in_channels", "width", "small_input"}, set())
_CLASSES["mobilenetv3"] = MobileNetV3


# --------------------------------------------------------------------------- SegNet (Section 5.5)
# Spec: {"arch": "segnet", "cfg": encoder, "decoder": decoder, "in_channels": C, "num_classes": K}.
# cfg: encoder stages in VGG notation, each one or more 3x3 conv+BN+ReLU widths followed by "M" (2x2 max
# pool that keeps its indices). decoder: "U" (2x2 max-unpool with the indices of the PAIRED pool: the
# k-th "U" pairs with the k-th "M" from the end) and 3x3 conv+BN+ReLU widths, then an implicit 3x3
# classifier conv to K logits per pixel (no BN/ReLU). Max-unpooling needs the channel count of its pool,
# so the decoder conv feeding a "U" (a "bridge") has the width of the last conv of the paired encoder
# stage: the two are tied (they share one width, set through the encoder ref). Every other decoder
# width is free.
def _segnet_stages(cfg: list) -> list[list[int]]:
    """cfg indices of the convs of each encoder stage (the convs before each "M")."""
    stages, current = [], []
    for i, item in enumerate(cfg):
        if item == "M":
            stages.append(current)
            current = []
        else:
            current.append(i)
    return stages


def _segnet_bridges(spec: dict) -> dict[int, int]:
    """{decoder index of a conv feeding a "U": the encoder stage (0-based) of that U's pool}."""
    num_stages, bridges, k = spec["cfg"].count("M"), {}, 0
    for j, item in enumerate(spec["decoder"]):
        if item == "U":
            if j > 0 and spec["decoder"][j - 1] != "U":
                bridges[j - 1] = num_stages - 1 - k
            k += 1
    return bridges


def _validate_segnet(spec: dict) -> None:
    cfg, dec = spec["cfg"], spec["decoder"]
    _check_list(cfg, "spec['cfg']")
    for i, c in enumerate(cfg):
        if c != "M":
            _check_pos_int(c, f"spec['cfg'][{i}] (a conv width, or \"M\")")
    if (cfg and cfg[-1] != "M") or any(c == "M" and (i == 0 or cfg[i - 1] == "M") for i, c in enumerate(cfg)):
        raise ValueError(f"spec['cfg'] must be encoder stages, each one or more conv widths followed by \"M\" "
                         f"(e.g. [64, 64, \"M\", 128, \"M\"]), got {cfg!r}")
    _check_list(dec, "spec['decoder']")
    for j, c in enumerate(dec):
        if c != "U":
            _check_pos_int(c, f"spec['decoder'][{j}] (a conv width, or \"U\")")
    if dec.count("U") != cfg.count("M"):
        raise ValueError(f"spec['decoder'] must have one \"U\" per \"M\" of spec['cfg'] ({cfg.count('M')}), "
                         f"got {dec.count('U')}")
    stages, bridges = _segnet_stages(cfg), _segnet_bridges(spec)
    for k, j in enumerate(j for j, c in enumerate(dec) if c == "U"):
        if k > 0 and j - 1 not in bridges:
            raise ValueError(f"spec['decoder'][{j}] (\"U\") must follow a conv (only the first \"U\" may follow "
                             f"the encoder directly), got {dec!r}")
    for j, s in bridges.items():
        expected = cfg[stages[s][-1]]
        if dec[j] != expected:
            raise ValueError(f"spec['decoder'][{j}] feeds the unpool of encoder stage {s + 1}, so it must have that "
                             f"stage's last width spec['cfg'][{stages[s][-1]}] = {expected}, got {dec[j]}")


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


class SegNet(nn.Module):
    """SegNet (Badrinarayanan et al., 2017). Input [n, in_channels, H, W] -> logits [n, num_classes, H, W].

    ``encoder[i]`` / ``decoder[j]`` follow ``spec["cfg"][i]`` / ``spec["decoder"][j]``: a conv block
    (Conv2d, BatchNorm2d, ReLU), ``MaxPool2d(2, 2, return_indices=True)`` or ``MaxUnpool2d(2, 2)``
    (unpooled to the pre-pool size, so odd H, W work). ``classifier``: the last 3x3 conv to K logits.
    """

    linear_init = "default"  # no Linear layers

    def __init__(self, spec: dict):
        super().__init__()
        c, encoder, decoder = spec["in_channels"], [], []
        for item in spec["cfg"]:
            encoder.append(nn.MaxPool2d(2, 2, return_indices=True) if item == "M" else _conv_bn_relu(c, item))
            c = c if item == "M" else item
        for item in spec["decoder"]:
            decoder.append(nn.MaxUnpool2d(2, 2) if item == "U" else _conv_bn_relu(c, item))
            c = c if item == "U" else item
        self.encoder, self.decoder = nn.ModuleList(encoder), nn.ModuleList(decoder)
        self.classifier = nn.Conv2d(c, spec["num_classes"], 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []  # (indices, pre-pool size) per pool, popped by the unpools in reverse order
        for layer in self.encoder:
            if isinstance(layer, nn.MaxPool2d):
                size = x.shape[-2:]
                x, indices = layer(x)
                pooled.append((indices, size))
            else:
                x = layer(x)
        for layer in self.decoder:
            if isinstance(layer, nn.MaxUnpool2d):
                indices, size = pooled.pop()
                x = layer(x, indices, output_size=size)
            else:
                x = layer(x)
        return self.classifier(x)


def _segnet_prunable_layers(model: SegNet, spec: dict) -> list[PrunableLayer]:
    stages, bridges = _segnet_stages(spec["cfg"]), _segnet_bridges(spec)
    tie_of = {stages[s][-1]: f"pool{s + 1}" for s in bridges.values()}  # encoder conv index -> tie
    layers = []
    for i, c in enumerate(spec["cfg"]):
        if c != "M":
            conv, bn = model.encoder[i][0], model.encoder[i][1]
            layers.append(PrunableLayer(f"encoder.{i}.0", conv, bn, conv.out_channels, ("enc", i), tie_of.get(i), bn))
    for j, c in enumerate(spec["decoder"]):
        if c != "U":
            conv, bn = model.decoder[j][0], model.decoder[j][1]
            if j in bridges:
                s = bridges[j]
                ref, tie = ("enc", stages[s][-1]), f"pool{s + 1}"
            else:
                ref, tie = ("dec", j), None
            layers.append(PrunableLayer(f"decoder.{j}.0", conv, bn, conv.out_channels, ref, tie, bn))
    return layers


def _segnet_ref_width(spec: dict, ref) -> int:
    if isinstance(ref, tuple) and len(ref) == 2 and ref[0] in ("enc", "dec") \
            and isinstance(ref[1], numbers.Integral) and not isinstance(ref[1], bool):
        items = spec["cfg"] if ref[0] == "enc" else spec["decoder"]
        if 0 <= ref[1] < len(items) and items[ref[1]] not in ("M", "U"):
            bridges = _segnet_bridges(spec)
            if ref[0] == "dec" and ref[1] in bridges:
                s = bridges[ref[1]]
                raise ValueError(f"ref {ref!r} feeds the unpool of encoder stage {s + 1} and is tied to "
                                 f"('enc', {_segnet_stages(spec['cfg'])[s][-1]}); set that ref instead")
            return items[ref[1]]
    raise ValueError(f"unknown ref {ref!r} for a segnet spec; expected ('enc', i) or ('dec', j) naming a conv "
                     f"of spec['cfg'] or spec['decoder']")


def _segnet_with_widths(spec: dict, new_width: dict) -> tuple[list, list]:
    """(cfg, decoder) with the new widths; a stage whose convs are all 0 goes with its pool and unpool."""
    cfg, stages = spec["cfg"], _segnet_stages(spec["cfg"])
    enc = {i: new_width.get(("enc", i), cfg[i]) for stage in stages for i in stage}
    # width of each stage's last kept conv (what its pool and the paired bridge carry); 0: stage collapsed
    last = [next((enc[i] for i in reversed(stage) if enc[i] > 0), 0) for stage in stages]
    new_cfg = [item for stage, kept in zip(stages, last) if kept
               for item in [enc[i] for i in stage if enc[i] > 0] + ["M"]]
    bridges, new_dec, k = _segnet_bridges(spec), [], 0
    for j, item in enumerate(spec["decoder"]):
        if item == "U":
            if last[len(stages) - 1 - k]:
                new_dec.append("U")
            k += 1
        else:
            w = last[bridges[j]] if j in bridges else new_width.get(("dec", j), item)
            if w > 0:
                new_dec.append(w)
    return new_cfg, new_dec


def _segnet_mirror(cfg: list) -> list:
    """SegNet's decoder for encoder ``cfg``: each stage in reverse, "U" then its convs, the last conv
    mapping to the previous stage's width (for VGG16: "U", 512, 512, 512, "U", 512, 512, 256, ...,
    "U", 128, 64, "U", 64; the classifier conv follows)."""
    widths = [[cfg[i] for i in stage] for stage in _segnet_stages(cfg)]
    decoder = []
    for s in reversed(range(len(widths))):
        decoder += ["U", *widths[s][:-1], *([widths[s - 1][-1]] if s > 0 else [])]
    return decoder


def segnet_vgg16(num_classes: int = 20, in_channels: int = 3, width: float = 1.0) -> dict:
    """SegNet with a VGG16 encoder and its mirrored decoder (26 convs); channels c -> max(1, round(c * width))."""
    _check_width(width)
    cfg = [c if c == "M" else _scaled(c, width) for c in _VGG16_CFG]
    spec = {"arch": "segnet", "cfg": cfg, "decoder": _segnet_mirror(cfg), "in_channels": in_channels,
            "num_classes": num_classes}
    validate(spec)
    return spec


_KEYS["segnet"] = ({"arch", "cfg", "decoder", "in_channels", "num_classes"}, set())
_CLASSES["segnet"] = SegNet
_PRUNABLE_ARCHS = ("vgg", "resnet", "mlp", "segnet")


def _check_prunable(spec: dict) -> None:
    if spec["arch"] not in _PRUNABLE_ARCHS:
        raise ValueError(f"spec['arch'] = {spec['arch']!r} is not prunable; prunable architectures: "
                         f"{list(_PRUNABLE_ARCHS)}")
