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
carry it. :func:`select_probe_sites` picks a small, class-stratified sample of
sites, and :func:`embed_batches` embeds them with an encoder in eval mode, so the
probe is cheap enough to run after every training epoch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from rxray.data.layout import CONTROL

if TYPE_CHECKING:
    import pandas as pd
    import torch

PROBE_TASKS = ("treatment", "control")
PROBE_METHODS = ("logistic", "knn")
TREATED = "treated"
# Fewer folds than plates keeps the cost flat on a 24-plate screen; 5 leaves 80 % of plates to train on.
MAX_FOLDS = 5
NEIGHBORS = 5
# Columns a probe needs besides the image: the label and the plate (the group).
PROBE_COLUMNS = ("site_id", "experiment", "plate", "treatment")


def probe_targets(treatments: Iterable[Any], task: str, control: str = CONTROL) -> np.ndarray:
    """The class of each site: its treatment (``treatment``), or ``control`` / ``treated`` (``control``)."""
    values = np.asarray([str(t) for t in treatments], dtype=object)
    if task == "treatment":
        return values
    if task == "control":
        return np.where(values == control, "control", TREATED).astype(object)
    raise ValueError(f"unknown probe task {task!r}; choose one of {', '.join(PROBE_TASKS)}")


def plate_groups(experiments: Iterable[Any], plates: Iterable[Any]) -> np.ndarray:
    """The plate group of each site, ``<experiment>_<plate>`` (plate numbers repeat across experiments)."""
    return np.asarray([f"{e}_{p}" for e, p in zip(experiments, plates)], dtype=object)


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
    regression, or k-nearest neighbours) on its training plates only, then predicts
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
    if method == "logistic":
        model = LogisticRegression(max_iter=2000, class_weight="balanced")
    else:
        model = KNeighborsClassifier(n_neighbors=min(neighbors, len(y_train)))
    fitted = make_pipeline(StandardScaler(), model).fit(X_train, y_train)
    columns = [classes.index(c) for c in fitted.classes_]
    proba[:, columns] = fitted.predict_proba(X_test)
    return proba


def select_probe_sites(meta: "pd.DataFrame", *, task: str, treatments: Sequence[str] | None = None,
                       max_sites: int = 1024, seed: int = 0, control: str = CONTROL) -> "pd.DataFrame":
    """A seeded, class-stratified sample of at most ``max_sites`` rows of ``meta`` (site_id, experiment, plate,
    treatment) for a probe.

    ``treatments`` restricts the sites to those treatments (controls are always
    kept). Each probe class gets an equal share of the sites, drawn at random from
    all its plates; a class with fewer sites gives its unused share to none (the
    sample stays small and balanced). Raises ValueError if fewer than 2 classes or
    plates remain.
    """
    frame = meta.sort_values("site_id", kind="stable").reset_index(drop=True)
    if treatments:
        unknown = sorted(set(treatments) - set(frame["treatment"].astype(str)))
        if unknown:
            raise ValueError(f"probe treatments not in the data: {', '.join(unknown)}")
        frame = frame[frame["treatment"].astype(str).isin([*treatments, control])].reset_index(drop=True)
    targets = probe_targets(frame["treatment"], task, control)
    classes = sorted(set(targets.tolist()))
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes; the selected sites hold {classes}")
    share = max(1, max_sites // len(classes))
    rng = np.random.default_rng(seed)
    chosen = []
    for name in classes:
        rows = np.flatnonzero(targets == name)
        chosen.extend(rng.permutation(rows)[:share].tolist())
    sample = frame.iloc[sorted(chosen)].reset_index(drop=True)
    n_plates = len(set(plate_groups(sample["experiment"], sample["plate"])))
    if n_plates < 2:
        raise ValueError(f"a grouped probe needs sites from at least 2 plates; the selected sites span {n_plates}")
    return sample


def embed_batches(encoder: "torch.nn.Module", batches: Iterable[dict[str, np.ndarray]], *,
                  mean: Sequence[float], std: Sequence[float],
                  device: "torch.device") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Features (n, d) float32 of every image in numpy ``batches`` (``image`` (B, C, H, W) uint8 + metadata),
    and the batches' other columns concatenated in the same row order.

    The encoder runs in eval mode without gradients (batch norm uses its running
    statistics), on inputs normalised like training inputs; the caller restores
    train mode.
    """
    import torch

    from rxray.ssl.augment import normalize
    from rxray.train.loop import autocast_for

    encoder.eval()
    features: list[np.ndarray] = []
    columns: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        for batch in batches:
            images = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device)
            with autocast_for(device):
                output = encoder(normalize(images, mean, std))
            features.append(output.float().cpu().numpy())
            for name, values in batch.items():
                if name != "image":
                    columns.setdefault(name, []).append(np.asarray(values))
    if not features:  # a worker whose share of the probe sites is empty
        return np.zeros((0, getattr(encoder, "feature_dim", 0)), np.float32), {}
    return np.concatenate(features), {name: np.concatenate(parts) for name, parts in columns.items()}
