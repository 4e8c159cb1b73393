"""Downstream probe scores of embeddings: a simple classifier trained on some plates, scored on the others.

A self-supervised loss says little about what an encoder learned (SimCLR's loss
falls when the augmentations get easier), so representations are judged by how
well a *simple* classifier on frozen embeddings recovers what the screen is about:
the identity of each treatment (``treatment``), or treated vs control
(``control``). Folds are whole plates (:func:`grouped_folds`): sites of one well
are near-duplicates and a plate carries its own batch effect, so a probe scored
on sites of plates it was trained on would measure memory, not biology.

The headline ``score`` is balanced accuracy over the pooled out-of-fold
predictions (chance = 1 / number of classes), so a large control class cannot
carry it. :func:`rxray.evaluate.probe_sites.select_probe_sites` picks a small,
class-stratified sample of sites, and :func:`rxray.evaluate.probe_step.embed_batches` embeds them with an
encoder in eval mode, so the probe is cheap enough to run after every training epoch. With plate centring
(``center``, the default of ``rxray probe`` and of the per-epoch probe) every
plate's embeddings are first scaled on its own control sites, as a screen's
profiles are: otherwise an encoder that has learned to recognise plates (easy
for SimCLR when its colour augmentation is mild) looks worse than it is.

:mod:`rxray.evaluate.probe_step` is the ``rxray probe`` step: the same probes on a trained
encoder and on random-init encoders of the same architecture, side by side.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from rxray.config import PROBE_CORRECTIONS
from rxray.evaluate.probe_sites import probe_targets
from rxray.layout import CONTROL, plate_groups

if TYPE_CHECKING:
    import pandas as pd

PROBE_METHODS = ("logistic", "knn")
# Encoder names in probe.csv: the checkpoint's, and random_init_seed<k> for the baselines.
TRAINED = "trained"
RANDOM_INIT = "random_init"
# Fewer folds than plates keeps the cost flat on a 24-plate screen; 5 leaves 80 % of plates to train on.
MAX_FOLDS = 5
NEIGHBORS = 5


def grouped_folds(groups: Sequence[Any], max_folds: int = MAX_FOLDS) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, test rows) per fold; every group is tested once and never trains the fold it is tested in."""
    from sklearn.model_selection import GroupKFold

    groups = np.asarray(groups)
    n_groups = len(np.unique(groups))
    if n_groups < 2:
        raise ValueError(f"a grouped probe needs sites from at least 2 plates, got {n_groups}")
    splitter = GroupKFold(n_splits=min(max_folds, n_groups))
    return [(train, test) for train, test in splitter.split(np.zeros(len(groups)), groups=groups)]


def probe_score(X: np.ndarray, targets: Sequence[Any], groups: Sequence[Any], *, method: str = "logistic",
                max_folds: int = MAX_FOLDS, neighbors: int = NEIGHBORS,
                center_on: np.ndarray | None = None) -> dict[str, Any]:
    """Plate-grouped cross-validated probe of embeddings X (n, d) for ``targets``; higher ``score`` is better.

    Each fold standardises features and fits the probe (class-balanced logistic
    regression, or k-nearest neighbours with class-balanced votes) on its training plates only, then predicts
    the held-out plates. ``center_on`` (a boolean row mask of control sites) first
    centres and scales each plate's features on its own controls, removing plate
    batch effects the way a screen does (controls are known from the plate map).
    Returns ``score`` (balanced accuracy), ``accuracy``, ``f1_macro``, ``roc_auc``,
    ``chance``, and the counts of sites, classes, plates and folds.
    """
    from rxray.evaluate.metrics import classification_metrics

    X = np.asarray(X, dtype=np.float64)
    targets = np.asarray([str(t) for t in targets], dtype=object)
    groups = np.asarray(groups)
    if not len(X) == len(targets) == len(groups):
        raise ValueError(f"{len(X)} embeddings, {len(targets)} targets and {len(groups)} groups must match")
    if method not in PROBE_METHODS:
        raise ValueError(f"unknown probe method {method!r}; choose one of {', '.join(PROBE_METHODS)}")
    classes = sorted(set(targets.tolist()))
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes, got {classes}")
    if center_on is not None:
        from rxray.evaluate.correction import center_by_plate

        X = center_by_plate(X, groups, np.asarray(center_on, dtype=bool))
    folds = grouped_folds(groups, max_folds)
    proba = np.zeros((len(X), len(classes)))
    for train, test in folds:
        proba[test] = _fit_predict(X[train], targets[train], X[test], classes, method, neighbors)
    metrics = classification_metrics(targets, proba, labels=classes)
    return {"score": metrics["recall_macro"], "accuracy": metrics["accuracy"], "f1_macro": metrics["f1_macro"],
            "roc_auc": metrics["roc_auc"], "chance": 1.0 / len(classes), "n": int(len(X)), "classes": classes,
            "groups": int(len(np.unique(groups))), "folds": len(folds), "method": method}


