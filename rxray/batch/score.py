"""`rxray score`: per-treatment Random-Forest scores and mAP activity, with and without batch correction.

For every treatment and every requested correction, one Ray task:

- Random Forest, controls vs that treatment (the study's 100 trees and fixed seed),
  on sites, cross-validated with folds grouped by plate, so no plate (and hence no
  well, whose sites are near-duplicates) is ever on both sides of a split. Metrics
  are computed once on the pooled out-of-fold predictions.
- Controls are subsampled from the treatment's own plates, as many per plate as the
  treatment has sites there (all of them when the plate has fewer), with a seed per
  treatment. Matching plates keeps the forest from learning "which plate" instead of
  "which phenotype", and keeps 433 treatments x ~7,600 control sites tractable. The
  same sample is used for every correction, so corrections are compared on equal terms.
- Phenotypic activity: mAP of the treatment's well profiles against same-plate
  control wells (see :mod:`rxray.evaluate.profiles`), permutation p-value, and
  Benjamini-Hochberg across treatments (per correction) to call it active.

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
nearest treatments and, with ``moa`` set, the EFAAR-style same-MoA recall and per-MoA
consistency (see :mod:`rxray.evaluate.treatment_map`). Nothing in the map is compared
with controls, so its profiles come from the correction fitted on every control (see
:func:`_map_profiles`). It is treatments x treatments, never per site.
"""

from __future__ import annotations

import io
import json
import sys
import time
import zlib
from typing import Any

import numpy as np
import pandas as pd
import ray
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import StratifiedGroupKFold

from rxray import storage
from rxray.errors import StepFailed
from rxray.config import ConfigError, ScoreConfig, config_to_dict
from rxray.evaluate.correction import correct, split_controls
from rxray.evaluate.metrics import classification_metrics
from rxray.evaluate.profiles import (
    benjamini_hochberg,
    load_embeddings,
    map_permutation_test,
    plate_keys,
    summarize_activity,
    unit_rows,
    well_profiles,
)
from rxray.evaluate.treatment_map import (CLUSTER_DISTANCE, MAP_FILES, TOP_FRACTION, similarity_long,
                                         treatment_map)
from rxray.outputs import write_manifest
from rxray.runtime import Timer, ensure_ray, json_safe

CONTROL, TREATED = 0, 1
PROGRESS_EVERY_S = 5.0  # seconds between progress lines while the treatment tasks run
SCORE_TABLE = "scores"
# The benchmark numbers of each correction that go into the manifest summary (the JSON file has them all).
MAP_SUMMARY_KEYS = ["n_treatments", "n_related", "n_clusters", "n_annotated", "n_same_moa_pairs", "recall_top",
                    "recall_bottom", "null_mean", "null_sd", "p_value", "p_floor", "mean_moa_map", "n_moas_consistent"]
COLUMNS = ["treatment", "correction", "accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc",
           "n_treated", "n_control", "n_plates", "n_replicates", "map", "p_value", "q_value", "active", "status"]


# --------------------------------------------------------------------------- folds and sampling


