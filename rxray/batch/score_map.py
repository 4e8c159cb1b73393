"""The treatment map's part of `rxray score`: its profiles per correction, the MoA table, and its files.

The science is in :mod:`rxray.evaluate.treatment_map` and :mod:`rxray.evaluate.moa_prediction`;
here the score step's well profiles become the map's (corrected on every control, and sphered
for the mechanism vote), the dataset's moa.csv is found and checked, and each correction's map
is written beside the score table with the headline numbers its manifest summary keeps.
"""

from __future__ import annotations

import io
import json
import posixpath
from typing import Any

import numpy as np
import pandas as pd

from rxray import storage
from rxray.config import ConfigError, ScoreConfig
from rxray.evaluate.correction import correct, sphere
from rxray.evaluate.profiles import unit_rows, well_profiles
from rxray.evaluate.treatment_map import CLUSTER_DISTANCE, MAP_FILES, TOP_FRACTION, similarity_long
from rxray.layout import MOA_FILE
from rxray.outputs import read_manifest
from rxray.runtime import json_safe

# The benchmark numbers of each correction that go into the manifest summary (the JSON file has them all).
MAP_SUMMARY_KEYS = ["n_treatments", "n_related", "n_clusters", "n_annotated", "n_same_moa_pairs", "recall_top",
                    "recall_bottom", "null_mean", "null_sd", "p_value", "p_floor", "mean_moa_map", "n_moas_consistent"]


def map_well_profiles(meta: pd.DataFrame, X: np.ndarray, plates: np.ndarray, is_control: np.ndarray,
                  correction: str) -> tuple[np.ndarray, np.ndarray]:
    """Unit well profiles for the similarity map: the correction fitted on all of each plate's controls; and for the
    mechanism prediction, the same wells sphered on all wells (:func:`rxray.evaluate.correction.sphere`).

    Scores hold half the controls out of the fit so treatments are not compared with
    the controls that centred them. The map compares treatments with each other, and
    every treatment on a plate shares the error of the plate's fitted control mean: with
    the reference half alone, the planted nulls of a 24-treatment synthetic dataset had
    mean cosine 0.45 to each other (a relationship that is not there); fitted on every
    control, 0.04. Sphering keeps the directions every treatment moves along from ruling
    the cosines that name a mechanism: on the default screen's SimCLR embeddings (seeds 0-4) the
    leave-one-compound-out MoA top-1 went from 0.58-0.74 (TVN alone) to 0.74-0.84, and on the
    generator's hand-made embeddings it stayed at 0.74-1.0. The map itself shows unsphered
    cosines: sphering spreads every treatment over all the whitened noise directions (same-MoA
    cosines of 0.05-0.2 instead of 0.6), which a reader and the clusters' cut could not use.
    """
    wells = well_profiles(meta, correct(X, plates, is_control, correction))[1]
    return unit_rows(wells), unit_rows(sphere(wells))


def default_moa(embeddings: str) -> str | None:
    """The moa.csv beside the dataset an embedding table came from: beside an embeddings.csv, or the ingest source."""
    from rxray.data.shards import source_file

    if embeddings.lower().endswith((".csv", ".csv.gz")):
        uri = storage.join(posixpath.dirname(embeddings.rstrip("/")), MOA_FILE)
        return uri if storage.exists(uri) else None
    data = ((read_manifest(embeddings) or {}).get("config") or {}).get("data")
    return source_file(data, MOA_FILE) if data else None


def load_moa(cfg: ScoreConfig) -> tuple[pd.DataFrame | None, str | None]:
    """The treatment -> MoA table (``cfg.moa``, else :func:`default_moa`) and its URI; (None, None) without one."""
    uri = cfg.moa or default_moa(cfg.embeddings)
    if uri is None:
        return None, None
    try:
        with storage.open_file(uri, "rb") as handle:
            frame = pd.read_csv(handle, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ConfigError("score.moa", f"not found: {uri}") from None
    missing = [c for c in ("treatment", "moa") if c not in frame.columns]
    if missing:
        raise ConfigError("score.moa", f"{uri} lacks columns {missing} (needs treatment,moa)")
    frame = frame[["treatment", "moa"]].drop_duplicates()
    conflicting = frame["treatment"][frame["treatment"].duplicated()].unique().tolist()
    if conflicting:
        raise ConfigError("score.moa", f"treatments with more than one moa: {', '.join(conflicting[:5])}")
    return frame, uri


def write_map(maps: dict[str, dict[str, Any]], cfg: ScoreConfig, moa_uri: str | None
               ) -> tuple[list[str], dict[str, Any]]:
    """Write the similarity map files of every correction; return their URIs and the manifest summary."""
    def stacked(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
        frame = pd.concat([table.assign(correction=c) for c, table in tables.items()], ignore_index=True)
        return frame[["correction"] + [c for c in frame.columns if c != "correction"]]

    parts = ["clusters", "neighbors", "doses"] + (["mechanisms"] if moa_uri is not None else [])
    uris = {name: storage.join(cfg.out, MAP_FILES[name]) for name in ["similarity", *parts, "summary"]}
    buffer = io.BytesIO()
    stacked({c: similarity_long(m["names"], m["similarity"]) for c, m in maps.items()}).to_parquet(buffer, index=False)
    storage.write_bytes(uris["similarity"], buffer.getvalue())
    for part in parts:
        storage.write_text(uris[part], stacked({c: m[part] for c, m in maps.items()}).to_csv(index=False))
    detail = {c: {**m["benchmark"], "moa_map": m["moa"].to_dict("records")} for c, m in maps.items()}
    storage.write_text(uris["summary"], json.dumps(json_safe(
        {"moa": moa_uri, "top_fraction": TOP_FRACTION, "cluster_distance": CLUSTER_DISTANCE,
         "permutations": cfg.map_permutations, "moa_neighbours": cfg.moa_neighbours, "corrections": detail},
        digits=6), indent=1))
    summary = {c: json_safe({**{k: m["benchmark"][k] for k in MAP_SUMMARY_KEYS if k in m["benchmark"]},
                             **_prediction_summary(m["benchmark"])}, digits=6) for c, m in maps.items()}
    return list(uris.values()), summary


def _prediction_summary(benchmark: dict[str, Any]) -> dict[str, Any]:
    """The leave-one-compound-out MoA prediction's headline numbers, for the manifest (empty without moa.csv)."""
    prediction = benchmark.get("moa_prediction")
    if prediction is None:
        return {}
    retrieval = benchmark.get("moa_retrieval") or {}
    return {"moa_top1": prediction["top1"], "moa_top3": prediction["top3"], "moa_null_mean": prediction["null_mean"],
            "moa_p_value": prediction["p_value"], "moa_evaluable": prediction["n_evaluable"],
            **{f"moa_map_{rule}": (values or {}).get("mean_map") for rule, values in retrieval.items()}}
