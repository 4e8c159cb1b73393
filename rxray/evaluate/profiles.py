"""Embedding tables, well-level profiles, and phenotypic activity by mean average precision.

Activity follows the retrieval framework of ``copairs`` (Kalinin et al. 2025, as used
for JUMP Cell Painting): every replicate well of a treatment is a query; the ranked
list holds the treatment's other replicate wells (positives) and the negative control
wells of the query's own plate (so plate effects hit both sides equally), ranked by
cosine similarity. A treatment's mAP is the mean of its replicates' average
precision; its p-value comes from shuffling the treatment label within plates and
recomputing the mAP; Benjamini-Hochberg across treatments calls it active.

Profiles are well means: sites of one well are near-duplicates, and scoring them as
replicates of each other would make every treatment look reproducible.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import posixpath
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rxray import storage
from rxray.layout import EMBEDDINGS_FILE, METADATA_COLUMNS, METADATA_FILE
from rxray.outputs import read_manifest

EMBEDDING_COLUMN = "embedding"
EMBED_SITES_DIR = "sites"  # where `rxray embed` writes site embeddings (its manifest's layout.sites)
FEATURE_PREFIX = "feature_"
CP_METADATA_PREFIX = "Metadata_"  # CellProfiler's and pycytominer's prefix of every non-feature column
_METADATA_DTYPES = {"site_id": str, "well_id": str, "cell_type": str, "experiment": str, "plate": "int64",
                    "well": str, "site": "int64", "treatment": str, "treatment_conc": "float64"}


# --------------------------------------------------------------------------- loading


def read_metadata(uri: str) -> pd.DataFrame:
    """An RxRx2 metadata.csv with typed columns; ValueError if a column is missing."""
    with storage.open_file(uri, "rb") as handle:
        frame = pd.read_csv(handle, dtype={k: v for k, v in _METADATA_DTYPES.items() if v is str})
    missing = [c for c in METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{uri} lacks metadata columns {missing}")
    return _typed_metadata(frame)


def _typed_metadata(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame[METADATA_COLUMNS].copy()
    for column, dtype in _METADATA_DTYPES.items():
        frame[column] = frame[column].astype(dtype)
    return frame.reset_index(drop=True)


def _is_csv(uri: str) -> bool:
    return uri.lower().endswith((".csv", ".csv.gz"))


def _read_features_csv(uri: str) -> tuple[pd.Series, np.ndarray]:
    """site_id and the feature_0..feature_{d-1} matrix (in numeric order) of an RxRx2 embeddings.csv."""
    with storage.open_file(uri, "rb") as raw, (gzip.GzipFile(fileobj=raw) if uri.lower().endswith(".gz")
                                               else contextlib.nullcontext(raw)) as handle:
        table = pacsv.read_csv(handle, convert_options=pacsv.ConvertOptions(column_types={"site_id": pa.string()}))
    features = sorted((c for c in table.column_names if c.startswith(FEATURE_PREFIX)),
                      key=lambda c: int(c[len(FEATURE_PREFIX):]))
    if "site_id" not in table.column_names or not features:
        raise ValueError(f"{uri} needs a site_id column and {FEATURE_PREFIX}0.. columns")
    X = np.column_stack([table.column(c).to_numpy().astype(np.float32, copy=False) for c in features])
    return table.column("site_id").to_pandas(), X


def _embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """(n, d) float32 from a list, fixed-size-list or Ray tensor column of equal-length vectors."""
    array = column.combine_chunks()
    if isinstance(array, pa.ExtensionArray):  # Ray Data writes ndarray columns as a tensor extension type
        array = array.storage
    if array.null_count:
        raise ValueError(f"{array.null_count} rows have no embedding")
    n = len(array)
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = np.unique(array.value_lengths().to_numpy())
        if len(lengths) > 1:
            raise ValueError(f"embeddings have different lengths: {lengths[:5].tolist()}")
    values = array.flatten() if n else pa.array([], pa.float32())
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32).reshape(n, -1)


def _parquet_files(fs: pafs.FileSystem, path: str) -> list[str]:
    return sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=False))
                  if f.type == pafs.FileType.File and f.base_name.endswith(".parquet")
                  and not f.base_name.startswith(("_", ".")))


def _read_embedding_parquet(uri: str) -> pa.Table:
    """Site embeddings from one Parquet file, a folder of them, or an `rxray embed` output (its sites folder)."""
    fs, path = storage.pyarrow_filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return pq.read_table(path, filesystem=fs)
    if info.type != pafs.FileType.Directory:
        raise FileNotFoundError(f"no embeddings at {uri}")
    files = _parquet_files(fs, path)
    if not files:
        # `rxray embed` writes sites/ and wells/ beside its manifest; score reads the sites.
        layout = (read_manifest(uri) or {}).get("layout") or {}
        sites = posixpath.join(path, layout.get("sites") or EMBED_SITES_DIR)
        if fs.get_file_info(sites).type == pafs.FileType.Directory:
            files = _parquet_files(fs, sites)
    if not files:
        raise FileNotFoundError(f"no Parquet files under {uri} or its {EMBED_SITES_DIR}/ folder")
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files], promote_options="default")


def _sibling(uri: str, name: str) -> str:
    """A file next to ``uri`` (same folder or prefix)."""
    if storage.is_remote(uri):
        return posixpath.join(posixpath.dirname(uri), name)
    return os.path.join(os.path.dirname(storage.strip_scheme(uri)), name)


def _attach_metadata(site_ids: pd.Series, metadata_uri: str) -> pd.DataFrame:
    """Metadata rows in the order of ``site_ids``; ValueError naming sites without a metadata row."""
    metadata = read_metadata(metadata_uri).drop_duplicates("site_id").set_index("site_id", drop=False)
    missing = ~site_ids.isin(metadata.index)
    if missing.any():
        examples = ", ".join(site_ids[missing].head(3))
        raise ValueError(f"{int(missing.sum())} embedded sites have no row in {metadata_uri} (e.g. {examples})")
    return metadata.loc[site_ids.to_numpy()].reset_index(drop=True)


def _cellprofiler_profiles(uri: str, table: pa.Table) -> tuple[pd.DataFrame, np.ndarray]:
    """Metadata and features of a table in CellProfiler's conventions (``Metadata_<column>`` + feature columns)."""
    names = table.column_names
    missing = [c for c in METADATA_COLUMNS if f"{CP_METADATA_PREFIX}{c}" not in names]
    if missing:
        raise ValueError(f"{uri} lacks metadata columns {[CP_METADATA_PREFIX + c for c in missing]}")
    features = [c for c in names if not c.startswith(CP_METADATA_PREFIX)]
    if not features:
        raise ValueError(f"{uri} has Metadata_ columns but no feature column")
    meta = table.select([CP_METADATA_PREFIX + c for c in METADATA_COLUMNS]).to_pandas()
    meta.columns = list(METADATA_COLUMNS)
    X = np.column_stack([table.column(c).to_numpy().astype(np.float32, copy=False) for c in features])
    return _typed_metadata(meta), X


