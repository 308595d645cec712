"""Training and evaluation with the paper's recipe (Section 4.3), resumable and cached.

* SGD with momentum 0.9 (weight decay 5e-4 unless set otherwise), cross-entropy, cosine
  annealing of the learning rate stepped once per EPOCH (``CosineAnnealingLR(T_max=epochs)``,
  no warm-up, ``eta_min=0``); the ``lr`` recorded for an epoch is the one used during it.
* Augmentation is the dataset's job (``data.load_dataset(..., augment=True)``).
* Two modes: ``"scratch"`` re-initialises the model first (training from scratch, TFS) and
  ``"finetune"`` keeps its weights (FT).
* Deterministic given ``seed`` on CPU: the global torch/numpy/python RNGs are seeded, the
  DataLoader shuffles with its own ``torch.Generator`` and a dataset's augmentation generator
  (a ``generator`` attribute holding a ``torch.Generator``) is re-seeded; all are derived from
  ``seed``.  A checkpoint written after every epoch holds the model, optimizer, scheduler and
  every RNG state, so an interrupted run resumed from it ends with bit-identical weights.
* Data-parallel under ``torchrun`` (``WORLD_SIZE > 1``): ``DistributedDataParallel`` with a
  seeded ``DistributedSampler``; ``recipe.batch_size`` is the GLOBAL batch (each rank takes
  ``batch_size // world_size``).  BatchNorm buffers are broadcast from rank 0 at the end of every
  epoch so all ranks hold identical weights; evaluation shards the test set across ranks and
  sums the counts (exact, no padding).  Only rank 0 writes checkpoints and shows progress.

``train_run`` is the cached run every notebook uses; ``python -m spvr_lib train`` is the command line
(the way to train data-parallel: ``torchrun --nproc_per_node N -m spvr_lib train ...``).  A state dict's
digest (``state_dict_digest``, ``WeightsOnDemand``) is :mod:`spvr_lib.models.files`'s.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from spvr_lib import data, models, store
from spvr_lib.data import LabeledSubset
from spvr_lib.devices import resolve_device
from spvr_lib.models.files import WeightsOnDemand, state_dict_digest  # noqa: F401 (read as train.WeightsOnDemand)
from spvr_lib.tasks import CLASSIFICATION, Task, task_named

MODES = ("scratch", "finetune")
OPTIMIZERS = ("sgd", "adam")      # SGD with momentum (Section 4.3); Adam for Appendix A's MLP
SCHEDULES = ("cosine", "constant")


# --------------------------------------------------------------------------- recipe
@dataclass(frozen=True)
class Recipe:
    """Everything that determines a training run besides model, data and seed.

    ``batch_size`` is the global batch (summed over data-parallel ranks); ``lr`` the initial
    learning rate of SGD, annealed to 0 by a per-epoch cosine schedule over ``epochs``.
    ``amp`` trains in bfloat16 autocast on CUDA and on CPUs with native bfloat16 (ignored elsewhere).  ``optimizer`` "sgd" (momentum,
    weight decay) or "adam" (Appendix A's MLP); ``schedule`` "cosine" (per epoch, to 0) or "constant".
    ``channels_last`` trains image networks in that memory format (faster convolutions).  Off by
    default: with torch 2.14.1 on this CPU, the backward pass of a 1x1 stride-2 convolution in
    channels_last aborts the process for some batch sizes (e.g. 3 images of 4x64x64), so it is only
    for shapes known to work.
    ``eval_every``: the test set is scored after every ``eval_every``-th epoch, after the three epochs around the
    start of the last quarter of training and after the last three (where a convergence reading compares it).
    """

    epochs: int
    batch_size: int
    lr: float
    momentum: float = 0.9
    weight_decay: float = 5e-4
    mode: str = "scratch"
    num_workers: int = 0
    augment: bool = True
    amp: bool = False
    optimizer: str = "sgd"
    schedule: str = "cosine"
    channels_last: bool = False
    eval_every: int = 1

    def __post_init__(self) -> None:
        def require(ok: bool, field: str, expected: str) -> None:
            if not ok:
                raise ValueError(f"Recipe.{field}={getattr(self, field)!r}: expected {expected}")

        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
                and math.isfinite(v)

        require(is_int(self.epochs) and self.epochs >= 1, "epochs", "an int >= 1")
        require(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an int >= 1")
        require(is_num(self.lr) and self.lr > 0, "lr", "a finite float > 0")
        require(is_num(self.momentum) and 0 <= self.momentum < 1, "momentum", "a float in [0, 1)")
        require(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a float >= 0")
        require(self.mode in MODES, "mode", f"one of {MODES}")
        require(is_int(self.num_workers) and self.num_workers >= 0, "num_workers", "an int >= 0")
        require(isinstance(self.augment, bool), "augment", "a bool")
        require(isinstance(self.amp, bool), "amp", "a bool")
        require(self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}")
        require(self.schedule in SCHEDULES, "schedule", f"one of {SCHEDULES}")
        require(isinstance(self.channels_last, bool), "channels_last", "a bool")
        require(is_int(self.eval_every) and self.eval_every >= 1, "eval_every", "an int >= 1")
        # Normalise types so that to_dict() (and with it every cache key) is canonical: lr=1 == lr=1.0.
        for name in ("epochs", "batch_size", "num_workers", "eval_every"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("lr", "momentum", "weight_decay"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["eval_every"] == 1:          # the default leaves the cache keys of earlier recipes as they were
            del out["eval_every"]
        return out

    def evaluates_after(self, epoch: int) -> bool:
        """Whether the test set is scored after ``epoch`` (1-based): every ``eval_every``-th epoch, the three
        epochs around the start of the last quarter and the last three (the budget's last quarter)."""
        start = last_quarter_start(self.epochs)
        return epoch % self.eval_every == 0 or abs(epoch - start) <= 1 or epoch > self.epochs - 3


# --------------------------------------------------------------------------- helpers
def _cpu_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX-512 BF16 / AMX): where CPU autocast pays."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _world() -> tuple[int, int]:
    """(rank, world_size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed when started by torchrun (``WORLD_SIZE > 1``) and not yet done.

    Backend: nccl for a CUDA ``device``, gloo otherwise.  Returns (rank, world_size).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (dist.is_available() and dist.is_initialized()):
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return _world()


def _augmentation_generator(dataset: Any) -> torch.Generator | None:
    """The dataset's ``generator`` (a torch.Generator), looking through ``Subset``-like wrappers."""
    while dataset is not None:
        gen = getattr(dataset, "generator", None)
        if isinstance(gen, torch.Generator):
            return gen
        dataset = getattr(dataset, "dataset", None)
    return None


def _seed_worker(worker_id: int) -> None:
    """DataLoader worker init: derive the worker's augmentation/numpy/random seeds from its torch seed.

    torch gives each worker ``base_seed + worker_id`` with ``base_seed`` drawn from the loader's
    generator every epoch, so this is deterministic and differs between epochs and workers.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    info = torch.utils.data.get_worker_info()
    gen = _augmentation_generator(info.dataset if info is not None else None)
    if gen is not None:
        gen.manual_seed(seed)


def _derived_seeds(seed: int) -> tuple[int, int]:
    """Two independent 32-bit seeds (DataLoader shuffling, dataset augmentation) derived from ``seed``."""
    loader_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
    return int(loader_seed), int(augment_seed)


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state(loader_gen: torch.Generator, augment_gen: torch.Generator | None) -> dict[str, Any]:
    """Every RNG state as tensors/ints (loadable with ``torch.load(weights_only=True)``)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "loader": loader_gen.get_state(),
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if augment_gen is not None:
        state["augment"] = augment_gen.get_state()
    return state


def _set_rng_state(state: Mapping[str, Any], loader_gen: torch.Generator,
                   augment_gen: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    loader_gen.set_state(state["loader"])
    npy = state["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if augment_gen is not None and "augment" in state:
        augment_gen.set_state(state["augment"])


# --------------------------------------------------------------------------- data in memory
def batch_source(dataset: Any) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """``indices -> (x, y)`` for a dataset held in memory (``data.InMemoryImages``, through ``Subset`` and
    ``LabeledSubset`` wrappers): whole batches gathered and augmented at once, no DataLoader; None otherwise."""
    if isinstance(dataset, Subset):
        inner = batch_source(dataset.dataset)
        if inner is None:
            return None
        positions = torch.as_tensor(dataset.indices)
        return lambda idx: inner(positions[idx])
    if isinstance(dataset, LabeledSubset):
        return dataset.batch if batch_source(dataset.dataset) is not None else None
    return getattr(dataset, "batch", None) if callable(getattr(dataset, "batch", None)) else None


def _memory_batches(source: Callable, n: int, batch_size: int, generator: torch.Generator | None,
                    drop_one: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of ``source`` in a permutation drawn from ``generator`` (None: in order)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        if drop_one and len(idx) == 1:
            continue
        yield source(idx)


def _to_format(x: torch.Tensor) -> torch.Tensor:
    """Image batches in channels_last (faster convolutions on CPU and GPU); anything else as is."""
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _eval_sums(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
               num_workers: int, task: Task) -> tuple[torch.Tensor, int]:
    """(``task.eval_sums`` totalled over ``dataset`` as float64 on ``device``, number of model outputs)."""
    was_training = model.training
    model.eval()
    sums, num_outputs = None, 0
    # its own generator: a DataLoader without one draws its worker seed from the GLOBAL torch RNG,
    # so evaluating would shift the training's random stream
    source = batch_source(dataset) if num_workers == 0 else None
    loader = _memory_batches(source, len(dataset), batch_size, None, False) if source is not None else \
        DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                   pin_memory=device.type == "cuda", generator=torch.Generator())
    try:
        for x, y in loader:
            x = x.to(device, non_blocking=True)
            y = torch.as_tensor(y).to(device, non_blocking=True)
            logits = model(x)
            num_outputs = logits.shape[1]
            batch = task.eval_sums(logits, y).to(device)
            sums = batch if sums is None else sums + batch
    finally:
        model.train(was_training)
    if sums is None:
        raise ValueError("dataset is empty: cannot evaluate on 0 samples")
    return sums, num_outputs


def evaluate(model: nn.Module, dataset: Dataset, batch_size: int = 256,
             device: str | torch.device | None = None, num_workers: int = 0,
             task: Task = CLASSIFICATION) -> dict[str, Any]:
    """The scores of ``model`` on ``dataset`` under ``task`` (``tasks.CLASSIFICATION`` by default).

    Classification: ``dataset`` yields (x, int label), ``model(x)`` gives logits [batch, K]; returns
    ``{"top1", "top5", "loss", "n"}`` (top5 None when K <= 5).  Segmentation: (x, mask [H, W]) and
    logits [batch, K, H, W]; returns ``{"miou", "pixel_acc", "loss", "n"}``.  Scores in %.
    The model is moved to ``device`` and left in the train/eval mode it came in.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an int >= 1")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: cannot evaluate on 0 samples")
    dev = resolve_device(device)
    model.to(dev)
    sums, num_outputs = _eval_sums(model, dataset, batch_size, dev, num_workers, task)
    return task.metrics(sums, num_outputs)


def _evaluate_distributed(model: nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                          num_workers: int, task: Task) -> dict[str, Any]:
    """``evaluate`` with the dataset split into disjoint shards over ranks and the sums added."""
    rank, world = _world()
    if world == 1:
        return task.metrics(*_eval_sums(model, dataset, batch_size, device, num_workers, task))
    shard = Subset(dataset, range(rank, len(dataset), world))
    sums, num_outputs = _eval_sums(model, shard, batch_size, device, num_workers, task)
    outputs = torch.tensor([num_outputs], dtype=torch.float64, device=device)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM)
    dist.all_reduce(outputs, op=dist.ReduceOp.MAX)
    return task.metrics(sums, int(outputs.item()))


# --------------------------------------------------------------------------- training
def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s parameters: SGD with momentum and weight decay, or Adam."""
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)


def _load_checkpoint(path: Path, recipe: Recipe, seed: int) -> dict[str, Any]:
    # on the CPU: RNG states must stay CPU tensors; model/optimizer loading moves the rest
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("recipe") != recipe.to_dict() or ckpt.get("seed") != seed:
        raise ValueError(f"checkpoint={str(path)!r} belongs to another run (recipe {ckpt.get('recipe')}, "
                         f"seed {ckpt.get('seed')}); expected recipe {recipe.to_dict()}, seed {seed}. "
                         "Delete it or pass another checkpoint path.")
    return ckpt


def fit(model: nn.Module, train_set: Dataset, test_set: Dataset, recipe: Recipe, seed: int = 0,
        checkpoint: str | Path | None = None, device: str | torch.device | None = None,
        progress: bool = True, reinit: Callable[[nn.Module], Any] | None = None,
        on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
        task: Task = CLASSIFICATION) -> dict[str, Any]:
    """Train ``model`` in place with ``recipe`` and evaluate it on ``test_set`` after every epoch.

    The one training loop of spvr_lib: ``task`` (``tasks.CLASSIFICATION`` or ``tasks.SEGMENTATION``)
    says what is minimised and reported.  ``recipe.mode == "scratch"`` first re-initialises the
    model with ``reinit`` (default: ``models.reinitialize``) after seeding; ``"finetune"`` keeps its
    weights.
    ``checkpoint``: a file written atomically after every epoch and resumed from when it exists.
    ``on_epoch_end(history_entry)`` is called after each epoch's checkpoint (an exception raised
    there interrupts the run, which the checkpoint then resumes).

    Returns the final model's scores on ``test_set`` (``evaluate``'s keys but ``n``) plus ``"history"``
    (one dict per epoch: epoch (1-based), lr, train_loss and every score as ``test_<name>``) and
    ``"epochs"``.
    """
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe={recipe!r}: expected a spvr_lib.train.Recipe")
    if len(train_set) == 0:
        raise ValueError("train_set is empty: expected at least one sample")
    dev = resolve_device(device)
    rank, world = init_distributed(dev)
    if recipe.batch_size % world:
        raise ValueError(f"recipe.batch_size={recipe.batch_size} is not divisible by the world size {world}")
    per_rank_batch = recipe.batch_size // world
    ckpt_path = Path(checkpoint) if checkpoint is not None else None

    # the datasets' code may run in DataLoader workers, out of the run cache's trace: count it here
    store.CodeTrace.add(store.source_files(train_set) | store.source_files(test_set))
    _seed_everything(seed)
    if recipe.mode == "scratch":
        (reinit or models.reinitialize)(model)
    model.to(dev)
    loader_seed, augment_seed = _derived_seeds(seed)
    loader_gen = torch.Generator().manual_seed(loader_seed)
    augment_gen = _augmentation_generator(train_set)
    if augment_gen is not None:
        augment_gen.manual_seed(augment_seed)

    optimizer = make_optimizer(model, recipe)
    if recipe.schedule == "cosine":
        scheduler: Any = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)
    history: list[dict[str, Any]] = []
    start = 0
    if ckpt_path is not None and ckpt_path.exists():
        ckpt = _load_checkpoint(ckpt_path, recipe, seed)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], loader_gen, augment_gen)
        history, start = list(ckpt["history"]), int(ckpt["epoch"])

    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                      shuffle=True, seed=seed)
        net: nn.Module = DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        shard_len = len(sampler)
    else:
        sampler, net, shard_len = None, model, len(train_set)
    # data held in memory: whole batches gathered and augmented at once (no DataLoader, no per-item Python)
    source = batch_source(train_set) if world == 1 and recipe.num_workers == 0 else None
    drop_one = shard_len % per_rank_batch == 1 and shard_len > 1   # one sample would break BatchNorm in train mode
    loader = None if source is not None else DataLoader(
        train_set, batch_size=per_rank_batch, shuffle=sampler is None, sampler=sampler, generator=loader_gen,
        num_workers=recipe.num_workers, worker_init_fn=_seed_worker, pin_memory=dev.type == "cuda",
        persistent_workers=recipe.num_workers > 0, drop_last=drop_one)
    use_amp = recipe.amp and (dev.type == "cuda" or _cpu_bf16())
    channels_last = False          # set at the first image batch (parameters keep their identity)
    show = progress and rank == 0

    epochs_bar = tqdm(range(start, recipe.epochs), total=recipe.epochs, initial=start, desc="epochs",
                      disable=not show)
    for epoch in epochs_bar:
        if sampler is not None:
            sampler.set_epoch(epoch)
        model.train()
        lr = optimizer.param_groups[0]["lr"]
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        seen = torch.zeros((), dtype=torch.float64, device=dev)
        batches = _memory_batches(source, shard_len, per_rank_batch, loader_gen, drop_one) if source is not None \
            else loader
        for x, y in tqdm(batches, desc=f"epoch {epoch + 1}", leave=False, disable=not show,
                         total=-(-shard_len // per_rank_batch)):
            x = x.to(dev, non_blocking=True)
            if recipe.channels_last and x.ndim == 4:
                x = _to_format(x)
                if not channels_last:
                    model.to(memory_format=torch.channels_last)
                    channels_last = True
            y = torch.as_tensor(y).to(dev, non_blocking=True)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, weight = task.loss(net(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach().double() * weight
            seen += weight
        scheduler.step()
        if world > 1:
            for buf in model.buffers():  # BatchNorm statistics: rank 0's, so all ranks agree
                dist.broadcast(buf, src=0)
            dist.all_reduce(loss_sum)
            dist.all_reduce(seen)
        entry = {"epoch": epoch + 1, "lr": lr, "train_loss": (loss_sum / seen.clamp(min=1)).item()}
        if recipe.evaluates_after(epoch + 1):
            test = _evaluate_distributed(model, test_set, task.eval_batch(per_rank_batch), dev, recipe.num_workers,
                                         task)
            entry.update({f"test_{k}": v for k, v in test.items() if k != "n"})
        history.append(entry)
        epochs_bar.set_postfix({"loss": f"{entry['train_loss']:.4f}",
                                **({task.primary: f"{entry['test_' + task.primary]:.2f}"}
                                   if f"test_{task.primary}" in entry else {})})
        if ckpt_path is not None and rank == 0:
            store.atomic_torch_save({
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "history": history, "recipe": recipe.to_dict(),
                "seed": seed, "world_size": world, "rng": _rng_state(loader_gen, augment_gen),
            }, ckpt_path)
        if world > 1:
            dist.barrier()
        if on_epoch_end is not None:
            on_epoch_end(entry)
    epochs_bar.close()

    last = history[-1]
    return {**{k[len("test_"):]: v for k, v in last.items() if k.startswith("test_")},
            "history": history, "epochs": recipe.epochs}


# --------------------------------------------------------------------------- convergence
def last_quarter_start(epochs: int) -> int:
    """The epoch (1-based, counted as done) at which the last quarter of ``epochs`` begins: floor(3/4 * epochs)."""
    return (3 * int(epochs)) // 4


# --------------------------------------------------------------------------- validation split
def validation_split(dataset: Dataset, val_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train indices, validation indices) of ``dataset``, stratified by ``dataset.targets`` if present.

    Each class with at least 2 samples gives ``max(1, round(val_fraction * count))`` of them
    (but never all) to validation; without ``targets`` a seeded random ``val_fraction`` is taken.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction!r}: expected a float in (0, 1)")
    rng = np.random.default_rng(seed)
    n = len(dataset)
    targets = getattr(dataset, "targets", None)
    if targets is None:
        perm = rng.permutation(n)
        n_val = min(n - 1, max(1, round(val_fraction * n)))
        return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())
    targets = np.asarray(torch.as_tensor(targets).cpu())
    if len(targets) != n:
        raise ValueError(f"dataset.targets has {len(targets)} entries for {n} samples")
    val: list[int] = []
    for label in np.unique(targets):
        idx = rng.permutation(np.flatnonzero(targets == label))
        if len(idx) >= 2:
            val.extend(idx[: min(len(idx) - 1, max(1, round(val_fraction * len(idx))))].tolist())
    val_set = set(val)
    return [i for i in range(n) if i not in val_set], sorted(val)


# --------------------------------------------------------------------------- the cached run
def checkpoint_dir() -> Path:
    """Checkpoints live beside the run cache: ``<cache_dir>/../checkpoints`` (data/checkpoints)."""
    return store.cache_dir().parent / "checkpoints"


def train_run(spec: dict, dataset: str, recipe: Recipe, seed: int, per_class_train: int | None = None,
              per_class_test: int | None = None, init_state: Mapping[str, torch.Tensor] | None = None,
              tag: str = "", progress: bool = True, device: str | torch.device | None = None,
              shapes: Mapping[str, Mapping[str, int]] | None = None, train_options: Mapping[str, Any] | None = None,
              test_options: Mapping[str, Any] | None = None, weights_needed: bool = True) -> dict[str, Any]:
    """THE cached training run: build the network, train it on ``dataset`` with ``recipe``, keep the record.

    The network is ``models.build_network(spec, shapes)`` (``shapes``: a pruned network's layer
    shapes, from ``models.network_shapes``); the task (classification or segmentation) is the
    dataset's.  ``init_state`` (a state dict, loaded strictly) is only allowed with
    ``recipe.mode == "finetune"``.  The train split is built with ``augment=recipe.augment``, the
    test split without; ``per_class_*`` samples per class (None: all) are drawn with ``seed``;
    ``train_options`` / ``test_options`` go to ``data.load_dataset`` (e.g. ``limit``, ``n_images``).

    The cache key is every argument above but ``progress`` and ``device`` (plus sha256 of
    ``init_state`` and ``data.fingerprint`` of the dataset's files); the record also carries the fingerprint of the code that ran (``store.cached``).
    A finished run is never recomputed while its code is unchanged, an interrupted one resumes from
    its per-epoch checkpoint, and a record whose weights file was deleted is retrained when
    ``weights_needed`` (the default; pass False where only the record's scores are read, so that a run cache
    carried without those weights, as the committed cpu records are, is not retrained).

    Returns the record: the final test scores (top1, top5, loss or miou, pixel_acc, loss), history,
    epochs, params, size_mb, wall_s, weights (the ``models.save_network`` file, relative to the repo
    root when inside it), spec, shapes.
    """
    if not isinstance(recipe, Recipe):
        raise ValueError(f"recipe={recipe!r}: expected a spvr_lib.train.Recipe")
    if init_state is not None and recipe.mode != "finetune":
        raise ValueError(f"init_state is given but recipe.mode={recipe.mode!r}: initial weights are only "
                         "used with mode='finetune' (scratch re-initialises the model)")
    task = task_named(data.dataset_info(dataset).task)
    key = {"spec": spec, "dataset": dataset, "per_class_train": per_class_train,
           "per_class_test": per_class_test, "recipe": recipe.to_dict(), "seed": seed, "tag": tag,
           "init": None if init_state is None else state_dict_digest(init_state),
           "data_files": data.fingerprint(dataset)}       # names and sizes of the files: a partial copy is another key
    key.update({k: dict(v) for k, v in (("shapes", shapes), ("train_options", train_options),
                                        ("test_options", test_options)) if v})
    stem = store.cache_path(key, kind="train").stem
    resume_path = checkpoint_dir() / f"{stem}.pt"
    final_path = checkpoint_dir() / f"{stem}.final.pt"

    def compute() -> dict[str, Any]:
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = models.build_network(spec, shapes)
        if init_state is not None:
            model.load_state_dict(init_state, strict=True)
        train_set = data.load_dataset(dataset, "train", augment=recipe.augment, per_class=per_class_train,
                                      seed=seed, **dict(train_options or {}))
        test_set = data.load_dataset(dataset, "test", augment=False, per_class=per_class_test, seed=seed,
                                     **dict(test_options or {}))
        out = fit(model, train_set, test_set, recipe, seed=seed, checkpoint=resume_path, device=device,
                  progress=progress, task=task)
        models.save_network(model, final_path, spec=spec)
        return {**out, "params": int(models.count_params(model)), "size_mb": float(models.model_size_mb(model)),
                "wall_s": round(time.perf_counter() - t0, 3), "weights": store.repo_relative(final_path),
                "spec": spec, "shapes": models.network_shapes(model) if shapes else None}

    record_exists = store.cache_path(key, kind="train").exists()
    record = store.cached(key, compute, kind="train",
                          refresh=record_exists and weights_needed and not final_path.exists())
    resume_path.unlink(missing_ok=True)  # the run is finished and recorded
    return record


def load_weights(record: Mapping[str, Any]) -> nn.Module:
    """The trained network of a ``train_run`` record (``models.load_network`` of its weights file; CPU)."""
    path = Path(record["weights"])
    if not path.is_absolute():
        path = store.REPO_ROOT / path
    if not path.exists():
        raise FileNotFoundError(f"weights file {str(path)!r} of run {record.get('hash')} is missing; call "
                                "train_run again with the same arguments: it retrains when the weights are gone")
    return models.load_network(path)
