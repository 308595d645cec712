"""Datasets: one entry point, :func:`load_dataset`, for every dataset of the paper and the CPU stand-ins.

* ``fashion-mnist`` (embedded default of the ``smoke`` and ``cpu`` scales): the idx files of the Debian
  package ``dataset-fashion-mnist`` (or ``data/fashion-mnist/``), parsed here and kept in memory as uint8.
  Images are [1, 32, 32]: the 28x28 image zero-padded by 2 on each side (so VGG16's five 2x2 max-pools
  fit), scaled to [0, 1] and normalised with the padded train-set constants ``FASHION_MNIST_MEAN`` /
  ``FASHION_MNIST_STD`` (0.2190 / 0.3318; on the 28x28 images they are 0.2860 / 0.3530).
* ``cifar10``, ``tiny-imagenet``, ``imagenet``, ``cityscapes``: the paper's datasets read from a local
  directory in their standard on-disk formats (nothing is downloaded).
* ``fashion-mnist-scenes``: a segmentation stand-in composed of Fashion-MNIST items (:class:`FashionMNISTScenes`).

Training augmentation for the 32x32 and 64x64 datasets is "random crop with zero padding + horizontal
flip", done on the uint8 image *before* normalisation (so the padding is black, like the image
background), with torch ops and a per-dataset ``torch.Generator`` (deterministic given the seed with
``num_workers=0``; :meth:`reseed` lets a DataLoader ``worker_init_fn`` give each worker its own stream).

Every classification dataset exposes ``.targets`` (LongTensor or list of ints), ``.num_classes``,
``.classes`` and a writable ``.augment`` flag; segmentation datasets return ``(image, mask)`` pairs with
``mask`` a LongTensor [H, W].

Command line: ``python -m spvr_lib.data ensure fashion-mnist`` prints where Fashion-MNIST is (installing
it when possible).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gzip
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .results import REPO_ROOT

SPLITS = ("train", "test")
DATA_DIR = REPO_ROOT / "data"


# --------------------------------------------------------------------------- registry
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


# --------------------------------------------------------------------------- shared image helpers
def random_crop_flip(image: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Random crop of the original size from ``image`` [C, H, W] zero-padded by ``padding`` on each
    side, then a horizontal flip with probability 1/2; randomness from ``generator``."""
    _, height, width = image.shape
    dy, dx = torch.randint(0, 2 * padding + 1, (2,), generator=generator).tolist()
    flip = bool(torch.randint(0, 2, (1,), generator=generator))
    out = F.pad(image, (padding, padding, padding, padding))[:, dy:dy + height, dx:dx + width]
    return out.flip(-1) if flip else out


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


# --------------------------------------------------------------------------- Fashion-MNIST files
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_MEAN_28, FASHION_MNIST_STD_28 = 0.2860, 0.3530  # train set, 28x28 images in [0, 1]
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2190, 0.3318        # the same pixels zero-padded to 32x32
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
            f"{DATA_DIR / 'fashion-mnist'}/.")


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
    local = DATA_DIR / "fashion-mnist"
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


# --------------------------------------------------------------------------- CIFAR-10
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR10_BATCHES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}


