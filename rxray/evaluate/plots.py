"""Figures as PNG files at URIs: Grad-CAM panels, channel importance, confusion matrix, PR and ROC curves, tune trials.

Every figure is a :class:`matplotlib.figure.Figure` on an Agg canvas, built without
``pyplot``: no global backend switch or figure registry, so the helpers are safe in
Ray actors and threads. ``save_figure`` renders to PNG bytes and writes them through
:mod:`rxray.storage`, so a path may be local or ``s3://``. Each ``plot_*`` function
writes one PNG and returns its URI. The figures only the report draws, from numbers the
steps recorded, are in :mod:`rxray.report.figures`.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rxray import storage
from rxray.layout import CHANNEL_NAMES, N_CHANNELS

if TYPE_CHECKING:
    import pandas as pd

DPI = 100
# Stain colours of the RxRx1 reference code (rxrx1-utils `RGB_MAP`), in w1..w6 order,
# so composites look like the ones published with the dataset.
STAIN_RGB = np.array([[19, 0, 249], [42, 255, 31], [255, 0, 25], [45, 255, 252], [250, 0, 253], [254, 255, 40]],
                     dtype=np.float32) / 255.0
# Display range per channel: up to this percentile, so a few saturated pixels do not hide the rest.
DISPLAY_PERCENTILE = 99.5
HEATMAP_ALPHA = 0.45
# Above this many treatments a grouped bar chart is unreadable; draw a treatments x stains matrix instead.
MAX_GROUPED_BARS = 12


def new_figure(width: float, height: float) -> Figure:
    """An empty figure (inches) on an Agg canvas."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def figure_png(figure: Figure) -> bytes:
    """The figure rendered as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def save_figure(figure: Figure, uri: str) -> str:
    """Write the figure as a PNG at a URI (local path or object storage); returns the URI."""
    storage.write_bytes(uri, figure_png(figure))
    return uri


# --------------------------------------------------------------------------- microscopy images


def stretch(channel: np.ndarray) -> np.ndarray:
    """One channel scaled to [0, 1] float32 between its minimum and its DISPLAY_PERCENTILE."""
    channel = np.asarray(channel, dtype=np.float32)
    low, high = float(channel.min()), float(np.percentile(channel, DISPLAY_PERCENTILE))
    if high <= low:
        high = float(channel.max())
    if high <= low:
        return np.zeros_like(channel)
    return np.clip((channel - low) / (high - low), 0.0, 1.0)


def rgb_composite(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]: the six stains (6, H, W) blended in their RxRx1 colours."""
    if image.ndim != 3 or image.shape[0] != N_CHANNELS:
        raise ValueError(f"expected a ({N_CHANNELS}, H, W) image, got shape {image.shape}")
    stretched = np.stack([stretch(c) for c in image])  # (6, H, W)
    composite = np.einsum("chw,ck->hwk", stretched, STAIN_RGB)
    # Six colours overlap, so the sum exceeds 1 where stains co-localise; rescale the whole picture.
    top = float(np.percentile(composite, DISPLAY_PERCENTILE))
    return np.clip(composite / top, 0.0, 1.0) if top > 0 else composite


