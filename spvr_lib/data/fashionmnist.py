"""Fashion-MNIST (idx files of the Debian package dataset-fashion-mnist) and the segmentation scenes composed from it."""
from __future__ import annotations

import functools
import gzip
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .common import (
    data_dir,
    ImageSegmentation,
    InMemoryImages,
    _check_split,
    normalize_uint8,
)

FASHION_MNIST_MEAN_28, FASHION_MNIST_STD_28 = 0.2860, 0.3530  # train set, 28x28 images in [0, 1]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2190, 0.3318        # the same pixels zero-padded to 32x32

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


FASHION_MNIST_APT_PACKAGE = "dataset-fashion-mnist"


SYSTEM_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


_FASHION_MNIST_MIRROR = ("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80)


_IDX_MAGIC = {2049: 1, 2051: 3}  # uint8 labels (1 dim), uint8 images (3 dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Parse a uint8 idx file (gzipped when the name ends in .gz): labels [N] or images [N, rows, cols].

    Raises ValueError naming ``path`` for a bad gzip stream, an unknown magic number or a size that
    does not match the header.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                raw = fh.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as err:  # BadGzipFile is an OSError; a truncated stream an EOFError
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"idx file {path} does not exist") from None
        raise ValueError(f"idx file {path} cannot be read ({err}); expected a gzipped idx file") from None
    if len(raw) < 8:
        raise ValueError(f"idx file {path} has {len(raw)} bytes; expected at least an 8-byte header")
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _IDX_MAGIC:
        raise ValueError(f"idx file {path} has magic number {magic}; expected 2049 (labels) or 2051 (images)")
    ndim = _IDX_MAGIC[magic]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"idx file {path} has {len(raw)} bytes; expected a {header}-byte header")
    shape = tuple(int.from_bytes(raw[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise ValueError(f"idx file {path} has {len(raw)} bytes; expected {expected} for shape {shape} "
                         "(truncated or corrupt)")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _has_fashion_mnist(folder: Path) -> bool:
    return all(_idx_file(folder, stem) is not None for pair in FASHION_MNIST_FILES.values() for stem in pair)


def _fashion_mnist_missing_message(searched: Sequence[Path]) -> str:
    names = ", ".join(f"{s}.gz" for pair in FASHION_MNIST_FILES.values() for s in pair)
    return (f"Fashion-MNIST not found (looked in {', '.join(str(p) for p in searched)}). Install it with "
            f"`sudo apt-get install {FASHION_MNIST_APT_PACKAGE}` (Debian/Ubuntu; files go to "
            f"{SYSTEM_FASHION_MNIST}), or copy the four files {names} (gzipped or not) to "
            f"{data_dir() / 'fashion-mnist'}/.")


def _can_use_apt() -> bool:
    return (hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/etc/debian_version").exists()
            and shutil.which("apt-get") is not None)


def _apt_install_fashion_mnist() -> bool:
    """``apt-get update`` + ``apt-get install -y dataset-fashion-mnist`` (output shown); True on success."""
    try:
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", FASHION_MNIST_APT_PACKAGE]):
            print("+", " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"apt-get failed ({err}); trying other sources", file=sys.stderr)
        return False
    return True


def _network_reachable(host: str, port: int, timeout_s: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _torchvision_download_fashion_mnist(dest: Path) -> bool:
    """Download the four .gz files with torchvision into ``dest``; True on success."""
    if not _network_reachable(*_FASHION_MNIST_MIRROR):
        return False
    from torchvision.datasets import FashionMNIST

    dest.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            FashionMNIST(tmp, train=True, download=True)
            raw = Path(tmp) / "FashionMNIST" / "raw"
            for pair in FASHION_MNIST_FILES.values():
                for stem in pair:
                    os.replace(raw / f"{stem}.gz", dest / f"{stem}.gz")
    except (OSError, RuntimeError) as err:
        print(f"torchvision download failed ({err})", file=sys.stderr)
        return False
    return True


def ensure_fashion_mnist(root: str | Path | None = None) -> Path:
    """The folder holding the four Fashion-MNIST idx files (``.gz`` or not).

    With ``root`` given, only ``root`` is checked. Otherwise: ``/usr/share/datasets/fashion-mnist``
    (the Debian package), then ``<repo>/data/fashion-mnist``; if both lack the files, install the apt
    package (only as root on Debian), else download with torchvision into ``<repo>/data/fashion-mnist``
    (only if the mirror is reachable), else raise FileNotFoundError saying how to get the files.
    """
    if root is not None:
        folder = Path(root)
        if not _has_fashion_mnist(folder):
            raise FileNotFoundError(_fashion_mnist_missing_message([folder]))
        return folder
    local = data_dir() / "fashion-mnist"
    for folder in (SYSTEM_FASHION_MNIST, local):
        if _has_fashion_mnist(folder):
            return folder
    if _can_use_apt() and _apt_install_fashion_mnist() and _has_fashion_mnist(SYSTEM_FASHION_MNIST):
        return SYSTEM_FASHION_MNIST
    if _torchvision_download_fashion_mnist(local) and _has_fashion_mnist(local):
        return local
    raise FileNotFoundError(_fashion_mnist_missing_message([SYSTEM_FASHION_MNIST, local]))


@functools.lru_cache(maxsize=8)
def read_fashion_mnist(folder: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Parsed ``split`` of the Fashion-MNIST files in ``folder``: images uint8 [N, 28, 28] and labels
    int64 [N] in 0..9 (cached per process; the arrays are read-only)."""
    folder = Path(folder)
    _check_split(split)
    paths = [_idx_file(folder, stem) for stem in FASHION_MNIST_FILES[split]]
    for stem, path in zip(FASHION_MNIST_FILES[split], paths):
        if path is None:
            raise FileNotFoundError(f"Fashion-MNIST file {folder / stem}(.gz) does not exist")
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{paths[0]} holds arrays of shape {images.shape}; expected images [N, 28, 28]")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{paths[1]} holds shape {labels.shape}; expected labels [{len(images)}] "
                         f"matching {paths[0]}")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{paths[1]} holds label {labels.max()}; expected labels in 0..9")
    labels = labels.astype(np.int64)
    labels.flags.writeable = False
    return images, labels


@functools.lru_cache(maxsize=8)
def _fashion_mnist_padded(folder: str, split: str) -> tuple[Tensor, Tensor]:
    images, labels = read_fashion_mnist(folder, split)
    padded = F.pad(torch.tensor(images).unsqueeze(1), (2, 2, 2, 2))  # uint8 [N, 1, 32, 32]
    return padded, torch.tensor(labels)


def fashion_mnist(split: str, root: str | Path | None = None, augment: bool = False, seed: int = 0) -> InMemoryImages:
    """Fashion-MNIST ``split``: items (float [1, 32, 32] normalised, label); augmentation: crop 32 pad 4 + flip."""
    _check_split(split)
    folder = ensure_fashion_mnist(root)
    images, labels = _fashion_mnist_padded(str(folder), split)
    return InMemoryImages(images, labels, classes=FASHION_MNIST_CLASSES, mean=(FASHION_MNIST_MEAN,),
                          std=(FASHION_MNIST_STD,), crop_padding=4, augment=augment, seed=seed,
                          name="fashion-mnist")


SCENE_THRESHOLD = 0.1  # an item pixel belongs to the item when its intensity (in [0, 1]) is > 0.1


class FashionMNISTScenes(ImageSegmentation):
    """Segmentation stand-in: ``n_images`` canvases (1 x canvas x canvas) with ``items[0]..items[1]``
    Fashion-MNIST items of ``split`` pasted at random positions (fully inside the canvas).

    Pasting an item sets the pixels where it is foreground (intensity > :data:`SCENE_THRESHOLD`) to
    its intensity and its mask to class + 1 (later items overwrite earlier ones); its faint pixels only
    raise the canvas (elementwise max) and keep the mask. So mask > 0 exactly where the canvas is above
    the threshold. 11 classes: 0 = background, 1..10 = the Fashion-MNIST classes. Deterministic given
    ``seed``. Items: (image float [1, H, W] normalised with the 28x28 Fashion-MNIST constants 0.2860 /
    0.3530, mask LongTensor [H, W]); ``augment`` flips both together with probability 1/2.
    """

    def __init__(self, split: str, n_images: int, canvas: int = 64, items: tuple[int, int] = (2, 4),
                 seed: int = 0, root: str | Path | None = None, augment: bool = False):
        _check_split(split)
        if int(n_images) < 1:
            raise ValueError(f"n_images={n_images!r}; expected a positive number of images")
        if int(canvas) < 28:
            raise ValueError(f"canvas={canvas!r}; expected at least 28 pixels (one item)")
        if len(items) != 2 or not 1 <= items[0] <= items[1]:
            raise ValueError(f"items={items!r}; expected (min, max) with 1 <= min <= max")
        pool, labels = read_fashion_mnist(str(ensure_fashion_mnist(root)), split)
        rng = np.random.default_rng(seed)
        images = np.zeros((n_images, canvas, canvas), dtype=np.uint8)
        masks = np.zeros((n_images, canvas, canvas), dtype=np.uint8)
        threshold = SCENE_THRESHOLD * 255
        for i in range(n_images):
            count = int(rng.integers(items[0], items[1] + 1))
            picks = rng.integers(0, len(pool), size=count)
            corners = rng.integers(0, canvas - 28 + 1, size=(count, 2))
            for pick, (y, x) in zip(picks, corners):
                item = pool[pick]
                foreground = item > threshold
                window = images[i, y:y + 28, x:x + 28]
                window[...] = np.where(foreground, item, np.maximum(window, item))
                masks[i, y:y + 28, x:x + 28][foreground] = labels[pick] + 1
        self.images = torch.from_numpy(images).unsqueeze(1)  # uint8 [N, 1, canvas, canvas]
        self.masks = torch.from_numpy(masks)                  # uint8 [N, canvas, canvas]
        super().__init__("fashion-mnist-scenes", ["background", *FASHION_MNIST_CLASSES], (FASHION_MNIST_MEAN_28,),
                         (FASHION_MNIST_STD_28,), None, augment, seed)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask = self.images[index], self.masks[index].long()
        if self.augment and bool(torch.randint(0, 2, (1,), generator=self.generator)):
            image, mask = image.flip(-1), mask.flip(-1)
        return normalize_uint8(image, self.mean, self.std), mask
