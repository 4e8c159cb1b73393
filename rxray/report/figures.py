"""Figures the report draws from what the steps recorded: training curves, channel intensities,
embedding PCA, per-treatment scores, the treatment map and step wall times.

The figures a step draws itself (Grad-CAM panels, channel importance, classifier
curves) are in :mod:`rxray.evaluate.plots`; these come from numbers in manifests and
small tables, and only the report shows them. Each function returns a
:class:`matplotlib.figure.Figure` on an Agg canvas (see ``plots.new_figure``), which the
report writes into its own folder.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from rxray.evaluate.plots import new_figure

# Bookkeeping fields of per-epoch training metrics that are not worth a curve.
HISTORY_SKIP = frozenset({"epoch", "steps", "seconds", "data_wait_s"})
# Categories named in a scatter legend; the rest are drawn as "other".
MAX_LEGEND = 19
# Above this many treatments per-treatment bars are unreadable: draw ranked values instead.
MAX_BAR_TREATMENTS = 40
# Above this many treatments a heatmap's rows cannot carry names; the clustered colour blocks still read.
MAX_HEATMAP_LABELS = 60


def training_curves(history: list[dict[str, Any]], title: str) -> Figure:
    """One small panel per numeric per-epoch metric (loss, top-1, images/s, ...) against epoch."""
    keys = [k for k in dict.fromkeys(k for entry in history for k in entry)
            if k not in HISTORY_SKIP and all(isinstance(e.get(k), (int, float)) for e in history if k in e)]
    epochs = [entry.get("epoch", i + 1) for i, entry in enumerate(history)]
    columns = min(4, max(1, len(keys)))
    rows = max(1, math.ceil(len(keys) / columns))
    figure = new_figure(3.6 * columns, 2.8 * rows)
    figure.set_layout_engine("constrained")  # keeps the suptitle clear of the panel titles
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for ax, key in zip(axes, keys):
        points = [(x, e[key]) for x, e in zip(epochs, history) if key in e]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    figure.suptitle(title, fontsize=10)
    return figure


def channel_intensity_bars(mean: Sequence[float], std: Sequence[float], names: Sequence[str]) -> Figure:
    """Per-channel intensity mean with its standard deviation as error bars (the normalisation statistics)."""
    figure = new_figure(6.5, 3.2)
    ax = figure.subplots()
    positions = np.arange(len(mean))
    ax.bar(positions, mean, yerr=std, capsize=3, color="#4c72b0")
    ax.set_xticks(positions)
    ax.set_xticklabels([f"w{i + 1} {n}" for i, n in enumerate(names[:len(mean)])], rotation=20, ha="right")
    ax.set_ylabel("intensity (uint8)")
    ax.set_title("Channel mean ± std over written sites", fontsize=10)
    return figure


def categorical_scatter(ax, xy: np.ndarray, labels: np.ndarray, title: str, grey: Iterable[str] = (),
                        named: Sequence[str] | None = None) -> None:
    """Scatter coloured by category: ``named`` ones (default: the most frequent) in the legend, the rest as 'other'.

    Categories in ``grey`` (controls) are drawn first, in grey, so treatments stay visible on top.
    """
    labels = np.asarray(labels).astype(str)
    grey = [g for g in grey if g in set(labels)]
    names, counts = np.unique(labels[~np.isin(labels, grey)], return_counts=True)
    if named is None:
        named = list(names[np.argsort(-counts, kind="stable")][:MAX_LEGEND])
    else:
        named = [n for n in named if n in set(names)][:MAX_LEGEND]
    other = ~np.isin(labels, named + grey)
    for g in grey:
        mask = labels == g
        ax.scatter(xy[mask, 0], xy[mask, 1], s=4, c="#bbbbbb", label=f"{g} ({mask.sum()})", linewidths=0)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=4, c="#e0c9a6",
                   label=f"other {len(names) - len(named)} ({other.sum()})", linewidths=0)
    # tab10, then tab20's light shades: neighbours in the legend never get two shades of one hue.
    palette = list(colormaps["tab10"].colors) + list(colormaps["tab20"].colors[1::2])
    for index, name in enumerate(named):
        mask = labels == name
        ax.scatter(xy[mask, 0], xy[mask, 1], s=6, color=palette[index % len(palette)],
                   label=f"{name} ({mask.sum()})", linewidths=0)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def embedding_pca_scatter(xy: np.ndarray, labels: np.ndarray, coloured_by: str, grey: Iterable[str],
                          variance_share: Sequence[float], named: Sequence[str] | None = None) -> Figure:
    """Sites on their first two principal components, coloured by one category, axes titled with their variance."""
    figure = new_figure(7.5, 5.0)
    ax = figure.subplots()
    categorical_scatter(ax, xy, labels, f"Embedding PCA coloured by {coloured_by}", grey, named)
    ax.set_xlabel(f"PC1 ({variance_share[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({variance_share[1]:.0%} of variance)")
    return figure


def score_bars(frame: pd.DataFrame, metrics: list[tuple[str, str]]) -> Figure:
    """Per-treatment bars of each metric, one bar per correction; ranked values when treatments are many."""
    corrections = list(dict.fromkeys(frame["correction"]))
    treatments = sorted(set(frame["treatment"]))
    many = len(treatments) > MAX_BAR_TREATMENTS
    height = 4.0 if many else max(3.0, 0.28 * len(treatments) * max(1, len(corrections)) ** 0.5 + 1.0)
    figure = new_figure(4.2 * len(metrics), height)
    axes = np.atleast_1d(figure.subplots(1, len(metrics), sharey=not many))
    width = 0.8 / max(1, len(corrections))
    for ax, (column, title) in zip(axes, metrics):
        for i, correction in enumerate(corrections):
            values = frame[frame["correction"] == correction].set_index("treatment")[column]
            if many:
                ranked = np.sort(values.dropna().to_numpy())[::-1]
                ax.plot(np.arange(1, len(ranked) + 1), ranked, label=str(correction))
            else:
                positions = np.arange(len(treatments)) + (i - (len(corrections) - 1) / 2) * width
                ax.barh(positions, values.reindex(treatments).to_numpy(dtype=float), height=width,
                        label=str(correction))
        if many:
            ax.set_xlabel("treatment rank")
        else:
            ax.set_yticks(np.arange(len(treatments)))
            ax.set_yticklabels(treatments, fontsize=7)
            ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
    axes[-1].legend(fontsize=7, title="correction", title_fontsize=7)
    return figure


def activity_volcano(frame: pd.DataFrame, fdr: float, correction: str, labelled: int = 6) -> Figure:
    """mAP against -log10 q, one point per treatment (any number of them): the active ones coloured, the top named."""
    frame = frame.dropna(subset=["map", "q_value"])
    height = -np.log10(frame["q_value"].clip(lower=1e-6).to_numpy(dtype=float))
    active = frame["active"].to_numpy(dtype=bool) if "active" in frame.columns else np.zeros(len(frame), bool)
    figure = new_figure(6.5, 4.5)
    ax = figure.subplots()
    ax.scatter(frame["map"][~active], height[~active], s=10, c="#999999", linewidths=0,
               label=f"not active ({(~active).sum()})")
    ax.scatter(frame["map"][active], height[active], s=14, c="#c44e52", linewidths=0,
               label=f"active ({active.sum()})")
    ax.axhline(-np.log10(fdr), color="#555555", linestyle=":", linewidth=1)
    # Permutation p-values tie at their floor, so many treatments share the top q: name the highest mAPs among the
    # most significant, in a column below the points with a line to each, so the names never overlap.
    order = np.lexsort((-frame["map"].to_numpy(dtype=float), -height))[:labelled]
    for k, i in enumerate(sorted(order, key=lambda i: -frame["map"].iloc[i])):
        ax.annotate(str(frame["treatment"].iloc[i]), (frame["map"].iloc[i], height[i]), fontsize=6,
                    xytext=(-60, -14 - 10 * k), textcoords="offset points", ha="right",
                    arrowprops=dict(arrowstyle="-", color="#777777", linewidth=0.5))
    ax.set_xlabel("mAP against same-plate controls")
    ax.set_ylabel("-log10 q (Benjamini-Hochberg)")
    ax.set_title(f"Phenotypic activity ({correction} correction; dotted: q = {fdr:g})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", frameon=False)
    return figure


def similarity_heatmap(similarity: np.ndarray, labels: Sequence[str], title: str = "") -> Figure:
    """Cosine similarity of treatments (already in cluster leaf order) as a square heatmap; names when few."""
    n = len(labels)
    side = float(np.clip(3.0 + 0.16 * min(n, MAX_HEATMAP_LABELS), 4.0, 10.0))
    figure = new_figure(side + 1.2, side)
    ax = figure.subplots()
    image = ax.imshow(similarity, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.02, label="cosine similarity")
    if n <= MAX_HEATMAP_LABELS:
        ax.set_xticks(np.arange(n))
        ax.set_yticks(np.arange(n))
        ax.set_xticklabels(labels, rotation=90, fontsize=7)
        ax.set_yticklabels(labels, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{n} treatments in cluster order")
    ax.set_title(title, fontsize=10)
    return figure


def step_time_bars(labels: Sequence[str], seconds: Sequence[float]) -> Figure:
    """Horizontal bars of each step output's wall time, in the order given (top to bottom)."""
    figure = new_figure(7.0, 1.0 + 0.35 * len(labels))
    ax = figure.subplots()
    ax.barh(np.arange(len(labels)), seconds, color="#55a868")
    ax.set_yticks(np.arange(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title("Step wall time", fontsize=10)
    return figure
