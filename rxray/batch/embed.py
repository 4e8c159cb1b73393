"""`rxray embed`: one embedding per site, computed by a Ray Data actor pool, plus per-well profiles.

The trained encoder loads once per actor (:class:`EmbedBatch` on the shared pool,
:mod:`rxray.batch.pool`); Ray Data streams shard batches through the pool and writes
the results straight to Parquet, so neither images nor embeddings ever pass through
the driver. The encoder gets the inputs it was trained on (:mod:`rxray.models.inputs`:
no plate gains for a pretrain checkpoint, its gains for a classifier trained with
them). Output layout under ``out``:

- ``sites/*.parquet``: one row per input site; every shard column but ``image``
  (the 9 RxRx2 metadata columns and any label columns) plus ``embedding``, a
  float32 vector of the encoder's feature dimension (Ray's tensor extension type;
  plain pyarrow sees ``large_list<float>``).
- ``wells/*.parquet``: per-well mean profiles (``--per-well``): the columns that are
  constant within a well, ``n_sites`` and the mean ``embedding``.
- ``_manifest.json``: config, checkpoint URI and epoch, row counts, dimension,
  timings; written last, so its presence means the step completed.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from rxray import storage
from rxray.batch.pool import InferenceActor, PoolPlan, map_batches, plan_pool
from rxray.config import EmbedConfig
from rxray.data.shards import IMAGE_COLUMN, open_shards
from rxray.errors import StepFailed
from rxray.models.checkpoints import model_provenance, require_checkpoint
from rxray.models.inputs import InputRecipe
from rxray.results import EmbedResult
from rxray.runner import step_function
from rxray.runtime import Timer, ensure_ray

if TYPE_CHECKING:
    import pyarrow as pa
    import ray.data

SITES_DIR = "sites"
WELLS_DIR = "wells"
EMBEDDING_COLUMN = "embedding"
# Site-level columns: they differ between the sites of one well, so well profiles drop them.
SITE_ONLY_COLUMNS = ("site_id", "site")
# Rows per Arrow batch when streaming the site table for well profiles: bounds driver memory.
_PROFILE_READ_ROWS = 8192


# --------------------------------------------------------------------------- the actor


class EmbedBatch(InferenceActor):
    """Ray Data callable class: shard batch in, the same rows with ``embedding`` (float32 (B, D)) out.

    The encoder loads once in ``__init__`` and gets its inputs by the checkpoint's input
    recipe (:mod:`rxray.models.inputs`); on a GPU it runs channels-last under bf16 autocast.
    """

    def __init__(self, checkpoint_uri: str, gpu: bool = False, threads: int | None = None):
        import torch

        from rxray.models.checkpoints import load_encoder

        super().__init__(gpu, threads)
        encoder, checkpoint = load_encoder(checkpoint_uri)
        self.recipe = InputRecipe.from_checkpoint(checkpoint)
        self.encoder = encoder.eval().to(self.device, memory_format=torch.channels_last)
        self.feature_dim = encoder.feature_dim

    def embed_images(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Embeddings (B, D) float32 of a shard batch's images (``image`` uint8 (B, 6, S, S), plate columns)."""
        import torch

        with torch.inference_mode(), self.precision():
            inputs = self.recipe.encoder_inputs(batch, self.device).contiguous(memory_format=torch.channels_last)
            features = self.encoder(inputs)
        return features.float().cpu().numpy()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The batch's columns without ``image``, plus ``embedding``."""
        out = {name: values for name, values in batch.items() if name != IMAGE_COLUMN}
        out[EMBEDDING_COLUMN] = self.embed_images(batch)
        return out


# --------------------------------------------------------------------------- the pipeline


def embed_dataset(shards: "ray.data.Dataset", checkpoint_uri: str, *, batch_size: int,
                  plan: PoolPlan) -> "ray.data.Dataset":
    """The lazy Ray Dataset of shard rows with ``embedding`` in place of ``image``."""
    return map_batches(shards, EmbedBatch, plan, batch_size=batch_size, checkpoint_uri=checkpoint_uri)


def embedding_matrix(column: "pa.ChunkedArray | pa.Array") -> np.ndarray:
    """An ``embedding`` column read with pyarrow as an (N, D) float32 array (Ray imported or not)."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if isinstance(array, pa.ExtensionArray):
        array = array.storage
    return np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(array), -1)


def _embedding_dim(schema: "pa.Schema") -> int:
    """The embedding length recorded in a site or well table's schema."""
    field = schema.field(EMBEDDING_COLUMN)
    shape = getattr(field.type, "shape", None)  # Ray's tensor type, when Ray registered it
    if shape is None:
        shape = json.loads((field.metadata or {})[b"ARROW:extension:metadata"])
    return int(shape[0])


