"""`rxray features`: CellProfiler profiles of every site by a Ray Data actor pool, selected and aggregated.

Each actor (:class:`ProfileSites`) segments and measures the sites of its shard batches
(:func:`rxray.features.profile.site_profile`) and Ray Data writes the rows straight to
Parquet, so no image passes through the driver. Then, as pycytominer does for a
CellProfiler run, but without ever loading every site on one machine:

1. **select** (pycytominer ``feature_select``: variance, correlation and NaN filters, and
   its blocklist) on a seeded sample of at most ``select_sites`` sites, which also gives
   each kept feature's mean and standard deviation;
2. **profiles**: every site's kept features, standardised with the sample's statistics
   (a scale, the same for every plate: batch correction is the scorer's job, identical
   for every representation), streamed through Ray Data;
3. **wells**: the median of each well's sites (pycytominer ``aggregate``'s default),
   grouped in the step's process up to ``DRIVER_WELL_SITES`` sites, by Ray Data above.

Output layout under ``out``, every column named in CellProfiler's conventions (shard
columns as ``Metadata_<name>``, features as ``<Object>_<Measurement>_<Feature>_<Stain>``),
so pycytominer and copairs read them as they are:

- ``sites/*.parquet``: every feature of every site, ``Metadata_no_cells`` and ``Cells_Count``;
- ``profiles/*.parquet``: the selected, standardised features: what ``rxray score`` reads;
- ``wells/*.parquet``: per-well medians of the profiles and ``Metadata_n_sites``;
- ``selection.json``: the kept features with their mean and standard deviation, and how many
  pycytominer's operations dropped;
- ``_manifest.json``: written last.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from rxray import storage
from rxray.batch.pool import PoolPlan, map_batches
from rxray.config import FeaturesConfig
from rxray.data.shards import IMAGE_COLUMN, images_from_table, open_shards, read_shards
from rxray.errors import StepFailed
from rxray.evaluate.profiles import CP_METADATA_PREFIX as METADATA_PREFIX
from rxray.outputs import read_manifest
from rxray.results import FeaturesResult
from rxray.runner import step_function
from rxray.runtime import Timer, ensure_ray, wait_for_a_free_cpu

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa
    import ray.data

SITES_DIR, PROFILES_DIR, WELLS_DIR = "sites", "profiles", "wells"
SELECTION_FILE = "selection.json"
WELL_KEYS = ("experiment", "plate", "well_id")  # a well, wherever well ids repeat across plates
NO_CELLS_COLUMN = f"{METADATA_PREFIX}no_cells"
SITE_COLUMNS = (f"{METADATA_PREFIX}site_id", f"{METADATA_PREFIX}site")  # differ between a well's sites
SITES_PER_PARTITION = 50_000  # of the well medians' hash shuffle
DRIVER_WELL_SITES = 20_000  # up to this many sites, the well medians are computed in the step's own process
SELECT_OPERATIONS = ["variance_threshold", "correlation_threshold", "drop_na_columns", "blocklist"]


def metadata_name(column: str) -> str:
    """A shard column as CellProfiler's conventions name metadata: ``plate`` -> ``Metadata_plate``."""
    return column if column.startswith(METADATA_PREFIX) else f"{METADATA_PREFIX}{column}"


def is_feature(column: str) -> bool:
    """True for a feature column (anything that is not ``Metadata_``), as pycytominer's inference has it."""
    return not column.startswith(METADATA_PREFIX)


# --------------------------------------------------------------------------- the actor


