"""Shared pieces of every dataset: the registry of names, augmentation, the in-memory image sets."""
from __future__ import annotations

import os

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from spvr_lib.store import REPO_ROOT

SPLITS = ("train", "test")


def data_dir() -> Path:
    """Where datasets live by default: ``$SPVR_DATA`` when set, else ``<repo>/data`` (read at each call)."""
    return Path(os.environ.get("SPVR_DATA", REPO_ROOT / "data"))


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset.

    ``image_size`` is the side of the (square) network input, or (H, W) for Cityscapes at full
    resolution; ``ignore_index`` is the mask value a segmentation loss must ignore (None: none).
    """

    name: str
    num_classes: int
    in_channels: int
    image_size: int | tuple[int, int]
    task: str  # "classification" | "segmentation"
    ignore_index: int | None = None


DATASETS: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, 1, 32, "classification"),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, "classification"),
    "tiny-imagenet": DatasetInfo("tiny-imagenet", 200, 3, 64, "classification"),
    "imagenet": DatasetInfo("imagenet", 1000, 3, 224, "classification"),
    "cityscapes": DatasetInfo("cityscapes", 19, 3, (1024, 2048), "segmentation", ignore_index=255),
    "fashion-mnist-scenes": DatasetInfo("fashion-mnist-scenes", 11, 1, 64, "segmentation"),
}


def dataset_info(name: str) -> DatasetInfo:
    """The :class:`DatasetInfo` of dataset ``name`` (a key of :data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"dataset name={name!r} is unknown; expected one of {sorted(DATASETS)}")
    return DATASETS[name]


