"""Tiny ImageNet in its official layout (train/<wnid>/images, val/val_annotations.txt)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from .common import ImageClassification, _check_split, _read_rgb_uint8, _subfolder

TINY_IMAGENET_MEAN, TINY_IMAGENET_STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)

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