def _subfolder(root: Path, name: str, marker: str) -> Path:
    """``root/name`` (the standard layout) or ``root`` itself when it already contains ``marker``."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory; expected it to contain {name}/")
    if (root / name).is_dir():
        return root / name
    if (root / marker).exists():
        return root
    raise FileNotFoundError(f"{root / name} does not exist; expected the folder {name}/ in root={root}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 batch {path} does not exist; expected the python-pickle batches "
                                f"{', '.join(_CIFAR10_BATCHES['train'] + _CIFAR10_BATCHES['test'])}")
    try:  # the standard format is a pickle: only load batches you obtained from a trusted source
        with open(path, "rb") as fh:
            batch = pickle.load(fh, encoding="latin1")
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as err:  # unpickling can fail in many ways; report them all as a bad file
        raise ValueError(f"CIFAR-10 batch {path} is not a valid python-pickle batch ({type(err).__name__}: "
                         f"{err}); expected a dict with 'data' [n, 3072] uint8 and 'labels' [n]") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"CIFAR-10 batch {path} has data {data.shape} and {len(labels)} labels; "
                         "expected data [n, 3072] and n labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise ValueError(f"CIFAR-10 batch {path} has labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


@functools.lru_cache(maxsize=4)
def _cifar10_tensors(folder: str, split: str) -> tuple[Tensor, Tensor]:
    parts = [_read_cifar_batch(Path(folder) / name) for name in _CIFAR10_BATCHES[split]]
    return (torch.from_numpy(np.concatenate([p[0] for p in parts])),
            torch.from_numpy(np.concatenate([p[1] for p in parts])))


def cifar10(split: str, root: str | Path | None = None, augment: bool = False, seed: int = 0) -> InMemoryImages:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (default root: ``<repo>/data``): items (float [3, 32, 32]
    normalised, label); augmentation: crop 32 pad 4 + flip."""
    _check_split(split)
    folder = _subfolder(Path(root) if root is not None else DATA_DIR, "cifar-10-batches-py", "test_batch")
    images, labels = _cifar10_tensors(str(folder), split)
    return InMemoryImages(images, labels, classes=CIFAR10_CLASSES, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                          crop_padding=4, augment=augment, seed=seed, name="cifar10")


# --------------------------------------------------------------------------- Tiny ImageNet
TINY_IMAGENET_MEAN, TINY_IMAGENET_STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)


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


class TinyImageNet(ImageClassification):
    """Tiny ImageNet in the official layout under ``root/tiny-imagenet-200`` (or ``root`` itself).

    Classes are the wnids of ``wnids.txt`` in sorted order (ImageFolder's convention); train images are
    ``train/<wnid>/images/*.JPEG``; ``test`` is the official val split, labelled by
    ``val/val_annotations.txt``. Items: (float [3, 64, 64] normalised, label), decoded lazily;
    augmentation: crop 64 pad 8 + flip.
    """

    def __init__(self, root: str | Path, split: str, augment: bool = False, seed: int = 0):
        _check_split(split)
        base = _subfolder(Path(root), "tiny-imagenet-200", "wnids.txt")
        wnids_path = base / "wnids.txt"
        if not wnids_path.is_file():
            raise FileNotFoundError(f"{wnids_path} does not exist; expected one wnid per line")
        classes = sorted({line.strip() for line in wnids_path.read_text().splitlines() if line.strip()})
        class_index = {w: i for i, w in enumerate(classes)}
        files: list[Path] = []
        targets: list[int] = []
        if split == "train":
            for wnid in classes:
                folder = base / "train" / wnid / "images"
                found = sorted(folder.glob("*.JPEG")) if folder.is_dir() else []
                if not found:
                    raise FileNotFoundError(f"{folder} has no .JPEG images; expected the train images of {wnid}")
                files += found
                targets += [class_index[wnid]] * len(found)
        else:
            annotations = base / "val" / "val_annotations.txt"
            if not annotations.is_file():
                raise FileNotFoundError(f"{annotations} does not exist; expected the val labels "
                                        "(tab-separated: filename, wnid, bbox)")
            for number, line in enumerate(annotations.read_text().splitlines(), start=1):
                if not line.strip():
                    continue
                fields = line.split("\t")
                if len(fields) < 2 or fields[1] not in class_index:
                    raise ValueError(f"{annotations} line {number} is {line!r}; expected 'filename<TAB>wnid...' "
                                     "with a wnid listed in wnids.txt")
                path = base / "val" / "images" / fields[0]
                if not path.is_file():
                    raise FileNotFoundError(f"{path} (listed in {annotations} line {number}) does not exist")
                files.append(path)
                targets.append(class_index[fields[1]])
        super().__init__(torch.tensor(targets, dtype=torch.long), classes, TINY_IMAGENET_MEAN,
                         TINY_IMAGENET_STD, crop_padding=8, augment=augment, seed=seed, name="tiny-imagenet")
        self.files = files

    def uint8_image(self, index: int) -> Tensor:
        return _read_rgb_uint8(self.files[index], expect=(64, 64))


