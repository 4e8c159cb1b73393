"""CellProfiler measurements of segmented objects with cp_measure, named as CellProfiler names them.

Every feature is ``<Object>_<Measurement>_<Feature>[_<Stain>][_<parameters>]`` with objects ``Nuclei``,
``Cells`` and ``Cytoplasm``, e.g. ``Nuclei_Intensity_MeanIntensity_DNA``, ``Cells_AreaShape_Area``,
``Cells_Texture_Contrast_Actin_1_00_16``, ``Cells_Granularity_1_Mito``,
``Cells_RadialDistribution_FracAtD_RNA_1of4`` and ``Cytoplasm_Correlation_Correlation_ER_Mito``.
Stains take short names of their targets in rxray.layout (``STAIN_NAMES``, w1..w6): DNA, ER, Actin,
RNA, Mito, Golgi. Pixels are the stains divided by 255, as CellProfiler reads 8-bit images.

Measured, with CellProfiler's default settings unless said:

- AreaShape (size, shape, Zernike shape moments to degree 9, Feret diameters), once per object class;
- Intensity and Texture (Haralick, 4 directions, 16 grey levels, at :func:`texture_scale`) per stain;
- Granularity (spectrum of 16) and RadialDistribution (4 scaled rings) per stain, of Cells;
- Correlation per pair of stains, each pair once: Pearson correlation and slope, Manders, rank-weighted
  colocalisation (RWC), Overlap and K (the ``_2`` coefficients name the pair reversed, as CellProfiler).

Left out or changed, and why. Seconds are per generated site of 64 / 256 px (~20 cells) on one core
(:func:`rxray.features.benchmark.benchmark_sites` with :func:`left_out_measurements`, on a 2-core
machine another job shared; a whole profile as kept costs 0.68 / 1.5 s, segmentation included):

- Costes' automatic-threshold Manders: 4.4 / 3.8 s, more than the whole kept profile; Manders is kept.
- 256 grey levels for texture (CellProfiler 3+): 0.43 / 0.72 s against 0.18 / 0.20 s at 16. Objects of
  10-300 px leave a 256 x 256 co-occurrence matrix almost empty: on planted ER-texture, actin-fibre
  and mitochondria phenotypes (12 + 12 sites of 64 px, texture at 3 px) 16 levels moved more texture
  features past |d| = 2 (43-48 of 312 against 32-38) with the same largest effects.
- Texture at CellProfiler's 3 px: that is for nuclei ~35 px across (RxRx2 at 1024 px); a 64 px
  site's nuclei are 4 px across and have no pixel pairs 3 px apart, so the scale follows the nucleus.
- Granularity of Nuclei and Cytoplasm: 0.10 / 0.38 s. The spectrum comes from whole-image openings;
  per object it is the same spectrum pooled over other masks, and granularity moved the planted
  punctate phenotypes little (largest |d| 1.5-3.5 against >10 for intensity and texture).
- RadialDistribution of Nuclei and Cytoplasm: 0.09 / 0.45 s. The Cell Painting protocol measures it on
  cells; a cytoplasm's centre (its point farthest from its edge) lies in the ring, so its rings are
  not radial, and a 4 px nucleus has no room for 4 rings.
- Intensity Zernikes of RadialDistribution (0.08 / 0.22 s) and AreaShape's advanced moments (spatial,
  central, normalised, Hu, inertia; 0.06 / 0.07 s): off in CellProfiler by default, and spatial
  moments depend on where the object is.
- Positions (``Location_*``, ``AreaShape_Center_*``, ``AreaShape_BoundingBoxM*``): where a cell sits
  is no phenotype, and their median over a site is the middle of the field.
- Image-level measurements, MeasureObjectNeighbors and MeasureObjectOverlap: a profile is the median
  of single-object measurements.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Callable

import numpy as np
import scipy.ndimage as ndi
from cp_measure.core import (
    measurecolocalization,
    measuregranularity,
    measureobjectintensity,
    measureobjectintensitydistribution,
    measureobjectsizeshape,
    measuretexture,
)
from skimage.segmentation import relabel_sequential

from rxray.layout import CHANNEL_TARGETS

# Short stain names, from the stains' targets in rxray.layout (w1..w6).
_SHORT_NAMES = {"nuclei": "DNA", "ER": "ER", "actin": "Actin", "nucleoli/RNA": "RNA",
                "mitochondria": "Mito", "Golgi/membrane": "Golgi"}
STAIN_NAMES: tuple[str, ...] = tuple(_SHORT_NAMES[target] for target in CHANNEL_TARGETS)
OBJECT_NAMES = ("Nuclei", "Cells", "Cytoplasm")
TEXTURE_GRAY_LEVELS = 16
TEXTURE_SCALE_PER_DIAMETER = 1.0 / 12.0
_POSITIONS = ("Location_", "Center_", "BoundingBoxMinimum_", "BoundingBoxMaximum_")

Measure = Callable[..., dict[str, np.ndarray]]


@dataclass(frozen=True)
class Measurement:
    """One cp_measure measurement: how it is called (per object, stain or stain pair) and named."""

    name: str
    kind: str  # "shape": once per object class; "stain": per stain; "pair": per pair of stains
    function: Measure
    prefix: str = ""  # CellProfiler's measurement name, where cp_measure's keys lack it
    objects: tuple[str, ...] = OBJECT_NAMES  # the object classes it is measured on


def _overlap_or_nan(pixels_1: np.ndarray, pixels_2: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """cp_measure's Overlap and K, NaN for an object where a stain is 0 throughout (cp_measure raises there)."""
    try:
        return measurecolocalization.get_correlation_overlap(pixels_1, pixels_2, masks)
    except ZeroDivisionError:  # its sums are Python floats, so 0/0 raises instead of giving NaN
        pass
    rows = []
    for label, box in enumerate(ndi.find_objects(masks), start=1):
        one = (masks[box] == label).astype(np.int32)
        try:
            rows.append({k: v[0] for k, v in measurecolocalization.get_correlation_overlap(
                pixels_1[box], pixels_2[box], one).items()})
        except ZeroDivisionError:
            rows.append(None)
    keys = next((row.keys() for row in rows if row), ("Correlation_Overlap", "Correlation_K_1", "Correlation_K_2"))
    return {key: np.array([row[key] if row else np.nan for row in rows]) for key in keys}


