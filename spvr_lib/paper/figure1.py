"""Figure 1: inference latency of every method's pruned networks (and MACs), and the claims read from it."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from spvr_lib import data, latency, models
from spvr_lib.paper import base_models, plots, tables1_3


def latency_runs(cfg: Any, keys: Iterable[str], methods: Iterable[str] = tables1_3.TABLE1_METHODS,
                 rates: dict[str, Sequence[float]] | None = None, runs: int = 1500, warmup: int = 50,
                 batch_sizes: Sequence[int] = (1, 64), device: str | None = None, threads: int | None = None,
                 progress: bool = True) -> pd.DataFrame:
    """Inference latency (``latency.measure_latency``), MACs (``latency.count_macs``) and parameters of the
    unpruned network and of every method's network at each rate (default: each setup's ``rates``, the
    paper's), at every batch size.  Weights do not matter for latency, so the networks are not trained
    (SPvR's is freshly initialised; a baseline's keeps the base's weights).  Not cached: timings
    belong to the machine they ran on.  One row per (model, rate, method, batch size); a failed method
    is a row with status "failed" and its reason.
    """

    keys, methods = list(keys), [tables1_3._check_method(m) for m in methods]
    rows = []
    for key in keys:
        setup = cfg.model(key)
        info = data.dataset_info(setup.dataset)
        shape = (info.in_channels, info.image_size, info.image_size)
        base, base_rec = base_models.base_model(cfg, key, progress=progress)
        jobs = [(0.0, "unpruned")] + [(r, m) for r in (rates or {}).get(key, setup.rates) for m in methods]
        for rate, method in tqdm(jobs, desc=f"latency {key}", disable=not progress):
            head = {"model": key, "rate": round(float(rate), 6), "params removed (%)": round(100 * rate, 2),
                    "method": method, "name": "unpruned" if method == "unpruned" else tables1_3.DISPLAY_NAMES[method]}
            try:
                if method == "unpruned":
                    net, rec = base, {"status": "ok", "error": None, "params_after": base_rec["params"],
                                      "budget": base_rec["params"]}
                else:
                    net, rec = tables1_3.pruned_network(cfg, key, method, rate, progress=False)
            except Exception as e:                    # recorded; the other networks go on
                net, rec = None, {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            if net is None:
                rows += [{**head, "batch_size": b, "status": "failed", "error": rec["error"]} for b in batch_sizes]
                continue
            macs = latency.count_macs(net, shape)
            for b in batch_sizes:
                t = latency.measure_latency(net, shape, batch_size=b, runs=runs, warmup=warmup, device=device,
                                            threads=threads)
                rows.append({**head, "batch_size": b, "params": models.count_params(net),
                             "budget": rec.get("budget"), "MMACs": macs / 1e6, **t, "status": "ok", "error": None})
    return tables1_3._nullable_ints(pd.DataFrame(rows))


def latency_figure(lat: pd.DataFrame, batch_sizes: Sequence[int] | None = None, stat: str = "mean_ms",
                   title: str = "") -> Any:
    """Figure 1: latency (``stat``: "mean_ms" as the paper, or "median_ms") against parameters removed (%),
    one line per method, the unpruned network as a dashed horizontal line; one panel per model (columns)
    and batch size (rows)."""
    import matplotlib.pyplot as plt


    ok = lat[lat["status"] == "ok"]
    model_keys = list(dict.fromkeys(lat["model"]))
    batch_sizes = list(batch_sizes or sorted(ok["batch_size"].unique()))
    with plt.rc_context(plots.PLOT_STYLE):
        fig, axes = plt.subplots(len(batch_sizes), len(model_keys), figsize=(4.6 * len(model_keys),
                                                                            3.4 * len(batch_sizes)), squeeze=False)
    for i, b in enumerate(batch_sizes):
        for ax, key in zip(axes[i], model_keys):
            sub = ok[(ok["model"] == key) & (ok["batch_size"] == b)]
            pruned = sub[sub["method"] != "unpruned"]
            plots.lines(pruned, x="params removed (%)", y=stat, hue="name", ax=ax,
                           title=f"{key}, batch {b}", ylabel=f"latency (ms, {stat.removesuffix('_ms')})")
            base = sub[sub["method"] == "unpruned"][stat]
            if len(base):
                ax.axhline(float(base.iloc[0]), color="k", ls="--", lw=0.8, label="unpruned")
                ax.legend(fontsize=7, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def latency_claims(lat: pd.DataFrame, batch_size: int = 1, stat: str = "mean_ms") -> pd.DataFrame:
    """Section 5.3's two claims, per (model, rate) at ``batch_size``: is SPvR's network the fastest at the
    common budget, and which networks are slower than the unpruned one (CURL's, says the paper)?

    Latencies are ``stat`` ("mean_ms" or "median_ms").  Columns: model, params removed (%), batch size,
    unpruned ms, SPvR ms, fastest, fastest ms, SPvR fastest, SPvR / best other (ratio of latencies;
    NaN when every other method failed), slower than unpruned (names, or "none").
    """
    ok = lat[(lat["status"] == "ok") & (lat["batch_size"] == batch_size)]
    rows = []
    for key, sub in ok.groupby("model", sort=False):
        base = sub.loc[sub["method"] == "unpruned", stat]
        base_ms = float(base.iloc[0]) if len(base) else np.nan
        for rate, r in sub[sub["method"] != "unpruned"].groupby("rate"):
            ms = r.set_index("method")[stat].astype(float)
            fastest = ms.idxmin()
            others = ms.drop(index="spvr", errors="ignore")
            spvr_ms = float(ms["spvr"]) if "spvr" in ms.index else np.nan
            rows.append({"model": key, "params removed (%)": round(100 * rate, 2), "batch size": batch_size,
                         "unpruned ms": base_ms, "SPvR ms": spvr_ms, "fastest": tables1_3.DISPLAY_NAMES[fastest],
                         "fastest ms": float(ms[fastest]), "SPvR fastest": fastest == "spvr",
                         "SPvR / best other": spvr_ms / float(others.min()) if len(others) else np.nan,
                         "slower than unpruned": ", ".join(tables1_3.DISPLAY_NAMES[m] for m in ms.index if ms[m] > base_ms)
                         or "none"})
    return pd.DataFrame(rows)