# --------------------------------------------------------------------------- ImageNet
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ImageNetFolder(Dataset):
    """ImageNet class folders ``root/{train,val}/<wnid>/*.JPEG`` (torchvision ImageFolder).

    Items: (float [3, 224, 224] normalised, label). ``augment``: RandomResizedCrop(224) + flip, else
    Resize(256) + CenterCrop(224). The torchvision transforms draw from torch's global RNG, so seed
    that (``torch.manual_seed`` / the DataLoader's worker seeding); :meth:`reseed` does nothing here.
    """

    def __init__(self, folder: str | Path, augment: bool = False):
        import torchvision.transforms as T
        from torchvision.datasets import ImageFolder

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"ImageNet split folder {folder} does not exist; expected <wnid>/*.JPEG class folders")
        try:
            self.folder = ImageFolder(str(folder))
        except (FileNotFoundError, RuntimeError) as err:
            raise FileNotFoundError(f"ImageNet split folder {folder}: {err}; expected <wnid>/*.JPEG class folders") from None
        self.name = "imagenet"
        self.augment = augment
        self.classes = self.folder.classes
        self.num_classes = len(self.classes)
        self.targets = list(self.folder.targets)
        normalize = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_transform = T.Compose([T.RandomResizedCrop(224), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
        self.eval_transform = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), normalize])

    def reseed(self, seed: int) -> None:
        """No own generator (see the class docstring)."""

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, target = self.folder.samples[index]
        image = _open_rgb(Path(path))
        transform = self.train_transform if self.augment else self.eval_transform
        return transform(image), int(target)


# --------------------------------------------------------------------------- Cityscapes
CITYSCAPES_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
                      "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
                      "motorcycle", "bicycle")
CITYSCAPES_IGNORE = 255
# labelId -> trainId of the official cityscapesScripts labels.py; every other id -> 255 (ignore)
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
_CITYSCAPES_LUT = torch.full((256,), CITYSCAPES_IGNORE, dtype=torch.long)
for _label_id, _train_id in CITYSCAPES_TRAIN_IDS.items():
    _CITYSCAPES_LUT[_label_id] = _train_id


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


class Cityscapes(ImageSegmentation):
    """Cityscapes (fine annotations) in torchvision's layout under ``root``:
    ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and ``gtFine/{split}/{city}/*_gtFine_labelIds.png``.

    ``split`` "test" reads the ``val`` folders (the official test masks are not public). Items:
    (image float [3, H, W] normalised with the ImageNet statistics, mask LongTensor [H, W] with the 19
    train ids and 255 = ignore). ``size`` (H, W) resizes (image bilinear, mask nearest);
    ``augment`` flips image and mask together with probability 1/2.
    """

    def __init__(self, root: str | Path, split: str, size: tuple[int, int] | None = None,
                 augment: bool = False, seed: int = 0):
        _check_split(split)
        root = Path(root)
        folder = "train" if split == "train" else "val"
        image_dir, mask_dir = root / "leftImg8bit" / folder, root / "gtFine" / folder
        for d in (image_dir, mask_dir):
            if not d.is_dir():
                raise FileNotFoundError(f"Cityscapes folder {d} does not exist; expected "
                                        f"root/leftImg8bit/{folder}/<city>/ and root/gtFine/{folder}/<city>/")
        self.images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        if not self.images:
            raise FileNotFoundError(f"{image_dir} holds no <city>/*_leftImg8bit.png images")
        self.masks = []
        for image in self.images:
            stem = image.name[: -len("_leftImg8bit.png")]
            mask = mask_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"
            if not mask.is_file():
                raise FileNotFoundError(f"Cityscapes mask {mask} does not exist; expected one per image ({image})")
            self.masks.append(mask)
        if size is not None and (len(size) != 2 or min(size) < 1):
            raise ValueError(f"size={size!r}; expected (height, width) in pixels")
        self.size = tuple(size) if size is not None else None
        super().__init__("cityscapes", CITYSCAPES_CLASSES, IMAGENET_MEAN, IMAGENET_STD, CITYSCAPES_IGNORE,
                         augment, seed)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = _read_rgb_uint8(self.images[index], size=self.size)
        path = self.masks[index]
        try:
            with Image.open(path) as img:
                if self.size is not None:
                    img = img.resize((self.size[1], self.size[0]), Image.NEAREST)
                label_ids = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())
        except (OSError, SyntaxError, ValueError) as err:
            raise ValueError(f"Cityscapes mask {path} cannot be decoded ({err}); expected an 8-bit labelIds PNG") from None
        if label_ids.shape != image.shape[1:]:
            raise ValueError(f"Cityscapes mask {path} is {tuple(label_ids.shape)}; expected the image size "
                             f"{tuple(image.shape[1:])}")
        mask = _CITYSCAPES_LUT[label_ids.long()]
        if self.augment and bool(torch.randint(0, 2, (1,), generator=self.generator)):
            image, mask = image.flip(-1), mask.flip(-1)
        return normalize_uint8(image, self.mean, self.std), mask


