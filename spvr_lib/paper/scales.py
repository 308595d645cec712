"""The scales, defined in one place: ``smoke``, ``cpu`` (and ``cpu-full``) and ``paper``.

* ``smoke``: minutes on a laptop; what the tests and nbmake run.
* ``cpu``: real results on a 2-core machine without a GPU (the default of ``make reproduce``): Fashion-MNIST,
  networks at 1/8 width, trained until they plateau (docs/protocol.md gives the cost: several
  runs of a few hours each, resumed from the run cache).
* ``cpu-full``: the cpu scale with every rate of the paper's Table 1 in the trained comparisons.
* ``paper``: the paper's recipe (Section 4.3, Appendix D) for a GPU and the real datasets.

Notebooks read everything from here: ``cfg = get_scale(SCALE)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from spvr_lib.paper import reference

SCALE_NAMES = ("smoke", "cpu", "cpu-full", "paper")
# Convergence, measured on the budget (notebook 03 and every on-budget reading): the same network trained again over
# ON_BUDGET_FRACTION of its epochs; it has converged when the last quarter of its budget buys at most PLATEAU_POINTS
# points of top-1 (mIoU for the segmentation network)
ON_BUDGET_FRACTION = 0.75
PLATEAU_POINTS = 0.3
# Figure 1 (notebook 07): the batch sizes timed and the torch threads of every timing (the paper's latency table:
# batch 1 and a large batch, on one CPU thread here)
LATENCY_BATCH_SIZES = (1, 64)
LATENCY_THREADS = 1
# Notebook 02: the group sizes d whose ranking cost (forward passes, one per group) is shown
GROUPING_COST_D = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class ModelSetup:
    """One row of the paper's experiments: a network on a dataset with its recipe."""

    preset: str                 # models.PRESETS key: vgg16_bn, resnet34, resnet50
    dataset: str                # data.DATASETS key: fashion-mnist, cifar10, tiny-imagenet, imagenet
    width: float = 1.0          # width multiplier applied to every layer
    epochs: int = 1             # training epochs (base model, scratch and fine-tune alike)
    batch_size: int = 128
    lr: float = 0.05            # SGD learning rate (momentum 0.9, cosine annealing)
    lr_grid: tuple[float, ...] = (0.01, 0.05, 0.1)  # searched for training from scratch (base_models.scratch_lr)
    finetune_lr_grid: tuple[float, ...] | None = None  # searched for fine-tuning (pruned_networks.finetune_lr); None: lr_grid
    val_fraction: float = 0.1   # the validation split held out of the training set for the lr searches
    val_per_class: int | None = None  # instead: lr trials train on ALL the training images every network gets and
                                      # score this many OTHER training images per class (never the test set)
    weight_decay: float = 5e-4
    group_size: int = 2         # d of Section 3.2
    rates: tuple[float, ...] = (0.7, 0.8, 0.9, 0.95, 0.98)  # fractions of parameters removed (Tables 6-8)
    train_rates: tuple[float, ...] | None = None  # rates of the trained comparisons (Tables 1, Fig. 1); None: rates
    calib_per_class: int = 50   # calibration samples per class for grouping and ranking
    train_subset: int | None = None  # samples per class used for training (None: all)
    test_subset: int | None = None   # samples per class used for testing (None: all)
    augment: bool = True
    amp: bool = False           # bfloat16 autocast (CUDA, or a CPU with native bfloat16)
    channels_last: bool = False  # train in channels_last memory format
    eval_every: int = 1         # score the test set every n-th epoch (and every epoch of the last quarter)
    stem: str | None = None     # ResNet stem: "cifar" (3x3, stride 1) or "imagenet" (7x7/2 + max-pool)
    table3_rate: float = 0.9    # the single high rate of Tables 3 (architecture vs retraining)
    pretrained: str | None = None   # published weights to start from instead of training the base network
    quote_baselines: bool = False   # Tables 1 and 3 quote the baselines' published numbers (Section 4.2: ImageNet)
    num_workers: int = 0        # DataLoader worker processes of every training (decode + augmentation off the GPU's
                                # critical path; pinned memory and persistent workers come with them on CUDA)

    @property
    def compare_rates(self) -> tuple[float, ...]:
        return self.train_rates if self.train_rates is not None else self.rates


