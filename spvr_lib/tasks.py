"""Semantic segmentation (Section 5.5): mean IoU, evaluation and a small training loop.

A segmentation dataset yields ``(x, y)`` with ``x`` a float tensor [C, H, W] and ``y`` a long
tensor [H, W] of class indices, ``IGNORE_INDEX`` (255) marking pixels that are not scored. The
model (e.g. ``models.build(models.segnet_vgg16(...))``) maps [n, C, H, W] to logits [n, K, H, W].
Scores are in percent, like ``train.evaluate``'s accuracies and the paper's "51.2% IoU".

SPvR needs no segmentation-specific pruner: ``criteria.spvr_loss`` takes the [n, K, H, W] softmax
outputs and sums Eq. 2 over the pixels, as Section 5.5 does.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from spvr_lib.train import resolve_device

__all__ = ["IGNORE_INDEX", "confusion_matrix", "mean_iou", "evaluate_segmentation", "fit_segmentation"]

IGNORE_INDEX = 255


def _check_int(value, what: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """[K, K] int64 pixel counts, row = target class, column = predicted class.

    ``pred``, ``target``: integer tensors of the same shape (e.g. [n, H, W]); pixels whose target is
    ``ignore_index`` are not counted. Every other target and the prediction there must lie in [0, K).
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor):
        raise ValueError(f"pred and target must be torch tensors, got {type(pred).__name__} and "
                         f"{type(target).__name__}")
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have the same shape, got {tuple(pred.shape)} and "
                         f"{tuple(target.shape)}")
    for name, t in (("pred", pred), ("target", target)):
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise ValueError(f"{name} must be an integer tensor of class indices, got dtype {t.dtype}")
    _check_int(num_classes, "num_classes", 1)
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    for name, values in (("target", t), ("pred", p)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} has class indices outside [0, {num_classes}) (ignore_index={ignore_index}): "
                             f"min {values.min().item()}, max {values.max().item()}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).view(num_classes, num_classes)


def _miou_from_confusion(cm: Tensor) -> float:
    """Mean IoU in % over the classes present in the target or the prediction."""
    inter = cm.diag().double()
    union = cm.sum(0).double() + cm.sum(1).double() - inter
    present = union > 0
    if not present.any():
        raise ValueError("no pixel to score: every target pixel is ignore_index")
    return 100.0 * (inter[present] / union[present]).mean().item()


def mean_iou(pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> float:
    """Mean intersection over union in % (pred, target: [n, H, W] class indices).

    IoU_c = |pred = c and target = c| / |pred = c or target = c| over the pixels whose target is not
    ``ignore_index``, averaged over the classes c present in the target or the prediction.
    """
    return _miou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: Dataset, batch_size: int = 16,
                          device: str | torch.device | None = None) -> dict[str, Any]:
    """Scores of ``model`` on ``dataset`` over all its pixels at once (one confusion matrix).

    Returns {"miou": mean IoU in %, "pixel_acc": % of scored pixels right, "loss": mean per-pixel
    cross-entropy (nats), "n": number of images}. Pixels with target ``IGNORE_INDEX`` are not scored.
    The model is moved to ``device`` (None: CUDA if available) and left in the mode it came in.
    """
    _check_int(batch_size, "batch_size", 1)
    if len(dataset) == 0:
        raise ValueError("dataset is empty: cannot evaluate on 0 images")
    dev = resolve_device(device)
    model.to(dev)
    was_training = model.training
    model.eval()
    cm, loss_sum, n = None, 0.0, 0
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            x, y = x.to(dev), y.to(dev).long()
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").item()
            batch_cm = confusion_matrix(logits.argmax(1), y, logits.shape[1])
            cm = batch_cm if cm is None else cm + batch_cm
            n += len(x)
    finally:
        model.train(was_training)
    scored = int(cm.sum())
    return {"miou": _miou_from_confusion(cm), "pixel_acc": 100.0 * cm.diag().sum().item() / scored,
            "loss": loss_sum / scored, "n": n}


def fit_segmentation(model: nn.Module, train_set: Dataset, test_set: Dataset, epochs: int, lr: float,
                     batch_size: int, seed: int, progress: bool = True, weight_decay: float = 5e-4,
                     device: str | torch.device | None = None) -> dict[str, Any]:
    """Train ``model`` in place (its current weights) and evaluate it on ``test_set`` after every epoch.

    SGD (momentum 0.9, ``weight_decay``), cosine annealing of ``lr`` stepped once per epoch (to 0),
    per-pixel cross-entropy ignoring ``IGNORE_INDEX``. Deterministic given ``seed`` on CPU (global torch
    RNG and the loader's shuffling); build the model under a seed to train from scratch.

    Returns {"miou", "pixel_acc", "loss"} of the final model on ``test_set`` (see
    ``evaluate_segmentation``), "history" (per epoch: epoch, lr, train_loss, test_miou,
    test_pixel_acc, test_loss) and "epochs".
    """
    _check_int(epochs, "epochs", 1)
    _check_int(batch_size, "batch_size", 1)
    _check_int(seed, "seed", 0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if len(train_set) == 0:
        raise ValueError("train_set is empty: expected at least one image")
    dev = resolve_device(device)
    torch.manual_seed(seed)
    model.to(dev)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    history = []
    bar = tqdm(range(epochs), desc="epochs", disable=not progress)
    for epoch in bar:
        model.train()
        epoch_lr, loss_sum, pixels = optimizer.param_groups[0]["lr"], 0.0, 0
        for x, y in tqdm(loader, desc=f"epoch {epoch + 1}", leave=False, disable=not progress):
            x, y = x.to(dev), y.to(dev).long()
            scored = int((y != IGNORE_INDEX).sum())
            loss = F.cross_entropy(model(x), y, ignore_index=IGNORE_INDEX, reduction="sum") / max(scored, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum, pixels = loss_sum + loss.item() * scored, pixels + scored
        scheduler.step()
        test = evaluate_segmentation(model, test_set, batch_size, dev)
        history.append({"epoch": epoch + 1, "lr": epoch_lr, "train_loss": loss_sum / max(pixels, 1),
                        "test_miou": test["miou"], "test_pixel_acc": test["pixel_acc"], "test_loss": test["loss"]})
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}", miou=f"{test['miou']:.2f}")
    return {"miou": test["miou"], "pixel_acc": test["pixel_acc"], "loss": test["loss"], "history": history,
            "epochs": epochs}
