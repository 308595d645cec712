"""Figure 1: inference latency of every method's pruned networks (and MACs), and the claims read from it."""
from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from spvr_lib import data, latency, models, store
from spvr_lib.paper import base_models, plots, pruned_networks, trained_runs


def _signature(net: nn.Module) -> str:
    """What a network's latency depends on: its architecture (spec where it has one, and layer shapes; the module
    types in order), not its weights."""
    return store.run_hash({"spec": getattr(net, "spec", None), "shapes": models.network_shapes(net),
                           "modules": [type(m).__name__ for m in net.modules()]})


def timed_together(label: Mapping[str, Any], nets: Mapping[str, nn.Module], shape: tuple[int, int, int],
                   batch_size: int, rounds: int, runs_per_round: int, warmup: int, threads: int | None = 1,
                   retime: bool | None = None) -> dict[str, Any]:
    """The latency of ``nets`` timed together (:func:`spvr_lib.latency.measure_interleaved`: round-robin rounds, so
    drift hits all alike; median over rounds with its 95% interval) at ``batch_size``: a record like any other
    (kind ``latency``), keyed by ``label`` (what the networks are for), the networks' architectures, the input,
    batch, threads and protocol, the CPU model and the torch version, so that the same kind of machine re-times
    nothing.  ``retime`` (default: the environment's ``SPVR_RETIME=1``, which ``reproduce --retime`` sets)
    measures afresh.  Returns the record; its ``latency`` is {name: timings}."""
    retime = os.environ.get("SPVR_RETIME") == "1" if retime is None else retime
    lkey = {**label, "batch_size": int(batch_size), "threads": threads,
            "networks": {name: _signature(net) for name, net in nets.items()},
            "protocol": {"rounds": int(rounds), "runs_per_round": int(runs_per_round), "warmup": int(warmup),
                         "input": list(shape)},
            "cpu": latency.cpu_model(), "torch": torch.__version__}

    def compute() -> dict[str, Any]:
        return {"latency": latency.measure_interleaved(dict(nets), tuple(shape), batch_size=batch_size, rounds=rounds,
                                                       runs_per_round=runs_per_round, warmup=warmup,
                                                       threads=threads)}

    return store.cached(lkey, compute, kind="latency", refresh=retime)


def protocol(cfg: Any) -> dict[str, int]:
    """The scale's latency protocol: rounds, forwards per network and round, warm-up forwards."""
    return {"rounds": cfg.latency_rounds, "runs_per_round": cfg.latency_runs_per_round, "warmup": cfg.latency_warmup}


def latency_runs(cfg: Any, keys: Iterable[str], methods: Iterable[str] = pruned_networks.TABLE1_METHODS,
                 rates: dict[str, Sequence[float]] | None = None, rounds: int = 30, runs_per_round: int = 10,
                 warmup: int = 30, batch_sizes: Sequence[int] = (1, 64), threads: int | None = 1,
                 retime: bool | None = None, progress: bool = True) -> pd.DataFrame:
    """Inference latency (:func:`timed_together`: the networks of a cell, the unpruned one included, timed interleaved; median over rounds
    with its 95% interval), MACs (``latency.count_macs``) and parameters of the unpruned network and of every
    method's network at each rate (default: each setup's ``rates``, the paper's), at every batch size.  Weights
    do not matter for latency, so the networks are not trained (SPvR's is freshly initialised; a baseline's is
    its pruned architecture).  ``retime`` (default: the environment's ``SPVR_RETIME=1``, set by ``reproduce
    --retime``) measures afresh instead of reading the records.  One row per (model, rate, method, batch size);
    a failed method is a row with status "failed" and its reason."""
    keys, methods = list(keys), [pruned_networks._check_method(m) for m in methods]
    rows = []
    for key in keys:
        setup = cfg.model(key)
        info = data.dataset_info(setup.dataset)
        shape = (info.in_channels, info.image_size, info.image_size)
        base, base_rec = base_models.base_model(cfg, key, progress=progress)
        for rate in tqdm((rates or {}).get(key, setup.rates), desc=f"latency {key}", disable=not progress):
            nets: dict[str, nn.Module] = {"unpruned": base}
            recs: dict[str, dict] = {"unpruned": {"budget": base_rec["params"]}}
            failed: dict[str, str] = {}
            for method in methods:
                try:
                    net, rec = pruned_networks.pruned_network(cfg, key, method, rate, progress=False)
                except Exception as e:                # recorded; the other networks go on
                    net, rec = None, {"error": f"{type(e).__name__}: {e}"}
                if net is None:
                    failed[method] = rec["error"]
                else:
                    nets[method], recs[method] = net, rec
            for b in batch_sizes:
                timed = timed_together({"model": key, "rate": round(float(rate), 6)}, nets, shape, b, rounds,
                                       runs_per_round, warmup, threads, retime)
                for method in ["unpruned", *methods]:
                    head = {"model": key, "rate": 0.0 if method == "unpruned" else round(float(rate), 6),
                            "cell removed (%)": round(100 * rate, 2),
                            "params removed (%)": 0.0 if method == "unpruned" else round(100 * rate, 2),
                            "method": method, "batch_size": b,
                            "name": "unpruned" if method == "unpruned" else pruned_networks.DISPLAY_NAMES[method]}
                    if method in failed:
                        rows.append({**head, "status": "failed", "error": failed[method]})
                        continue
                    net = nets[method]
                    rows.append({**head, "params": models.count_params(net), "budget": recs[method].get("budget"),
                                 "MMACs": latency.count_macs(net, shape) / 1e6, **timed["latency"][method],
                                 "cpu": timed["key"]["cpu"], "status": "ok", "error": None})
    return trained_runs._nullable_ints(pd.DataFrame(rows))


