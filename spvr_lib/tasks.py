"""What a training run optimises and reports: a task is a loss and a metric, never a loop.

:data:`CLASSIFICATION` (cross-entropy; top-1 / top-5 accuracy in %) and :data:`SEGMENTATION` (per-pixel
cross-entropy ignoring ``IGNORE_INDEX``; mean IoU and pixel accuracy in %, Section 5.5) are the two
tasks; ``train.fit`` and ``train.evaluate`` take either, so the one training loop trains the base
networks, the pruned networks, SegNet and Appendix A's MLP alike.

A segmentation dataset yields ``(x, y)`` with ``x`` a float tensor [C, H, W] and ``y`` a long
tensor [H, W] of class indices, ``IGNORE_INDEX`` (255) marking pixels that are not scored. The
model (e.g. ``models.build(models.segnet_vgg16(...))``) maps [n, C, H, W] to logits [n, K, H, W].
Scores are in percent, like ``train.evaluate``'s accuracies and the paper's "51.2% IoU".

SPvR needs no segmentation-specific pruner: ``criteria.spvr_loss`` takes the [n, K, H, W] softmax
outputs and sums Eq. 2 over the pixels, as Section 5.5 does.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["IGNORE_INDEX", "Task", "CLASSIFICATION", "SEGMENTATION", "task_named", "confusion_matrix", "mean_iou"]

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


# --------------------------------------------------------------------------- the tasks
@dataclass(frozen=True)
class Task:
    """A loss to train with and a metric to report; the training loop itself is ``train.fit``.

    ``loss(logits, y) -> (mean loss, weight)``: the batch's mean loss and how many units (samples or
    scored pixels) it averages over, so that an epoch's ``train_loss`` is a weighted mean.
    ``eval_sums(logits, y) -> Tensor``: float64 sums over a batch (summable across batches and
    data-parallel ranks); ``metrics(sums, num_outputs) -> dict`` turns the total into the reported
    scores (always with ``"loss"`` and ``"n"``).  ``primary``: the score shown on the progress bar
    and used by the learning-rate search.  ``eval_batch(per_rank_batch)``: the evaluation batch.
    """

    name: str
    loss: Callable[[Tensor, Tensor], tuple[Tensor, int]]
    eval_sums: Callable[[Tensor, Tensor], Tensor]
    metrics: Callable[[Tensor, int], dict[str, Any]]
    primary: str
    eval_batch: Callable[[int], int]


def _classification_loss(logits: Tensor, y: Tensor) -> tuple[Tensor, int]:
    return F.cross_entropy(logits, y), len(y)


def _classification_sums(logits: Tensor, y: Tensor) -> Tensor:
    """[summed cross-entropy, top-1 hits, top-5 hits, samples] of a batch (logits [n, K], y [n])."""
    logits = logits.float()
    hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == y[:, None]
    return torch.stack([F.cross_entropy(logits, y, reduction="sum").double(), hits[:, 0].sum().double(),
                        hits.any(dim=1).sum().double(), torch.tensor(float(len(y)), dtype=torch.float64,
                                                                     device=logits.device)])


def _classification_metrics(sums: Tensor, num_classes: int) -> dict[str, Any]:
    """top1, top5 (None with <= 5 classes: it would be trivially 100), loss (mean CE) and n."""
    loss_sum, top1, top5, n = sums.tolist()
    if n == 0:
        raise ValueError("dataset is empty: cannot evaluate on 0 samples")
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n if num_classes > 5 else None,
            "loss": loss_sum / n, "n": int(n)}


def _segmentation_loss(logits: Tensor, y: Tensor) -> tuple[Tensor, int]:
    """Per-pixel cross-entropy averaged over the scored pixels (``IGNORE_INDEX`` excluded)."""
    y = y.long()
    scored = int((y != IGNORE_INDEX).sum())
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum") / max(scored, 1), scored


def _segmentation_sums(logits: Tensor, y: Tensor) -> Tensor:
    """[summed per-pixel cross-entropy, images, confusion matrix K*K flattened] of a batch."""
    logits, y = logits.float(), y.long()
    cm = confusion_matrix(logits.argmax(1), y, logits.shape[1]).reshape(-1).double()
    head = torch.stack([F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum").double(),
                        torch.tensor(float(len(y)), dtype=torch.float64, device=logits.device)])
    return torch.cat([head, cm.to(head.device)])


def _segmentation_metrics(sums: Tensor, num_classes: int) -> dict[str, Any]:
    """miou (%), pixel_acc (% of scored pixels right), loss (per scored pixel) and n (images)."""
    n = int(sums[1].item())
    if n == 0:
        raise ValueError("dataset is empty: cannot evaluate on 0 images")
    cm = sums[2:].round().long().view(num_classes, num_classes)
    scored = int(cm.sum())
    return {"miou": _miou_from_confusion(cm), "pixel_acc": 100.0 * cm.diag().sum().item() / scored,
            "loss": sums[0].item() / scored, "n": n}


CLASSIFICATION = Task("classification", _classification_loss, _classification_sums, _classification_metrics,
                      primary="top1", eval_batch=lambda b: max(b, 256))
SEGMENTATION = Task("segmentation", _segmentation_loss, _segmentation_sums, _segmentation_metrics,
                    primary="miou", eval_batch=lambda b: b)
_TASKS = {t.name: t for t in (CLASSIFICATION, SEGMENTATION)}


def task_named(name: str) -> Task:
    """The task called ``name`` ("classification" or "segmentation", as ``data.dataset_info(...).task``)."""
    if name not in _TASKS:
        raise ValueError(f"task={name!r}: expected one of {sorted(_TASKS)}")
    return _TASKS[name]
