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
import functools
import hashlib
import os
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .cifar10 import CIFAR10_CLASSES, CIFAR10_MEAN, CIFAR10_STD, cifar10  # noqa: F401
from .cityscapes import (  # noqa: F401
    CITYSCAPES_CLASSES,
    CITYSCAPES_IGNORE,
    CITYSCAPES_TRAIN_IDS,
    Cityscapes,
)
from .common import (  # noqa: F401
    data_dir,
    DATASETS,
    SPLITS,
    DatasetInfo,
    ImageClassification,
    ImageSegmentation,
    InMemoryImages,
    LabeledSubset,
    _check_split,
    dataset_info,
    normalize_uint8,
    random_crop_flip,
)
from .fashionmnist import (  # noqa: F401
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    FashionMNISTScenes,
    ensure_fashion_mnist,
    fashion_mnist,
    read_fashion_mnist,
    read_idx,
)
from .guyon import make_guyon  # noqa: F401
from .imagenet import IMAGENET_MEAN, IMAGENET_STD, ImageNetFolder  # noqa: F401
from .tiny_imagenet import TINY_IMAGENET_MEAN, TINY_IMAGENET_STD, TinyImageNet  # noqa: F401

# --------------------------------------------------------------------------- registry


# --------------------------------------------------------------------------- shared image helpers


# --------------------------------------------------------------------------- Fashion-MNIST files





# --------------------------------------------------------------------------- CIFAR-10


# --------------------------------------------------------------------------- Tiny ImageNet


# --------------------------------------------------------------------------- ImageNet


# --------------------------------------------------------------------------- Cityscapes


# --------------------------------------------------------------------------- composed scenes


# --------------------------------------------------------------------------- entry point


_OPTIONS = {"cityscapes": ("size",), "fashion-mnist-scenes": ("n_images", "canvas", "items", "compose_seed")}


# Where each dataset's files are by default (under data/ unless installed system-wide), and the marker
# file or folder that says the layout is there.  README "Datasets" shows each layout in full.
_DEFAULT_FOLDER = {"cifar10": ("cifar-10-batches-py", "test_batch"),
                   "tiny-imagenet": ("tiny-imagenet-200", "wnids.txt"),
                   "imagenet": ("imagenet", "val"),
                   "cityscapes": ("cityscapes", "gtFine")}


def dataset_folder(name: str, root: str | Path | None = None) -> Path:
    """The folder holding dataset ``name``'s files (the same place :func:`load_dataset` reads).

    Fashion-MNIST (and the scenes composed from it): the idx files' folder (``ensure_fashion_mnist``).
    The others: ``root`` (default ``<repo>/data``) / their standard folder, or ``root`` itself when it
    is that folder.  A missing folder raises FileNotFoundError naming where it was expected."""
    dataset_info(name)
    if name in ("fashion-mnist", "fashion-mnist-scenes"):
        return ensure_fashion_mnist(root)
    sub, marker = _DEFAULT_FOLDER[name]
    base = Path(root) if root is not None else data_dir()
    if (base / marker).exists():
        return base
    if (base / sub).is_dir():
        return base / sub
    raise FileNotFoundError(f"dataset {name!r} is not at {base / sub} (or {base} itself): put it there in the "
                            "layout the README's 'Datasets' section shows, or pass root=")


