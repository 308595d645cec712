"""Experiments behind the notebooks, kept here so notebooks stay thin.

Section 3.1.1's worked example and Appendix A's Table 5 (the Guyon synthetic data, Kendall tau
of the SPvR and KL neuron rankings against a ground truth).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy.stats import kendalltau

from . import results
from .ranking import kl_loss, spvr_loss

# ----------------------------------------------------------------- Section 3.1.1: worked example
WORKED_P = [0.1, 0.3, 0.6]
WORKED_P_MASKED = [[0.1, 0.6, 0.3], [0.01, 0.1, 0.89], [0.1, 0.8, 0.1]]
WORKED_PAPER = {"KL": [0.20, 0.32, 0.78], "L": [1.3, 0.29, 1.5]}


def worked_example() -> pd.DataFrame:
    """Section 3.1.1: KL and Eq. 2 for the three masked neurons, computed, beside the paper's values."""
    p = torch.tensor([WORKED_P], dtype=torch.float64)
    pm = torch.tensor(WORKED_P_MASKED, dtype=torch.float64).unsqueeze(1)
    kl, L = kl_loss(p, pm), spvr_loss(p, pm)
    return pd.DataFrame({
        "neuron j": [1, 2, 3],
        "f_M(x)": [str(v) for v in WORKED_P_MASKED],
        "KL (ours)": kl.numpy().round(4), "KL (paper)": WORKED_PAPER["KL"],
        "L (ours)": L.numpy().round(4), "L (paper)": WORKED_PAPER["L"],
        "rank by KL": (-kl).argsort().argsort().numpy() + 1, "rank by L": (-L).argsort().argsort().numpy() + 1,
    })


# ----------------------------------------------------------------- Appendix A: Table 5
TABLE5_PAPER = {"SPvR": 0.861, "KL": 0.586}


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


def _train_mlp(x: torch.Tensor, y: torch.Tensor, setup: GuyonSetup, seed: int) -> torch.nn.Module:
    from .models import build

    torch.manual_seed(seed)
    model = build({"arch": "mlp", "in_features": setup.n_features, "hidden": [setup.hidden], "num_classes": 2})
    opt = torch.optim.Adam(model.parameters(), lr=setup.lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(setup.epochs):
        for idx in torch.randperm(len(x), generator=g).split(setup.batch_size):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
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
    from .data import make_guyon

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
    model = _train_mlp(x[train_idx], y[train_idx], setup, seed)
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
    return results.cached({"setup": dataclasses.asdict(setup), "seed": int(seed)},
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
                     "n_seeds": len(tau), "n_undefined": len(per_seed) - len(tau), "paper": TABLE5_PAPER[c]})
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


# ----------------------------------------------------------------- the base models (notebook 03)
# Table 1's base rows and the sizes of Tables 6-8's 0% rows, as the paper prints them.
PAPER_BASE = {
    "vgg16": {"paper dataset": "CIFAR-10", "paper top1": 94.25, "paper top5": None, "paper size (MB)": 112},
    "resnet34": {"paper dataset": "Tiny ImageNet", "paper top1": 63.02, "paper top5": 83.22, "paper size (MB)": 163},
    "resnet50": {"paper dataset": "ImageNet1K", "paper top1": 76.32, "paper top5": 92.89, "paper size (MB)": 195},
}


def base_spec(setup: Any) -> dict:
    """The unpruned network of a :class:`config.ModelSetup`, sized for its dataset."""
    from . import data, models

    info = data.dataset_info(setup.dataset)
    kw = {"stem": setup.stem} if setup.stem else {}
    return models.preset(setup.preset, num_classes=info.num_classes, in_channels=info.in_channels,
                         width=setup.width, **kw)


def recipe(setup: Any, lr: float | None = None, mode: str = "scratch") -> Any:
    """The training recipe of a setup (SGD, momentum 0.9, cosine annealing; Section 4.3)."""
    from .train import Recipe

    return Recipe(epochs=setup.epochs, batch_size=setup.batch_size, lr=setup.lr if lr is None else lr,
                  weight_decay=setup.weight_decay, mode=mode, augment=setup.augment)


def searched_lr(setup: Any, spec: dict, mode: str = "scratch", init_state: dict | None = None,
                seed: int = 0, progress: bool = True) -> tuple[float, dict[float, float]]:
    """Grid search of the learning rate over ``setup.lr_grid`` on a validation split of the
    training subset (never the test set); cached.  Returns (best lr, {lr: validation top-1})."""
    from . import data, models, train

    key = {"spec": spec, "dataset": setup.dataset, "per_class_train": setup.train_subset,
           "grid": list(setup.lr_grid), "recipe": recipe(setup, mode=mode).to_dict(), "seed": seed,
           "init": None if init_state is None else train.state_dict_digest(init_state)}

    def compute() -> dict[str, Any]:
        if len(setup.lr_grid) == 1:
            return {"best": setup.lr_grid[0], "scores": {str(setup.lr_grid[0]): None}}
        ds = data.load_dataset(setup.dataset, "train", augment=setup.augment, per_class=setup.train_subset, seed=seed)
        plain = data.load_dataset(setup.dataset, "train", augment=False, per_class=setup.train_subset, seed=seed)

        def make() -> torch.nn.Module:
            m = models.build(spec)
            if init_state is not None:
                m.load_state_dict(init_state)
            return m

        best, scores = train.lr_search(make, ds, setup.lr_grid, recipe(setup, mode=mode), seed=seed,
                                       eval_set=plain, progress=progress)
        return {"best": best, "scores": {str(k): v for k, v in scores.items()}}

    rec = results.cached(key, compute, kind="lrsearch")
    return float(rec["best"]), {float(k): v for k, v in rec["scores"].items()}