def _fit_predict(X_train: np.ndarray, y_train: np.ndarray, X_test: np.ndarray, classes: list[str], method: str,
                 neighbors: int) -> np.ndarray:
    """Class probabilities (n_test, len(classes)) from a probe fitted on one fold's training plates."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    proba = np.zeros((len(X_test), len(classes)))
    present = sorted(set(y_train.tolist()))
    if len(present) == 1:  # a fold whose training plates hold one class can only predict that class
        proba[:, classes.index(present[0])] = 1.0
        return proba
    model = (LogisticRegression(max_iter=2000, class_weight="balanced") if method == "logistic"
             else KNeighborsClassifier(n_neighbors=min(neighbors, len(y_train))))
    fitted = make_pipeline(StandardScaler(), model).fit(X_train, y_train)
    columns = [classes.index(c) for c in fitted.classes_]
    votes = fitted.predict_proba(X_test)
    if method == "knn":  # 14 % controls are rarely 3 of 5 neighbours: votes / class share, as class_weight="balanced"
        votes = votes / np.array([(y_train == c).mean() for c in fitted.classes_])
    proba[:, columns] = votes / votes.sum(axis=1, keepdims=True)
    return proba


def score_embeddings(X: np.ndarray, columns: dict[str, np.ndarray], *, task: str, method: str = "logistic",
                     correct: str = "none", control: str = CONTROL) -> dict[str, Any]:
    """:func:`probe_score` of embedded probe sites (``columns`` from ``embed_batches``), plates as groups;
    ``correct="center"`` first centres every plate on its own control sites."""
    if correct not in PROBE_CORRECTIONS:
        raise ValueError(f"unknown probe correction {correct!r}; choose one of {', '.join(PROBE_CORRECTIONS)}")
    treatments = np.asarray([str(t) for t in columns["treatment"]], dtype=object)
    groups = plate_groups(columns["experiment"], columns["plate"])
    return probe_score(X, probe_targets(treatments, task, control), groups, method=method,
                       center_on=(treatments == control) if correct == "center" else None)


def compare_to_baselines(table: "pd.DataFrame") -> list[dict[str, Any]]:
    """Per task and method: the trained encoder's score, the random-init scores, and the margin over the best."""
    comparison = []
    for (task, method), group in table.groupby(["task", "method"], sort=False):
        trained = float(group.loc[group["encoder"] == TRAINED, "score"].iloc[0])
        baselines = group.loc[group["encoder"] != TRAINED, "score"].astype(float).tolist()
        comparison.append({"task": task, "method": method, "trained": round(trained, 4),
                           "random_init": [round(b, 4) for b in baselines],
                           "margin": round(trained - max(baselines), 4) if baselines else None,
                           "chance": float(group["chance"].iloc[0])})
    return comparison


def format_comparison(comparison: list[dict[str, Any]]) -> str:
    """The comparison as a small text table (balanced accuracy; margin over the best random-init encoder)."""
    lines = [f"{'task':<10} {'method':<9} {'trained':>8} {'random init':>24} {'margin':>7} {'chance':>7}"]
    for row in comparison:
        baselines = ", ".join(f"{b:.3f}" for b in row["random_init"]) or "-"
        margin = f"{row['margin']:+.3f}" if row["margin"] is not None else "-"
        lines.append(f"{row['task']:<10} {row['method']:<9} {row['trained']:>8.3f} {baselines:>24} {margin:>7} "
                     f"{row['chance']:>7.3f}")
    return "\n".join(lines)