# --------------------------------------------------------------------------- composed scenes
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


# --------------------------------------------------------------------------- entry point
def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; expected one of {SPLITS}")


_OPTIONS = {"cityscapes": ("size",), "fashion-mnist-scenes": ("n_images", "canvas", "items")}


def load_dataset(name: str, split: str, root: str | Path | None = None, augment: bool = False,
                 per_class: int | None = None, seed: int = 0, **kw: Any) -> Dataset:
    """Dataset ``name`` (a key of :data:`DATASETS`), ``split`` "train" or "test" (the val folder for
    tiny-imagenet, imagenet and cityscapes).

    ``root``: where the files are (default: Fashion-MNIST's usual places, else ``<repo>/data`` for cifar10
    and tiny-imagenet, ``<repo>/data/imagenet`` and ``<repo>/data/cityscapes``). ``augment``: the training
    augmentation. ``per_class``: keep a stratified subset with ``per_class`` samples of each class,
    chosen with ``seed`` (classification only). ``seed`` also seeds the augmentation (and the scene
    composition). Extra options: cityscapes ``size=(H, W)``; fashion-mnist-scenes ``n_images`` (default
    1000), ``canvas`` (64), ``items`` ((2, 4)).
    """
    info = dataset_info(name)
    _check_split(split)
    unknown = sorted(set(kw) - set(_OPTIONS.get(name, ())))
    if unknown:
        raise ValueError(f"options {unknown} do not apply to dataset {name!r}; "
                         f"expected only {list(_OPTIONS.get(name, ())) or 'none'}")
    if per_class is not None and info.task != "classification":
        raise ValueError(f"per_class={per_class} applies to classification datasets; {name!r} is {info.task}")
    if name == "fashion-mnist":
        dataset: Dataset = fashion_mnist(split, root, augment, seed)
    elif name == "cifar10":
        dataset = cifar10(split, root, augment, seed)
    elif name == "tiny-imagenet":
        dataset = TinyImageNet(root if root is not None else DATA_DIR, split, augment, seed)
    elif name == "imagenet":
        base = Path(root) if root is not None else DATA_DIR / "imagenet"
        dataset = ImageNetFolder(base / ("train" if split == "train" else "val"), augment)
    elif name == "cityscapes":
        dataset = Cityscapes(root if root is not None else DATA_DIR / "cityscapes", split,
                             size=kw.get("size"), augment=augment, seed=seed)
    else:
        dataset = FashionMNISTScenes(split, kw.get("n_images", 1000), kw.get("canvas", 64),
                                     kw.get("items", (2, 4)), seed=seed, root=root, augment=augment)
    if per_class is not None:
        dataset = LabeledSubset(dataset, stratified_indices(dataset.targets, per_class, seed,
                                                            num_classes=dataset.num_classes))
    return dataset