def train_base(cfg: Any, key: str, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Train (or fetch from the cache) the pre-trained network SPvR starts from; its run record."""
    from .train import train_run

    setup = cfg.model(key)
    spec = base_spec(setup)
    lr, _ = searched_lr(setup, spec, progress=progress)   # searched at the pruned networks' budget
    base = dataclasses.replace(recipe(setup, lr=lr), epochs=setup.base_epochs or setup.epochs)
    per_class = setup.base_train_subset or setup.train_subset
    return train_run(spec, setup.dataset, base, seed, per_class, setup.test_subset, tag="base", progress=progress)


def base_model(cfg: Any, key: str, seed: int = 0, progress: bool = True) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The trained base network (eval mode) and its run record."""
    from .train import load_weights

    rec = train_base(cfg, key, seed, progress=progress)
    return load_weights(rec).eval(), rec


def calibration(cfg: Any, key: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration subset SPvR ranks with: ``calib_per_class`` training images per class."""
    from . import data

    setup = cfg.model(key)
    return data.calibration_set(data.load_dataset(setup.dataset, "train"), setup.calib_per_class, seed, progress=False)


def base_table(cfg: Any, records: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Notebook 03's table: our base models beside the paper's base rows."""
    from .models import spec_to_str

    rows = []
    for key, rec in records.items():
        setup = cfg.model(key)
        rows.append({"model": key, "dataset": setup.dataset, "width": setup.width,
                     "train images per class": rec["key"]["per_class_train"], "epochs": rec["key"]["recipe"]["epochs"],
                     "lr": rec["key"]["recipe"]["lr"], "params": rec["params"], "size (MB)": rec["size_mb"],
                     "top1": rec["top1"], "top5": rec["top5"], "train s": rec["wall_s"],
                     **PAPER_BASE[key], "architecture": spec_to_str(rec["spec"])})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------- SPvR pruning of the base models
def _prunable_count(spec: dict) -> int:
    from . import models

    with torch.device("meta"):
        return len(models.prunable_layers(models.build(spec), spec))


def spvr_pruned(cfg: Any, key: str, rate: float, group_size: int | None = None, method: str = "fast",
                criterion: str = "spvr", seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """SPvR applied to the scale's trained base network at ``rate`` (fraction of parameters removed).

    Cached (kind ``prune``) by the base run, rate, group size, ranking method, criterion and
    calibration seed.  The record holds the pruned ``spec``, ``arch`` (the paper's notation),
    ``params_before``, ``params_after``, ``budget``, ``prune_s`` (grouping + ranking + budget, in
    seconds), ``collapsed`` (whether a layer or stage disappeared) and ``kept`` (channels kept per
    layer, indices into the base network).
    """
    from . import models
    from .prune import spvr_prune

    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate={rate!r}; expected the fraction of parameters removed, in (0, 1)")
    setup = cfg.model(key)
    d = int(group_size or setup.group_size)
    base_rec = train_base(cfg, key, progress=progress)
    rkey = {"base": base_rec["hash"], "rate": float(rate), "group_size": d, "method": method,
            "criterion": criterion, "calib_seed": int(seed), "calib_per_class": setup.calib_per_class}

    def compute() -> dict[str, Any]:
        from .train import load_weights

        model = load_weights(base_rec).eval()
        x, y = calibration(cfg, key, seed)
        t0 = time.perf_counter()
        res = spvr_prune(model, (x, y), keep=1.0 - rate, group_size=d, criterion=criterion, method=method,
                         progress=progress)
        prune_s = time.perf_counter() - t0
        return {"spec": res.spec, "arch": models.spec_to_str(res.spec), "params_before": res.params_before,
                "params_after": res.params_after, "budget": res.budget, "prune_s": round(prune_s, 3),
                "collapsed": _prunable_count(res.spec) < _prunable_count(base_rec["spec"]),
                "size_mb": models.model_size_mb(res.model), "kept": res.kept,
                "removed_fraction": 1.0 - res.params_after / res.params_before}

    return results.cached(rkey, compute, kind="prune")


def spvr_model(record: dict[str, Any]) -> torch.nn.Module:
    """The freshly initialised network of a :func:`spvr_pruned` record (SPvR trains it from scratch)."""
    from .models import build

    return build(record["spec"])


# ----------------------------------------------------------------- the grouping module (notebook 02)
@torch.no_grad()
def layer_activations(model: torch.nn.Module, x: torch.Tensor, layer: str, batch_size: int = 256) -> torch.Tensor:
    """The output of prunable layer ``layer`` at its mask point (after BN), [n, m, h, w], for inputs ``x``."""
    from .models import prunable_layers

    layers = {pl.name: pl for pl in prunable_layers(model, model.spec)}
    if layer not in layers:
        raise ValueError(f"layer={layer!r} is not a prunable layer; expected one of {list(layers)}")
    out: list[torch.Tensor] = []
    handle = layers[layer].mask_module.register_forward_hook(lambda m, i, o: out.append(o.detach()))
    try:
        model.eval()
        for chunk in x.split(batch_size):
            model(chunk)
    finally:
        handle.remove()
    return torch.cat(out)


def forward_passes(spec: dict, group_sizes: Sequence[int]) -> pd.DataFrame:
    """Section 3.2's cost: the ranking needs sum_i ceil(m_i / d) forward passes (one per group)."""
    from .models import build, prunable_layers

    with torch.device("meta"):
        widths = [pl.width for pl in prunable_layers(build(spec), spec)]
    return pd.DataFrame([{"d": d, "layers": len(widths), "channels": sum(widths),
                          "forward passes": sum(-(-m // d) for m in widths)} for d in group_sizes])


# ----------------------------------------------------------------- the architectures (notebook 08)
# Tables 6-8 as the paper prints them: rate -> (size on disk in MB, architecture).  Table 8's 70% row
# lists "x 6" for the last stage; ResNet50's last stage has 3 blocks, so we read it as a typo and
# show it as printed.
PAPER_ARCHITECTURES = {
    "vgg16": {
        0.0: (112, '64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"'),
        0.7: (33.7, '58, 64, "M", 126, 128, "M", 238, 224, "M", 192, 192, 94, "M", 56, 482, 512, "M"'),
        0.8: (22.5, '58, 64, "M", 126, 128, "M", 238, 224, "M", 192, 192, 94, "M", 56, 196, 512, "M"'),
        0.9: (11.2, '54, 64, "M", 124, 128, "M", 224, 220, "M", 174, 110, "M"'),
        0.95: (5.56, '42, 64, "M", 110, 126, "M", 170, 138, 92, "M"'),
        0.98: (2.25, '36, 62, "M", 78, 112, "M", 92, 44, 46, "M"'),
    },
    "resnet34": {
        0.0: (163, "[64, 64] × 3, [128, 128] × 4, [256, 256] × 6, [512, 512] × 3"),
        0.7: (46.8, "[60, 60] × 3, [112, 112] × 4, [328, 328] × 3"),
        0.8: (30.6, "[60, 60] × 3, [104, 104] × 4, [256, 256] × 3"),
        0.9: (15.2, "[60, 60] × 3, [100, 100] × 4, [152, 152] × 3"),
        0.95: (8.03, "[60, 60] × 3, [76, 76] × 4, [88, 88] × 3"),
        0.98: (2.72, "[60, 60] × 3, [36, 36] × 4, [44, 44] × 3"),
    },
    "resnet50": {
        0.0: (195, "[64, 64, 64] × 3, [128, 128, 128] × 4, [256, 256, 256] × 6, [512, 512, 512] × 3"),
        0.4: (118, "[64, 64, 64] × 3, [120, 120, 120] × 4, [240, 240, 240] × 6, [328, 328, 328] × 3"),
        0.7: (60.3, "[64, 64, 64] × 3, [112, 112, 112] × 4, [200, 200, 200] × 6, [152, 152, 152] × 6"),
        0.8: (41.5, "[56, 56, 56] × 3, [112, 112, 112] × 4, [168, 168, 168] × 6, [96, 96, 96] × 3"),
        0.95: (12, "[56, 56, 56] × 3, [88, 88, 88] × 4, [64, 64, 64] × 6"),
    },
}


def architectures_table(cfg: Any, keys: Sequence[str] | None = None, progress: bool = True) -> pd.DataFrame:
    """Tables 6-8: the architecture SPvR recommends at each of the paper's rates, beside the paper's."""
    from . import models

    rows = []
    for key in keys or list(cfg.models):
        setup = cfg.model(key)
        base = train_base(cfg, key, progress=progress)
        paper = PAPER_ARCHITECTURES[key]
        rows.append({"model": key, "rate": 0.0, "removed": 0.0, "params": base["params"], "size (MB)": base["size_mb"],
                     "layers": _prunable_count(base["spec"]), "architecture": models.spec_to_str(base["spec"]),
                     "paper size (MB)": paper[0.0][0], "paper architecture": paper[0.0][1]})
        for rate in setup.rates:
            rec = spvr_pruned(cfg, key, rate, progress=progress)
            p = paper.get(rate, (None, None))
            rows.append({"model": key, "rate": rate, "removed": rec["removed_fraction"], "params": rec["params_after"],
                         "size (MB)": rec["size_mb"], "layers": _prunable_count(rec["spec"]),
                         "architecture": rec["arch"], "paper size (MB)": p[0], "paper architecture": p[1]})
    return pd.DataFrame(rows)
