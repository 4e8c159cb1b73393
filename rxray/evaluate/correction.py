"""Batch correction of embeddings, fitted on control wells only.

- ``none``: the embeddings as they are.
- ``center``: per plate, subtract the mean of that plate's control sites and divide
  by their standard deviation (per feature). Plates are the unit of batch effect in
  RxRx2 (each plate is imaged and stained together), and controls are the only wells
  whose expected phenotype is the same on every plate.
- ``tvn``: typical variation normalisation (Ando et al. 2017): ``center``, then PCA
  whitening fitted on the control sites of all plates, so the controls' variation is
  spherical and a treatment is measured in units of typical control variation. The
  covariance is Ledoit-Wolf shrunk: with fewer controls than features (small screens)
  a plain estimate is singular and whitening would blow directions the controls
  happen not to span up into pure noise.

Which controls fit a correction matters. Controls inside the fit are, together,
exactly centred and scaled, while every other well shares the fit's estimation
error, so a comparison against in-fit controls makes null treatments look different
from them (on the default synthetic dataset, 8 control wells per plate: null
treatments scored RF ROC-AUC 1.0 after TVN). :func:`split_controls` therefore splits
each plate's control wells into a *reference* half that fits the correction and a
*comparison* half that treatments are scored against. A plate needs at least
``MIN_PLATE_CONTROLS`` reference control sites, otherwise its scale is not estimable
and the correction refuses the input rather than inventing one.

A feature (almost) constant on one plate's reference controls, e.g. a ReLU unit that
is zero there, has no scale on that plate. Dividing by its tiny std would blow it up
by orders of magnitude and let it dominate cosine similarities and the TVN covariance,
so each plate's std is floored at ``SCALE_FLOOR`` of the feature's typical control std
across plates, and a feature constant on every plate's controls is left unscaled, as
scikit-learn's StandardScaler does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.covariance import LedoitWolf
from threadpoolctl import threadpool_limits

CORRECTIONS = ("none", "center", "tvn")
MIN_PLATE_CONTROLS = 2
# A plate's control std is floored at this fraction of the feature's median control std over plates.
SCALE_FLOOR = 0.1
# Below this a std counts as zero (float32 embeddings carry ~7 significant digits).
_STD_FLOOR = 1e-6


def center_by_plate(X: np.ndarray, plates: np.ndarray, reference: np.ndarray, scale: bool = True) -> np.ndarray:
    """Per plate: subtract the reference controls' mean and (with ``scale``) divide by their std, feature-wise."""
    X = np.asarray(X, dtype=np.float64)
    plates = np.asarray(plates)
    reference = np.asarray(reference, dtype=bool)
    out = np.empty_like(X)
    thin, plate_rows, means, stds = [], [], [], []
    for plate in np.unique(plates):
        rows = plates == plate
        controls = X[rows & reference]
        if len(controls) < MIN_PLATE_CONTROLS:
            thin.append(f"{plate} ({len(controls)})")
            continue
        plate_rows.append(rows)
        means.append(controls.mean(axis=0))
        stds.append(controls.std(axis=0))
    if thin:
        raise ValueError(f"plates with fewer than {MIN_PLATE_CONTROLS} control sites cannot be corrected: "
                         + ", ".join(thin[:5]) + (" ..." if len(thin) > 5 else ""))
    scales = plate_scales(np.asarray(stds)) if scale else None
    for k, rows in enumerate(plate_rows):
        out[rows] = X[rows] - means[k]
        if scales is not None:
            out[rows] /= scales[k]
    return out


def plate_scales(stds: np.ndarray) -> np.ndarray:
    """Divisors (n_plates, d) from each plate's control std: floored per feature, 1 where there is no scale."""
    typical = np.median(stds, axis=0)
    scales = np.maximum(stds, SCALE_FLOOR * typical)
    return np.where(scales > _STD_FLOOR, scales, 1.0)


def fit_whitening(controls: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitening matrix W (d x d) from control rows: (x - mean) @ W has ~identity covariance."""
    controls = np.asarray(controls, dtype=np.float64)
    mean = controls.mean(axis=0)
    covariance = LedoitWolf(assume_centered=False).fit(controls).covariance_
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    return mean, eigenvectors / np.sqrt(np.maximum(eigenvalues, _STD_FLOOR**2))


def tvn(X: np.ndarray, plates: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Plate centering and scaling on reference controls, then PCA whitening fitted on them across plates."""
    centered = center_by_plate(X, plates, reference, scale=True)
    mean, whitening = fit_whitening(centered[np.asarray(reference, dtype=bool)])
    return (centered - mean) @ whitening


def correct(X: np.ndarray, plates: np.ndarray, reference: np.ndarray, method: str) -> np.ndarray:
    """Apply one named correction fitted on the ``reference`` rows (control sites); float32, input row order.

    BLAS runs on one thread here: with more, LAPACK's eigh and the covariance sums change
    in their last bits with the thread count, and a forest's split can flip on that, so
    the same embeddings scored by a driver with 2 threads (a laptop) and with 1 (a
    submitted job) gave different tables. These are small (d x d) problems and one
    matrix product; one thread costs seconds at RxRx2's full size.
    """
    with threadpool_limits(limits=1):
        return _correct(X, plates, reference, method)


def _correct(X: np.ndarray, plates: np.ndarray, reference: np.ndarray, method: str) -> np.ndarray:
    if method == "none":
        corrected = np.asarray(X)
    elif method == "center":
        corrected = center_by_plate(X, plates, reference)
    elif method == "tvn":
        corrected = tvn(X, plates, reference)
    else:
        raise ValueError(f"unknown correction {method!r}; choose from {', '.join(CORRECTIONS)}")
    return np.ascontiguousarray(corrected, dtype=np.float32)


def sphere(profiles: np.ndarray) -> np.ndarray:
    """Profiles whitened on themselves (Ledoit-Wolf-shrunk PCA whitening fitted on every row), float32.

    For relating treatments to each other after a correction (the treatment map), as
    pycytominer's ``spherize`` does with its default ``samples="all"``: the few directions
    along which every treatment moves (a generic "perturbed" axis, cell density) would
    otherwise dominate every cosine and make all active treatments look alike.
    """
    with threadpool_limits(limits=1):  # as correct(): the same numbers whatever the driver's thread count
        mean, whitening = fit_whitening(profiles)
        return np.ascontiguousarray((np.asarray(profiles, dtype=np.float64) - mean) @ whitening, dtype=np.float32)


def split_controls(well_ids: pd.Series, plates: pd.Series, is_control: np.ndarray, seed: int) -> np.ndarray:
    """Per plate, a seeded half (rounded up) of the control wells: True = reference (fits), False = comparison.

    Rows are wells or sites; the split is by well, so a well's sites stay together.
    """
    frame = pd.DataFrame({"well": np.asarray(well_ids), "plate": np.asarray(plates)})[np.asarray(is_control, bool)]
    wells = frame.drop_duplicates("well")
    rng = np.random.default_rng(seed)
    reference = []
    for _, group in wells.groupby("plate", sort=True):
        chosen = rng.permutation(np.sort(group["well"].to_numpy()))  # sorted: independent of row order
        reference.extend(chosen[: (len(chosen) + 1) // 2])
    return np.asarray(is_control, bool) & np.isin(np.asarray(well_ids), reference)