def load_embeddings(uri: str, metadata: str | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Site metadata (9 RxRx2 columns) and the (n_sites, d) float32 embedding matrix, row-aligned, in site_id order.

    Writers leave rows in the order their blocks finished (`rxray embed` on a loaded machine
    wrote a plate's sites out of order), and the seeded permutations and forests downstream
    draw by row: sorted by site_id, the same profiles give the same scores whoever wrote them.
    """
    meta, X = _read_profiles(uri, metadata)
    order = np.argsort(meta["site_id"].to_numpy(dtype=str), kind="stable")
    if np.array_equal(order, np.arange(len(order))):
        return meta, X
    return meta.iloc[order].reset_index(drop=True), X[order]


def _read_profiles(uri: str, metadata: str | None) -> tuple[pd.DataFrame, np.ndarray]:
    """Site metadata and the embedding matrix, row-aligned, in the order the files hold them.

    ``uri`` is `rxray embed` output (Parquet with the metadata columns and an
    ``embedding`` vector column), `rxray features` output or any Parquet in CellProfiler's
    conventions (``Metadata_<column>`` and one column per feature), or an RxRx2
    ``embeddings.csv`` (site_id, feature_0..), joined with ``metadata`` (default: the
    metadata.csv beside it) on site_id.
    """
    if _is_csv(uri):
        site_ids, X = _read_features_csv(uri)
        meta = _attach_metadata(site_ids, metadata or _sibling(uri, METADATA_FILE))
        return meta, X
    table = _read_embedding_parquet(uri)
    if EMBEDDING_COLUMN not in table.column_names and any(c.startswith(CP_METADATA_PREFIX) for c in table.column_names):
        return _cellprofiler_profiles(uri, table)
    if EMBEDDING_COLUMN not in table.column_names:
        raise ValueError(f"{uri} has no {EMBEDDING_COLUMN!r} column (is it `rxray embed` output "
                         f"or an {EMBEDDINGS_FILE}?)")
    X = _embedding_matrix(table.column(EMBEDDING_COLUMN))
    present = [c for c in METADATA_COLUMNS if c in table.column_names]
    if len(present) == len(METADATA_COLUMNS):
        meta = _typed_metadata(table.select(METADATA_COLUMNS).to_pandas())
    elif "site_id" in present and metadata:
        meta = _attach_metadata(table.column("site_id").to_pandas(), metadata)
    else:
        missing = sorted(set(METADATA_COLUMNS) - set(present))
        raise ValueError(f"{uri} lacks metadata columns {missing} (give a metadata.csv to join on site_id)")
    return meta, X


def plate_keys(meta: pd.DataFrame) -> pd.Series:
    """One key per physical plate: plate numbers repeat across experiments, so 'HUVEC-1_3'."""
    return meta["experiment"].astype(str) + "_" + meta["plate"].astype(str)


def well_profiles(meta: pd.DataFrame, X: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """Per-well mean profiles: (one metadata row per well, (n_wells, d) float32), wells in first-seen order."""
    if len(meta) == 0:
        raise ValueError("no sites to aggregate")
    codes, _ = pd.factorize(meta["well_id"])
    order = np.argsort(codes, kind="stable")  # one pass over sites: a sort and a segmented sum
    starts = np.flatnonzero(np.diff(codes[order], prepend=-1))
    sums = np.add.reduceat(np.asarray(X, dtype=np.float64)[order], starts, axis=0)
    counts = np.diff(np.r_[starts, len(codes)])
    well_meta = meta.iloc[order[starts]].drop(columns=["site_id", "site"]).reset_index(drop=True)
    well_meta["n_sites"] = counts
    return well_meta, (sums / counts[:, None]).astype(np.float32)


def unit_rows(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), so a dot product is a cosine similarity."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.where(norms > 0, norms, 1.0)).astype(np.float32)


# --------------------------------------------------------------------------- mean average precision


def _average_precisions(ranked: np.ndarray, same_plate: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP of every labelled pool well as a query (see :func:`map_permutation_test`).

    ``ranked[i]`` lists the other pool wells by falling similarity to well ``i``;
    ``same_plate[i]`` says which of them share its plate (the negatives it may see).
    """
    queries = np.flatnonzero(labels)
    positive = np.take(labels, ranked[queries])
    candidate = positive | same_plate[queries]
    # float32 counts are exact far beyond any pool size and keep this loop memory-light.
    hits = np.cumsum(positive, axis=1, dtype=np.float32)
    rank = np.cumsum(candidate, axis=1, dtype=np.float32)
    precision_sum = (hits * positive / np.maximum(rank, 1)).sum(axis=1)
    return precision_sum / np.maximum(hits[:, -1], 1)


def map_permutation_test(profiles: np.ndarray, plates: np.ndarray, query_rows: np.ndarray,
                         negative_rows: np.ndarray, permutations: int,
                         rng: np.random.Generator) -> tuple[float, float]:
    """mAP of a treatment's replicate wells and its permutation p-value.

    Each replicate (``query_rows``) ranks the other replicates (positives) and the
    ``negative_rows`` on its own plate by cosine similarity (``profiles`` are unit rows).
    The null shuffles the treatment label among the treatment's and the negative wells
    *within each plate* and recomputes the whole mAP, which keeps the dependence between
    replicates (each is the others' positive). A null that shuffles each replicate's
    list on its own ignores it: in our simulations it called 13-25% of null treatments
    significant at p < 0.05. p = (1 + #null mAP >= observed) / (1 + permutations).
    """
    query_rows, negative_rows = np.asarray(query_rows), np.asarray(negative_rows)
    if len(query_rows) < 2:
        return float("nan"), float("nan")
    negative_rows = negative_rows[np.isin(plates[negative_rows], plates[query_rows])]
    # A random pool order, so tied similarities favour neither label.
    pool = rng.permutation(np.r_[query_rows, negative_rows])
    pool_plates = plates[pool]
    vectors = profiles[pool].astype(np.float64)
    similarity = vectors @ vectors.T
    np.fill_diagonal(similarity, np.inf)  # each well ranks itself first; that column is then dropped
    ranked = np.argsort(-similarity, axis=1, kind="stable")[:, 1:].astype(np.int32)
    same_plate = pool_plates[ranked] == pool_plates[:, None]
    observed_labels = np.isin(pool, query_rows)
    observed = float(_average_precisions(ranked, same_plate, observed_labels).mean())

    # Within-plate shuffles: sort by (plate, random key) and label the first k of each plate.
    plate_codes, plate_index = np.unique(pool_plates, return_inverse=True)
    per_plate = np.bincount(plate_index, weights=observed_labels, minlength=len(plate_codes)).astype(int)
    plate_start = np.r_[0, np.cumsum(np.bincount(plate_index, minlength=len(plate_codes)))[:-1]]
    exceed = 0
    for _ in range(permutations):
        shuffled = np.lexsort((rng.random(len(pool)), plate_index))
        rank_in_plate = np.arange(len(pool)) - plate_start[plate_index[shuffled]]
        labels = np.zeros(len(pool), dtype=bool)
        labels[shuffled] = rank_in_plate < per_plate[plate_index[shuffled]]
        exceed += _average_precisions(ranked, same_plate, labels).mean() >= observed - 1e-12
    return observed, (1 + exceed) / (1 + permutations)


def benjamini_hochberg(p_values: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg q-values; NaN p-values stay NaN and do not count as tests."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full_like(p, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    if len(tested) == 0:
        return q
    order = tested[np.argsort(p[tested], kind="stable")]
    m = len(order)
    scaled = p[order] * m / np.arange(1, m + 1)
    q[order] = np.minimum(1.0, np.minimum.accumulate(scaled[::-1])[::-1])
    return q


def summarize_activity(frame: pd.DataFrame) -> dict[str, Any]:
    """Fraction and count of active treatments in a score table with an ``active`` column."""
    tested = frame["p_value"].notna()
    active = frame["active"].astype(bool)
    return {"n_tested": int(tested.sum()), "n_active": int(active.sum()),
            "fraction_active": float(active[tested].mean()) if tested.any() else float("nan")}

