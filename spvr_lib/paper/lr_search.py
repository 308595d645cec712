"""Learning rates by grid search on a validation split of the training set (never the test set; Section 4.3).

One cached trial per grid value (kind ``lrtrial``), so that ``paper.jobs`` can run a grid's trials side by
side and a regeneration spread over several runs keeps every finished one.  Kept apart from the notebooks'
modules: a trial's record carries the fingerprint of the code that ran it, this file included.
"""
from __future__ import annotations

from typing import Any

import torch

from spvr_lib import data, models, store, train
from spvr_lib.data.common import LabeledSubset
from spvr_lib.train import Recipe


def recipe(setup: Any, lr: float | None = None, mode: str = "scratch") -> Recipe:
    """The training recipe of EVERY network of a setup, base, pruned, fine-tuned or from scratch (SGD, momentum
    0.9, cosine annealing; Section 4.3): the setup's epochs, batch, precision and memory format; only ``lr``
    and ``mode`` differ."""
    return Recipe(epochs=setup.epochs, batch_size=setup.batch_size, lr=setup.lr if lr is None else lr,
                  weight_decay=setup.weight_decay, mode=mode, augment=setup.augment, num_workers=setup.num_workers,
                  amp=setup.amp, channels_last=setup.channels_last, eval_every=setup.eval_every)


def trial_share(setup: Any) -> float:
    """The share of the training images an lr trial trains on: all of them when the validation images are others
    (``val_per_class``), else all but the validation split."""
    return 1.0 if setup.val_per_class is not None else 1.0 - setup.val_fraction


def validation_images(setup: Any, seed: int = 0) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(what an lr trial trains on, what it is scored on) for ``setup``: never the test set.

    * ``setup.val_per_class`` set: ALL the training images every network of the setup gets (``train_subset`` per
      class, drawn with ``seed``), and ``val_per_class`` OTHER training images per class, not augmented.
    * otherwise: those training images minus a stratified ``setup.val_fraction`` of them, which are scored.
    """
    ds = data.load_dataset(setup.dataset, "train", augment=setup.augment, per_class=setup.train_subset, seed=seed)
    if setup.val_per_class is None:
        plain = data.load_dataset(setup.dataset, "train", augment=False, per_class=setup.train_subset, seed=seed)
        train_idx, val_idx = train.validation_split(ds, setup.val_fraction, seed)
        return torch.utils.data.Subset(ds, train_idx), torch.utils.data.Subset(plain, val_idx)
    full = data.load_dataset(setup.dataset, "train", augment=False, seed=seed)
    used = set(getattr(ds, "indices", range(len(full))))
    rest = [i for i in range(len(full)) if i not in used]
    if not rest:
        raise ValueError(f"val_per_class={setup.val_per_class}: every training image of {setup.dataset!r} is already "
                         "a training image of the setup (train_subset=None); set val_fraction instead")
    targets = torch.as_tensor(full.targets)[rest]
    picked = data.stratified_indices(targets, setup.val_per_class, seed, num_classes=full.num_classes)
    return ds, LabeledSubset(full, [rest[i] for i in picked])


def lr_trial(setup: Any, spec: dict, lr: float, mode: str = "scratch", init_state: dict | None = None,
             seed: int = 0, progress: bool = True, shapes: dict | None = None) -> dict[str, Any]:
    """One point of a learning-rate grid search: ``spec`` trained with :func:`recipe` at ``lr`` in ``mode`` on
    :func:`validation_images` (held-out training images, never the test set) and scored by validation top-1;
    cached (kind ``lrtrial``).  Record: lr, val_top1 (0 when the training loss diverged), history, wall_s."""
    rcp = recipe(setup, lr=float(lr), mode=mode)
    key = {"spec": spec, "dataset": setup.dataset, "per_class_train": setup.train_subset, "recipe": rcp.to_dict(),
           "seed": seed, "val_fraction": setup.val_fraction, "data_files": data.fingerprint(setup.dataset),
           "init": None if init_state is None else train.state_dict_digest(init_state)}
    if setup.val_per_class is not None:
        key["val_per_class"] = int(setup.val_per_class)
        del key["val_fraction"]
    if shapes:
        key["shapes"] = dict(shapes)

    # a per-epoch checkpoint: a trial interrupted at a session's end resumes (it is as long as a base training)
    resume = train.checkpoint_dir() / f"{store.cache_path(key, kind='lrtrial').stem}.pt"

    def compute() -> dict[str, Any]:
        train_part, val_part = validation_images(setup, seed)
        torch.manual_seed(seed)
        model = models.build_network(spec, shapes)
        if init_state is not None:
            model.load_state_dict(init_state)
        out = train.fit(model, train_part, val_part, rcp, seed=seed, progress=progress, checkpoint=resume)
        diverged = not all(torch.isfinite(torch.tensor(h["train_loss"])) for h in out["history"])
        return {"lr": float(lr), "val_top1": 0.0 if diverged else float(out["top1"]), "history": out["history"],
                "train images": len(train_part), "val images": len(val_part)}

    record = store.cached(key, compute, kind="lrtrial")
    resume.unlink(missing_ok=True)      # finished and recorded
    return record


def lr_grid(setup: Any, mode: str) -> list[float]:
    """The learning rates searched for ``mode``: ``setup.finetune_lr_grid`` for fine-tuning when set, else
    ``setup.lr_grid``."""
    return [float(v) for v in (setup.finetune_lr_grid if mode == "finetune" and setup.finetune_lr_grid
                               else setup.lr_grid)]


def searched_lr(setup: Any, spec: dict, mode: str = "scratch", init_state: dict | None = None,
                seed: int = 0, progress: bool = True, grid: Any = None,
                shapes: dict | None = None) -> tuple[float, dict[float, float]]:
    """Grid search of the learning rate over ``grid`` (default ``setup.lr_grid``, or ``setup.finetune_lr_grid``
    in mode "finetune"): one :func:`lr_trial` per value (each cached; ``paper.jobs`` can fill them side by
    side).  Returns (best lr, {lr: validation top-1}); ties go to the smaller lr; a one-value grid is taken as
    is, untrained."""
    grid = [float(v) for v in grid] if grid else lr_grid(setup, mode)
    if len(grid) == 1:
        return grid[0], {grid[0]: None}
    scores = {lr: lr_trial(setup, spec, lr, mode, init_state, seed, progress, shapes)["val_top1"] for lr in grid}
    best = max(sorted(scores), key=lambda lr: scores[lr])
    return best, scores