def texture_scale(nucleus_diameter: float) -> int:
    """Haralick pixel distance for nuclei of this diameter: CellProfiler's 3 px at ~35 px (RxRx2, 1024 px)."""
    return max(1, round(nucleus_diameter * TEXTURE_SCALE_PER_DIAMETER))


@lru_cache(maxsize=None)
def default_measurements(texture_scale: int = 3) -> tuple[Measurement, ...]:
    """The measurements of a profile (see the module docstring), Haralick texture at ``texture_scale`` px."""
    texture = partial(measuretexture.get_texture, scale=texture_scale, gray_levels=TEXTURE_GRAY_LEVELS)
    return (
        Measurement("sizeshape", "shape", partial(measureobjectsizeshape.get_sizeshape, calculate_advanced=False),
                    "AreaShape"),
        Measurement("zernike", "shape", measureobjectsizeshape.get_zernike, "AreaShape"),
        Measurement("feret", "shape", measureobjectsizeshape.get_feret, "AreaShape"),
        Measurement("intensity", "stain", measureobjectintensity.get_intensity),
        Measurement("texture", "stain", texture, "Texture"),
        Measurement("granularity", "stain", measuregranularity.get_granularity, objects=("Cells",)),
        Measurement("radial_distribution", "stain", measureobjectintensitydistribution.get_radial_distribution,
                    objects=("Cells",)),
        Measurement("pearson", "pair", measurecolocalization.get_correlation_pearson),
        Measurement("manders", "pair", measurecolocalization.get_correlation_manders_fold),
        Measurement("rwc", "pair", measurecolocalization.get_correlation_rwc),
        Measurement("overlap", "pair", _overlap_or_nan),
    )


