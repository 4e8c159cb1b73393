"""Classification metrics shared by the Random-Forest scorer and the classifier trainer.

One entry point, :func:`classification_metrics`, for binary and multiclass problems.
It never raises because a class is missing from a fold: a score that cannot be
defined (ROC-AUC with one class present) is NaN, and precision/recall of a class
that is never predicted are 0, so a bad fold shows up as a bad number, not a crash.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)


def _as_probability_matrix(y_score: np.ndarray, n_labels: int) -> np.ndarray:
    """(n, n_labels) class scores; a 1-D binary score is the probability of the second label."""
    y_score = np.asarray(y_score, dtype=np.float64)
    if y_score.ndim == 1:
        if n_labels != 2:
            raise ValueError(f"a 1-D score needs exactly 2 labels, got {n_labels}")
        return np.column_stack([1.0 - y_score, y_score])
    if y_score.ndim != 2 or y_score.shape[1] != n_labels:
        raise ValueError(f"expected scores of shape (n, {n_labels}), got {y_score.shape}")
    return y_score


def _one_vs_rest_scores(true_idx: np.ndarray, proba: np.ndarray) -> tuple[float, float]:
    """Macro ROC-AUC and PR-AUC over the classes that have both positives and negatives."""
    roc, pr = [], []
    for k in range(proba.shape[1]):
        positive = true_idx == k
        if positive.all() or not positive.any():
            continue
        roc.append(roc_auc_score(positive, proba[:, k]))
        pr.append(average_precision_score(positive, proba[:, k]))
    nan = float("nan")
    return (float(np.mean(roc)) if roc else nan), (float(np.mean(pr)) if pr else nan)


def roc_auc_interval(positive: Sequence[bool], score: Sequence[float], groups: Sequence[Any] | None = None,
                     unit: str = "wells", level: float = 0.95, resamples: int = 2000, seed: int = 0) -> dict[str, Any]:
    """A bootstrap confidence interval of the ROC-AUC, resampling whole groups (wells) within each class.

    A held-out plate gives a handful of positive wells, so one borderline well moves the
    ROC-AUC by several hundredths: the interval says how far. Sites of one well share
    its treatment and its position on the plate, so wells, not sites, are resampled
    (each site its own group, ``unit`` "sites", when ``groups`` is None); positives and
    negatives are resampled apart (a stratified bootstrap, as pROC's), so every draw has
    both. A draw weighs each site by how often it took the site's well, and its AUC is
    the weighted Mann-Whitney statistic over the sites sorted once by score: linear in
    the sites per draw, whatever the split's size. Percentile interval.
    """
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    groups, unit = (np.arange(len(score)), "sites") if groups is None else (np.asarray(groups), unit)
    result: dict[str, Any] = {"low": float("nan"), "high": float("nan"), "level": level, "unit": unit,
                              "positive_groups": int(len(np.unique(groups[positive]))),
                              "negative_groups": int(len(np.unique(groups[~positive])))}
    if not positive.any() or positive.all():
        return result
    order = np.argsort(score, kind="stable")
    positive, groups = positive[order], groups[order]
    tie_starts = np.flatnonzero(np.diff(score[order], prepend=-np.inf))  # sites of equal score are contiguous
    pos_wells, pos_index = np.unique(groups[positive], return_inverse=True)
    neg_wells, neg_index = np.unique(groups[~positive], return_inverse=True)
    rng = np.random.default_rng(seed)
    auc = np.empty(resamples)
    chunk = max(1, min(resamples, 2**22 // len(score)))  # draws at a time: ~32 MB of site weights
    for start in range(0, resamples, chunk):
        draws = min(chunk, resamples - start)
        taken_pos = rng.multinomial(len(pos_wells), np.full(len(pos_wells), 1.0 / len(pos_wells)), size=draws)
        taken_neg = rng.multinomial(len(neg_wells), np.full(len(neg_wells), 1.0 / len(neg_wells)), size=draws)
        pos_weight, neg_weight = np.zeros((draws, len(score))), np.zeros((draws, len(score)))
        pos_weight[:, positive], neg_weight[:, ~positive] = taken_pos[:, pos_index], taken_neg[:, neg_index]
        pos_at, neg_at = (np.add.reduceat(w, tie_starts, axis=1) for w in (pos_weight, neg_weight))
        below = np.cumsum(neg_at, axis=1) - neg_at  # negatives scored under each tie group; ties count half
        auc[start:start + draws] = (np.sum(pos_at * (below + 0.5 * neg_at), axis=1)
                                    / (pos_at.sum(axis=1) * neg_at.sum(axis=1)))
    tail = (1.0 - level) / 2.0
    result["low"], result["high"] = (float(v) for v in np.quantile(auc, [tail, 1.0 - tail]))
    return result


def best_f1_threshold(positive: Sequence[bool], score: Sequence[float]) -> float:
    """The decision threshold on ``score`` that maximises the positive class's F1 (for a validation split).

    It lies halfway between the lowest positive-called score and the next lower
    score, so it does not sit on a validation sample; 0.5 when the split has no
    positives or no negatives (nothing to tune on).
    """
    positive = np.asarray(positive, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    if positive.all() or not positive.any():
        return 0.5
    candidates = np.unique(score)[::-1]  # each candidate t calls score >= t positive
    best_f1, best_index = -1.0, 0
    for index, threshold in enumerate(candidates):
        called = score >= threshold
        true_positives = np.sum(called & positive)
        f1 = 2.0 * true_positives / (called.sum() + positive.sum())
        if f1 > best_f1:
            best_f1, best_index = f1, index
    lower = candidates[best_index + 1] if best_index + 1 < len(candidates) else 0.0
    return float((candidates[best_index] + lower) / 2.0)


def predicted_classes(proba: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Predicted class index per row of (n, k) probabilities: the most probable, or with ``threshold``
    (two classes only) class 1 where its probability is at least ``threshold``."""
    if threshold is None:
        return np.argmax(proba, axis=1)
    if proba.shape[1] != 2:
        raise ValueError("a decision threshold needs exactly two labels")
    return (proba[:, 1] >= threshold).astype(np.int64)


def classification_metrics(y_true: Sequence[Any], y_score: np.ndarray, labels: Sequence[Any],
                           threshold: float | None = None) -> dict[str, Any]:
    """Accuracy, precision, recall, F1 (headline, macro and per class), ROC-AUC, PR-AUC, confusion matrix.

    ``labels`` fixes the class order: the columns of a 2-D ``y_score`` (n, n_labels),
    and the rows/columns of the confusion matrix. With two labels a 1-D ``y_score``
    is the probability of ``labels[1]``, the positive class. Predictions are the
    highest-scoring class, or for two labels with ``threshold`` given, the positive
    class where its probability is at least ``threshold``. Headline ``precision``,
    ``recall`` and ``f1`` are those of the positive class for binary problems and
    the macro averages otherwise.
    """
    labels = list(labels)
    y_true = np.asarray(y_true)
    if len(labels) < 2:
        raise ValueError("need at least two labels")
    if len(y_true) == 0:
        raise ValueError("no samples to score")
    unknown = set(y_true.tolist()) - set(labels)
    if unknown:
        raise ValueError(f"y_true holds labels not in `labels`: {sorted(map(str, unknown))}")
    proba = _as_probability_matrix(y_score, len(labels))
    # sklearn cannot type object arrays of mixed labels; score class indices instead.
    index_of = {label: k for k, label in enumerate(labels)}
    true_idx = np.array([index_of[v] for v in y_true.tolist()], dtype=np.int64)
    pred_idx = predicted_classes(proba, threshold)
    class_ids = list(range(len(labels)))

    precision, recall, f1, support = precision_recall_fscore_support(
        true_idx, pred_idx, labels=class_ids, zero_division=0)
    per_class = {str(label): {"precision": float(precision[k]), "recall": float(recall[k]), "f1": float(f1[k]),
                              "support": int(support[k])} for k, label in enumerate(labels)}
    # Macro averages over the classes present in this fold, so a missing class does not add a 0.
    present = support > 0
    macro = {name: float(values[present].mean()) for name, values in
             (("precision", precision), ("recall", recall), ("f1", f1))}

    binary = len(labels) == 2
    if binary:
        positive = true_idx == 1
        both = positive.any() and not positive.all()
        roc_auc = float(roc_auc_score(positive, proba[:, 1])) if both else float("nan")
        pr_auc = float(average_precision_score(positive, proba[:, 1])) if positive.any() else float("nan")
        headline = {"precision": float(precision[1]), "recall": float(recall[1]), "f1": float(f1[1])}
    else:
        roc_auc, pr_auc = _one_vs_rest_scores(true_idx, proba)
        headline = macro

    return {
        "accuracy": float(accuracy_score(true_idx, pred_idx)),
        **headline,
        "precision_macro": macro["precision"],
        "recall_macro": macro["recall"],
        "f1_macro": macro["f1"],
        "roc_auc": roc_auc,
        "pr_auc": pr_auc,
        "per_class": per_class,
        "labels": [str(label) for label in labels],
        "confusion_matrix": confusion_matrix(true_idx, pred_idx, labels=class_ids).tolist(),
        "n": int(len(y_true)),
    }
