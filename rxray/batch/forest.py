"""One treatment's score under one correction: a Random Forest against plate-matched controls, and its mAP.

The unit of work `rxray score` sends to Ray, one task per treatment and correction
(:data:`score_treatment_task`). The forest is the RxRx2 study's (100 trees, fixed seed) on
sites, cross-validated with folds grouped by plate, so no plate (and hence no well, whose
sites are near-duplicates) is on both sides of a split; its metrics come from the pooled
out-of-fold predictions. Controls are sampled from the treatment's own plates, as many per
plate as the treatment has sites there, with a seed per treatment, so the forest learns the
phenotype and not the plate, and 433 treatments x ~7,600 control sites stay tractable.
Activity is the mAP of the treatment's well profiles against same-plate control wells with
a permutation p-value (:func:`rxray.evaluate.profiles.map_permutation_test`). Nothing here
scans every row of the screen, so the work per treatment does not grow with the screen.
"""

from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import ray
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import StratifiedGroupKFold

from rxray.evaluate.metrics import classification_metrics
from rxray.evaluate.profiles import map_permutation_test

CONTROL, TREATED = 0, 1


# --------------------------------------------------------------------------- folds and sampling


def plate_folds(plates: np.ndarray, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row, grouped by plate (every plate in exactly one fold), stratified by label.

    Uses ``min(n_folds, number of plates)`` folds; ValueError with fewer than 2 plates.
    """
    plates = np.asarray(plates)
    n_plates = len(np.unique(plates))
    if n_plates < 2:
        raise ValueError("cross-validation by plate needs at least 2 plates")
    splitter = StratifiedGroupKFold(n_splits=min(n_folds, n_plates), shuffle=True, random_state=seed)
    folds = np.full(len(plates), -1, dtype=np.int64)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(plates)), y, groups=plates)):
        folds[test] = k
    return folds


def plate_matched_controls(plates: np.ndarray, treated_rows: np.ndarray, control_rows: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
    """Control rows drawn from the treated rows' plates: per plate as many as treated, or all there are."""
    treated_plates, treated_counts = np.unique(plates[treated_rows], return_counts=True)
    control_plates = plates[control_rows]
    chosen = []
    for plate, count in zip(treated_plates, treated_counts):
        available = control_rows[control_plates == plate]
        take = min(int(count), len(available))
        chosen.append(rng.choice(available, size=take, replace=False) if take < len(available) else available)
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def out_of_fold_scores(X: np.ndarray, y: np.ndarray, folds: np.ndarray, trees: int, seed: int) -> np.ndarray:
    """Probability of TREATED for every row from a forest that never saw the row's plate."""
    scores = np.empty(len(y), dtype=np.float64)
    for k in np.unique(folds):
        test = folds == k
        forest = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
        forest.fit(X[~test], y[~test])
        proba = forest.predict_proba(X[test])
        classes = list(forest.classes_)
        # A training fold holding one class predicts it with certainty; keep the column layout fixed.
        scores[test] = proba[:, classes.index(TREATED)] if TREATED in classes else 0.0
    return scores


def rows_by_code(codes: np.ndarray, n_codes: int) -> list[np.ndarray]:
    """The row indices of each code 0..n_codes-1 (ascending), in one sort; rows coded -1 belong to none."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes[codes >= 0], minlength=n_codes)
    starts = np.searchsorted(codes[order], 0)
    return np.split(order[starts:], np.cumsum(counts)[:-1])


def _treatment_rng(seed: int, treatment: str, stream: int) -> np.random.Generator:
    """A generator fixed by (seed, treatment, purpose), independent of task order and cluster size."""
    return np.random.default_rng([seed, zlib.crc32(treatment.encode("utf-8")), stream])


# --------------------------------------------------------------------------- one treatment


def score_treatment(X: np.ndarray, profiles: np.ndarray, sites: dict[str, np.ndarray], wells: dict[str, np.ndarray],
                    treated: np.ndarray, replicates: np.ndarray, treatment: str, correction: str, trees: int,
                    folds: int, permutations: int, seed: int) -> dict[str, Any]:
    """Forest metrics and mAP for one treatment under one correction (one row of the score table).

    ``sites`` (rows of ``X``) and ``wells`` (rows of ``profiles``, unit-length well
    means) hold an integer array ``plate`` and ``comparison``, the rows of the control
    sites or wells that treatments are scored against; ``treated`` and ``replicates``
    are the treatment's own rows. Nothing here scans every row of the screen, so the
    work per treatment does not grow with the number of treatments.
    """
    notes = []
    row: dict[str, Any] = {"treatment": treatment, "correction": correction}
    controls = plate_matched_controls(sites["plate"], treated, sites["comparison"], _treatment_rng(seed, treatment, 0))
    unmatched = ~np.isin(sites["plate"][treated], sites["plate"][controls])
    if unmatched.any():  # a plate without comparison controls would teach the forest plate identity
        notes.append(f"{int(unmatched.sum())} sites on plates without comparison controls left out")
        treated = treated[~unmatched]
    rows = np.concatenate([treated, controls])
    y = np.r_[np.full(len(treated), TREATED), np.full(len(controls), CONTROL)]
    n_plates = len(np.unique(sites["plate"][treated]))
    row.update(n_treated=len(treated), n_control=len(controls), n_plates=n_plates)
    metrics = dict.fromkeys(["accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc"], float("nan"))
    if n_plates < 2:
        notes.append("fewer than 2 plates with controls: cannot cross-validate by plate")
    else:
        fold_of = plate_folds(sites["plate"][rows], y, folds, seed)
        scores = out_of_fold_scores(X[rows], y, fold_of, trees, seed)
        full = classification_metrics(y, scores, labels=[CONTROL, TREATED])
        metrics = {k: full[k] for k in metrics}
    row.update(metrics)

    row["n_replicates"] = len(replicates)
    row["map"] = row["p_value"] = float("nan")
    if len(replicates) < 2:
        notes.append("fewer than 2 replicate wells: no mAP")
    else:
        row["map"], row["p_value"] = map_permutation_test(profiles, wells["plate"], replicates,
                                                          wells["comparison"], permutations,
                                                          _treatment_rng(seed, treatment, 1))
    row["status"] = "; ".join(notes) or "ok"
    return row


score_treatment_task = ray.remote(num_cpus=1)(score_treatment)


__all__ = ["CONTROL", "TREATED", "out_of_fold_scores", "plate_folds", "plate_matched_controls", "rows_by_code",
           "score_treatment", "score_treatment_task"]