@lru_cache(maxsize=None)
def left_out_measurements(texture_scale: int = 3) -> tuple[Measurement, ...]:
    """CellProfiler's measurements a profile leaves out (see the module docstring), to time them."""
    return (
        Measurement("costes", "pair", partial(measurecolocalization.get_correlation_costes, scale_max=255)),
        Measurement("texture_256_levels", "stain", partial(measuretexture.get_texture, scale=texture_scale), "Texture"),
        Measurement("granularity_nuclei_cytoplasm", "stain", measuregranularity.get_granularity,
                    objects=("Nuclei", "Cytoplasm")),
        Measurement("radial_distribution_nuclei_cytoplasm", "stain",
                    measureobjectintensitydistribution.get_radial_distribution, objects=("Nuclei", "Cytoplasm")),
        Measurement("radial_zernikes", "stain", measureobjectintensitydistribution.get_radial_zernikes),
        Measurement("sizeshape_advanced", "shape", measureobjectsizeshape.get_sizeshape, "AreaShape"),
    )


def stain_feature_name(key: str, stain: str, prefix: str = "") -> str:
    """CellProfiler's name of a per-stain feature: the stain follows the feature, before its parameters.

    ``Intensity_MeanIntensity`` -> ``Intensity_MeanIntensity_DNA``; ``Granularity_1`` ->
    ``Granularity_1_DNA``; ``RadialDistribution_FracAtD_1of4`` -> ``RadialDistribution_FracAtD_DNA_1of4``;
    ``Contrast_3_00_256`` (prefix ``Texture``) -> ``Texture_Contrast_DNA_3_00_256``.
    """
    parts = ([prefix] if prefix else []) + key.split("_")
    return "_".join(parts[:2] + [stain] + parts[2:])


def pair_feature_name(key: str, first: str, second: str) -> str:
    """CellProfiler's name of a correlation feature of two stains; ``_2`` results name the pair reversed.

    ``Correlation_Pearson`` -> ``Correlation_Correlation_DNA_ER``; ``Correlation_Manders_1`` ->
    ``Correlation_Manders_DNA_ER``; ``Correlation_Manders_2`` -> ``Correlation_Manders_ER_DNA``.
    """
    measurement, feature, *which = key.split("_")
    feature = "Correlation" if feature == "Pearson" else feature
    a, b = (second, first) if which == ["2"] else (first, second)
    return f"{measurement}_{feature}_{a}_{b}"


def _is_position(key: str) -> bool:
    """True for features that say where an object is, not what it looks like."""
    return any(key.startswith(p) or f"_{p}" in key for p in _POSITIONS)


def _run(measurement: Measurement, labels: np.ndarray, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """One measurement of every object in ``labels`` (contiguous 1..N) on (6, S, S) pixels, CellProfiler-named."""
    named: dict[str, np.ndarray] = {}
    if measurement.kind == "shape":
        for key, values in measurement.function(labels, None).items():
            named[f"{measurement.prefix}_{key}" if measurement.prefix else key] = values
    elif measurement.kind == "stain":
        for stain, plane in zip(STAIN_NAMES, pixels):
            for key, values in measurement.function(labels, plane).items():
                named[stain_feature_name(key, stain, measurement.prefix)] = values
    else:
        for (i, first), (j, second) in itertools.combinations(enumerate(STAIN_NAMES), 2):
            for key, values in measurement.function(pixels[i], pixels[j], labels).items():
                named[pair_feature_name(key, first, second)] = values
    return {key: np.asarray(values, dtype=np.float64) for key, values in named.items() if not _is_position(key)}


def measure_objects(object_name: str, labels: np.ndarray, pixels: np.ndarray,
                    measurements: tuple[Measurement, ...] | None = None,
                    timings: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Per-object features ``{<Object>_<name>: values}`` of one label image on (6, S, S) pixels in [0, 1].

    Labels need not be contiguous; an image without objects gives an empty dict. ``measurements``
    defaults to :func:`default_measurements`; ``timings``, when given, accumulates each
    measurement's seconds under its name.
    """
    measurements = measurements or default_measurements()
    labels = relabel_sequential(np.asarray(labels))[0]
    if not labels.any():
        return {}
    features: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        # Degenerate objects (one pixel, no texture pairs, zero variance) give NaN with a warning each.
        warnings.simplefilter("ignore", RuntimeWarning)
        for measurement in measurements:
            if object_name not in measurement.objects:
                continue
            start = time.perf_counter()
            for key, values in _run(measurement, labels, pixels).items():
                features[f"{object_name}_{key}"] = values
            if timings is not None:
                timings[measurement.name] = timings.get(measurement.name, 0.0) + time.perf_counter() - start
    return features
