"""The RxRx2 dataset layout: metadata schema, well names, site ids, image paths and the shard image column.

Everything that knows how RxRx2 names things lives here, so the generator, ingest
and every later step agree with the real dataset by construction.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

METADATA_COLUMNS = [
    "site_id",
    "well_id",
    "cell_type",
    "experiment",
    "plate",
    "well",
    "site",
    "treatment",
    "treatment_conc",
]
METADATA_FILE = "metadata.csv"
EMBEDDINGS_FILE = "embeddings.csv"
MOA_FILE = "moa.csv"  # treatment -> mechanism of action: written by `rxray synth`, the map's annotation
EMBEDDING_DIM = 128
IMAGE_COLUMN = "image"  # the (6, S, S) uint8 site image in ingest shards, beside the metadata columns
CONTROL = "EMPTY"

N_CHANNELS = 6
# RxRx1/RxRx2 stains, in w1..w6 order.
CHANNEL_NAMES = ["Hoechst", "ConA", "Phalloidin", "SYTO14", "MitoTracker", "WGA"]
CHANNEL_TARGETS = ["nuclei", "ER", "actin", "nucleoli/RNA", "mitochondria", "Golgi/membrane"]

# RxRx2 as released: 2 experiments x 12 plates of 1536-well plates, the 1,380 wells inside each plate's outer ring
# used, 4 sites each; 433 treatments in 3 wells per plate (72 wells, 288 sites each) and 81 EMPTY wells per plate,
# of whose 7,776 sites 527 are missing: 131,953 sites. Four doses: with three wells per plate, every plate gets a
# different run of the ladder (a ladder of six would put the top three doses on alternate plates only).
RXRX2_LAYOUT = dict(experiments=2, plates=12, wells=1380, controls=81, sites=4, treatments=433, doses=4,
                    missing_sites=527, rim_wells=False)

# 1536-well plates: 32 rows (A..Z, AA..AF) x 48 columns (01..48).
PLATE_ROWS = [chr(ord("A") + i) for i in range(26)] + ["A" + chr(ord("A") + i) for i in range(6)]
PLATE_COLUMNS = 48
_WELL_RE = re.compile(r"^(A[A-F]|[A-Z])(\d{2})$")

TREATMENT_GROUPS = {
    "interferons": ["IFN-alpha-A", "IFN-beta", "IFN-gamma", "IFN-omega"],
}


def well_name(row: int, column: int) -> str:
    """Name of the well at 0-based (row, column) on a 1536-well plate, e.g. (26, 2) -> 'AA03'."""
    if not 0 <= row < len(PLATE_ROWS) or not 0 <= column < PLATE_COLUMNS:
        raise ValueError(f"well ({row}, {column}) is outside a 1536-well plate")
    return f"{PLATE_ROWS[row]}{column + 1:02d}"


def parse_well(well: str) -> tuple[int, int]:
    """0-based (row, column) of a 1536-well name such as 'AA03'; ValueError if invalid."""
    match = _WELL_RE.match(well)
    if not match:
        raise ValueError(f"invalid 1536-well name {well!r}")
    row = PLATE_ROWS.index(match.group(1))
    column = int(match.group(2)) - 1
    if not 0 <= column < PLATE_COLUMNS:
        raise ValueError(f"invalid 1536-well name {well!r}")
    return row, column


def is_edge_well(well: str) -> bool:
    """True for wells on the outer ring of the plate, where evaporation effects are strongest."""
    row, column = parse_well(well)
    return row in (0, len(PLATE_ROWS) - 1) or column in (0, PLATE_COLUMNS - 1)


def well_positions(rim: bool = False) -> list[int]:
    """0-based positions (row * 48 + column) of the wells a screen uses: inside the outer ring, as RxRx2's 1,380
    (1,536 minus the ring's 156, which evaporation spoils), or every well with ``rim``."""
    return [p for p in range(len(PLATE_ROWS) * PLATE_COLUMNS)
            if rim or not is_edge_well(well_name(*divmod(p, PLATE_COLUMNS)))]


def make_well_id(experiment: str, plate: int, well: str) -> str:
    """RxRx2 well id, e.g. 'HUVEC-1_1_AA03'."""
    return f"{experiment}_{plate}_{well}"


def plate_groups(experiments: Iterable[Any], plates: Iterable[Any]) -> np.ndarray:
    """The plate key of each row, ``<experiment>_<plate>`` (plate numbers repeat across experiments)."""
    return np.asarray([f"{experiment}_{plate}" for experiment, plate in zip(experiments, plates)], dtype=object)


RIM_GAIN_KEY = "@rim"  # in a gains mapping: the extra gain of rim wells over the plate's interior, per stain


def row_gains(gains: Mapping[str, Sequence[float]] | None, experiments: Sequence[Any],
              plates: Sequence[Any], wells: Sequence[Any] | None = None) -> np.ndarray:
    """Each row's plate gain per stain (n, 6) float32 from ``gains`` (keyed by plate group); 1 where none is known.

    With ``wells`` and a ``RIM_GAIN_KEY`` entry, rim wells also take that gain (evaporation at the plate's
    outer ring brightens every stain there).
    """
    gain = np.ones((len(experiments), N_CHANNELS), dtype=np.float32)
    if gains:
        for i, group in enumerate(plate_groups(experiments, plates)):
            gain[i] = gains.get(group, 1.0)
        if wells is not None and RIM_GAIN_KEY in gains:
            rim = np.fromiter((is_edge_well(str(w)) for w in wells), dtype=bool, count=len(gain))
            gain[rim] *= np.asarray(gains[RIM_GAIN_KEY], dtype=np.float32)
    return gain


def make_site_id(experiment: str, plate: int, well: str, site: int) -> str:
    """RxRx2 site id, e.g. 'HUVEC-1_1_AA03_1'."""
    return f"{make_well_id(experiment, plate, well)}_{site}"


def image_path(experiment: str, plate: int, well: str, site: int, channel: int) -> str:
    """Path of one channel PNG relative to the dataset root (channel is 1-based, w1..w6)."""
    return f"images/{experiment}/Plate{plate}/{well}_s{site}_w{channel}.png"


def site_image_paths(experiment: str, plate: int, well: str, site: int) -> list[str]:
    """The six channel paths of one site, in w1..w6 order."""
    return [image_path(experiment, plate, well, site, c) for c in range(1, N_CHANNELS + 1)]


_PATH_RE = re.compile(
    r"^images/(?P<experiment>[^/]+)/Plate(?P<plate>\d+)/"
    r"(?P<well>[A-Z]{1,2}\d{2})_s(?P<site>\d+)_w(?P<channel>\d)\.png$"
)


@dataclass(frozen=True)
class ImageKey:
    """The metadata encoded in one image path."""

    experiment: str
    plate: int
    well: str
    site: int
    channel: int


def parse_image_path(path: str) -> ImageKey:
    """Parse a relative image path back into its keys; ValueError if it is not RxRx2-shaped."""
    match = _PATH_RE.match(path)
    if not match:
        raise ValueError(f"not an RxRx2 image path: {path!r}")
    parse_well(match["well"])
    return ImageKey(
        experiment=match["experiment"],
        plate=int(match["plate"]),
        well=match["well"],
        site=int(match["site"]),
        channel=int(match["channel"]),
    )


def is_safe_component(value: str) -> bool:
    """True if a metadata value can be used inside a path without escaping the dataset root."""
    return bool(value) and "/" not in value and "\\" not in value and value not in (".", "..") and ".." not in value