def _site_table(uri: str):
    """A pyarrow dataset over the Parquet files of a ``sites/`` folder."""
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_filesystem(uri)
    return pads.dataset(path, filesystem=fs, format="parquet")


def well_profiles(sites_uri: str) -> "pa.Table":
    """Per-well mean embeddings of a ``sites/`` folder, one row per well_id sorted by it.

    One streaming pass over the embedding table (never the images): the driver holds
    a running float64 sum per well, wells x D numbers (37k x 1024 for all of RxRx2).
    """
    import pyarrow as pa
    from ray.data.extensions import ArrowTensorArray

    table = _site_table(sites_uri)
    well_columns = [c for c in table.schema.names if c not in (*SITE_ONLY_COLUMNS, EMBEDDING_COLUMN)]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    first_rows: dict[str, dict[str, Any]] = {}
    for batch in table.to_batches(columns=[*well_columns, EMBEDDING_COLUMN], batch_size=_PROFILE_READ_ROWS):
        if batch.num_rows == 0:
            continue
        vectors = embedding_matrix(batch.column(EMBEDDING_COLUMN)).astype(np.float64)
        wells, first_index, inverse = np.unique(batch.column("well_id").to_numpy(zero_copy_only=False),
                                                return_index=True, return_inverse=True)
        batch_sums = np.zeros((len(wells), vectors.shape[1]))
        np.add.at(batch_sums, inverse, vectors)
        batch_counts = np.bincount(inverse, minlength=len(wells))
        for i, well_id in enumerate(wells):
            if well_id not in sums:
                sums[well_id] = batch_sums[i]
                counts[well_id] = 0
                first_rows[well_id] = {c: batch.column(c)[int(first_index[i])].as_py() for c in well_columns}
            else:
                sums[well_id] += batch_sums[i]
            counts[well_id] += int(batch_counts[i])
    order = sorted(sums)
    columns: dict[str, Any] = {c: pa.array([first_rows[w][c] for w in order], type=table.schema.field(c).type)
                               for c in well_columns}
    columns["n_sites"] = pa.array([counts[w] for w in order], type=pa.int64())
    dim = _embedding_dim(table.schema)
    means = np.stack([sums[w] / counts[w] for w in order]) if order else np.zeros((0, dim))
    columns[EMBEDDING_COLUMN] = ArrowTensorArray.from_numpy(means.astype(np.float32))
    return pa.table(columns)


def _write_table(table: "pa.Table", uri: str) -> None:
    """Write a small table as one zstd Parquet file under a folder URI."""
    import pyarrow.parquet as pq

    fs, path = storage.pyarrow_filesystem(uri)
    fs.create_dir(path, recursive=True)
    pq.write_table(table, f"{path}/part-000000.parquet", filesystem=fs, compression="zstd")


@step_function("embed")
def embed(cfg: EmbedConfig) -> EmbedResult:
    """Embed every shard row with an actor pool into sites/ (and wells/ with per_well); returns what was written."""
    ensure_ray()
    timer = Timer()
    start = time.perf_counter()
    checkpoint = require_checkpoint(cfg.model, "embed.model")
    checkpoint_uri = checkpoint["uri"]
    shards, rows_in = open_shards(cfg.data, "embed.data")
    plan = plan_pool(cfg.actors, cfg.gpu, field="embed.actors")

    sites_uri, wells_uri = storage.join(cfg.out, SITES_DIR), storage.join(cfg.out, WELLS_DIR)

    embedded = embed_dataset(shards, checkpoint_uri, batch_size=cfg.batch_size, plan=plan)
    fs, path = storage.pyarrow_filesystem(sites_uri)
    with timer.time("embed"):
        embedded.write_parquet(path, filesystem=fs, compression="zstd")
    site_table = _site_table(sites_uri)
    rows_out = site_table.count_rows()
    if rows_out != rows_in:
        raise StepFailed(f"{rows_in} shard rows in but {rows_out} embeddings written under {sites_uri}")
    dim = _embedding_dim(site_table.schema)

    n_wells = None
    if cfg.per_well:
        with timer.time("wells"):
            profiles = well_profiles(sites_uri)
            _write_table(profiles, wells_uri)
        n_wells = profiles.num_rows

    timer.seconds["total"] = round(time.perf_counter() - start, 3)
    counts = {"rows_in": rows_in, "rows_out": rows_out, "wells": n_wells}
    images_per_s = round(rows_out / timer.seconds["embed"], 2) if timer.seconds["embed"] else None
    return EmbedResult(counts=counts, timings=timer.seconds, model=model_provenance(checkpoint), dim=dim,
                       pool=plan.describe(cfg.batch_size),
                       layout={"sites": SITES_DIR, "wells": WELLS_DIR if cfg.per_well else None,
                               "embedding_column": EMBEDDING_COLUMN},
                       images_per_s=images_per_s)