def stratified_indices(targets: Tensor | Sequence[int] | np.ndarray, per_class: int, seed: int,
                       num_classes: int | None = None) -> list[int]:
    """``per_class`` indices of each class in ``targets``, drawn without replacement with ``seed``,
    returned sorted. Classes are those present in ``targets``, or 0..num_classes-1 when given (then a
    missing class is an error). ValueError naming the class and its count when one is too small."""
    if int(per_class) < 1:
        raise ValueError(f"per_class={per_class!r}; expected a positive number of samples per class")
    labels = np.asarray(targets.cpu() if isinstance(targets, Tensor) else targets, dtype=np.int64).reshape(-1)
    classes = range(num_classes) if num_classes is not None else np.unique(labels).tolist()
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        if len(members) < per_class:
            raise ValueError(f"class {cls} has {len(members)} samples; per_class={per_class} needs at least that many")
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return sorted(int(i) for i in np.concatenate(chosen)) if chosen else []


@contextlib.contextmanager
def augmentation_off(dataset: Dataset) -> Iterator[Dataset]:
    """Temporarily set ``dataset.augment = False`` (restored on exit)."""
    previous = getattr(dataset, "augment", None)
    if previous is not None:
        dataset.augment = False
    try:
        yield dataset
    finally:
        if previous is not None:
            dataset.augment = previous


def calibration_set(dataset: Dataset, per_class: int, seed: int = 0, progress: bool = True) -> tuple[Tensor, Tensor]:
    """The calibration subset SPvR groups and ranks with, drawn without augmentation.

    Classification: ``per_class`` samples of every class (stratified, ``seed``): x [n, C, H, W], y [n]
    with n = per_class * num_classes. Segmentation datasets (no ``.targets``): per_class * num_classes
    images drawn at random with ``seed``: x [n, C, H, W], y = masks [n, H, W].
    """
    if hasattr(dataset, "targets"):
        indices = stratified_indices(dataset.targets, per_class, seed, num_classes=dataset.num_classes)
    else:
        n = int(per_class) * dataset.num_classes
        if int(per_class) < 1 or n > len(dataset):
            raise ValueError(f"per_class={per_class!r} x {dataset.num_classes} classes = {n} images; "
                             f"expected between 1 and len(dataset)={len(dataset)}")
        indices = sorted(torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    xs, ys = [], []
    with augmentation_off(dataset):
        for i in tqdm(indices, desc="calibration set", disable=not progress, leave=False):
            x, y = dataset[i]
            xs.append(x)
            ys.append(torch.as_tensor(y, dtype=torch.long))
    return torch.stack(xs), torch.stack(ys)


# --------------------------------------------------------------------------- Appendix A
def make_guyon(n_samples: int = 1000, n_features: int = 100, flip_y: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic binary task of the paper's Appendix A (Guyon 2003 via sklearn's make_classification):
    X float32 [n_samples, n_features], y int64 [n_samples] in {0, 1}.

    Other settings are sklearn's defaults: n_informative=2, n_redundant=2, n_repeated=0,
    n_clusters_per_class=2, class_sep=1.0, shuffle=True; ``flip_y`` labels are reassigned at random.
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n_samples, n_features=n_features, n_classes=2, flip_y=flip_y,
                               random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)


# --------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spvr_lib.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ensure = commands.add_parser("ensure", help="make sure a dataset is available and print where it is")
    ensure.add_argument("dataset", choices=["fashion-mnist"])
    ensure.add_argument("--root", default=None, help="look only in this folder")
    args = parser.parse_args(argv)
    try:
        folder = ensure_fashion_mnist(args.root)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"fashion-mnist: {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