@dataclass(frozen=True)
class Scale:
    name: str
    models: dict[str, ModelSetup]
    seeds: tuple[int, ...] = (0,)
    guyon: dict[str, Any] = field(default_factory=dict)
    notebook_timeout_s: int = 3600
    device: str | None = None    # where ranking runs (None: CUDA when present, else the CPU)
    rcp_samples: int = 20        # sub-architectures RCP samples (the paper: 20, Appendix D)
    latency_rounds: int = 50     # Figure 1: rounds of interleaved timing (every network of a cell in each round)
    latency_runs_per_round: int = 30  # timed forward passes per network and round (50 x 30 = the paper's 1500)
    latency_warmup: int = 50
    segmentation: dict[str, Any] = field(default_factory=dict)  # notebook 11 (Section 5.5), see below
    workers: int = 1             # processes that train independent networks side by side (paper.jobs)
    convergence_factor: int | None = 2  # notebook 03 also trains each base this many times longer (None: not)

    def model(self, key: str) -> ModelSetup:
        if key not in self.models:
            raise ValueError(f"model={key!r} is not set up at scale {self.name!r}; expected one of {sorted(self.models)}")
        return self.models[key]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def datasets(self) -> list[str]:
        """Every dataset the scale's notebooks read (Guyon's data is generated, not read)."""
        names = {setup.dataset for setup in self.models.values()}
        if self.segmentation:
            names.add(self.segmentation["dataset"])
        return sorted(names)


# Table 5's sensitivity table: each choice the paper leaves unstated, varied one at a time
_GUYON_VARIATIONS = {"epochs": [1, 10, 30], "batch_size": [128], "test_fraction": [0.2],
                     "reference": ["labels"]}

# Segmentation (notebook 11, Section 5.5), per scale: data, SegNet width, training recipe (SGD momentum
# 0.9, cosine annealing, per-pixel cross-entropy: train.fit with tasks.SEGMENTATION), and SPvR's settings
# (Section 5.5: 20 calibration samples per class, d = 4, 80% of the parameters removed).
# * smoke: seconds.  32x32 canvases with one item, 1/16 width (channels 4 ... 32), 64 training
#   images, one epoch, 1 calibration image per class (11).
# Every SegNet (unpruned and SPvR's, from scratch) follows the protocol of the other tables: the same
# images and epochs, and the learning rate of a grid search on a validation split of the training scenes
# (segmentation.segnet_lr), three seeds at the cpu scale.
# * cpu (~40 min of compute on 2 cores): 32x32 canvases holding ONE Fashion-MNIST item each (at 64x64
#   with 2-4 items, the dataset's default, a training step costs 2-3x more and SegNet learns no class
#   within the budget: 7% mean IoU, all background, after 200 steps), 1/8 width (channels 8 ... 64,
#   0.46M parameters), 2000 training and 1000 test scenes, batch 32 for 100 epochs (our probes at lr 0.1,
#   one seed, one core: test mIoU 55.4 after 40 epochs in 100 s, 64.2 after 100 in 254 s, 65.9 after
#   200 in 599 s; the 6 epochs used before reached 18 and were still rising fast).  Ranking goes through
#   the naive masking path (one forward pass of the calibration set per group, ~250 groups at d = 4), so
#   the calibration set is 10 images per class (110) instead of the paper's 20.
# * paper: CityScapes (19 classes) resized to 256x512, full width, 20 calibration images per class
#   and d = 4 as the paper.  The paper gives no SegNet training recipe; 100 epochs and batch 8 are our
#   choice, the learning rate is searched over the paper's grid.
_SEGMENTATION = {
    "smoke": {"dataset": "fashion-mnist-scenes", "options": {"canvas": 32, "items": (1, 1)}, "n_train": 64,
              "n_test": 32, "width": 1 / 16, "epochs": 1, "batch_size": 16, "lr_grid": (0.05,), "val_fraction": 0.1,
              "weight_decay": 5e-4, "augment": True, "calib_per_class": 1, "group_size": 4, "rate": 0.8,
              "seeds": (0,)},
    "cpu": {"dataset": "fashion-mnist-scenes", "options": {"canvas": 32, "items": (1, 1)}, "n_train": 2000,
            "n_test": 1000, "width": 1 / 8, "epochs": 100, "batch_size": 32, "lr_grid": (0.05, 0.1, 0.2),
            "val_fraction": 0.1, "eval_every": 5, "weight_decay": 5e-4, "augment": True, "calib_per_class": 10,
            "group_size": 4, "rate": 0.8, "seeds": (0, 1, 2)},
    "paper": {"dataset": "cityscapes", "options": {"size": (256, 512)}, "n_train": None, "n_test": None,
              "width": 1.0, "epochs": 100, "batch_size": 8, "lr_grid": (1e-4, 1e-3, 1e-2, 0.05, 0.1, 1.0),
              "val_fraction": 0.1, "weight_decay": 5e-4, "augment": True, "calib_per_class": 20, "group_size": 4,
              "rate": 0.8, "seeds": (0,)},
}