def explain_panel(image: np.ndarray, heatmap: np.ndarray, title: str = "",
                  attribution: Sequence[float] | None = None,
                  channel_names: Sequence[str] = CHANNEL_NAMES) -> Figure:
    """One row: the six stains (titled with their attribution share), the RGB composite, the heatmap overlay.

    ``image`` is (6, H, W) in any intensity unit; ``heatmap`` is (H, W) in [0, 1].
    """
    if heatmap.shape != image.shape[1:]:
        raise ValueError(f"heatmap {heatmap.shape} does not match image {image.shape[1:]}")
    figure = new_figure(2.0 * (N_CHANNELS + 2), 2.5)
    axes = figure.subplots(1, N_CHANNELS + 2)
    for index, ax in enumerate(axes[:N_CHANNELS]):
        ax.imshow(stretch(image[index]), cmap="gray", vmin=0, vmax=1)
        label = f"w{index + 1} {channel_names[index]}"
        if attribution is not None:
            label += f"\n{float(attribution[index]):.2f}"
        ax.set_title(label, fontsize=9)
    composite = rgb_composite(image)
    axes[N_CHANNELS].imshow(composite)
    axes[N_CHANNELS].set_title("RGB composite", fontsize=9)
    overlay = axes[N_CHANNELS + 1]
    overlay.imshow(composite.mean(axis=2), cmap="gray", vmin=0, vmax=1)
    shown = overlay.imshow(heatmap, cmap="jet", vmin=0, vmax=1, alpha=HEATMAP_ALPHA)
    overlay.set_title("Grad-CAM", fontsize=9)
    figure.colorbar(shown, ax=overlay, fraction=0.046, pad=0.04)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def plot_explain_panel(image: np.ndarray, heatmap: np.ndarray, path: str, title: str = "",
                       attribution: Sequence[float] | None = None) -> str:
    """Write :func:`explain_panel` as a PNG at a URI; returns the URI."""
    return save_figure(explain_panel(image, heatmap, title, attribution), path)


