"""The spec pruning interface: the layers of a spec's network the pruner may shrink and the spec with new widths.

- ``prunable_layers(model, spec)``: one ``PrunableLayer`` per prunable conv / hidden Linear, in forward order,
  with the ref that names its width in the spec and its tie (layers that share one width).
- ``with_widths(spec, widths)``: a NEW spec with ``widths[ref]`` for each ref; a width of 0 removes the layer or
  stage ("layer collapse").

Prunable architectures: "vgg", "resnet", "mlp" and "segnet" (``_PRUNABLE_ARCHS``); not "mobilenetv3".
"""
from __future__ import annotations

import copy
import numbers
from dataclasses import dataclass

from torch import nn

from spvr_lib.models.networks import _CLASSES, SegNet
from spvr_lib.models.sizes import count_params, spec_params
from spvr_lib.models.specs import _segnet_bridges, _segnet_stages, spec_to_str, validate

_PRUNABLE_ARCHS = ("vgg", "resnet", "mlp", "segnet")


def _check_prunable(spec: dict) -> None:
    if spec["arch"] not in _PRUNABLE_ARCHS:
        raise ValueError(f"spec['arch'] = {spec['arch']!r} is not prunable; prunable architectures: "
                         f"{list(_PRUNABLE_ARCHS)}")


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
