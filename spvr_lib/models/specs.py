"""The JSON specs: a network described as a plain, JSON-serialisable dict, and ``build(spec)``, its network.

- ``validate(spec)``: ValueError naming the offending key/value unless ``spec`` is buildable (``_KEYS``: the
  required and optional keys of each architecture).
- ``build(spec)``: a freshly initialised network (the class of :data:`spvr_lib.models.networks._CLASSES`), carrying
  a copy of its spec as ``model.spec``.
- presets: ``vgg16_bn``, ``resnet18``, ``resnet34``, ``resnet50`` (``preset(name, **kw)`` over ``PRESETS``),
  ``mobilenetv3`` and ``segnet_vgg16``.
- ``spec_to_str``: the paper's notation of a spec.

Architectures: ``"vgg"`` (``cfg`` in the paper's Table 6 notation: ints = 3x3 conv+BN+ReLU, "M" =
MaxPool2d(2)), ``"resnet"`` (torchvision module names, ONE width per stage: Tables 7/8), ``"mlp"`` (Appendix A),
``"mobilenetv3"`` (Table 4; not prunable) and ``"segnet"`` (Section 5.5).  What the pruner may change in a spec:
:mod:`spvr_lib.models.widths`.
"""
from __future__ import annotations

import copy

from torch import nn

from spvr_lib.models.networks import _CLASSES, ResNet, reinitialize

# required keys, optional keys per arch
_KEYS = {
    "vgg": ({"arch", "cfg", "in_channels", "num_classes"}, {"head"}),
    "resnet": ({"arch", "block", "stem", "stem_width", "in_channels", "num_classes", "stages"}, set()),
    "mlp": ({"arch", "in_features", "hidden", "num_classes"}, set()),
    "mobilenetv3": ({"arch", "variant", "num_classes", "in_channels", "width", "small_input"}, set()),
    "segnet": ({"arch", "cfg", "decoder", "in_channels", "num_classes"}, set()),
}
_STAGE_KEYS = {"name", "width", "blocks", "stride"}
_VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
_RESNET_WIDTHS = (64, 128, 256, 512)
_RESNET_STRIDES = (1, 2, 2, 2)
_MOBILENETV3_VARIANTS = ("small", "small-minimal")


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


def _validate_mobilenetv3(spec: dict) -> None:
    _check_choice(spec["variant"], "spec['variant']", _MOBILENETV3_VARIANTS)
    width = spec["width"]
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"spec['width'] (the width multiplier) must be a positive number, got {width!r}")
    if not isinstance(spec["small_input"], bool):
        raise ValueError(f"spec['small_input'] must be True or False, got {spec['small_input']!r}")


# --------------------------------------------------------------------------- SegNet specs (Section 5.5)

# --------------------------------------------------------------------------- SegNet (Section 5.5)
# Spec: {"arch": "segnet", "cfg": encoder, "decoder": decoder, "in_channels": C, "num_classes": K}.
# cfg: encoder stages in VGG notation, each one or more 3x3 conv+BN+ReLU widths followed by "M" (2x2 max
# pool that keeps its indices). decoder: "U" (2x2 max-unpool with the indices of the PAIRED pool: the
# k-th "U" pairs with the k-th "M" from the end) and 3x3 conv+BN+ReLU widths, then an implicit 3x3
# classifier conv to K logits per pixel (no BN/ReLU). Max-unpooling needs the channel count of its pool,
# so the decoder conv feeding a "U" (a "bridge") has the width of the last conv of the paired encoder
# stage: the two are tied (they share one width, set through the encoder ref). Every other decoder
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


# --------------------------------------------------------------------------- the network of a spec
def build(spec: dict) -> nn.Module:
    """A freshly initialised model for ``spec`` (validated first; widths of 0 are not allowed).

    The model carries a copy of its spec as ``model.spec``, so the pruner can find its
    prunable layers from the model alone (``prunable_layers(model, model.spec)``).
    """
    validate(spec)
    model = _CLASSES[spec["arch"]](spec)
    model.spec = copy.deepcopy(spec)
    return reinitialize(model)


# --------------------------------------------------------------------------- the paper's notation
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


def mobilenetv3(variant: str = "small", num_classes: int = 1000, in_channels: int = 3, width: float = 1.0,
                small_input: bool = False) -> dict:
    """MobileNetV3 spec (paper Table 4): variant "small" (2.54M params at 1000 classes) or "small-minimal" (2.04M)."""
    spec = {"arch": "mobilenetv3", "variant": variant, "num_classes": num_classes, "in_channels": in_channels,
            "width": width, "small_input": small_input}
    validate(spec)
    return spec


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
