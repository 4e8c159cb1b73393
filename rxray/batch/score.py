"""`rxray score`: per-treatment Random-Forest scores and mAP activity, with and without batch correction.

For every treatment and every requested correction, one Ray task
(:mod:`rxray.batch.forest`): a Random Forest against plate-matched controls (the same
control sample under every correction, so corrections are compared on equal terms) and the
mAP of the treatment's well profiles against same-plate control wells with a permutation
p-value; Benjamini-Hochberg across treatments (per correction) calls it active.

How many controls per plate, and which: each plate's control wells are split once,
by well with the run's seed, into a *reference* half that fits the corrections and a
*comparison* half that the forest samples from and mAP ranks against (see
:func:`rxray.evaluate.correction.split_controls` for why in-fit controls must not be
the comparison). "none" uses the same comparison half, so every correction is scored
against the same controls. RxRx2 has ~316 control sites per plate: ~158 fit the
centre and scale, ~158 remain for comparison, far more than any treatment's ~12 sites
per plate. The corrected matrix and well profiles of each correction go to the object
store once; tasks get references and read them without copying.

Beside the score table, the driver builds each correction's treatment similarity map
while the tasks run: consensus profile per treatment, cosine similarity, clusters,
nearest treatments and, with a moa.csv (``moa``, or the one beside the dataset), the
EFAAR-style same-MoA recall, per-MoA consistency and the predicted mechanism of every
active treatment with its leave-one-compound-out benchmark (see
:mod:`rxray.evaluate.treatment_map`, :mod:`rxray.evaluate.moa_prediction`). Nothing in the
map is compared with controls, so its profiles come from the correction fitted on every
control (see :func:`rxray.batch.score_map.map_well_profiles`). It is treatments x treatments, never per site.
"""

from __future__ import annotations

import io
import sys
import time
from typing import Any

import numpy as np
import pandas as pd
import ray

from rxray import storage
from rxray.batch.forest import rows_by_code, score_treatment_task
from rxray.errors import StepFailed
from rxray.config import ConfigError, ScoreConfig
from rxray.evaluate.correction import correct, split_controls
from rxray.evaluate.profiles import (
    benjamini_hochberg,
    load_embeddings,
    plate_keys,
    summarize_activity,
    unit_rows,
    well_profiles,
)
from rxray.batch.score_map import load_moa, map_well_profiles, write_map
from rxray.evaluate.treatment_map import treatment_map
from rxray.results import ScoreResult
from rxray.runner import step_function
from rxray.runtime import Timer, ensure_ray

PROGRESS_EVERY_S = 5.0  # seconds between progress lines while the treatment tasks run
SCORE_TABLE = "scores"
COLUMNS = ["treatment", "correction", "accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc",
           "n_treated", "n_control", "n_plates", "n_replicates", "map", "p_value", "q_value", "active", "status"]


# --------------------------------------------------------------------------- the step


def _load(cfg: ScoreConfig) -> tuple[pd.DataFrame, np.ndarray]:
    try:
        return load_embeddings(cfg.embeddings, cfg.metadata)
    except FileNotFoundError as exc:
        raise ConfigError("score.embeddings", f"not found: {exc}") from None
    except ValueError as exc:
        raise ConfigError("score.embeddings", str(exc)) from None


def _select_treatments(cfg: ScoreConfig, meta: pd.DataFrame) -> list[str]:
    present = set(meta["treatment"])
    missing_controls = [c for c in cfg.controls if c not in present]
    if missing_controls:
        raise ConfigError("score.controls", f"no sites with treatment {missing_controls} in the embeddings")
    if cfg.treatments:
        unknown = [t for t in cfg.treatments if t not in present]
        if unknown:
            raise ConfigError("score.treatments", f"not in the embeddings: {', '.join(unknown[:5])}")
        overlap = [t for t in cfg.treatments if t in cfg.controls]
        if overlap:
            raise ConfigError("score.treatments", f"{overlap} are controls")
        return list(dict.fromkeys(cfg.treatments))
    return sorted(present - set(cfg.controls))


def _write_table(frame: pd.DataFrame, out: str) -> list[str]:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    parquet_uri, csv_uri = storage.join(out, f"{SCORE_TABLE}.parquet"), storage.join(out, f"{SCORE_TABLE}.csv")
    storage.write_bytes(parquet_uri, buffer.getvalue())
    storage.write_text(csv_uri, frame.to_csv(index=False))
    return [parquet_uri, csv_uri]


def gather_with_progress(pending: list, step: str, what: str, every_s: float = PROGRESS_EVERY_S) -> list:
    """The results of Ray tasks in submission order, printing done/total, rate and ETA as they finish."""
    index = {ref: k for k, ref in enumerate(pending)}
    results: list[Any] = [None] * len(pending)
    remaining, start, last = list(pending), time.perf_counter(), 0.0
    while remaining:
        done, remaining = ray.wait(remaining, num_returns=len(remaining), timeout=every_s)
        for ref in done:
            results[index[ref]] = ray.get(ref)
        elapsed = time.perf_counter() - start
        finished = len(pending) - len(remaining)
        if elapsed - last >= every_s or not remaining:
            rate = finished / max(elapsed, 1e-9)
            eta = f", ETA {len(remaining) / rate:.0f} s" if remaining and finished else ""
            print(f"{step}: {finished}/{len(pending)} {what}, {rate:.1f}/s{eta}", file=sys.stderr, flush=True)
            last = elapsed
    return results