SMOKE = Scale(
    name="smoke",
    seeds=(0,),
    models={
        "vgg16": ModelSetup("vgg16_bn", "fashion-mnist", width=1 / 16, epochs=1, batch_size=64, lr=0.05,
                            lr_grid=(0.05,), group_size=4, train_rates=(0.9, 0.98), calib_per_class=4,
                            train_subset=20, test_subset=10),
        "resnet34": ModelSetup("resnet34", "fashion-mnist", width=1 / 16, epochs=1, batch_size=64, lr=0.05,
                               lr_grid=(0.05,), group_size=4, train_rates=(0.9,), calib_per_class=4,
                               train_subset=20, test_subset=10, stem="imagenet"),
        "resnet50": ModelSetup("resnet50", "fashion-mnist", width=1 / 16, epochs=1, batch_size=64, lr=0.05,
                               lr_grid=(0.05,), group_size=8, rates=(0.4, 0.7, 0.8, 0.95), train_rates=(0.8,),
                               calib_per_class=4, train_subset=20, test_subset=10, stem="imagenet", table3_rate=0.8),
    },
    guyon=dict(reference.GUYON_SETUP, epochs=5, batch_size=32, n_seeds=2, variations={"reference": ["labels"]}),
    notebook_timeout_s=900,
    rcp_samples=4, latency_rounds=4, latency_runs_per_round=3, latency_warmup=2, segmentation=_SEGMENTATION["smoke"],
)

def scaled_group_size(paper_d: int, width: float) -> int:
    """d at a reduced width: the same fraction of a layer as the paper's d at full width (at least 1).
    At 1/8 width a group of the paper's d = 8 would be a whole stage-1 layer (8 channels), a step that
    overshoots the parameter budget by points; scaled, d = 1 at 1/8 width for all three networks."""
    return max(1, round(paper_d * width))


# cpu: Fashion-MNIST (real, offline) at 32x32, networks at 1/8 width.  The paper's protocol, scaled down:
# EVERY network of a model (base, fine-tuned baselines, baselines and SPvR from scratch, Table 2, Figure 2,
# the MobileNets of Table 4) gets the same training images and epochs as its base network, in batches of 128
# with bfloat16 autocast where it pays (VGG16; the ResNets are no faster with it) and channels_last; learning
# rates come from a grid search on held-out training images, once per model and mode (from scratch: on the
# base network; fine-tuning: on ℓ1's pruned network): a trial trains on the very images every network of the
# model gets (250 per class) and is scored on 500 OTHER training images per class (val_per_class; never the
# test set); every network is scored on the whole 10,000-image test set.  The
# epochs are set so that the base networks plateau: VGG16 160, ResNet34 320, ResNet50 800 (docs/protocol.md, "Why these
# sizes", gives the measurements; at 80 / 160 / 200 epochs, commit 40c1659, the last quarter of training still
# added 0.85 / 0.56 / 0.60 points, and ResNet50 rose from 82.76 to 83.42 with 400).  The ResNets use the
# ImageNet stem (7x7/2 + max-pool, as the paper's ResNet50).  Trained comparisons run at two rates per model
# (the highest included) and three seeds; the architecture tables (Tables 6-8) and latency use all of the
# paper's rates.  Group sizes are the paper's d scaled with the width (scaled_group_size: d = 1 at 1/8
# width), so that a group is the same fraction of a layer as in the paper.  Independent networks train side
# by side, one per core (paper.jobs).
_CPU_TRAIN = dict(epochs=160, train_subset=250, test_subset=None, batch_size=128, channels_last=True, eval_every=20,
                  lr_grid=(0.02, 0.05, 0.1, 0.2, 0.4), finetune_lr_grid=(0.002, 0.005, 0.02, 0.05, 0.1, 0.2),
                  val_per_class=500)