def latency_figure(lat: pd.DataFrame, batch_sizes: Sequence[int] | None = None, title: str = "") -> Any:
    """Figure 1: latency (median over rounds, its 95% interval as error bars) against the cell's parameters
    removed (%), one line per method and a dashed line for the unpruned network timed in each cell; one panel
    per model (columns) and batch size (rows)."""
    import matplotlib.pyplot as plt

    ok = lat[lat["status"] == "ok"].assign(err_low=lambda d: d["median_ms"] - d["low_ms"],
                                          err_high=lambda d: d["high_ms"] - d["median_ms"])
    model_keys = list(dict.fromkeys(lat["model"]))
    batch_sizes = list(batch_sizes or sorted(ok["batch_size"].unique()))
    with plt.rc_context(plots.PLOT_STYLE):
        fig, axes = plt.subplots(len(batch_sizes), len(model_keys), figsize=(4.6 * len(model_keys),
                                                                            3.4 * len(batch_sizes)), squeeze=False)
    for i, b in enumerate(batch_sizes):
        for ax, key in zip(axes[i], model_keys):
            sub = ok[(ok["model"] == key) & (ok["batch_size"] == b)]
            for j, (name, g) in enumerate(sub.groupby("name", sort=False)):
                g = g.sort_values("cell removed (%)")
                ax.errorbar(g["cell removed (%)"], g["median_ms"], yerr=[g["err_low"], g["err_high"]],
                            ls="--" if name == "unpruned" else "-", color="k" if name == "unpruned" else f"C{j}",
                            marker="o", ms=3, capsize=2, lw=0.9, label=name)
            ax.set(title=f"{key}, batch {b}", xlabel="params removed (%)", ylabel="latency (ms, median)")
            ax.legend(fontsize=6, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def latency_claims(lat: pd.DataFrame, batch_size: int = 1) -> pd.DataFrame:
    """Section 5.3's two claims, per (model, rate) at ``batch_size``, from the medians and their 95% intervals:
    a network is faster or slower than another only where the intervals separate.

    Columns: model, params removed (%), batch size, unpruned ms, SPvR ms (median [low, high]), fastest (lowest
    median), SPvR fastest ("yes": its interval is below every other pruned network's; "tied with <names>": the
    lowest median, but intervals overlap; "no"), slower than unpruned and faster than unpruned (names whose
    interval lies above / below the unpruned network's, or "none")."""
    ok = lat[(lat["status"] == "ok") & (lat["batch_size"] == batch_size)]
    rows = []
    for (key, cell), sub in ok.groupby(["model", "cell removed (%)"], sort=False):
        by = sub.set_index("method")
        if "unpruned" not in by.index:
            continue
        base = by.loc["unpruned"]
        pruned = by.drop(index="unpruned")
        if pruned.empty:
            continue
        name = pruned_networks.DISPLAY_NAMES
        fastest = pruned["median_ms"].astype(float).idxmin()
        row = {"model": key, "params removed (%)": cell, "batch size": batch_size,
               "unpruned ms": _ms(base), "SPvR ms": _ms(by.loc["spvr"]) if "spvr" in by.index else None,
               "fastest": name[fastest]}
        if "spvr" in pruned.index:
            s = pruned.loc["spvr"]
            others = pruned.drop(index="spvr")
            overlapping = [name[m] for m, o in others.iterrows() if not float(s["high_ms"]) < float(o["low_ms"])]
            row["SPvR fastest"] = "yes" if not overlapping else \
                (f"tied with {', '.join(overlapping)}" if fastest == "spvr" else "no")
        else:
            row["SPvR fastest"] = None
        row["slower than unpruned"] = ", ".join(name[m] for m, o in pruned.iterrows()
                                                if float(o["low_ms"]) > float(base["high_ms"])) or "none"
        row["faster than unpruned"] = ", ".join(name[m] for m, o in pruned.iterrows()
                                                if float(o["high_ms"]) < float(base["low_ms"])) or "none"
        rows.append(row)
    return pd.DataFrame(rows)


def _ms(r: pd.Series) -> str:
    return f"{float(r['median_ms']):.3f} [{float(r['low_ms']):.3f}, {float(r['high_ms']):.3f}]"
