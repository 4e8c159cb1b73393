"""Cell Painting-like images of one site: cells, six stains, optics and camera noise.

A site is drawn in field units (the field of view is 1 x 1), so the same biology
renders at any pixel size. Cells are seeded at random, their territories are the
Voronoi cells of the seeds (one distance transform), and every stain is computed
per pixel from each pixel's own cell (a gather), or as blurred point sources for
punctate organelles (nucleoli, mitochondria, Golgi). No Python loop runs over cells
or pixels: a 256 px site costs ~30 ms of one CPU core, PNG encoding included.

Stains follow RxRx1/RxRx2 (w1..w6): Hoechst nuclei, ConA ER, phalloidin actin,
SYTO14 nucleoli/RNA, MitoTracker mitochondria, WGA Golgi/membrane.
:func:`embed_site` turns a rendered site into the 128 numbers of ``embeddings.csv``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import cv2
import numpy as np

from rxray.layout import EMBEDDING_DIM, N_CHANNELS

N_STAINS = N_CHANNELS
NUCLEI, ER, ACTIN, RNA, MITO, GOLGI = range(N_STAINS)

# Cells may sit this far (field units) beyond each border, so cells are cut at the image edge.
FIELD_PAD = 0.12
CELL_RADIUS = 0.085
PHOTONS_PER_LEVEL = 1.5  # shot noise: variance of a pixel is its mean grey level / this
READ_NOISE = 1.2  # grey levels


@dataclass(frozen=True)
class Morphology:
    """What the cells of one site look like before acquisition (field units, grey levels)."""

    cells_per_field: float = 24.0
    nucleus_radius: float = 0.034
    nucleus_brightness: float = 115.0
    er_brightness: float = 48.0
    er_texture: float = 0.45
    actin_brightness: float = 42.0
    actin_fibre_contrast: float = 0.55
    rna_brightness: float = 18.0
    nucleoli_brightness: float = 80.0
    mito_brightness: float = 60.0
    mito_spread: float = 1.0
    golgi_brightness: float = 90.0
    golgi_size: float = 1.0
    membrane_brightness: float = 26.0


# Effect kind -> (primary stain index, how a signed strength s changes the morphology).
# Multiplicative factors are exp(k * s) so any strength keeps quantities positive.
EFFECTS = {
    "nuclear_size": (NUCLEI, lambda m, s: dict(nucleus_radius=m.nucleus_radius * math.exp(0.35 * s))),
    "nuclear_intensity": (NUCLEI, lambda m, s: dict(nucleus_brightness=m.nucleus_brightness * math.exp(0.6 * s))),
    "cell_count": (NUCLEI, lambda m, s: dict(cells_per_field=m.cells_per_field * math.exp(0.7 * s))),
    "er_texture": (ER, lambda m, s: dict(er_texture=float(np.clip(m.er_texture + 0.5 * s, 0.05, 1.5)),
                                         er_brightness=m.er_brightness * math.exp(0.35 * s))),
    "actin_fibres": (ACTIN, lambda m, s: dict(
        actin_brightness=m.actin_brightness * math.exp(0.6 * s),
        actin_fibre_contrast=float(np.clip(m.actin_fibre_contrast + 0.3 * s, 0.05, 0.95)))),
    "nucleoli": (RNA, lambda m, s: dict(nucleoli_brightness=m.nucleoli_brightness * math.exp(0.9 * s))),
    "mito_clumping": (MITO, lambda m, s: dict(mito_brightness=m.mito_brightness * math.exp(0.5 * s),
                                              mito_spread=m.mito_spread * math.exp(-0.8 * s))),
    "golgi": (GOLGI, lambda m, s: dict(golgi_brightness=m.golgi_brightness * math.exp(0.6 * s),
                                       golgi_size=m.golgi_size * math.exp(0.3 * s))),
    "rna_content": (RNA, lambda m, s: dict(rna_brightness=m.rna_brightness * math.exp(0.6 * s))),
    "membrane": (GOLGI, lambda m, s: dict(membrane_brightness=m.membrane_brightness * math.exp(1.0 * s))),
}


def effect_channel(kind: str) -> int:
    """0-based stain index (w1 = 0) that an effect kind changes most."""
    return EFFECTS[kind][0]


def with_effect(morph: Morphology, kind: str, strength: float) -> Morphology:
    """The morphology after a phenotype of the given kind and signed strength (0 = no change)."""
    if strength == 0.0:
        return morph
    return dataclasses.replace(morph, **EFFECTS[kind][1](morph, strength))


def with_effects(morph: Morphology, effects: Iterable[tuple[str, float]]) -> Morphology:
    """The morphology after several (kind, strength) effects, applied in turn.

    Each effect acts on the morphology the previous ones left, so effects on one
    field compose: multiplicative factors multiply, additive shifts add (then clip).
    """
    for kind, strength in effects:
        morph = with_effect(morph, kind, strength)
    return morph


@dataclass(frozen=True)
class Acquisition:
    """How one site is imaged: per-stain gain and offset, illumination gradient and vignetting."""

    gain: tuple[float, ...] = (1.0,) * N_STAINS
    offset: tuple[float, ...] = (6.0,) * N_STAINS
    gradient: float = 0.0  # relative brightness change from the field centre to its edge
    gradient_angle: float = 0.0
    vignetting: float = 0.0  # relative loss in the corners


@lru_cache(maxsize=8)
def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre x and y coordinates (float32, in pixels)."""
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.broadcast_to(coords[None, :], (size, size)), np.broadcast_to(coords[:, None], (size, size))