@functools.lru_cache(maxsize=64)
def _fingerprint(folder: str) -> str:
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for f in sorted(filenames):
            path = Path(dirpath) / f
            h.update(f"{path.relative_to(folder)}|{path.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def fingerprint(name: str, root: str | Path | None = None) -> str | None:
    """A fingerprint of the files dataset ``name`` is read from: sha256 of every file's relative path
    and size (not contents: an ImageNet pass would take hours), memoised per process.  It goes into
    the cache key of every training run, so runs on a partial or another copy of a dataset are never
    served for the full one.  None for a dataset without files (none yet: Guyon's data is generated
    by ``make_guyon`` and carries no dataset name)."""
    return _fingerprint(str(dataset_folder(name, root).resolve()))


def num_classes(name: str, root: str | Path | None = None) -> int:
    """How many classes dataset ``name``'s training split holds where it is (a class-folder subset of
    ImageNet or Tiny ImageNet has fewer than the registry's 1000 / 200): what a network for it must output.
    Where the dataset is not on this machine, the registry's count (a spec or a parameter count needs no data)."""
    try:
        files = fingerprint(name, root)
    except FileNotFoundError:
        return dataset_info(name).num_classes
    return _num_classes(name, None if root is None else str(root), files)


@functools.lru_cache(maxsize=32)
def _num_classes(name: str, root: str | None, _files: str) -> int:
    return int(load_dataset(name, "train", root=root, **({"n_images": 2} if name == "fashion-mnist-scenes" else {}))
               .num_classes)


def load_dataset(name: str, split: str, root: str | Path | None = None, augment: bool = False,
                 per_class: int | None = None, seed: int = 0, limit: int | None = None, **kw: Any) -> Dataset:
    """Dataset ``name`` (a key of :data:`DATASETS`), ``split`` "train" or "test" (the val folder for
    tiny-imagenet, imagenet and cityscapes).

    ``root``: where the files are (default: Fashion-MNIST's usual places, else ``<repo>/data`` for cifar10
    and tiny-imagenet, ``<repo>/data/imagenet`` and ``<repo>/data/cityscapes``). ``augment``: the training
    augmentation. ``per_class``: keep a stratified subset with ``per_class`` samples of each class,
    chosen with ``seed`` (classification only). ``limit``: keep only the first ``limit`` samples (after
    ``per_class``). ``seed`` also seeds the augmentation (and the scene
    composition). Extra options: cityscapes ``size=(H, W)``; fashion-mnist-scenes ``n_images`` (default
    1000), ``canvas`` (64), ``items`` ((2, 4)), ``compose_seed`` (the scenes' layout; default ``seed``).
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
        dataset = TinyImageNet(root if root is not None else data_dir(), split, augment, seed)
    elif name == "imagenet":
        base = dataset_folder(name, root)
        dataset = ImageNetFolder(base / ("train" if split == "train" else "val"), augment)
    elif name == "cityscapes":
        dataset = Cityscapes(dataset_folder(name, root), split, size=kw.get("size"), augment=augment, seed=seed)
    else:
        dataset = FashionMNISTScenes(split, kw.get("n_images", 1000), kw.get("canvas", 64),
                                     kw.get("items", (2, 4)), seed=kw.get("compose_seed", seed), root=root, augment=augment)
    if per_class is not None:
        dataset = LabeledSubset(dataset, stratified_indices(dataset.targets, per_class, seed,
                                                            num_classes=dataset.num_classes))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit={limit!r}: expected None or an int >= 1")
        if limit < len(dataset):
            dataset = torch.utils.data.Subset(dataset, range(limit))
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


# --------------------------------------------------------------------------- command line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spvr_lib.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    ensure = commands.add_parser("ensure", help="make sure a dataset is available and print where it is")
    ensure.add_argument("dataset", choices=["fashion-mnist"])
    ensure.add_argument("--root", default=None, help="look only in this folder")
    check = commands.add_parser("check", help="read every split of the given datasets and report their layout "
                                "(python -m spvr_lib.reproduce --check-data --scale S checks a scale's datasets)")
    check.add_argument("datasets", nargs="+", choices=sorted(DATASETS))
    check.add_argument("--root", default=None, help="the folder holding the datasets (default <repo>/data)")
    args = parser.parse_args(argv)
    if args.command == "check":
        problems = check_datasets(args.datasets, args.root)
        return 1 if problems else 0
    try:
        folder = ensure_fashion_mnist(args.root)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"fashion-mnist: {folder}")
    return 0


def check_datasets(names: Sequence[str], root: str | Path | None = None, out: Any = None) -> dict[str, str]:
    """Open both splits of every dataset in ``names`` and read one item of each; print one line per dataset
    (folder, images per split, classes) or its problem.  Returns {dataset: problem} (empty: all fine)."""
    out = out or sys.stdout
    problems = {}
    for name in names:
        try:
            folder = dataset_folder(name, root)
            sizes = {}
            for split in SPLITS:
                ds = load_dataset(name, split, root=root) if name != "fashion-mnist-scenes" else \
                    load_dataset(name, split, root=root, n_images=2)
                ds[0]
                sizes[split] = len(ds)
            print(f"ok      {name}: {folder} (train {sizes['train']}, test {sizes['test']} images, "
                  f"{dataset_info(name).num_classes} classes)", file=out)
        except (FileNotFoundError, ValueError, OSError) as err:
            problems[name] = f"{type(err).__name__}: {err}"
            print(f"missing {name}: {problems[name]}", file=out)
    return problems
