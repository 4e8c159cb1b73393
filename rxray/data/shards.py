"""Reading the ingest output (the shard contract in DESIGN.md).

Shards are Parquet files under one URI with the 9 metadata columns, any joined
label columns, and ``image``: a uint8 tensor (6, S, S) in w1..w6 order, plus
``_manifest.json`` (counts, config, per-channel intensity statistics).
"""

from __future__ import annotations

from typing import Any

import ray

from rxray import storage
from rxray.runtime import read_manifest

IMAGE_COLUMN = "image"


def read_shards(uri: str, columns: list[str] | None = None) -> "ray.data.Dataset":
    """The shards under a URI as a Ray Dataset (no rows are read until it is consumed)."""
    fs, path = storage.pyarrow_filesystem(uri)
    return ray.data.read_parquet(path, filesystem=fs, columns=columns, file_extensions=["parquet"])


def shard_manifest(uri: str) -> dict[str, Any]:
    """The ingest manifest of a shard URI; FileNotFoundError if ingest has not completed there."""
    manifest = read_manifest(uri)
    if manifest is None:
        raise FileNotFoundError(f"no ingest manifest at {uri} (run `rxray ingest` first)")
    return manifest


def channel_stats(uri: str) -> tuple[list[float], list[float]]:
    """Per-channel intensity mean and std (uint8 units) recorded by ingest, for normalisation."""
    manifest = shard_manifest(uri)
    return list(manifest["channel_mean"]), list(manifest["channel_std"])
