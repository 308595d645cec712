"""CityScapes in torchvision's layout (leftImg8bit/, gtFine/), labelIds mapped to the 19 trainIds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .common import ImageSegmentation, _check_split, _read_rgb_uint8, normalize_uint8
from .imagenet import IMAGENET_MEAN, IMAGENET_STD

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
