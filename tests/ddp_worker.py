"""Tiny stand-ins for ``spvr_lib.models`` / ``spvr_lib.data`` and a CLI launcher for the torchrun test.

``python tests/ddp_worker.py <args of python -m spvr_lib train>`` installs the stand-ins and runs the ``train``
command of ``spvr_lib.__main__``; the tests launch it with ``torch.distributed.run --nproc_per_node 2``.
The stand-ins follow the real APIs (``models.build/preset/count_params/model_size_mb/reinitialize``,
``data.load_dataset``) with a 2-layer MLP (with BatchNorm) on Gaussian blobs of shape [1, 2, 2].
"""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import spvr_lib  # noqa: E402
from spvr_lib import __main__ as cli  # noqa: E402
from spvr_lib import models as real_models  # noqa: E402
from spvr_lib import train  # noqa: E402

NUM_CLASSES = 3
SHAPE = (1, 2, 2)


def _build(spec: dict) -> nn.Module:
    c, h, w = spec["input_shape"]
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, spec["hidden"]), nn.BatchNorm1d(spec["hidden"]),
                         nn.ReLU(), nn.Linear(spec["hidden"], spec["num_classes"]))


def _preset(name: str, num_classes: int, in_channels: int, width: float = 1.0) -> dict:
    return {"name": name, "num_classes": num_classes, "input_shape": [in_channels, *SHAPE[1:]],
            "hidden": max(2, int(16 * width))}


class BlobDataset(torch.utils.data.Dataset):
    """Gaussian blobs, one per class; ``augment`` adds noise drawn from ``self.generator``."""

    def __init__(self, n_per_class: int, seed: int, augment: bool) -> None:
        g = torch.Generator().manual_seed(seed)
        means = torch.randn(NUM_CLASSES, *SHAPE, generator=torch.Generator().manual_seed(1234)) * 2
        self.targets = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
        self.x = means[self.targets] + 0.5 * torch.randn(len(self.targets), *SHAPE, generator=g)
        self.num_classes = NUM_CLASSES
        self.generator = torch.Generator().manual_seed(seed) if augment else None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.x[i]
        if self.generator is not None:
            x = x + 0.1 * torch.randn(x.shape, generator=self.generator)
        return x, int(self.targets[i])


def _load_dataset(name: str, split: str, augment: bool = False, per_class: int | None = None,
                  seed: int = 0) -> BlobDataset:
    return BlobDataset(per_class or 20, seed=seed + (0 if split == "train" else 10_000), augment=augment)


def _load_network(path) -> nn.Module:
    """``models.load_network`` for the stand-in specs: the description beside the weights, then the weights."""
    desc = json.loads(Path(f"{path}.json").read_text())
    model = _build(desc["spec"])
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model


def fake_modules() -> tuple[types.ModuleType, types.ModuleType]:
    models = types.ModuleType("spvr_lib.models")
    models.build = _build
    models.preset = _preset
    models.count_params = lambda m: sum(p.numel() for p in m.parameters())
    models.model_size_mb = lambda m: sum(p.numel() * p.element_size() for p in m.parameters()) / 2**20
    models.reinitialize = real_models.reinitialize
    models.save_network = real_models.save_network
    models.network_shapes = real_models.network_shapes
    models.build_network = lambda spec, shapes=None: _build(spec)
    models.load_network = _load_network
    data = types.ModuleType("spvr_lib.data")
    data.load_dataset = _load_dataset
    data.fingerprint = lambda name, root=None: "blobs"
    data.dataset_info = lambda name: types.SimpleNamespace(task="classification", num_classes=NUM_CLASSES)
    return models, data


def install(monkeypatch=None) -> None:
    """Put the stand-ins in place of spvr_lib.models / spvr_lib.data (through ``monkeypatch`` if given)."""
    models, data = fake_modules()
    for name, mod in (("models", models), ("data", data)):
        if monkeypatch is None:
            sys.modules[f"spvr_lib.{name}"] = mod
            setattr(spvr_lib, name, mod)
            setattr(train, name, mod)
            setattr(cli, name, mod)
        else:
            monkeypatch.setitem(sys.modules, f"spvr_lib.{name}", mod)
            monkeypatch.setattr(spvr_lib, name, mod, raising=False)
            monkeypatch.setattr(train, name, mod)
            monkeypatch.setattr(cli, name, mod)


if __name__ == "__main__":
    torch.set_num_threads(1)
    install()
    raise SystemExit(cli.main(["train", *sys.argv[1:]]))
