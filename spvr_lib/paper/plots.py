"""Figures, from computed results only (compute lives elsewhere; these functions only draw)."""
from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import pandas as pd

PLOT_STYLE = {"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
               "axes.spines.right": False, "font.size": 9}


def rank_scatter(ranks: pd.DataFrame, criteria: Sequence[str] = ("SPvR", "KL"),
                 truth: str = "ground truth", taus: dict[str, float] | None = None) -> plt.Figure:
    """One panel per criterion: each neuron's ground-truth rank (x) against its rank under the criterion (y)."""
    with plt.rc_context(PLOT_STYLE):
        fig, axes = plt.subplots(1, len(criteria), figsize=(3.2 * len(criteria), 3.2), sharey=True)
        axes = [axes] if len(criteria) == 1 else list(axes)
        n = len(ranks)
        for ax, c in zip(axes, criteria):
            ax.scatter(ranks[truth], ranks[c], s=12, alpha=0.7)
            ax.plot([1, n], [1, n], color="grey", lw=0.8, ls="--")
            title = c if not taus else f"{c} (Kendall tau {taus[c]:.3f})"
            ax.set(title=title, xlabel="ground-truth rank (1 = most important)")
        axes[0].set_ylabel("rank under the criterion")
        fig.tight_layout()
    return fig


def heatmap_by_group(C, groups: Sequence[Sequence[int]], title: str = "") -> plt.Figure:
    """The correlation matrix with rows and columns ordered group by group, group borders drawn."""
    import numpy as np

    order = [i for g in groups for i in g]
    Cm = np.asarray(C)[np.ix_(order, order)]
    with plt.rc_context(PLOT_STYLE):
        fig, ax = plt.subplots(figsize=(4.4, 3.8))
        im = ax.imshow(Cm, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
        edge = 0
        for g in groups[:-1]:
            edge += len(g)
            ax.axhline(edge - 0.5, color="k", lw=0.4)
            ax.axvline(edge - 0.5, color="k", lw=0.4)
        ax.set(title=title, xlabel="channel (ordered by group)", ylabel="channel (ordered by group)")
        ax.grid(False)
        fig.colorbar(im, ax=ax, label="Pearson correlation (Eq. 3)")
        fig.tight_layout()
    return fig


def lines(df: pd.DataFrame, x: str, y: str, hue: str, yerr: str | None = None, title: str = "",
          xlabel: str | None = None, ylabel: str | None = None, ax=None, logy: bool = False) -> plt.Figure:
    """One line per ``hue`` value of ``y`` against ``x`` (with error bars from ``yerr``)."""
    with plt.rc_context(PLOT_STYLE):
        if ax is None:
            fig, ax = plt.subplots(figsize=(4.6, 3.2))
        else:
            fig = ax.figure
        for key, sub in df.groupby(hue, sort=False):
            sub = sub.sort_values(x)
            ax.errorbar(sub[x], sub[y], yerr=None if yerr is None else sub[yerr], marker="o", ms=3,
                        capsize=2, label=str(key))
        if logy:
            ax.set_yscale("log")
        ax.set(title=title, xlabel=xlabel or x, ylabel=ylabel or y)
        ax.legend(fontsize=7, frameon=False)
        fig.tight_layout()
    return fig