def plot_channel_importance(table: "pd.DataFrame", path: str, value: str = "importance",
                            title: str = "Channel importance") -> str:
    """Bar chart of per-stain importance for each treatment (a matrix when there are many); returns the URI.

    ``table`` is long-format: one row per (treatment, stain) with columns ``treatment``,
    ``channel`` (1-based), ``stain`` and ``value``.
    """
    wide = table.pivot(index="treatment", columns="channel", values=value).sort_index()
    stains = [f"w{c} {CHANNEL_NAMES[c - 1]}" for c in wide.columns]
    treatments = list(wide.index)
    if len(treatments) <= MAX_GROUPED_BARS:
        figure = new_figure(max(6.0, 1.2 * len(stains) + 0.3 * len(treatments)), 4.0)
        ax = figure.subplots()
        width = 0.8 / max(1, len(treatments))
        positions = np.arange(len(stains))
        for i, treatment in enumerate(treatments):
            ax.bar(positions + (i - (len(treatments) - 1) / 2) * width, wide.loc[treatment].to_numpy(),
                   width=width, label=str(treatment))
        ax.set_xticks(positions)
        ax.set_xticklabels(stains, rotation=20, ha="right")
        ax.set_ylabel(value)
        ax.legend(fontsize=8, ncol=2 if len(treatments) > 6 else 1)
    else:
        height = min(40.0, 1.5 + 0.18 * len(treatments))  # capped: hundreds of treatments still fit a page
        figure = new_figure(7.0, height)
        ax = figure.subplots()
        shown = ax.imshow(wide.to_numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(np.arange(len(stains)))
        ax.set_xticklabels(stains, rotation=20, ha="right")
        ax.set_yticks(np.arange(len(treatments)))
        ax.set_yticklabels([str(t) for t in treatments], fontsize=max(3, min(8, int(600 / len(treatments)))))
        figure.colorbar(shown, ax=ax, label=value)
    ax.set_title(title)
    return save_figure(figure, path)


# --------------------------------------------------------------------------- classifier evaluation


def plot_confusion_matrix(cm: np.ndarray, labels: Sequence[str], path: str, normalize: bool = True,
                          title: str = "Confusion matrix") -> str:
    """Confusion matrix (rows: true class, columns: predicted) with counts, coloured by row share; returns the URI."""
    cm = np.asarray(cm)
    if cm.shape != (len(labels), len(labels)):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(labels)} labels")
    totals = cm.sum(axis=1, keepdims=True)
    shares = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)
    side = max(4.0, 0.6 * len(labels) + 2.0)
    figure = new_figure(side + 1.0, side)
    ax = figure.subplots()
    shown = ax.imshow(shares if normalize else cm, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    figure.colorbar(shown, ax=ax, label="share of true class" if normalize else "count")
    if len(labels) <= 30:  # beyond that the numbers overlap; the colours still read
        for i in range(len(labels)):
            for j in range(len(labels)):
                ax.text(j, i, f"{cm[i, j]}", ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticks(np.arange(len(labels)))
    ax.set_yticklabels(labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return save_figure(figure, path)


def _curve_classes(y_true: np.ndarray, y_score: np.ndarray,
                   labels: Sequence[str] | None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, is_positive, score) per class to draw: the positive class alone for binary problems."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_score.ndim == 1:
        name = labels[1] if labels is not None and len(labels) == 2 else "positive"
        return [(str(name), y_true == 1, y_score)]
    n_classes = y_score.shape[1]
    names = list(labels) if labels is not None else [str(k) for k in range(n_classes)]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} labels for scores of {n_classes} classes")
    classes = [1] if n_classes == 2 else range(n_classes)
    return [(str(names[k]), y_true == k, y_score[:, k]) for k in classes]


def plot_pr_curve(y_true: np.ndarray, y_score: np.ndarray, path: str, labels: Sequence[str] | None = None,
                  title: str = "Precision-recall") -> str:
    """Precision-recall curve per class (one-vs-rest; the positive class for binary), AP in the legend.

    ``y_true`` holds class indices; ``y_score`` is (N,) positive-class scores or (N, C) probabilities.
    """
    from sklearn.metrics import average_precision_score, precision_recall_curve

    figure = new_figure(5.5, 5.0)
    ax = figure.subplots()
    for name, positive, score in _curve_classes(y_true, y_score, labels):
        if positive.all() or not positive.any():
            continue  # undefined with one class present; metrics record it as NaN
        precision, recall, _ = precision_recall_curve(positive, score)
        prevalence = positive.mean()
        ax.plot(recall, precision, label=f"{name} (AP {average_precision_score(positive, score):.2f}, "
                                         f"prevalence {prevalence:.2f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower left")
    return save_figure(figure, path)


def plot_roc_curve(y_true: np.ndarray, y_score: np.ndarray, path: str, labels: Sequence[str] | None = None,
                   title: str = "ROC") -> str:
    """ROC curve per class (one-vs-rest; the positive class for binary), AUC in the legend.

    ``y_true`` holds class indices; ``y_score`` is (N,) positive-class scores or (N, C) probabilities.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = new_figure(5.5, 5.0)
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    for name, positive, score in _curve_classes(y_true, y_score, labels):
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, score)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(positive, score):.2f})")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="lower right")
    return save_figure(figure, path)


def plot_trial_objectives(histories: dict[str, "pd.DataFrame"], table: "pd.DataFrame", metric: str, path: str,
                          best_trial: str) -> str:
    """A search's objective per epoch of every trial (ASHA-stopped ones end early) and the final one per trial.

    ``histories`` maps trial id to its reported epochs (``epoch`` and ``metric`` columns);
    ``table`` has one row per trial with ``trial_id``, ``status`` (complete / stopped / error) and ``metric``.
    """
    figure = new_figure(11, 4.2)
    curves, bars = figure.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for trial_id, history in histories.items():
        if metric not in history:
            continue
        best = trial_id == best_trial
        curves.plot(history["epoch"], history[metric], marker="o", linewidth=2.5 if best else 1.0,
                    alpha=1.0 if best else 0.6, label=f"{trial_id} (best)" if best else None, zorder=3 if best else 2)
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.set_xlabel("epoch")
    curves.set_ylabel(metric)
    curves.set_title(f"{metric} per epoch, every trial")
    curves.grid(alpha=0.3)
    if best_trial:
        curves.legend(loc="best", fontsize=8)

    ordered = table.sort_values(metric, ascending=True, na_position="first")
    colours = {"complete": "tab:blue", "stopped": "tab:grey", "error": "tab:red"}
    scores = ordered[metric].fillna(0.0)
    bars.barh(ordered["trial_id"], scores, color=[colours[s] for s in ordered["status"]],
              edgecolor=["black" if t == best_trial else "none" for t in ordered["trial_id"]])
    bars.set_xlabel(f"final {metric}")
    bars.set_title("trials (blue complete, grey stopped early, red error)", fontsize=9)
    bars.tick_params(axis="y", labelsize=7)
    return save_figure(figure, path)