def _splat(x: np.ndarray, y: np.ndarray, weights: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """Point sources blurred to Gaussian spots of `sigma` field units; a spot's flux is size-invariant."""
    ix, iy = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
    inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    flat = iy[inside] * size + ix[inside]
    canvas = np.bincount(flat, weights[inside], minlength=size * size).astype(np.float32).reshape(size, size)
    sigma_px = sigma * size
    # Tiny images clamp the blur to stay visible; the flux (peak x area) still follows the field size.
    return cv2.GaussianBlur(canvas, (0, 0), max(0.6, sigma_px)) * np.float32(2 * math.pi * sigma_px * sigma_px)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """A smooth random texture with zero mean and unit standard deviation."""
    field = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), sigma)
    return field / max(float(field.std()), 1e-6)


def _cell_points(rng, cells: dict, per_cell: np.ndarray, inner: float, outer: float,
                 angle_spread: float = math.pi, angle_centre: np.ndarray | None = None):
    """Random points in each cell, in pixels, at a depth between `inner` and `outer`.

    Depth 0 is the nucleus centre, 1 its edge and 2 the cell edge (both ellipses), so
    organelles stay inside their own cell whatever its shape.
    """
    owner = np.repeat(np.arange(per_cell.size), per_cell)
    centre = 0.0 if angle_centre is None else angle_centre[owner]
    alpha = centre + rng.uniform(-angle_spread, angle_spread, owner.size)
    depth = rng.uniform(inner, outer, owner.size)
    beyond = np.clip(depth - 1.0, 0.0, None)
    a, b = cells["a"][owner], cells["b"][owner]
    u = np.cos(alpha) * (a * np.minimum(depth, 1.0) + beyond * (cells["cell_a"][owner] - a))
    v = np.sin(alpha) * (b * np.minimum(depth, 1.0) + beyond * (cells["cell_b"][owner] - b))
    cos_t, sin_t = np.cos(cells["theta"][owner]), np.sin(cells["theta"][owner])
    return cells["x"][owner] + u * cos_t - v * sin_t, cells["y"][owner] + u * sin_t + v * cos_t, owner


def _sample_cells(rng: np.random.Generator, morph: Morphology, size: int) -> dict:
    """Random cell positions, shapes and per-cell stain brightness, in pixels."""
    span = (1 + 2 * FIELD_PAD) ** 2
    n = int(rng.poisson(morph.cells_per_field * span))
    x, y = rng.uniform(-FIELD_PAD * size, (1 + FIELD_PAD) * size, (2, n))
    nucleus_a = morph.nucleus_radius * size * rng.lognormal(0.0, 0.12, n)
    nucleus_b = nucleus_a * rng.uniform(0.65, 0.95, n)
    cell_a = np.maximum(CELL_RADIUS * size * rng.lognormal(0.25, 0.15, n), 1.4 * nucleus_a)
    cell_b = np.maximum(cell_a / rng.uniform(1.2, 2.0, n), 1.4 * nucleus_b)
    return dict(x=x, y=y, theta=rng.uniform(0, math.pi, n), a=nucleus_a, b=nucleus_b,
                cell_a=cell_a, cell_b=cell_b, phase=rng.uniform(0, 2 * math.pi, n),
                brightness=rng.lognormal(0.0, 0.18, (N_STAINS, n)))