class ProfileSites:
    """Ray Data callable class: shard batch in, one CellProfiler profile per site out (no image).

    ``gpu`` is accepted for the shared pool's call and must be False: segmentation and
    cp_measure run on CPUs. ``threads`` caps the numeric libraries' threads per actor.
    """

    def __init__(self, measurements: tuple[str, ...], size: int, nucleus_diameter: float | None = None,
                 gpu: bool = False, threads: int | None = None):
        from threadpoolctl import threadpool_limits

        from rxray.features.profile import profile_columns

        if gpu:
            raise ValueError("CellProfiler features run on CPUs")
        self._limits = threadpool_limits(limits=threads or 1)
        self.nucleus_diameter = nucleus_diameter
        self.measurements = chosen_measurements(measurements, size, nucleus_diameter)
        self.columns = profile_columns(size, nucleus_diameter, self.measurements)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's other columns as ``Metadata_<name>``, then every profile column (float32)."""
        from rxray.features.profile import site_profile

        rows = [site_profile(image, self.nucleus_diameter, self.measurements) for image in batch[IMAGE_COLUMN]]
        out = {metadata_name(name): values for name, values in batch.items() if name != IMAGE_COLUMN}
        for name in self.columns:
            out[name] = np.array([row[name] for row in rows], dtype=np.float32)
        return out


def chosen_measurements(names: tuple[str, ...] | list[str], size: int, nucleus_diameter: float | None):
    """The default measurements for S x S sites whose names are in ``names``, in their fixed order."""
    from rxray.features.profile import measurements_for

    return tuple(m for m in measurements_for(size, nucleus_diameter) if m.name in set(names))


# --------------------------------------------------------------------------- selection and standardisation


def select_features(sample: "pd.DataFrame") -> dict[str, Any]:
    """pycytominer's feature selection on a sample of site profiles: kept features with mean and std, and drops.

    The no-cells flag is metadata; a kept feature has a finite, non-zero standard
    deviation on the sample (else it carries nothing once standardised).
    """
    from pycytominer import feature_select

    features = [c for c in sample.columns if is_feature(c)]
    selected = feature_select(sample, features=features, operation=SELECT_OPERATIONS)
    kept = [c for c in selected.columns if is_feature(c)]
    values = sample[kept].to_numpy(np.float64)
    mean, std = np.nanmean(values, axis=0), np.nanstd(values, axis=0)
    usable = np.isfinite(std) & (std > 0)
    kept = [name for name, ok in zip(kept, usable) if ok]
    return {"sample_sites": int(len(sample)), "features_in": len(features), "kept": kept,
            "mean": [float(v) for v in mean[usable]], "std": [float(v) for v in std[usable]],
            "operations": SELECT_OPERATIONS, "dropped": len(features) - len(kept)}


def standardise(batch: "pa.Table", selection: dict[str, Any]) -> "pa.Table":
    """A batch's metadata columns as they are and its selected features as (x - mean) / std (float32)."""
    import pyarrow as pa

    kept = selection["kept"]
    values = np.column_stack([batch.column(name).to_numpy(zero_copy_only=False) for name in kept]).astype(np.float32)
    values = (values - np.asarray(selection["mean"], np.float32)) / np.asarray(selection["std"], np.float32)
    metadata = [name for name in batch.column_names if not is_feature(name)]
    return pa.table({**{name: batch.column(name) for name in metadata},
                     **{name: pa.array(values[:, k]) for k, name in enumerate(kept)}})


def well_median(group: "pa.Table") -> "pa.Table":
    """One well's profile: pycytominer ``aggregate``'s median of its sites, its metadata, its site count."""
    import warnings

    import pyarrow as pa

    metadata = [name for name in group.column_names if not is_feature(name) and name not in SITE_COLUMNS]
    features = [name for name in group.column_names if is_feature(name)]
    values = np.column_stack([group.column(name).to_numpy(zero_copy_only=False) for name in features])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature undefined on every site of the well: NaN
        medians = np.nanmedian(values.astype(np.float64), axis=0).astype(np.float32)
    return pa.table({**{name: group.column(name).slice(0, 1) for name in metadata},
                     f"{METADATA_PREFIX}n_sites": pa.array([group.num_rows], pa.int64()),
                     **{name: pa.array(medians[k:k + 1]) for k, name in enumerate(features)}})


