"""One site's CellProfiler profile: segment, measure every object, take the median over objects.

A profile is one flat row of floats: ``Metadata_no_cells`` (1.0 when the site has no cell),
``Cells_Count`` and the median over objects of every feature of :mod:`rxray.features.measure`.
Its columns depend only on the measurements, which depend only on the site size (through the
expected nucleus diameter), so every site of a dataset gives the same columns in the same order
(:func:`profile_columns`). A site with no cell is a row that says so (flag 1.0, count 0, NaN
features), never an error. The ``Metadata_`` prefix and CellProfiler's compartment prefixes let
pycytominer's ``infer_cp_features`` tell metadata from features without renaming.
"""

from __future__ import annotations

import time
from functools import lru_cache

import numpy as np
from skimage.draw import disk

from rxray.features.measure import OBJECT_NAMES, Measurement, default_measurements, measure_objects, texture_scale
from rxray.features.segment import Objects, default_nucleus_diameter, identify_objects, to_unit_range
from rxray.layout import N_CHANNELS

NO_CELLS_FLAG = "Metadata_no_cells"
COUNT_FEATURE = "Cells_Count"


def measurements_for(size: int, nucleus_diameter: float | None = None) -> tuple[Measurement, ...]:
    """The default measurements for S x S sites (texture scale from the expected nucleus diameter)."""
    return default_measurements(texture_scale(nucleus_diameter or default_nucleus_diameter(size)))


def _reference_site() -> tuple[Objects, np.ndarray]:
    """One round cell around one round nucleus on a ramp: every measurement names its features on it."""
    size = 48
    nuclei = np.zeros((size, size), np.int32)
    cells = np.zeros((size, size), np.int32)
    cells[disk((24, 24), 16)] = 1
    nuclei[disk((24, 24), 7)] = 1
    ramp = np.linspace(0.1, 0.9, size * size).reshape(size, size)
    pixels = np.stack([np.roll(ramp, 7 * c, axis=1) for c in range(N_CHANNELS)])
    return Objects(nuclei=nuclei, cells=cells, cytoplasm=np.where(nuclei > 0, 0, cells)), pixels


@lru_cache(maxsize=16)
def _feature_names(measurements: tuple[Measurement, ...]) -> tuple[str, ...]:
    """``Cells_Count`` and the features the measurements give, in the order a profile holds them."""
    objects, pixels = _reference_site()
    names = [COUNT_FEATURE]
    for object_name in OBJECT_NAMES:
        names += measure_objects(object_name, getattr(objects, object_name.lower()), pixels, measurements)
    return tuple(names)


def feature_names(size: int, nucleus_diameter: float | None = None,
                  measurements: tuple[Measurement, ...] | None = None) -> tuple[str, ...]:
    """The feature columns of an S x S site's profile, in their fixed order: ``Cells_Count``, then every median."""
    return _feature_names(measurements or measurements_for(size, nucleus_diameter))


def profile_columns(size: int, nucleus_diameter: float | None = None,
                    measurements: tuple[Measurement, ...] | None = None) -> list[str]:
    """Every column of an S x S site's profile, in order: the no-cells flag, then :func:`feature_names`."""
    return [NO_CELLS_FLAG, *feature_names(size, nucleus_diameter, measurements)]


def _median(values: np.ndarray) -> float:
    """Median over objects, ignoring objects where the feature is undefined; NaN if it is for all."""
    finite = values[np.isfinite(values)]
    return float(np.median(finite)) if finite.size else float("nan")


def site_profile(image: np.ndarray, nucleus_diameter: float | None = None,
                 measurements: tuple[Measurement, ...] | None = None,
                 timings: dict[str, float] | None = None) -> dict[str, float]:
    """The profile of one (6, S, S) uint8 site: flag, cell count and per-feature medians over objects.

    ``nucleus_diameter`` (pixels) defaults to :func:`rxray.features.segment.default_nucleus_diameter`,
    ``measurements`` to :func:`measurements_for` the site's size; ``timings``, when given,
    accumulates seconds under ``segment`` and each measurement's name.
    """
    size = image.shape[-1]
    measurements = measurements or measurements_for(size, nucleus_diameter)
    start = time.perf_counter()
    objects = identify_objects(image, nucleus_diameter)
    if timings is not None:
        timings["segment"] = timings.get("segment", 0.0) + time.perf_counter() - start
    row = dict.fromkeys(profile_columns(size, nucleus_diameter, measurements), float("nan"))
    row[NO_CELLS_FLAG] = float(objects.count == 0)
    row[COUNT_FEATURE] = float(objects.count)
    pixels = to_unit_range(image)
    for object_name in OBJECT_NAMES:
        labels = getattr(objects, object_name.lower())
        for name, values in measure_objects(object_name, labels, pixels, measurements, timings).items():
            if name not in row:
                raise RuntimeError(f"cp_measure returned {name!r}, which the reference site did not name")
            row[name] = _median(values)
    return row