def _territories(cells: dict, size: int) -> np.ndarray:
    """Index of the cell owning each pixel (nearest seed: a Voronoi tessellation)."""
    pad = int(math.ceil(FIELD_PAD * size)) + 1
    grid = size + 2 * pad
    ix = np.clip(np.round(cells["x"]).astype(np.int64) + pad, 0, grid - 1)
    iy = np.clip(np.round(cells["y"]).astype(np.int64) + pad, 0, grid - 1)
    seeds = np.ones((grid, grid), np.uint8)
    seeds[iy, ix] = 0
    _, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_PIXEL)
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    lut[labels[iy, ix]] = np.arange(ix.size)  # two seeds on one pixel: the later one owns it
    return lut[labels[pad:pad + size, pad:pad + size]]


def render_site(rng: np.random.Generator, morph: Morphology, acq: Acquisition, size: int) -> np.ndarray:
    """One site as uint8 (6, size, size) in w1..w6 order."""
    cells = _sample_cells(rng, morph, size)
    texture = _smooth_noise(rng, size, max(0.7, 0.004 * size))
    stains = np.zeros((N_STAINS, size, size), np.float32)
    if cells["x"].size:
        _draw_cells(rng, cells, morph, texture, stains)
    psf = max(0.5, 0.0022 * size)
    for c in range(N_STAINS):
        stains[c] = cv2.GaussianBlur(stains[c], (0, 0), psf)
    return _acquire(rng, stains, acq)


def _draw_cells(rng, cells: dict, morph: Morphology, texture: np.ndarray, stains: np.ndarray) -> None:
    """Add every stain of every cell to `stains` (6, S, S), in place."""
    size = stains.shape[-1]
    f32 = {k: np.asarray(v, np.float32) for k, v in cells.items()}
    owner = _territories(cells, size)
    grid_x, grid_y = _pixel_grid(size)
    dx, dy = grid_x - f32["x"][owner], grid_y - f32["y"][owner]
    cos_t, sin_t = np.cos(f32["theta"])[owner], np.sin(f32["theta"])[owner]
    u, v = dx * cos_t + dy * sin_t, dy * cos_t - dx * sin_t  # along / across the cell's long axis
    rho_nucleus = (u / f32["a"][owner]) ** 2 + (v / f32["b"][owner]) ** 2
    rho_cell = (u / f32["cell_a"][owner]) ** 2 + (v / f32["cell_b"][owner]) ** 2 + 0.06 * texture  # ragged edges
    nucleus = np.clip(4.0 * (1.0 - rho_nucleus), 0.0, 1.0)
    cell = np.clip(3.0 * (1.0 - rho_cell), 0.0, 1.0)
    cytoplasm = cell * (1.0 - nucleus)
    border = np.zeros((size, size), bool)  # where two territories meet: cell-cell contacts
    border[:, 1:] |= owner[:, 1:] != owner[:, :-1]
    border[1:, :] |= owner[1:, :] != owner[:-1, :]
    rim = np.clip(1.0 - np.abs(rho_cell - 0.9) * 8.0, 0.0, 1.0)
    membrane = cell * np.maximum(rim, border)
    bright = f32["brightness"]

    chromatin = 1.0 + 0.15 * texture[::-1]
    stains[NUCLEI] += nucleus * chromatin * (morph.nucleus_brightness * bright[NUCLEI][owner])
    er_texture = np.clip(1.0 + morph.er_texture * texture, 0.0, None)
    stains[ER] += cytoplasm * (1.3 - 0.7 * np.minimum(rho_cell, 1.0)) * er_texture * (
        morph.er_brightness * bright[ER][owner])
    period = max(2.5, 0.012 * size)
    stripe = 0.5 + 0.5 * np.cos(v * np.float32(2 * math.pi / period) + (f32["phase"][owner] + 1.2 * texture))
    fibres = (1.0 - morph.actin_fibre_contrast) + morph.actin_fibre_contrast * (stripe * stripe / 0.375)
    actin = morph.actin_brightness * bright[ACTIN][owner]
    stains[ACTIN] += (cell * fibres + 0.8 * membrane) * actin
    stains[RNA] += (cytoplasm + 1.4 * nucleus) * (morph.rna_brightness * bright[RNA][owner])
    stains[MITO] += cytoplasm * (0.12 * morph.mito_brightness)
    stains[GOLGI] += membrane * (morph.membrane_brightness * bright[GOLGI][owner])

    n = cells["x"].size
    mean_nucleus = float(np.mean(cells["a"])) / size  # field units
    # Nucleoli: a few bright spots inside each nucleus.
    x, y, who = _cell_points(rng, cells, 1 + rng.poisson(2.0, n), 0.0, 0.5)
    stains[RNA] += _splat(x, y, morph.nucleoli_brightness * rng.lognormal(0, 0.3, who.size), size,
                          0.22 * mean_nucleus)
    # Mitochondria: puncta between nucleus and cell edge; clumping pulls them to the nucleus.
    x, y, who = _cell_points(rng, cells, rng.poisson(40, n), 1.05, 1.05 + 0.9 * min(morph.mito_spread, 1.0))
    stains[MITO] += _splat(x, y, morph.mito_brightness * rng.lognormal(0, 0.35, who.size), size,
                           0.0032)
    # Golgi: a compact cap on one side of the nucleus, sized from the untreated nucleus so that
    # nuclear-size phenotypes do not leak into w6.
    cap_angle = rng.uniform(-math.pi, math.pi, n)
    x, y, who = _cell_points(rng, cells, rng.poisson(6, n) + 1, 1.0, 1.0 + 0.25 * morph.golgi_size,
                             angle_spread=0.6 * morph.golgi_size, angle_centre=cap_angle)
    stains[GOLGI] += _splat(x, y, morph.golgi_brightness * rng.lognormal(0, 0.3, who.size), size,
                            0.12 * Morphology.nucleus_radius * morph.golgi_size)


