"""The shard contract (DESIGN.md): how ingest output is laid out, written and read.

Under one output URI:

- ``part-NNNNNN.parquet``: zstd Parquet with the 9 metadata columns, any joined label
  columns, and ``image``: uint8 (6, S, S) per row, channels in w1..w6 order.
- ``_manifest.json``: config, versions, counts, timings and per-channel intensity
  ``channel_mean`` / ``channel_std`` (uint8 units); present only once ingest completed.
- ``_rejects.csv``: every selected site that was not written (site_id, path, reason).
- ``_plan.json`` and ``_shards/part-NNNNNN.json``: ingest's bookkeeping for resume.

Names starting with ``_`` or ``.`` are skipped by pyarrow/pandas dataset discovery,
and Ray reads only ``*.parquet``, so every reader sees exactly the shards.

The ``image`` column is Ray Data's fixed-shape tensor extension (ArrowTensorTypeV2,
what Ray Data writes for an ndarray column), so ``read_shards(uri)`` yields (B, 6, S, S)
uint8 arrays and torch tensors directly. Its storage is a plain ``large_list<uint8>``
of the C-order flattened tensor with the shape in the field metadata
(``ARROW:extension:metadata`` = ``[6, S, S]``), so pyarrow and pandas read it without
Ray: use :func:`images_from_table` (pyarrow) or ``np.stack(df.image).reshape(-1, 6, S, S)``
(pandas). This module imports Ray only when a function needs it.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from rxray import storage
from rxray.layout import IMAGE_COLUMN
from rxray.outputs import read_manifest

if TYPE_CHECKING:
    import ray.data

SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
REJECTS_FILE = "_rejects.csv"
PLAN_FILE = "_plan.json"
SHARD_RECORDS_DIR = "_shards"
_EXTENSION_METADATA = b"ARROW:extension:metadata"


def shard_name(index: int) -> str:
    """File name of shard ``index`` (zero-padded so names sort in shard order)."""
    return f"{SHARD_PREFIX}{index:06d}{SHARD_SUFFIX}"


def shard_record_name(index: int) -> str:
    """Path, relative to the output, of the record that marks shard ``index`` complete."""
    return f"{SHARD_RECORDS_DIR}/{SHARD_PREFIX}{index:06d}.json"


def image_column(images: np.ndarray) -> pa.Array:
    """An (N, 6, S, S) uint8 array as the ``image`` column (Ray's tensor extension type)."""
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(np.ascontiguousarray(images))


def images_from_table(table: pa.Table | pa.RecordBatch, column: str = IMAGE_COLUMN) -> np.ndarray:
    """The image column of a shard table read with plain pyarrow, as an (N, 6, S, S) uint8 array.

    Works whether or not Ray's extension type is registered (with Ray imported the
    column arrives as the extension type, without it as ``large_list<uint8>``).
    """
    field = table.schema.field(column)
    shape = _tensor_shape(field)
    data = table.column(column)
    chunks = data.chunks if isinstance(data, pa.ChunkedArray) else [data]
    parts = []
    for chunk in chunks:
        storage_array = chunk.storage if isinstance(chunk, pa.ExtensionArray) else chunk
        parts.append(storage_array.flatten().to_numpy(zero_copy_only=False))
    flat = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)
    return flat.reshape((len(table), *shape))


def _tensor_shape(field: pa.Field) -> tuple[int, ...]:
    """Per-row tensor shape from the extension type, or from the field metadata without Ray."""
    shape = getattr(field.type, "shape", None)
    if shape is not None:
        return tuple(int(s) for s in shape)
    metadata = field.metadata or {}
    if _EXTENSION_METADATA in metadata:
        return tuple(int(s) for s in json.loads(metadata[_EXTENSION_METADATA]))
    raise ValueError(f"column {field.name!r} carries no tensor shape (not an ingest shard?)")


def read_shards(uri: str, columns: list[str] | None = None, task_cpus: float | None = None) -> "ray.data.Dataset":
    """The shards under a URI as a Ray Dataset (no rows are read until it is consumed); its read tasks ask for
    ``task_cpus`` logical CPUs each (Ray Data's default, one, without)."""
    import ray.data

    # Ray 2.60's Parquet reader V2 starts a pool of footer-reader actors for every read: 2-5 s before the
    # first row on a small node, paid by each training run, probe, embed and explain. Shards are few large
    # files (hundreds at full RxRx2 scale), whose footers the V1 reader plans in well under a second.
    context = ray.data.DataContext.get_current()
    context.use_datasource_v2 = False
    # V1 samples a few files to size its blocks, behind a progress bar of its own on every read: noise.
    shown, context.enable_progress_bars = context.enable_progress_bars, False
    try:
        fs, path = storage.pyarrow_filesystem(uri)
        dataset = ray.data.read_parquet(path, filesystem=fs, columns=columns, file_extensions=["parquet"],
                                        **({"num_cpus": task_cpus} if task_cpus else {}))
    finally:
        context.enable_progress_bars = shown
    dataset.context.enable_progress_bars = shown  # the dataset's own passes keep the bar the step asked for
    return dataset


def open_shards(uri: str, field: str) -> tuple["ray.data.Dataset", int]:
    """The shards under a URI and their row count (from Parquet footers) for a step that reads their images;
    ConfigError naming ``field`` when there are none, no image column, or no rows."""
    from rxray.errors import ConfigError

    try:
        shards = read_shards(uri)
        rows = shards.count()
        columns = shards.schema().names
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise ConfigError(field, f"no ingest shards at {uri}: {str(exc).splitlines()[0]}") from None
    if IMAGE_COLUMN not in columns:
        raise ConfigError(field, f"{uri} has no {IMAGE_COLUMN!r} column (not ingest output?)")
    if rows == 0:
        raise ConfigError(field, f"the shards at {uri} hold no rows")
    return shards, rows


def shard_manifest(uri: str) -> dict[str, Any]:
    """The ingest manifest of a shard URI; FileNotFoundError if ingest has not completed there."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise FileNotFoundError(f"no ingest manifest at {uri} (run `rxray ingest` first)")
    return manifest


def source_file(shards: str, name: str) -> str | None:
    """A file (e.g. moa.csv, truth.json) beside the dataset the shards were ingested from, if it exists there."""
    source = ((read_manifest(shards) or {}).get("config") or {}).get("source")
    uri = storage.join(source, name) if source else None
    return uri if uri is not None and storage.exists(uri) else None


def channel_stats(uri: str) -> tuple[list[float], list[float]]:
    """Per-channel intensity mean and std (uint8 units) recorded by ingest, for normalisation."""
    manifest = shard_manifest(uri)
    return list(manifest["channel_mean"]), list(manifest["channel_std"])