CPU = Scale(
    name="cpu",
    seeds=(0, 1, 2),
    models={
        "vgg16": ModelSetup("vgg16_bn", "fashion-mnist", width=1 / 8, **_CPU_TRAIN, amp=True,
                            group_size=scaled_group_size(2, 1 / 8), train_rates=(0.9, 0.98), table3_rate=0.9,
                            calib_per_class=50),
        "resnet34": ModelSetup("resnet34", "fashion-mnist", width=1 / 8, **{**_CPU_TRAIN, "epochs": 320},
                               group_size=scaled_group_size(4, 1 / 8), train_rates=(0.9, 0.98), table3_rate=0.9,
                               calib_per_class=50, stem="imagenet"),
        "resnet50": ModelSetup("resnet50", "fashion-mnist", width=1 / 8, **{**_CPU_TRAIN, "epochs": 800},
                               group_size=scaled_group_size(8, 1 / 8), rates=(0.4, 0.7, 0.8, 0.95),
                               train_rates=(0.4, 0.8), calib_per_class=20, stem="imagenet", table3_rate=0.8),
    },
    guyon=dict(reference.GUYON_SETUP, epochs=5, batch_size=32, n_seeds=10, variations=_GUYON_VARIATIONS),
    notebook_timeout_s=12 * 3600,
    rcp_samples=20, latency_rounds=30, latency_runs_per_round=10, latency_warmup=30, segmentation=_SEGMENTATION["cpu"],
    workers=2,
)

PAPER = Scale(
    name="paper",
    seeds=(0,),
    models={
        "vgg16": ModelSetup("vgg16_bn", "cifar10", width=1.0, epochs=200, batch_size=128, lr=0.05,
                            lr_grid=(1e-4, 1e-3, 1e-2, 0.05, 0.1, 1.0), group_size=2, calib_per_class=50,
                            num_workers=8),
        "resnet34": ModelSetup("resnet34", "tiny-imagenet", width=1.0, epochs=100, batch_size=512, lr=0.1,
                               lr_grid=(1e-4, 1e-3, 1e-2, 0.05, 0.1, 1.0), group_size=4, calib_per_class=50,
                               stem="cifar", num_workers=8),
        "resnet50": ModelSetup("resnet50", "imagenet", width=1.0, epochs=100, batch_size=256, lr=0.1,
                               lr_grid=(1e-4, 1e-3, 1e-2, 0.05, 0.1, 1.0), group_size=8,
                               rates=(0.4, 0.7, 0.8, 0.95), train_rates=(0.4, 0.7, 0.8), calib_per_class=20,
                               weight_decay=1e-4, stem="imagenet", table3_rate=0.8, num_workers=8,
                               pretrained="torchvision-resnet50-imagenet1k-v1", quote_baselines=True),
    },
    guyon=dict(reference.GUYON_SETUP, epochs=5, batch_size=32, n_seeds=10, variations=_GUYON_VARIATIONS),
    notebook_timeout_s=7 * 24 * 3600, convergence_factor=None,
    rcp_samples=20, latency_rounds=50, latency_runs_per_round=30, latency_warmup=50,
    segmentation=_SEGMENTATION["paper"],
)

# cpu-full: the cpu scale with what it leaves out to stay near 150 minutes: Tables 1 and 3 at EVERY rate of the
# paper's Table 1 (VGG16 and ResNet34: 70, 80, 90, 95, 98%; ResNet50: 40, 70, 80%), not two.  Outputs go to
# figures/cpu-full/; about 2.5 times the cpu scale's compute (`make reproduce SCALE=cpu-full`).
CPU_FULL = dataclasses.replace(CPU, name="cpu-full", models={
    key: dataclasses.replace(setup, train_rates=tuple(sorted({k[1] for k in reference.PAPER_TABLE1
                                                              if k[0] == key and k[1] > 0})))
    for key, setup in CPU.models.items()})

