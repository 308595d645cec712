"""The Guyon (2003) synthetic classification data of Appendix A, via sklearn's make_classification."""
from __future__ import annotations

import numpy as np


def make_guyon(n_samples: int = 1000, n_features: int = 100, flip_y: float = 0.02, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The synthetic binary task of the paper's Appendix A (Guyon 2003 via sklearn's make_classification):
    X float32 [n_samples, n_features], y int64 [n_samples] in {0, 1}.

    Other settings are sklearn's defaults: n_informative=2, n_redundant=2, n_repeated=0,
    n_clusters_per_class=2, class_sep=1.0, shuffle=True; ``flip_y`` labels are reassigned at random.
    """
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n_samples, n_features=n_features, n_classes=2, flip_y=flip_y,
                               random_state=seed)
    return x.astype(np.float32), y.astype(np.int64)