def _call_activity(frame: pd.DataFrame, fdr: float) -> pd.DataFrame:
    """q-values and active calls, Benjamini-Hochberg within each correction."""
    frame = frame.copy()
    frame["q_value"] = np.nan
    for _, index in frame.groupby("correction", sort=False).groups.items():
        frame.loc[index, "q_value"] = benjamini_hochberg(frame.loc[index, "p_value"].to_numpy())
    frame["active"] = (frame["q_value"] <= fdr).fillna(False).astype(bool)
    return frame


def summarize(frame: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per correction: fraction active, mean F1, ROC-AUC and mAP over scored treatments."""
    summary = {}
    for correction, group in frame.groupby("correction", sort=False):
        summary[str(correction)] = {**summarize_activity(group),
                                    "mean_f1": round(float(group["f1"].mean()), 4),
                                    "mean_roc_auc": round(float(group["roc_auc"].mean()), 4),
                                    "mean_map": round(float(group["map"].mean()), 4)}
    return summary


@step_function("score")
def score(cfg: ScoreConfig) -> ScoreResult:
    """Score every treatment under every correction; write the tables and the map, return the summary."""
    timer = Timer()
    with timer.time("load"):
        meta, X = _load(cfg)
    n_input = len(meta)
    finite = np.isfinite(X).all(axis=1)
    treatments = _select_treatments(cfg, meta)
    moa, moa_uri = load_moa(cfg)
    keep = finite & meta["treatment"].isin(list(cfg.controls) + treatments).to_numpy()
    meta, X = meta[keep].reset_index(drop=True), X[keep]

    codes = {name: k for k, name in enumerate(treatments)}
    site_plates = plate_keys(meta)
    plate_codes = pd.Index(pd.unique(site_plates))
    is_control = meta["treatment"].isin(cfg.controls).to_numpy()
    is_reference = split_controls(meta["well_id"], site_plates, is_control, cfg.seed)
    sites = {"plate": plate_codes.get_indexer(site_plates).astype(np.int32),
             "comparison": np.flatnonzero(is_control & ~is_reference)}
    site_rows = rows_by_code(meta["treatment"].map(codes).fillna(-1).to_numpy(np.int64), len(treatments))
    well_meta, _ = well_profiles(meta, X[:, :1])
    well_is_control = well_meta["treatment"].isin(cfg.controls).to_numpy()
    wells = {"plate": plate_codes.get_indexer(plate_keys(well_meta)).astype(np.int32),
             "comparison": np.flatnonzero(well_is_control
                                          & ~well_meta["well_id"].isin(meta["well_id"][is_reference]).to_numpy())}
    well_rows = rows_by_code(well_meta["treatment"].map(codes).fillna(-1).to_numpy(np.int64), len(treatments))

    ensure_ray()
    sites_ref, wells_ref = ray.put(sites), ray.put(wells)
    pending, map_profiles = [], {}
    for correction in cfg.correct:
        with timer.time(f"correct_{correction}"):
            try:
                corrected = correct(X, sites["plate"], is_reference, correction)
            except ValueError as exc:
                raise StepFailed(f"{correction} correction: {exc}") from None
            profiles = unit_rows(well_profiles(meta, corrected)[1])
            # The forests see float32 whatever they are given (scikit-learn's trees cast X to it), so the store
            # holds that: half the memory of the float64 correction, the same scores.
            corrected = corrected.astype(np.float32)
        X_ref, profiles_ref = ray.put(corrected), ray.put(profiles)
        pending += [score_treatment_task.remote(X_ref, profiles_ref, sites_ref, wells_ref, site_rows[codes[name]],
                                                 well_rows[codes[name]], name, correction, cfg.trees, cfg.folds,
                                                 cfg.permutations, cfg.seed)
                    for name in treatments]
        with timer.time("map"):  # in the driver, while the tasks run
            # The map fits the correction on every control (see map_well_profiles); wells x features, kept until the
            # activity calls say which treatments it relates.
            map_profiles[correction] = map_well_profiles(meta, X, sites["plate"], is_control, correction)
        del corrected, profiles
    with timer.time("score"):
        rows = gather_with_progress(pending, "score", "treatment scores")

    frame = _call_activity(pd.DataFrame(rows), cfg.fdr)[COLUMNS]
    maps = {}
    with timer.time("map"):
        for correction, profiles in map_profiles.items():
            called = frame[(frame["correction"] == correction) & frame["active"]]
            shown, sphered = profiles
            maps[correction] = treatment_map(well_meta, shown, cfg.controls, moa, cfg.map_neighbors,
                                             cfg.map_permutations, cfg.seed, active=set(called["treatment"]),
                                             moa_neighbours=cfg.moa_neighbours, mechanism_profiles=sphered)
    del map_profiles
    if not (frame["f1"].notna() | frame["map"].notna()).any():
        raise StepFailed("no treatment could be scored (see the status column); nothing written")
    storage.makedirs(cfg.out)
    with timer.time("write"):
        outputs = _write_table(frame, cfg.out)
        map_outputs, map_summary = write_map(maps, cfg, moa_uri)
    outputs += map_outputs
    summary = {"out": cfg.out, "n_treatments": len(treatments), "n_sites": int(len(meta)),
               "n_wells": int(len(well_meta)), "corrections": summarize(frame), "treatment_map": map_summary}
    counts = {"input_sites": n_input, "dims": int(X.shape[1]), "scored_sites": int(len(meta)),
              "control_sites": int(is_control.sum()),
              "reference_control_sites": int(is_reference.sum()),
              "rejected": {"non-finite embedding": int((~finite).sum())},
              "other_treatment_sites_ignored": int((finite & ~keep).sum())}
    return ScoreResult(counts=counts, timings=timer.seconds, outputs=outputs, summary=summary)
