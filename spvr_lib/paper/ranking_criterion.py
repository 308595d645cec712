"""Section 3.1.1's worked example and Appendix A's Table 5: Kendall tau of the SPvR and KL neuron
rankings against the ground truth on Guyon's synthetic data."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau

from spvr_lib import models, store, train
from spvr_lib.criteria import kl_loss, spvr_loss
from spvr_lib.data import make_guyon
from spvr_lib.paper import reference


def worked_example() -> pd.DataFrame:
    """Section 3.1.1: KL and Eq. 2 for the three masked neurons, computed, beside the paper's values."""
    p = torch.tensor([reference.WORKED_P], dtype=torch.float64)
    pm = torch.tensor(reference.WORKED_P_MASKED, dtype=torch.float64).unsqueeze(1)
    kl, L = kl_loss(p, pm), spvr_loss(p, pm)
    return pd.DataFrame({
        "neuron j": [1, 2, 3],
        "f_M(x)": [str(v) for v in reference.WORKED_P_MASKED],
        "KL (ours)": kl.numpy().round(4), "KL (paper)": reference.WORKED_PAPER["KL"],
        "L (ours)": L.numpy().round(4), "L (paper)": reference.WORKED_PAPER["L"],
        "rank by KL": (-kl).argsort().argsort().numpy() + 1, "rank by L": (-L).argsort().argsort().numpy() + 1,
    })


@dataclass(frozen=True)
class GuyonSetup:
    """Appendix A's experiment; the fields the paper leaves unstated carry our defaults.

    Stated by the paper: 1000 samples, 100 features, labels flipped with probability 0.02,
    64 hidden ReLU units, 2 softmax outputs, Adam at lr 1e-3.
    Our defaults for what it leaves open: ``epochs=5`` and ``batch_size=32`` (Keras' default
    batch).  Trained much longer (30 epochs and more here), the network fits all 1000 samples
    with such margins that masking any single hidden neuron changes no prediction: the ground
    truth is then constant and Kendall's tau undefined (reported as such, never dropped).  No
    train/test split (the paper describes none), so the ground truth is scored on the samples the
    network was trained on.  ``reference="predictions"``: a misclassification is a change of the
    unmasked network's own prediction, the paper's own use of the word (Section 3.1 calls
    ``argmax f != argmax f'`` a misclassification, and Remark A.1 says the misclassification
    count alone cannot break ties, which is Eq. 2's first term).  ``reference="labels"`` counts
    errors against the true labels instead; the notebook's sensitivity table reports both.
    """

    n_samples: int = 1000
    n_features: int = 100
    flip_y: float = 0.02
    hidden: int = 64
    lr: float = 1e-3
    epochs: int = 5
    batch_size: int = 32
    test_fraction: float = 0.0   # > 0: hold out this fraction and score the rankings on it
    reference: str = "predictions"  # "predictions" | "labels"
    standardize: bool = True     # z-score the features with the training statistics

    def __post_init__(self) -> None:
        if self.reference not in ("labels", "predictions"):
            raise ValueError(f"reference={self.reference!r}; expected 'labels' or 'predictions'")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction={self.test_fraction!r}; expected a fraction in [0, 1)")
        for f in ("n_samples", "n_features", "hidden", "epochs", "batch_size"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f}={getattr(self, f)!r}; expected a positive integer")


def train_mlp(x: torch.Tensor, y: torch.Tensor, setup: GuyonSetup, seed: int) -> torch.nn.Module:
    """Appendix A's MLP (one hidden ReLU layer, 2 outputs) trained with Adam at a constant lr by the one
    training loop (``train.fit``); returned in eval mode."""
    model = models.build({"arch": "mlp", "in_features": setup.n_features, "hidden": [setup.hidden], "num_classes": 2})
    recipe = train.Recipe(epochs=setup.epochs, batch_size=setup.batch_size, lr=setup.lr, weight_decay=0.0,
                          optimizer="adam", schedule="constant", augment=False, mode="scratch")
    samples = torch.utils.data.TensorDataset(x, y)
    train.fit(model, samples, samples, recipe, seed=seed, device="cpu", progress=False)
    return model.eval()


