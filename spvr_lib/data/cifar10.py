"""CIFAR-10 from its python pickle batches (cifar-10-batches-py)."""
from __future__ import annotations

import functools
import pickle
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .common import data_dir, InMemoryImages, _check_split, _subfolder

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
_CIFAR10_BATCHES = {"train": tuple(f"data_batch_{k}" for k in range(1, 6)), "test": ("test_batch",)}

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
    folder = _subfolder(Path(root) if root is not None else data_dir(), "cifar-10-batches-py", "test_batch")
    images, labels = _cifar10_tensors(str(folder), split)
    return InMemoryImages(images, labels, classes=CIFAR10_CLASSES, mean=CIFAR10_MEAN, std=CIFAR10_STD,
                          crop_padding=4, augment=augment, seed=seed, name="cifar10")
