"""The networks: the ``nn.Module`` of each architecture a spec describes, and THE re-initialisation.

- ``VGG``: VGG-BN, ``spec["cfg"]`` in the paper's Table 6 notation (ints = 3x3 conv+BN+ReLU, "M" = MaxPool2d(2)).
- ``ResNet`` with ``BasicBlock`` / ``Bottleneck``: torchvision module names, ONE width per stage (Tables 7/8).
- ``MLP``: the one-hidden-layer network of the paper's Appendix A.
- ``MobileNetV3``: torchvision's MobileNetV3-small and the "minimalistic" variant (Table 4; not prunable).
- ``SegNet``: a VGG encoder and a mirrored decoder (Section 5.5).
- ``_CLASSES``: the class of each ``spec["arch"]`` (what :func:`spvr_lib.models.specs.build` instantiates).
- ``reinitialize``: torchvision's initialisation of any network, in place (SPvR retrains from scratch).

Each class takes a validated spec (:mod:`spvr_lib.models.specs` says what one holds); nothing here reads
specs beyond that, nor files.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import mobilenetv3 as tv_mobilenetv3


# --------------------------------------------------------------------------- initialisation
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


# --------------------------------------------------------------------------- VGG, ResNet, MLP
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


# --------------------------------------------------------------------------- MobileNetV3 (Table 4)
# torchvision's mobilenet_v3_small table (Howard et al., 2019, Table 2), one row per inverted residual:
# (input channels, depthwise kernel, expanded channels, output channels, squeeze-excite, activation, stride)
_MOBILENETV3_SMALL = (
    (16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2), (24, 3, 88, 24, False, "RE", 1),
    (24, 5, 96, 40, True, "HS", 2), (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
    (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1), (48, 5, 288, 96, True, "HS", 2),
    (96, 5, 576, 96, True, "HS", 1), (96, 5, 576, 96, True, "HS", 1),
)


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


# --------------------------------------------------------------------------- SegNet (Section 5.5)
# the spec's encoder and decoder notation: spvr_lib.models.specs
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


# --------------------------------------------------------------------------- registry and re-initialisation
_CLASSES = {"vgg": VGG, "resnet": ResNet, "mlp": MLP, "mobilenetv3": MobileNetV3, "segnet": SegNet}


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
