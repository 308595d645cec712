"""The pruning baselines of the paper's Table 1 (Section 4.2), pruned to the SAME parameter budget as SPvR.

One entry point, :func:`prune`. Every method keeps the trained weights of the channels it keeps
(so the result can be fine-tuned) and is built on torch-pruning's ``DependencyGraph`` (the
paper's Section 4.3: "the pruning library by Fang et al. [2023] was utilized to implement the
baseline methods, except for OTOv2").

Channel units. A *unit* is a unit of the one network description SPvR prunes traced networks with
(:func:`spvr_lib.graph.trace_units`): one torch-pruning dependency group, the output channels of one
conv/linear layer together with everything coupled to them (its BN, the next layer's input
channels, and in a ResNet the whole residual stream of a stage: stem or projection conv, every
block's last conv and BN). The final classifier's outputs are never pruned. Its parameter count
(``NetworkGraph.count``) and rebuild (``NetworkGraph.build``) are the ones SPvR's graph path uses.
Units are the same for every method; each method scores channels as its authors do (:data:`NOTES`,
:data:`METHOD_CARDS`, with the repository each was read from) and selects them as they do:

- ``tp_l1``, ``tp_l2``, ``tp_taylor``, ``tp_fpgm``: Table 1's ℓ1, ℓ2, Taylor and FPGM as the paper ran them, with
  Torch-Pruning's importances (:data:`TP_IMPORTANCES`, scored over whole dependency groups) and its MetaPruner's
  local selection: one channel ratio for every unit, bisected to the budget (as below).
- the original authors' variants of those four (:data:`AUTHORS_VARIANTS`, the sensitivity table):
  ``l1``, ``l2``, ``fpgm`` (raw filter norms and distances), ``hrank`` (ranks of the feature maps
  the network produces), ``nisp``: LOCAL selection, one channel ratio ``r`` for every unit
  (torch-pruning's rule: ``int(C * (1 - r))`` channels kept, rounded down to ``group_size``),
  ``r`` bisected to the smallest value whose pruned model has ``count_params <= budget``.
- ``taylor`` (per-mini-batch gate criterion) and ``curl`` (joint masking, KL(p_masked || p)):
  GLOBAL selection of single channels across units until the budget (CURL with its 30% floor).
- ``rcp``: random per-unit keep fractions scaled to the budget, the best of ``n_samples`` after a
  brief training (``short_train``) or, without one, a cheap proxy.
- ``otov2``: reported as failed with its reason (see :data:`OTOV2_UNAVAILABLE`).

A method that cannot run or cannot reach the budget does not raise: its result has
``status="failed"`` and the reason in ``error``, so a table can show it as missing.

One module per job; every name below is read here as ``baselines.<name>`` (the very same objects: the tables are
not copies):

- :mod:`.catalogue`: ``BASELINES``, ``AUTHORS_VARIANTS``, ``PRUNE_METHODS``, ``DISPLAY_NAMES``,
  ``AUTHORS_VARIANT_OF``, ``LOCAL_METHODS``, ``NOTES``, ``METHOD_CARDS``, ``method_table``, ``method_notes``,
  ``OTOV2_UNAVAILABLE``: which methods there are and how each is implemented, with its source.
- :mod:`.common`: ``BaselineResult``, ``_MethodFailure``, ``bisect_budget``, ``budget_from_keep`` (from
  :mod:`spvr_lib.budget`), the argument checks and the calibration mini-batches.
- :mod:`.units`: ``_Units`` (the description's units with their torch-pruning groups, its count of a cut, its
  rebuild),
  ``ChannelScoreImportance``.
- :mod:`.tp_local`: ``TP_IMPORTANCES``, ``tp_importance``, ``_accumulate_gradients`` (Torch-Pruning's
  importances, VainF/Torch-Pruning) and MetaPruner's local rule (``_local_removals``, ``_fit_local``).
- :mod:`.authors`: ``_filter_scores`` (l1: Li et al. 2016; l2; fpgm: he-y/filter-pruning-geometric-median),
  ``_taylor_scores`` and ``TaylorGates`` (NVlabs/Taylor_pruning), the global selection (``_fit_global``).
- :mod:`.others`: ``_hrank_scores`` (lmbxmu/HRank), ``inf_fs`` and ``_nisp_scores`` (Yu et al. 2018),
  ``_curl_scores`` (Roll920/CURL), RCP's random widths (Li et al. 2022).
- :mod:`.pruning`: ``prune``, the entry point, and ``_run``, the dispatch to each method.

A test that replaces a function one method calls patches it in the module that calls it (``baselines.prune``
itself is read through this package by the paper harness, so patching it here reaches the harness).
"""
from __future__ import annotations

# the private names are the tests' (tests/test_baselines.py reads them as ``B._Units`` ...)
from spvr_lib.baselines.catalogue import (AUTHORS_VARIANT_OF, AUTHORS_VARIANTS, BASELINES, DISPLAY_NAMES,
                                          LOCAL_METHODS, METHOD_CARDS, NOTES, OTOV2_UNAVAILABLE, PRUNE_METHODS,
                                          method_notes, method_table)
from spvr_lib.baselines.common import BaselineResult, _MethodFailure, bisect_budget, budget_from_keep  # noqa: F401
from spvr_lib.baselines.units import ChannelScoreImportance, _Units  # noqa: F401
from spvr_lib.baselines.tp_local import (TP_IMPORTANCES, _accumulate_gradients, _fit_local,  # noqa: F401
                                         _local_removals, tp_importance)
from spvr_lib.baselines.authors import TaylorGates, _filter_scores, _fit_global, _taylor_scores  # noqa: F401
from spvr_lib.baselines.others import _curl_scores, _hrank_scores, _nisp_scores, inf_fs  # noqa: F401
from spvr_lib.baselines.pruning import prune

__all__ = ["TaylorGates", "BASELINES", "AUTHORS_VARIANTS", "PRUNE_METHODS", "AUTHORS_VARIANT_OF", "TP_IMPORTANCES", "tp_importance",
           "LOCAL_METHODS", "DISPLAY_NAMES", "NOTES", "METHOD_CARDS", "method_table", "BaselineResult", "prune",
           "budget_from_keep", "bisect_budget", "ChannelScoreImportance", "inf_fs", "method_notes", "OTOV2_UNAVAILABLE"]
