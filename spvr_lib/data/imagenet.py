"""ImageNet1K from class folders (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)."""
from __future__ import annotations

from pathlib import Path

from torch import Tensor
from torch.utils.data import Dataset

from .common import _open_rgb

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