def write_well_medians(profiles_uri: str, wells_uri: str, rows: int) -> None:
    """The well medians of a profiles table, by :func:`well_median` per well.

    Up to ``DRIVER_WELL_SITES`` sites they are grouped here (a sort, then slices; 6 s for 768
    sites of 971 features): Ray Data's shuffle and write cost 8-60 s of fixed overhead on a
    demo's few hundred sites with 100-1,000 feature columns. Above it Ray Data groups them
    (one hash partition per ``SITES_PER_PARTITION`` sites), so this process never holds more
    than that many sites.
    """
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq
    import ray

    keys = [metadata_name(k) for k in WELL_KEYS]
    if rows <= DRIVER_WELL_SITES:
        fs, path = storage.pyarrow_filesystem(profiles_uri)
        table = pads.dataset(path, filesystem=fs, format="parquet").to_table().sort_by([(k, "ascending") for k in keys])
        wells = pa.concat_tables([well_median(table.slice(start, length)) for start, length in _runs(table, keys)])
        fs, path = storage.pyarrow_filesystem(wells_uri)
        fs.create_dir(path, recursive=True)
        pq.write_table(wells, f"{path}/part-000000.parquet", filesystem=fs, compression="zstd")
        return
    partitions = max(1, min(int(ray.cluster_resources().get("CPU", 1)), rows // SITES_PER_PARTITION))
    wells = read_shards(profiles_uri).groupby(keys, num_partitions=partitions)
    _write(wells.map_groups(well_median, batch_format="pyarrow"), wells_uri)


def _runs(table: "pa.Table", keys: list[str]) -> list[tuple[int, int]]:
    """(start, length) of each run of equal keys in a table sorted by them."""
    if table.num_rows == 0:
        return []
    codes = np.zeros(table.num_rows, dtype=bool)
    for key in keys:
        column = table.column(key).to_numpy(zero_copy_only=False)
        codes[1:] |= column[1:] != column[:-1]
    starts = np.flatnonzero(np.concatenate([[True], codes[1:]]))
    return [(int(a), int(b - a)) for a, b in zip(starts, [*starts[1:], table.num_rows])]


# --------------------------------------------------------------------------- the step


def _pool(actors: int | None) -> PoolPlan:
    """One single-threaded actor per CPU (or ``actors``), each reserving half a logical CPU.

    Segmentation and cp_measure are single-threaded Python and NumPy, so an actor keeps one
    core busy; half a reservation each leaves half the cluster's CPU slots to the read and
    write tasks the streaming pipeline needs beside them.
    """
    import ray

    return PoolPlan(actors=actors or max(1, int(ray.cluster_resources().get("CPU", 1))), threads=1,
                    cpus_per_actor=0.5)


def _site_size(uri: str, shards: "ray.data.Dataset") -> int:
    """The side S of the shards' (6, S, S) images: the ingest manifest's image shape, else their first row."""
    shape = ((read_manifest(uri) or {}).get("image_shape") or [None])[-1]
    return int(shape) if shape else int(images_from_table(shards.take_batch(1, batch_format="pyarrow")).shape[-1])


def _local_table(uri: str, columns: list[str] | None = None) -> "pa.Table":
    """A Parquet folder read by pyarrow in this process (callers bound its size: a few columns, or few rows)."""
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=columns)


def _sample_sites(sites_uri: str, rows: int, limit: int, seed: int) -> "pd.DataFrame":
    """At most about ``limit`` seeded-random site rows as pandas with NumPy dtypes (every row when there are fewer)."""
    import pyarrow as pa
    import ray

    if rows <= limit:
        return _local_table(sites_uri).to_pandas()
    sample = read_shards(sites_uri).random_sample(limit / rows, seed=seed)
    # Through Arrow: Ray's own to_pandas may give Arrow-backed columns, which pycytominer's NumPy checks refuse.
    return pa.concat_tables(ray.get(sample.to_arrow_refs())).to_pandas()


def _write(dataset: "ray.data.Dataset", uri: str) -> None:
    fs, path = storage.pyarrow_filesystem(uri)
    dataset.write_parquet(path, filesystem=fs, compression="zstd")


@step_function("features")
def features(cfg: FeaturesConfig) -> FeaturesResult:
    """Profile every shard site with an actor pool, select and standardise features, aggregate wells."""
    import pyarrow.compute as pc

    from rxray.features.measure import STAIN_NAMES

    ensure_ray()
    timer, start = Timer(), time.perf_counter()
    shards, rows_in = open_shards(cfg.data, "features.data")
    size = _site_size(cfg.data, shards)
    measurements = chosen_measurements(cfg.measurements, size, cfg.nucleus_diameter)
    plan = _pool(cfg.actors)
    sites_uri, profiles_uri, wells_uri = (storage.join(cfg.out, name) for name in (SITES_DIR, PROFILES_DIR,
                                                                                   WELLS_DIR))
    # Blocks of one actor batch: an ingest shard is one block, and each actor queues several, so a few big
    # shards would all go to one actor while the others wait.
    shards = shards.repartition(target_num_rows_per_block=cfg.batch_size)
    profiled = map_batches(shards, ProfileSites, plan, batch_size=cfg.batch_size,
                           measurements=tuple(m.name for m in measurements), size=size,
                           nucleus_diameter=cfg.nucleus_diameter)
    print(f"features: profiling {rows_in} sites of {size} px ({', '.join(m.name for m in measurements)}) on "
          f"{plan.actors} actors", file=sys.stderr, flush=True)
    with timer.time("profile"):
        _write(profiled, sites_uri)
    wait_for_a_free_cpu()  # the profiling actors give their CPUs back: the next read would warn it "will hang"
    flags = _local_table(sites_uri, columns=[NO_CELLS_COLUMN]).column(NO_CELLS_COLUMN)  # 4 bytes a site
    rows_out = len(flags)
    if rows_out != rows_in:
        raise StepFailed(f"{rows_in} shard rows in but {rows_out} profiles written under {sites_uri}")
    print(f"features: {rows_out} sites profiled in {timer.seconds['profile']:.0f} s "
          f"({rows_out / timer.seconds['profile']:.1f}/s); selecting features, standardising, well medians",
          file=sys.stderr, flush=True)
    with timer.time("select"):
        sample = _sample_sites(sites_uri, rows_out, cfg.select_sites, cfg.seed)
        selection = select_features(sample)
        storage.write_text(storage.join(cfg.out, SELECTION_FILE), json.dumps(selection, indent=1))
    if not selection["kept"]:
        raise StepFailed(f"feature selection kept no feature of {selection['features_in']} (see {SELECTION_FILE})")
    no_cells = int(pc.sum(flags).as_py() or 0)
    with timer.time("profiles"):
        standardised = read_shards(sites_uri).map_batches(standardise, fn_kwargs={"selection": selection},
                                                          batch_format="pyarrow")
        _write(standardised, profiles_uri)
    with timer.time("wells"):
        write_well_medians(profiles_uri, wells_uri, rows_out)
    timer.seconds["total"] = round(time.perf_counter() - start, 3)
    return FeaturesResult(
        counts={"rows_in": rows_in, "rows_out": rows_out, "sample_sites": selection["sample_sites"],
                "sites_without_cells": no_cells},
        timings=timer.seconds, measurements=[m.name for m in measurements], stains=list(STAIN_NAMES),
        features_measured=selection["features_in"], features_kept=len(selection["kept"]), size=size,
        pool=plan.describe(cfg.batch_size),
        layout={"sites": PROFILES_DIR, "all_features": SITES_DIR, "wells": WELLS_DIR, "selection": SELECTION_FILE},
        sites_per_s=round(rows_out / timer.seconds["profile"], 2) if timer.seconds.get("profile") else None)