def random_crop_flip(image: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop of the original size from ``image`` [C, H, W] zero-padded by ``padding`` on each
    side, then a horizontal flip with probability 1/2; randomness from ``generator``."""
    _, height, width = image.shape
    dy, dx = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    out = F.pad(image, (padding, padding, padding, padding))[:, dy:dy + height, dx:dx + width]
    return out.flip(-1) if flip else out


def random_crop_flip_batch(images: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """:func:`random_crop_flip` for a whole batch at once: ``images`` uint8 [B, C, H, W]; each image gets its
    own crop offsets (drawn first, [B, 2]) and flip (drawn next, [B]) from ``generator``."""
    b, _, height, width = images.shape
    offsets = torch.randint(0, 2 * padding + 1, (b, 2), generator=generator)
    flips = torch.randint(0, 2, (b,), generator=generator).bool()
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = offsets[:, :1] + torch.arange(height)                  # [B, H]
    cols = offsets[:, 1:] + torch.arange(width)                   # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    out = padded[torch.arange(b)[:, None, None], :, rows[:, :, None], cols[:, None, :]]   # [B, H, W, C]
    return out.permute(0, 3, 1, 2)


def normalize_uint8(image: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [C, H, W] (or [H, W] with C=1 stats broadcast) -> float ``(image / 255 - mean) / std``."""
    return (image.float() / 255.0 - mean) / std


def _stats(values: Sequence[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1)


class ImageClassification(Dataset):
    """Base of the generator-augmented classification datasets.

    Item ``i`` is ``(image float [C, H, W] normalised, label int)``; subclasses provide the uint8 image.
    """

    def __init__(self, targets: Tensor, classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 crop_padding: int, augment: bool = False, seed: int = 0, name: str = ""):
        self.name = name
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.mean, self.std = _stats(mean), _stats(std)
        self.crop_padding = crop_padding
        self.augment = augment
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream from ``seed`` (e.g. per DataLoader worker)."""
        self.generator.manual_seed(seed)

    def uint8_image(self, index: int) -> Tensor:
        """The stored image ``index`` as uint8 [C, H, W], before augmentation and normalisation."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = self.uint8_image(index)
        if self.augment:
            image = random_crop_flip(image, self.crop_padding, self.generator)
        return normalize_uint8(image, self.mean, self.std), int(self.targets[index])


class InMemoryImages(ImageClassification):
    """Classification dataset held in memory: ``images`` uint8 [N, C, H, W], ``targets`` [N]."""

    def __init__(self, images: Tensor, targets: Tensor, **kw: Any):
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(targets):
            raise ValueError(f"images must be uint8 [N, C, H, W] with N == len(targets)={len(targets)}; "
                             f"got {images.dtype} {tuple(images.shape)}")
        super().__init__(targets, **kw)
        self.images = images

    def uint8_image(self, index: int) -> Tensor:
        return self.images[index]

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Items ``indices`` as one batch (float [B, C, H, W] normalised, labels [B]), augmented a whole batch
        at a time when ``augment`` is on: what ``train.fit`` uses instead of a DataLoader for data in memory."""
        images = self.images[indices]
        if self.augment:
            images = random_crop_flip_batch(images, self.crop_padding, self.generator)
        x = (images.float() / 255.0 - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)
        return x, self.targets[indices]


class LabeledSubset(Dataset):
    """``dataset`` restricted to ``indices``, keeping ``.targets``, ``.num_classes``, ``.classes`` and
    the ``.augment`` flag (forwarded to the parent)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.targets = torch.as_tensor(dataset.targets, dtype=torch.long)[self.indices]
        self.num_classes = dataset.num_classes
        self.classes = getattr(dataset, "classes", None)
        self.name = getattr(dataset, "name", "")

    @property
    def augment(self) -> bool:
        return self.dataset.augment

    @augment.setter
    def augment(self, value: bool) -> None:
        self.dataset.augment = value

    def reseed(self, seed: int) -> None:
        self.dataset.reseed(seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[self.indices[index]]

    def batch(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """The parent's :meth:`InMemoryImages.batch` for these positions (only when the parent has one)."""
        return self.dataset.batch(torch.as_tensor(self.indices)[indices])


def _subfolder(root: Path, name: str, marker: str) -> Path:
    """``root/name`` (the standard layout) or ``root`` itself when it already contains ``marker``."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory; expected it to contain {name}/")
    if (root / name).is_dir():
        return root / name
    if (root / marker).exists():
        return root
    raise FileNotFoundError(f"{root / name} does not exist; expected the folder {name}/ in root={root}")


def _open_rgb(path: Path, size: tuple[int, int] | None = None) -> Image.Image:
    """An image file as an RGB PIL image, resized (bilinear) to ``size`` (H, W) when given."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB")  # a decoded copy, independent of the file
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"image {path} cannot be decoded ({err}); expected a valid image file") from None
    return rgb if size is None else rgb.resize((size[1], size[0]), Image.BILINEAR)


def _read_rgb_uint8(path: Path, size: tuple[int, int] | None = None, expect: tuple[int, int] | None = None) -> Tensor:
    """An image file as uint8 [3, H, W] (RGB); ``size`` (H, W) resizes bilinearly, ``expect`` checks the size."""
    array = np.asarray(_open_rgb(path, size), dtype=np.uint8)
    if expect is not None and array.shape[:2] != expect:
        raise ValueError(f"image {path} is {array.shape[0]}x{array.shape[1]}; expected {expect[0]}x{expect[1]}")
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class ImageSegmentation(Dataset):
    """Base of the segmentation datasets: items (image float [C, H, W] normalised, mask LongTensor [H, W]);
    subclasses set ``self.images`` (one entry per item) and implement ``__getitem__``."""

    def __init__(self, name: str, classes: Sequence[str], mean: Sequence[float], std: Sequence[float],
                 ignore_index: int | None, augment: bool = False, seed: int = 0):
        self.name = name
        self.classes = list(classes)
        self.num_classes = len(self.classes)
        self.ignore_index = ignore_index
        self.augment = augment
        self.mean, self.std = _stats(mean), _stats(std)
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the augmentation random stream from ``seed`` (e.g. per DataLoader worker)."""
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; expected one of {SPLITS}")