_SCALES = {"smoke": SMOKE, "cpu": CPU, "cpu-full": CPU_FULL, "paper": PAPER}


def get_scale(name: str) -> Scale:
    """The :class:`Scale` called ``name`` (``smoke``, ``cpu`` or ``paper``)."""
    if name not in _SCALES:
        raise ValueError(f"scale={name!r} is not one of {SCALE_NAMES}")
    return _SCALES[name]


# Notebook 14 (a small ViT on Fashion-MNIST, SPvR against Torch-Pruning's head and neuron pruning).  Its setups
# are a class and a function, not module-level values: every artifact's provenance fingerprints the values this
# module assigns (paper.provenance._ALWAYS), and a new one would mark every committed figure as stale.
@dataclass(frozen=True)
class ViTSetup:
    """Notebook 14 at one scale: torchvision's VisionTransformer (32x32 input, ``patch_size`` patches) and the
    protocol of the other tables (one recipe for every network, lrs searched on held-out training images)."""

    dataset: str
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int
    patch_size: int = 4
    epochs: int = 1             # every network: base, SPvR's (from scratch) and Torch-Pruning's (fine-tuned)
    batch_size: int = 64
    lr: float = 0.05            # used when a grid has one value
    lr_grid: tuple[float, ...] = (0.05,)             # from scratch, searched on the base network
    finetune_lr_grid: tuple[float, ...] = (0.01,)    # fine-tuning, searched on Torch-Pruning magnitude's network
    val_fraction: float = 0.1
    val_per_class: int | None = None
    weight_decay: float = 5e-4
    augment: bool = True
    num_workers: int = 0
    amp: bool = False
    channels_last: bool = False
    eval_every: int = 1
    train_subset: int | None = None
    test_subset: int | None = None
    calib_per_class: int = 2
    group_size: int = 1         # d: one head / one MLP neuron per group
    keeps: tuple[float, ...] = (0.5, 0.2)            # fractions of the base's parameters kept
    seeds: tuple[int, ...] = (0, 1)
    convergence: bool = True    # train the base again with 3/4 of its epochs (the on-budget reading)


def vit_setup(scale: str) -> ViTSetup:
    """Notebook 14's setup at ``scale``.

    * smoke (~1 min): a 2-layer ViT (4 heads, width 16, MLP 64), 20 training and 10 test images per class, 1 epoch,
      keep 60% and 40% (at 20% its embedding, position and classifier alone would not fit), 2 seeds.
    * cpu (estimated 1.6 machine-hours cold, vit_fashion_mnist's docstring): 4 layers of 4 heads, width 64, MLP 128
      (140k parameters); 150 training images per class for 30 epochs (batch 128), 200 test images per class,
      scored every 10th epoch and over the last quarter; lr grids of 3 (scratch) and 2 (fine-tuning) values
      scored on 100 other training images per class; d = 1; keep 50% and 20%; 3 seeds.
    * paper: CIFAR-10 (3 channels), 6 layers of 8 heads, width 256, MLP 512 (~3.2M parameters), all images,
      200 epochs as the paper's CIFAR-10 recipe, batch 128, d = 1, 3 seeds."""
    get_scale(scale)
    if scale == "smoke":
        return ViTSetup("fashion-mnist", num_layers=2, num_heads=4, hidden_dim=16, mlp_dim=64, epochs=1,
                        batch_size=64, train_subset=20, test_subset=10, calib_per_class=2, keeps=(0.6, 0.4),
                        seeds=(0, 1))
    if scale in ("cpu", "cpu-full"):
        return ViTSetup("fashion-mnist", num_layers=4, num_heads=4, hidden_dim=64, mlp_dim=128, epochs=30,
                        batch_size=128, lr_grid=(0.01, 0.03, 0.1), finetune_lr_grid=(0.003, 0.01), val_per_class=100,
                        eval_every=10, train_subset=150, test_subset=200, calib_per_class=20, seeds=(0, 1, 2))
    return ViTSetup("cifar10", num_layers=6, num_heads=8, hidden_dim=256, mlp_dim=512, epochs=200, batch_size=128,
                    lr_grid=(0.01, 0.03, 0.1), finetune_lr_grid=(0.001, 0.003, 0.01), val_fraction=0.1,
                    calib_per_class=50, seeds=(0, 1, 2), num_workers=8)
