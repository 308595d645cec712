"""spvr_lib: SPvR, Structured Pruning via Ranking (Hassan, Paik, Khare; UAI 2025).

Prune a trained network to an exact parameter budget, then retrain it from scratch::

    from spvr_lib import spvr_prune, count_params
    result = spvr_prune(model, (x_calib, y_calib), keep=0.1, group_size=2)   # keep 10% of the parameters
    small = result.model                     # freshly initialised; train it with spvr_lib.fit
    assert count_params(small) == result.params_after <= result.budget

The method, in the paper's order: :mod:`spvr_lib.grouping` (Eq. 3-4, Algorithm 1),
:mod:`spvr_lib.criteria` (Eq. 2 and KL), :mod:`spvr_lib.ranking` (importance by masking; naive and
fast paths), :mod:`spvr_lib.budget` (the global sort to an exact budget, layer collapse) and
:mod:`spvr_lib.prune` (the entry point).  Around it: models, data, train (the one training loop),
tasks, latency, baselines and store (the one cache).  The paper's tables and figures live in
:mod:`spvr_lib.paper`, which depends on this package and never the reverse.
"""
from spvr_lib.baselines import BaselineResult
from spvr_lib.baselines import prune as prune_baseline
from spvr_lib.budget import budget_from_keep, global_discard
from spvr_lib.criteria import CRITERIA, kl_loss, spvr_loss
from spvr_lib.devices import resolve_device
from spvr_lib.grouping import (
                             correlation_matrix,
                             group_neurons,
                             record_activations,
                             reduce_feature_maps,
)
from spvr_lib.latency import count_macs, measure_latency
from spvr_lib.models import (
                             build,
                             count_params,
                             load_network,
                             preset,
                             reinitialize,
                             save_network,
                             spec_params,
                             spec_to_str,
)
from spvr_lib.prune import GroupRanking, PruneResult, inherit_weights, network_units, rank_groups, spvr_prune, unit_groups
from spvr_lib.ranking import MaskSite, group_importance, mask_output, unit_importance
from spvr_lib.tasks import CLASSIFICATION, SEGMENTATION, Task
from spvr_lib.train import Recipe, evaluate, fit, train_run

__version__ = "0.2.0"

__all__ = [
    # the method
    "spvr_prune", "PruneResult", "rank_groups", "GroupRanking", "inherit_weights", "network_units", "unit_groups", "group_importance", "mask_output", "unit_importance", "MaskSite",
    "spvr_loss", "kl_loss", "CRITERIA", "correlation_matrix", "group_neurons", "reduce_feature_maps",
    "record_activations", "budget_from_keep", "global_discard",
    # networks, training and measurement
    "build", "preset", "count_params", "spec_params", "spec_to_str", "reinitialize", "save_network",
    "load_network", "Recipe", "fit", "evaluate", "train_run", "Task", "CLASSIFICATION",
    "SEGMENTATION", "measure_latency", "count_macs", "resolve_device",
    # the baselines of Table 1
    "prune_baseline", "BaselineResult",
]
