"""The catalogue of the baselines: which methods there are, their names, and how each is implemented here.

Table 1's baselines as the paper ran them (:data:`BASELINES`), the original authors' variants of its four
weight/gradient criteria (:data:`AUTHORS_VARIANTS`, the sensitivity table), :data:`PRUNE_METHODS` (both),
:data:`DISPLAY_NAMES`, :data:`AUTHORS_VARIANT_OF`, :data:`LOCAL_METHODS`; what each method does and where it was
read from (:data:`NOTES`, :data:`METHOD_CARDS`, :func:`method_table`, :func:`method_notes`), and why OTOv2 cannot
run (:data:`OTOV2_UNAVAILABLE`).  The sources, as the notes and cards cite them:

- ``tp_l1``, ``tp_l2``, ``tp_taylor``, ``tp_fpgm``: VainF/Torch-Pruning (torch_pruning/pruner/importance.py: the
  importances; its MetaPruner: the local rule), as the paper's Section 4.3 ran them (:mod:`.tp_local`);
- ``l1``: Li et al. 2016 (no official code; Torch-Pruning's MagnitudeImportance); ``l2``: the filter norm, as
  Torch-Pruning's MagnitudeImportance(p=2); ``fpgm``: He et al. 2019, he-y/filter-pruning-geometric-median;
  ``taylor``: Molchanov et al. 2019, NVlabs/Taylor_pruning (pruning_engine.py, layers/gate_layer.py, configs/)
  (:mod:`.authors`);
- ``hrank``: Lin et al. 2020, lmbxmu/HRank (rank_generation.py); ``nisp``: Yu et al. 2018 (paper only), its final
  layer ranked by Inf-FS (Roffo et al. 2015); ``curl``: Luo and Wu 2020, Roll920/CURL (generate_mask.py,
  generate_index.py); ``rcp``: Li et al. 2022, Revisiting Random Channel Pruning (paper) (:mod:`.others`);
- ``otov2``: Chen et al. 2023, tianyic/only_train_once (cannot run here).

While a method runs, ``prune`` and ``_run`` (:mod:`.pruning`) read only :data:`PRUNE_METHODS`,
:data:`OTOV2_UNAVAILABLE` and the two RCP sentences ``_run`` appends to a run's details: editing the notes or the
cards changes no cached record.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch_pruning as tp

# Table 1's baselines, as the paper ran them (Section 4.3: "The pruning library by Fang et al. [2023] was utilized to
# implement the baseline methods, except for OTOv2"): l1, l2, Taylor and FPGM are Torch-Pruning's importances
BASELINES = ("tp_l1", "tp_l2", "tp_taylor", "tp_fpgm", "rcp", "hrank", "curl", "nisp", "otov2")
# the original authors' formulas for the same four criteria (the sensitivity table: does the choice move a verdict?)
AUTHORS_VARIANTS = ("l1", "l2", "taylor", "fpgm")
PRUNE_METHODS = (*BASELINES, *AUTHORS_VARIANTS)
DISPLAY_NAMES = {"tp_l1": "ℓ1", "tp_l2": "ℓ2", "tp_taylor": "Taylor", "tp_fpgm": "FPGM", "rcp": "RCP",
                 "hrank": "HRank", "curl": "CURL", "nisp": "NISP", "otov2": "OTOv2",
                 "l1": "ℓ1 (Li et al.)", "l2": "ℓ2 (filter norm)", "taylor": "Taylor (NVlabs)", "fpgm": "FPGM (He et al.)"}
# the variant of each Torch-Pruning criterion that follows its original authors
AUTHORS_VARIANT_OF = {"tp_l1": "l1", "tp_l2": "l2", "tp_taylor": "taylor", "tp_fpgm": "fpgm"}

# the methods that choose ONE architecture at a given budget (one ratio for every unit; only which channels differ):
# trained from scratch, their networks are one and the same training (paper.trained_runs.training_tag)
LOCAL_METHODS = ("tp_l1", "tp_l2", "tp_taylor", "tp_fpgm", "l1", "l2", "fpgm", "hrank", "nisp")

_LOCAL = ("one channel ratio r for every unit (torch-pruning's local pruning rule, bisected to the parameter "
          "budget): each unit keeps int(C * (1 - r)) channels rounded down to a multiple of group_size, at least one "
          "group, the most important by the criterion.")
_TP = ("Torch-Pruning {version}'s {cls}({args}; group_reduction 'mean', normalizer 'mean': its defaults) scores each "
       "channel over its whole dependency group (the conv filter, its BN, the next layer's input weights, and in a "
       "ResNet every coupled layer of the residual stream){extra}. Selection as Torch-Pruning's MetaPruner with "
       "global_pruning=False (its default; the paper's layer-wise methods), iterative_steps=1, round_to=group_size, "
       "the classifier ignored: " + _LOCAL + " The ratio is bisected to the parameter budget and the last step split "
       "across units (the first units in model order keep one group more) so that the budget is met exactly.")
NOTES = {
    "tp_l1": _TP.format(version=tp.__version__, cls="GroupMagnitudeImportance", args="p=1", extra=""),
    "tp_l2": _TP.format(version=tp.__version__, cls="GroupMagnitudeImportance", args="p=2", extra=""),
    "tp_taylor": _TP.format(version=tp.__version__, cls="GroupTaylorImportance", args="",
                            extra=" as |w * dL/dw|, the gradient of the mean cross-entropy over the whole calibration "
                                  "set (accumulated over mini-batches, eval mode)"),
    "tp_fpgm": _TP.format(version=tp.__version__, cls="FPGMImportance", args="p=2", extra=""),
    "l1": "Filter L1 norm (Li et al. 2016): a channel's score is sum |W| of the conv filter producing it (a residual "
          "stream unit sums the filters of its coupled convs). " + _LOCAL + " One shot, no iterative pruning.",
    "l2": "Filter L2 norm: ||W||_2 of the conv filter producing a channel (summed over a stream's coupled convs). "
          + _LOCAL,
    "fpgm": "FPGM (He et al. 2019): a channel's score is the sum of Euclidean distances between its raw conv filter and "
            "every other filter of the layer; the filters nearest the geometric median (smallest sum) go first. "
            + _LOCAL,
    "taylor": "Taylor as NVlabs/Taylor_pruning runs it (Molchanov et al. 2019, method 22: a gate of weight 1 after "
              "each BN): the criterion (gate * dL/dgate)^2 = (gamma * dL/dgamma + beta * dL/dbeta)^2 per mini-batch, "
              "accumulated; a stream unit sums its coupled BNs; all channels ranked together (global), at least one "
              "channel per unit.  In the paper harness it prunes while fine-tuning (TaylorGates: NVlabs's iterative "
              "schedule, scaled: paper.pruned_networks.TAYLOR_SCHEDULE); prune() alone scores once on the calibration set "
              "(eval mode) and removes the lowest until the parameter budget. ",
    "hrank": "HRank (Lin et al. 2020): a channel's score is the average matrix rank of the feature map the network "
             "produces for it: ReLU(BN) inside a block or a VGG layer, and for a residual-stream channel the output of "
             "every block of the stage (after the ReLU that follows the addition), summed over the blocks. "
             + _LOCAL + " One shot (HRank prunes layer by layer with fine-tuning in between).",
    "nisp": "NISP (Yu et al. 2018): Inf-FS (unsupervised, alpha=0.5) scores of the final response layer (the "
            "classifier's input) on the calibration set, propagated back by s_in = |W|^T s_out with a conv's |W| "
            "summed over its kernel and each BN folded in as the diagonal |gamma / sigma|; pooling, ReLU and dropout "
            "pass scores through per channel. ResNet: the score of a block's input is the residual branch's "
            "back-propagated score plus the shortcut's; a residual-stream unit sums the scores of its coupled convs. "
            + _LOCAL + " Implemented for spvr_lib VGG and ResNet.",
    "curl": "CURL (Luo and Wu 2020): each single channel is masked (its BN's gamma and beta set to 0) and scored by "
            "KL(p_masked || p_original) averaged over the calibration set, CURL's direction; a residual-stream "
            "channel is masked jointly in every coupled BN (the stem or projection BN and the last BN of every block "
            "of the stage) in one forward pass. All channels ranked together (global); the least important removed "
            "until the parameter budget while a unit keeps at least floor_fraction (CURL's 30%) of its channels. "
            "Where 30% cannot reach the budget the floor is lowered (20%, 10%, 5%, one channel) and the floor used "
            "is stated. No distillation or label refinement (CURL's later steps).",
    "rcp": "Random Channel Pruning (Li et al. 2022): n_samples architectures with per-unit keep fractions drawn from "
           "U(0.1, 1), each scaled by one multiplier bisected to the parameter budget; channels kept inside a unit by "
           "filter L1 norm so the chosen network can be fine-tuned; the best candidate after a brief training.",
    "otov2": "OTOv2 (Chen et al. 2023) trains the full network with its DHSPG optimizer and builds the subnet from "
             "its zero groups; no installable release runs here (see error).",
}
_RCP_PROXY = (" Candidates ranked by a cheap proxy (short_train=None): accuracy on the calibration set after "
              "re-estimating BN statistics on it (EagleEye-style adaptive BN), not by RCP's brief training.")
_RCP_TRAIN = " Candidates ranked by the caller's short_train (a brief training, scored on held-out validation data)."

# One card per baseline: what notebook 04's and docs/baselines.md's method table show.
def _tp_card(cls: str, args: str, calibration: str) -> dict[str, str]:
    return {"criterion": f"Torch-Pruning {cls}({args}), group_reduction 'mean', normalizer 'mean'",
            "ranking": "local: MetaPruner(global_pruning=False, iterative_steps=1, round_to=group_size)",
            "per-layer constraint": "at least one group of group_size", "calibration samples": calibration,
            "differences from the authors' code": "one shot to the parameter budget (the ratio bisected, the last "
            "step split across units); the scores are Torch-Pruning's, as the paper ran them (Section 4.3)",
            "read from": f"VainF/Torch-Pruning {tp.__version__} (torch_pruning/pruner/importance.py)"}


METHOD_CARDS: dict[str, dict[str, str]] = {
    "tp_l1": _tp_card("GroupMagnitudeImportance", "p=1", "none (weights only)"),
    "tp_l2": _tp_card("GroupMagnitudeImportance", "p=2", "none (weights only)"),
    "tp_taylor": _tp_card("GroupTaylorImportance", "", "the calibration set (gradients of the mean cross-entropy)"),
    "tp_fpgm": _tp_card("FPGMImportance", "p=2", "none (weights only)"),
    "l1": {"criterion": "filter L1 norm: sum of abs(W) over the filter", "ranking": "local (one ratio for every unit)",
           "per-layer constraint": "at least one group of group_size", "calibration samples": "none (weights only)",
           "differences from the authors' code": "one shot to the parameter budget (Li et al. prune chosen layers by "
           "sensitivity, then retrain); a stream unit sums its coupled convs",
           "read from": "Li et al. 2016 (no official code); Torch-Pruning MagnitudeImportance"},
    "l2": {"criterion": "filter L2 norm: Euclidean norm of the filter", "ranking": "local (one ratio for every unit)",
           "per-layer constraint": "at least one group of group_size", "calibration samples": "none (weights only)",
           "differences from the authors' code": "as l1",
           "read from": "Torch-Pruning MagnitudeImportance(p=2) (VainF/Torch-Pruning)"},
    "fpgm": {"criterion": "sum of distances of the raw filter to the layer's other filters",
             "ranking": "local (one ratio for every unit)", "per-layer constraint": "at least one group of group_size",
             "calibration samples": "none (weights only)",
             "differences from the authors' code": "one shot (the authors prune softly every epoch while training)",
             "read from": "he-y/filter-pruning-geometric-median"},
    "taylor": {"criterion": "(gamma * dL/dgamma + beta * dL/dbeta)^2 at the BN gate, per mini-batch, accumulated",
               "ranking": "global (all units together)", "per-layer constraint": "at least one channel",
               "calibration samples": "the training mini-batches while fine-tuning (prune() alone: the calibration "
               "set)",
               "differences from the authors' code": "the schedule scaled to the cpu budgets: ten pruning steps over "
               "the first quarter of the fine-tuning epochs (NVlabs: 100 neurons every 30 mini-batches); a stream "
               "unit sums its coupled BNs' gates (NVlabs: one shared gate per stage, divided by its blocks)",
               "read from": "NVlabs/Taylor_pruning (pruning_engine.py, layers/gate_layer.py, configs/)"},
    "hrank": {"criterion": "average matrix rank of the feature map the network outputs (after the ReLU that follows "
              "the residual addition)", "ranking": "local (one ratio for every unit)",
              "per-layer constraint": "at least one group of group_size", "calibration samples": "the calibration set",
              "differences from the authors' code": "one shot (HRank prunes layer by layer with fine-tuning in "
              "between); a stream unit sums the ranks of the blocks of its stage",
              "read from": "lmbxmu/HRank (rank_generation.py)"},
    "nisp": {"criterion": "Inf-FS importance of the final response layer propagated back through abs(W)",
             "ranking": "local (one ratio for every unit)", "per-layer constraint": "at least one group of group_size",
             "calibration samples": "the calibration set",
             "differences from the authors' code": "no official code; propagation written from the paper",
             "read from": "Yu et al. 2018 (paper only)"},
    "curl": {"criterion": "KL(p_masked || p) of masking one channel (jointly in every coupled BN)",
             "ranking": "global (all units together)",
             "per-layer constraint": "keep >= 30% of a unit (lowered only where 30% cannot reach the budget)",
             "calibration samples": "the calibration set",
             "differences from the authors' code": "no distillation / label refinement; the paper's stage exclusion "
             "(index 29) not copied; floor lowered at rates CURL's 30% cannot reach",
             "read from": "Roll920/CURL (generate_mask.py, generate_index.py)"},
    "rcp": {"criterion": "random per-unit widths; the best of n_samples after a brief training",
            "ranking": "per candidate (random)", "per-layer constraint": "keep fraction in [0.1, 1] before scaling",
            "calibration samples": "a brief training on the training split, validated on a held-out split",
            "differences from the authors' code": "brief training of 1 epoch (the authors train each candidate a few "
            "epochs); channels inside a unit kept by filter L1 norm",
            "read from": "Li et al. 2022, Revisiting Random Channel Pruning (paper)"},
    "otov2": {"criterion": "zero-invariant groups found by DHSPG while training the full network",
              "ranking": "-", "per-layer constraint": "-", "calibration samples": "-",
              "differences from the authors' code": "cannot run here (see the error of every OTOv2 row)",
              "read from": "tianyic/only_train_once"},
}


def method_table(methods: Sequence[str] = PRUNE_METHODS) -> list[dict[str, str]]:
    """The method table of notebook 04 and the README: one row per method (its :data:`METHOD_CARDS`), Table 1's
    baselines first, then the original authors' variants of the sensitivity table."""
    return [{"method": DISPLAY_NAMES[m], "table": "Table 1" if m in BASELINES else "sensitivity (authors' variant)",
             **METHOD_CARDS[m]} for m in methods]

OTOV2_UNAVAILABLE = (
    "OTOv2 cannot run in this environment: only_train_once 3.0.1 (the last release on PyPI) imports "
    f"torch.onnx._globals and calls torch.onnx._optimize_graph, neither of which the installed torch "
    f"{torch.__version__.split('+')[0]} has; it no longer ships "
    "DHSPG, OTOv2's optimizer (`from .dhspg import DHSPG` is commented out in only_train_once/optimizer/__init__.py), "
    "only OTOv3's HESSO, which hard-codes .cuda(); and otoml 2.0.1, the OTOv2 release that has DHSPG, declares "
    "non-PEP 440 requirements ('onnx (>=1.12.*)') that pip >= 24.1 refuses to install.")


def method_notes(method: str, details: str = "") -> str:
    """How ``method`` is implemented here (:data:`NOTES`), followed by ``details`` from one run."""
    return " ".join(part for part in (NOTES[method], details.strip()) if part)