def _acquire(rng: np.random.Generator, stains: np.ndarray, acq: Acquisition) -> np.ndarray:
    """Gain, offset, uneven illumination and shot/read noise, quantised to 8 bits."""
    size = stains.shape[-1]
    grid_x, grid_y = _pixel_grid(size)
    xn, yn = grid_x / size - 0.5, grid_y / size - 0.5
    illumination = (1.0 + 2.0 * acq.gradient * (xn * math.cos(acq.gradient_angle) + yn * math.sin(acq.gradient_angle))
                    - 2.0 * acq.vignetting * (xn * xn + yn * yn))
    gain = np.asarray(acq.gain, np.float32)[:, None, None]
    offset = np.asarray(acq.offset, np.float32)[:, None, None]
    signal = stains * (gain * illumination) + offset
    np.maximum(signal, 0.0, out=signal)
    # Gaussian approximation of Poisson shot noise plus read noise (exact Poisson is ~10x slower).
    noise_sd = np.sqrt(signal * np.float32(1.0 / PHOTONS_PER_LEVEL) + np.float32(READ_NOISE ** 2))
    signal += noise_sd * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.clip(signal + 0.5, 0, 255).astype(np.uint8)


@lru_cache(maxsize=1)
def _projection() -> np.ndarray:
    """Fixed random projection of the hand-crafted features to 128-d (the same for every dataset)."""
    n_features = N_STAINS * 9 + N_STAINS * (N_STAINS - 1) // 2
    rng = np.random.default_rng(20240601)
    return (rng.standard_normal((n_features, EMBEDDING_DIM)) / math.sqrt(n_features)).astype(np.float64)


def site_features(image: np.ndarray) -> np.ndarray:
    """Hand-crafted features of a (6, S, S) uint8 site: per-stain intensity, texture, co-localisation."""
    features = []
    levels = np.arange(256)
    for stain in image:
        hist = np.bincount(stain.ravel(), minlength=256)
        cdf = np.cumsum(hist) / hist.sum()
        mean = float(hist @ levels) / hist.sum()
        std = math.sqrt(max(float(hist @ (levels - mean) ** 2) / hist.sum(), 0.0))
        p10, p50, p90, p99 = np.searchsorted(cdf, [0.10, 0.50, 0.90, 0.99])
        texture = float(np.abs(np.diff(stain.astype(np.int16), axis=1)).mean())
        features += [mean / 64, std / 64, p10 / 64, p50 / 64, p90 / 64, p99 / 64,
                     1 - cdf[30], 1 - cdf[80], texture / 16]
    sample = image[:, ::4, ::4].reshape(N_STAINS, -1).astype(np.float64)
    centred = sample - sample.mean(axis=1, keepdims=True)
    norm = np.sqrt((centred * centred).sum(axis=1))
    norm[norm == 0] = 1.0  # a flat stain correlates with nothing
    correlation = ((centred @ centred.T) / np.outer(norm, norm))[np.triu_indices(N_STAINS, 1)]
    return np.asarray(features + correlation.tolist())


def embed_site(image: np.ndarray) -> np.ndarray:
    """The 128-d embedding of one site (its features through the fixed projection)."""
    return site_features(image) @ _projection()