def plate_folds(plates: np.ndarray, y: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per row, grouped by plate (every plate in exactly one fold), stratified by label.

    Uses ``min(n_folds, number of plates)`` folds; ValueError with fewer than 2 plates.
    """
    plates = np.asarray(plates)
    n_plates = len(np.unique(plates))
    if n_plates < 2:
        raise ValueError("cross-validation by plate needs at least 2 plates")
    splitter = StratifiedGroupKFold(n_splits=min(n_folds, n_plates), shuffle=True, random_state=seed)
    folds = np.full(len(plates), -1, dtype=np.int64)
    for k, (_, test) in enumerate(splitter.split(np.zeros(len(plates)), y, groups=plates)):
        folds[test] = k
    return folds


def plate_matched_controls(plates: np.ndarray, treated_rows: np.ndarray, control_rows: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
    """Control rows drawn from the treated rows' plates: per plate as many as treated, or all there are."""
    treated_plates, treated_counts = np.unique(plates[treated_rows], return_counts=True)
    control_plates = plates[control_rows]
    chosen = []
    for plate, count in zip(treated_plates, treated_counts):
        available = control_rows[control_plates == plate]
        take = min(int(count), len(available))
        chosen.append(rng.choice(available, size=take, replace=False) if take < len(available) else available)
    return np.sort(np.concatenate(chosen)) if chosen else np.array([], dtype=np.int64)


def out_of_fold_scores(X: np.ndarray, y: np.ndarray, folds: np.ndarray, trees: int, seed: int) -> np.ndarray:
    """Probability of TREATED for every row from a forest that never saw the row's plate."""
    scores = np.empty(len(y), dtype=np.float64)
    for k in np.unique(folds):
        test = folds == k
        forest = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
        forest.fit(X[~test], y[~test])
        proba = forest.predict_proba(X[test])
        classes = list(forest.classes_)
        # A training fold holding one class predicts it with certainty; keep the column layout fixed.
        scores[test] = proba[:, classes.index(TREATED)] if TREATED in classes else 0.0
    return scores


def rows_by_code(codes: np.ndarray, n_codes: int) -> list[np.ndarray]:
    """The row indices of each code 0..n_codes-1 (ascending), in one sort; rows coded -1 belong to none."""
    order = np.argsort(codes, kind="stable")
    counts = np.bincount(codes[codes >= 0], minlength=n_codes)
    starts = np.searchsorted(codes[order], 0)
    return np.split(order[starts:], np.cumsum(counts)[:-1])


def _treatment_rng(seed: int, treatment: str, stream: int) -> np.random.Generator:
    """A generator fixed by (seed, treatment, purpose), independent of task order and cluster size."""
    return np.random.default_rng([seed, zlib.crc32(treatment.encode("utf-8")), stream])


# --------------------------------------------------------------------------- one treatment


def score_treatment(X: np.ndarray, profiles: np.ndarray, sites: dict[str, np.ndarray], wells: dict[str, np.ndarray],
                    treated: np.ndarray, replicates: np.ndarray, treatment: str, correction: str, trees: int,
                    folds: int, permutations: int, seed: int) -> dict[str, Any]:
    """Forest metrics and mAP for one treatment under one correction (one row of the score table).

    ``sites`` (rows of ``X``) and ``wells`` (rows of ``profiles``, unit-length well
    means) hold an integer array ``plate`` and ``comparison``, the rows of the control
    sites or wells that treatments are scored against; ``treated`` and ``replicates``
    are the treatment's own rows. Nothing here scans every row of the screen, so the
    work per treatment does not grow with the number of treatments.
    """
    notes = []
    row: dict[str, Any] = {"treatment": treatment, "correction": correction}
    controls = plate_matched_controls(sites["plate"], treated, sites["comparison"], _treatment_rng(seed, treatment, 0))
    unmatched = ~np.isin(sites["plate"][treated], sites["plate"][controls])
    if unmatched.any():  # a plate without comparison controls would teach the forest plate identity
        notes.append(f"{int(unmatched.sum())} sites on plates without comparison controls left out")
        treated = treated[~unmatched]
    rows = np.concatenate([treated, controls])
    y = np.r_[np.full(len(treated), TREATED), np.full(len(controls), CONTROL)]
    n_plates = len(np.unique(sites["plate"][treated]))
    row.update(n_treated=len(treated), n_control=len(controls), n_plates=n_plates)
    metrics = dict.fromkeys(["accuracy", "precision", "recall", "f1", "roc_auc", "pr_auc"], float("nan"))
    if n_plates < 2:
        notes.append("fewer than 2 plates with controls: cannot cross-validate by plate")
    else:
        fold_of = plate_folds(sites["plate"][rows], y, folds, seed)
        scores = out_of_fold_scores(X[rows], y, fold_of, trees, seed)
        full = classification_metrics(y, scores, labels=[CONTROL, TREATED])
        metrics = {k: full[k] for k in metrics}
    row.update(metrics)

    row["n_replicates"] = len(replicates)
    row["map"] = row["p_value"] = float("nan")
    if len(replicates) < 2:
        notes.append("fewer than 2 replicate wells: no mAP")
    else:
        row["map"], row["p_value"] = map_permutation_test(profiles, wells["plate"], replicates,
                                                          wells["comparison"], permutations,
                                                          _treatment_rng(seed, treatment, 1))
    row["status"] = "; ".join(notes) or "ok"
    return row


_score_treatment_task = ray.remote(num_cpus=1)(score_treatment)


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


def _map_profiles(meta: pd.DataFrame, X: np.ndarray, plates: np.ndarray, is_control: np.ndarray,
                  correction: str) -> np.ndarray:
    """Unit well profiles for the similarity map: the correction fitted on all of each plate's controls.

    Scores hold half the controls out of the fit so treatments are not compared with
    the controls that centred them. The map compares treatments with each other, and
    every treatment on a plate shares the error of the plate's fitted control mean: with
    the reference half alone, the planted nulls of a 24-treatment synthetic dataset had
    mean cosine 0.45 to each other (a relationship that is not there); fitted on every
    control, 0.04.
    """
    return unit_rows(well_profiles(meta, correct(X, plates, is_control, correction))[1])


def _load_moa(cfg: ScoreConfig) -> pd.DataFrame | None:
    """The treatment -> MoA table for the map's benchmark (None without ``cfg.moa``)."""
    if cfg.moa is None:
        return None
    try:
        with storage.open_file(cfg.moa, "rb") as handle:
            frame = pd.read_csv(handle, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise ConfigError("score.moa", f"not found: {cfg.moa}") from None
    missing = [c for c in ("treatment", "moa") if c not in frame.columns]
    if missing:
        raise ConfigError("score.moa", f"{cfg.moa} lacks columns {missing} (needs treatment,moa)")
    frame = frame[["treatment", "moa"]].drop_duplicates()
    conflicting = frame["treatment"][frame["treatment"].duplicated()].unique().tolist()
    if conflicting:
        raise ConfigError("score.moa", f"treatments with more than one moa: {', '.join(conflicting[:5])}")
    return frame


def _write_map(maps: dict[str, dict[str, Any]], cfg: ScoreConfig) -> tuple[list[str], dict[str, Any]]:
    """Write the similarity map files of every correction; return their URIs and the manifest summary."""
    def stacked(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
        frame = pd.concat([table.assign(correction=c) for c, table in tables.items()], ignore_index=True)
        return frame[["correction"] + [c for c in frame.columns if c != "correction"]]

    uris = {name: storage.join(cfg.out, file) for name, file in MAP_FILES.items()}
    buffer = io.BytesIO()
    stacked({c: similarity_long(m["names"], m["similarity"]) for c, m in maps.items()}).to_parquet(buffer, index=False)
    storage.write_bytes(uris["similarity"], buffer.getvalue())
    for part in ("clusters", "neighbors", "doses"):
        storage.write_text(uris[part], stacked({c: m[part] for c, m in maps.items()}).to_csv(index=False))
    detail = {c: {**m["benchmark"], "moa_map": m["moa"].to_dict("records")} for c, m in maps.items()}
    storage.write_text(uris["summary"], json.dumps(json_safe(
        {"moa": cfg.moa, "top_fraction": TOP_FRACTION, "cluster_distance": CLUSTER_DISTANCE,
         "permutations": cfg.map_permutations, "corrections": detail}, digits=6), indent=1))
    summary = {c: json_safe({k: m["benchmark"][k] for k in MAP_SUMMARY_KEYS if k in m["benchmark"]}, digits=6)
               for c, m in maps.items()}
    return list(uris.values()), summary


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


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """Score every treatment under every correction; write the table, its manifest, return a summary."""
    timer = Timer()
    with timer.time("load"):
        meta, X = _load(cfg)
    n_input = len(meta)
    finite = np.isfinite(X).all(axis=1)
    treatments = _select_treatments(cfg, meta)
    moa = _load_moa(cfg)
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
        pending += [_score_treatment_task.remote(X_ref, profiles_ref, sites_ref, wells_ref, site_rows[codes[name]],
                                                 well_rows[codes[name]], name, correction, cfg.trees, cfg.folds,
                                                 cfg.permutations, cfg.seed)
                    for name in treatments]
        with timer.time("map"):  # in the driver, while the tasks run
            # The map fits the correction on every control (see _map_profiles); wells x features, kept until the
            # activity calls say which treatments it relates.
            map_profiles[correction] = (profiles if correction == "none" else
                                        _map_profiles(meta, X, sites["plate"], is_control, correction))
        del corrected, profiles
    with timer.time("score"):
        rows = gather_with_progress(pending, "score", "treatment scores")

    frame = _call_activity(pd.DataFrame(rows), cfg.fdr)[COLUMNS]
    maps = {}
    with timer.time("map"):
        for correction, profiles in map_profiles.items():
            called = frame[(frame["correction"] == correction) & frame["active"]]
            maps[correction] = treatment_map(well_meta, profiles, cfg.controls, moa, cfg.map_neighbors,
                                             cfg.map_permutations, cfg.seed, active=set(called["treatment"]))
    del map_profiles
    if not (frame["f1"].notna() | frame["map"].notna()).any():
        raise StepFailed("no treatment could be scored (see the status column); nothing written")
    storage.makedirs(cfg.out)
    with timer.time("write"):
        outputs = _write_table(frame, cfg.out)
        map_outputs, map_summary = _write_map(maps, cfg)
    outputs += map_outputs
    summary = {"out": cfg.out, "n_treatments": len(treatments), "n_sites": int(len(meta)),
               "n_wells": int(len(well_meta)), "corrections": summarize(frame), "treatment_map": map_summary}
    counts = {"input_sites": n_input, "scored_sites": int(len(meta)), "control_sites": int(is_control.sum()),
              "reference_control_sites": int(is_reference.sum()),
              "rejected": {"non-finite embedding": int((~finite).sum())},
              "other_treatment_sites_ignored": int((finite & ~keep).sum())}
    write_manifest(cfg.out, "score", config_to_dict(cfg), counts=counts, outputs=outputs,
                   summary=summary, timings=timer.seconds)
    return {**summary, "seconds": timer.seconds}