@torch.no_grad()
def masked_hidden_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax outputs of the MLP, [n, c], and with each hidden neuron masked in turn, [m, n, c]."""
    h = model.act1(model.fc1(x))                                         # [n, m]
    m = h.shape[1]
    keep = 1.0 - torch.eye(m, dtype=h.dtype)                             # row j masks neuron j
    logits_masked = model.fc2(h.unsqueeze(0) * keep.unsqueeze(1))        # [m, n, c]
    return torch.softmax(model.fc2(h), dim=1), torch.softmax(logits_masked, dim=2)


def guyon_run(setup: GuyonSetup, seed: int) -> dict[str, Any]:
    """One seed of Table 5: train, mask each hidden neuron, rank, and compare with Kendall's tau-b."""

    X, Y = make_guyon(n_samples=setup.n_samples, n_features=setup.n_features, flip_y=setup.flip_y, seed=seed)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    n_test = int(round(setup.test_fraction * len(X)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    score_idx = test_idx if n_test else train_idx
    mu, sd = X[train_idx].mean(0), X[train_idx].std(0) + 1e-12
    if setup.standardize:
        X = (X - mu) / sd
    x = torch.tensor(X, dtype=torch.float32)
    y = torch.tensor(Y, dtype=torch.long)
    model = train_mlp(x[train_idx], y[train_idx], setup, seed)
    p, pm = masked_hidden_outputs(model, x[score_idx])
    ref = y[score_idx] if setup.reference == "labels" else p.argmax(1)
    ground_truth = (pm.argmax(2) != ref.unsqueeze(0)).sum(1).double()   # misclassifications per masked neuron
    scores = {"SPvR": spvr_loss(p.double(), pm.double()), "KL": kl_loss(p.double(), pm.double())}
    out: dict[str, Any] = {"seed": seed, "train_acc": float((model(x[train_idx]).argmax(1) == y[train_idx]).float().mean()),
                           "score_acc": float((p.argmax(1) == y[score_idx]).float().mean()),
                           "ground_truth": ground_truth.tolist()}
    for name, s in scores.items():
        out[f"tau_{name}"] = float(kendalltau(ground_truth.numpy(), s.numpy()).statistic)
        out[f"scores_{name}"] = s.tolist()
    return out


def guyon_record(setup: GuyonSetup, seed: int) -> dict[str, Any]:
    """:func:`guyon_run`, cached by its setup and seed (kind ``guyon``)."""
    return store.cached({"setup": dataclasses.asdict(setup), "seed": int(seed)},
                          lambda: guyon_run(setup, int(seed)), kind="guyon")


def guyon_seeds(setup: GuyonSetup, seeds: Sequence[int], progress: bool = True) -> pd.DataFrame:
    """Table 5 over several seeds, each run cached by its setup and seed; one row per seed."""
    from tqdm.auto import tqdm

    rows = []
    for seed in tqdm(list(seeds), desc="Table 5 seeds", disable=not progress, leave=False):
        rec = guyon_record(setup, int(seed))
        rows.append({k: rec[k] for k in ("seed", "tau_SPvR", "tau_KL", "train_acc", "score_acc")})
    return pd.DataFrame(rows)


def table5(per_seed: pd.DataFrame) -> pd.DataFrame:
    """Summary in the layout of Table 5: criterion, tau_mean, tau_std, n_seeds, paper."""
    rows = []
    for c in ("SPvR", "KL"):
        tau = per_seed[f"tau_{c}"].dropna()       # undefined where the ground truth is constant
        rows.append({"criterion": c, "tau_mean": tau.mean() if len(tau) else float("nan"),
                     "tau_std": tau.std(ddof=1) if len(tau) > 1 else float("nan"),
                     "n_seeds": len(tau), "n_undefined": len(per_seed) - len(tau), "paper": reference.TABLE5_PAPER[c]})
    return pd.DataFrame(rows)


def table5_sensitivity(base: GuyonSetup, seeds: Sequence[int], variations: dict[str, Sequence[Any]],
                       progress: bool = True) -> pd.DataFrame:
    """Vary one unstated choice at a time from ``base``; one row per setting with both criteria's tau."""
    rows = []
    settings = [("default", None)] + [(f, v) for f, vals in variations.items() for v in vals
                                      if v != getattr(base, f)]
    for field, value in settings:
        setup = base if field == "default" else dataclasses.replace(base, **{field: value})
        t = table5(guyon_seeds(setup, seeds, progress=progress)).set_index("criterion")
        rows.append({"changed": field if field == "default" else f"{field}={value}",
                     "SPvR tau": t.loc["SPvR", "tau_mean"], "SPvR std": t.loc["SPvR", "tau_std"],
                     "KL tau": t.loc["KL", "tau_mean"], "KL std": t.loc["KL", "tau_std"],
                     "SPvR better": t.loc["SPvR", "tau_mean"] > t.loc["KL", "tau_mean"],
                     "n_seeds": int(t.loc["SPvR", "n_seeds"]), "n_undefined": int(t.loc["SPvR", "n_undefined"])})
    return pd.DataFrame(rows)


def guyon_ranks(setup: GuyonSetup, seed: int) -> pd.DataFrame:
    """For one seed: each hidden neuron's rank (1 = most important) under the ground truth and each criterion."""
    rec = guyon_record(setup, int(seed))
    df = pd.DataFrame({"ground truth": rec["ground_truth"], "SPvR": rec["scores_SPvR"], "KL": rec["scores_KL"]})
    return df.rank(ascending=False, method="average")
