"""Tables 6-8: the architectures SPvR finds at the paper's rates, beside the paper's."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from spvr_lib import models
from spvr_lib.paper import base_models, reference


def architectures_table(cfg: Any, keys: Sequence[str] | None = None, progress: bool = True) -> pd.DataFrame:
    """Tables 6-8: the architecture SPvR recommends at each of the paper's rates, beside the paper's."""

    rows = []
    for key in keys or list(cfg.models):
        setup = cfg.model(key)
        base = base_models.train_base(cfg, key, progress=progress)
        paper = reference.PAPER_ARCHITECTURES[key]
        rows.append({"model": key, "rate": 0.0, "removed": 0.0, "params": base["params"], "size (MB)": base["size_mb"],
                     "layers": base_models.prunable_count(base["spec"]), "architecture": models.spec_to_str(base["spec"]),
                     "paper size (MB)": paper[0.0][0], "paper architecture": paper[0.0][1]})
        for rate in setup.rates:
            rec = base_models.spvr_pruned(cfg, key, rate, progress=progress)
            p = paper.get(rate, (None, None))
            rows.append({"model": key, "rate": rate, "removed": rec["removed_fraction"], "params": rec["params_after"],
                         "size (MB)": rec["size_mb"], "layers": base_models.prunable_count(rec["spec"]),
                         "architecture": rec["arch"], "paper size (MB)": p[0], "paper architecture": p[1]})
    return pd.DataFrame(rows)
