"""Treatment similarity map: consensus profiles, cosine similarity, clustering, known-relationship benchmark.

The map follows EFAAR (Celik et al. 2024, "Building, benchmarking, and exploring
perturbative maps of transcriptional and morphological data"): Embed, Filter, Align
(batch correction, done upstream), Aggregate, Relate. Each treatment's corrected,
unit-length well profiles (controls excluded) are averaged into one consensus profile
(and one per treatment x concentration); treatments are related by the cosine
similarity of their consensus profiles, clustered hierarchically (average linkage on
cosine distance, :mod:`scipy.cluster.hierarchy`), and listed with their nearest
treatments. Only treatments with a detectable phenotype are related (Filter: `rxray
score` passes those it called active); a profile of noise around the controls has no
mechanism to share.

Whether the map holds biology is measured against known relationships, as EFAAR does
with annotation databases: with a treatment -> mechanism-of-action table, the recall
of same-MoA pairs among the top (and bottom) 5% most similar treatment pairs, compared
with a null that shuffles the MoA labels over the annotated treatments (the pair
ranking stays fixed; the group sizes stay the same), giving its mean, sd and a
one-sided p-value. Per MoA, consistency is a retrieval score in the style of copairs
(Kalinin et al. 2025, the mAP framework used for JUMP Cell Painting): each annotated
treatment queries all other annotated treatments ranked by cosine similarity, the
positives being its own MoA; the MoA's mAP is the mean average precision of its
members, with a label-permutation p-value and Benjamini-Hochberg q over MoAs.

Everything here is a function of small matrices (treatments x features, treatments x
treatments); nothing is per site, and nothing uses Ray.
"""

from __future__ import annotations

import math
from typing import Any, Collection, Sequence

import numpy as np
import pandas as pd
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from rxray.evaluate.moa_prediction import (DEFAULT_NEIGHBOURS, PREDICTION_FILE, leave_one_out_benchmark,
                                          moa_retrieval, predict_mechanisms)
from rxray.evaluate.profiles import benjamini_hochberg

CONTROL_MOA = "control"  # the MoA class of controls in moa.csv: never part of the benchmark
TOP_FRACTION = 0.05  # EFAAR's top and bottom 5% of pairs
TOP_PAIRS = 10  # the most similar pairs listed with their MoAs
# The recall test is reported only with at least this many same-MoA pairs among the related treatments (and a tail
# long enough for p <= 0.05 to be possible, p_floor): with fewer, the recall moves in steps of 25% or more, and the
# handful of pairs in the top 5% makes its p-value a coin toss rather than a finding.
MIN_SAME_MOA_PAIRS = 5
# Average linkage cut: a cluster's members have mean cosine similarity of at least 1 - this.
CLUSTER_DISTANCE = 0.5
# What `rxray score` writes beside its score table (the report and the findings read them by these names).
MAP_FILES = {"similarity": "treatment_similarity.parquet", "clusters": "treatment_clusters.csv",
             "neighbors": "treatment_neighbors.csv", "doses": "treatment_doses.csv", "summary": "treatment_map.json",
             "mechanisms": PREDICTION_FILE}


# --------------------------------------------------------------------------- the map


def consensus_profiles(well_meta: pd.DataFrame, profiles: np.ndarray, controls: Sequence[str] = ("EMPTY",),
                       by: Sequence[str] = ("treatment",)) -> tuple[pd.DataFrame, np.ndarray]:
    """Mean unit well profile per group of ``by`` columns, controls excluded: (groups with n_wells, matrix)."""
    by = list(by)
    keep = ~well_meta["treatment"].isin(list(controls)).to_numpy()
    unit = _unit(np.asarray(profiles, dtype=np.float64)[keep])
    keys = well_meta.loc[keep, by].reset_index(drop=True)
    if len(keys) == 0:
        return pd.DataFrame(columns=by + ["n_wells"]), np.zeros((0, unit.shape[1]))
    codes = keys.groupby(by, sort=True, dropna=False).ngroup().to_numpy()
    n_groups = int(codes.max()) + 1
    counts = np.bincount(codes, minlength=n_groups)
    sums = np.zeros((n_groups, unit.shape[1]))
    np.add.at(sums, codes, unit)
    table = keys.assign(_group=codes).drop_duplicates("_group").sort_values("_group")[by].reset_index(drop=True)
    table["n_wells"] = counts
    return table, sums / counts[:, None]


def _unit(X: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def cosine_similarity(X: np.ndarray) -> np.ndarray:
    """Cosine similarity of every pair of rows (a zero row is 0 to everything, 1 to itself)."""
    unit = _unit(np.asarray(X, dtype=np.float64))
    similarity = np.clip(unit @ unit.T, -1.0, 1.0)
    np.fill_diagonal(similarity, 1.0)
    return similarity


def cluster_treatments(similarity: np.ndarray, distance: float = CLUSTER_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """Average-linkage clustering on cosine distance: (cluster id per row from 1, heatmap leaf order)."""
    n = len(similarity)
    if n < 2:
        return np.ones(n, dtype=np.int64), np.arange(n)
    condensed = squareform(np.clip(1.0 - similarity, 0.0, 2.0), checks=False)
    tree = hierarchy.linkage(condensed, method="average", optimal_ordering=n <= 1000)
    return hierarchy.fcluster(tree, t=distance, criterion="distance").astype(np.int64), hierarchy.leaves_list(tree)


def nearest_neighbors(names: Sequence[str], similarity: np.ndarray, k: int = 5) -> pd.DataFrame:
    """Each treatment's k most similar other treatments: treatment, rank (1 = nearest), neighbor, cosine."""
    names = np.asarray(names, dtype=object)
    n = len(names)
    k = min(k, n - 1)
    if k < 1:
        return pd.DataFrame(columns=["treatment", "rank", "neighbor", "cosine"])
    masked = np.array(similarity, dtype=np.float64)
    np.fill_diagonal(masked, -np.inf)
    order = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    return pd.DataFrame({"treatment": np.repeat(names, k), "rank": np.tile(np.arange(1, k + 1), n),
                         "neighbor": names[order].ravel(),
                         "cosine": np.take_along_axis(masked, order, axis=1).ravel()})


def similarity_long(names: Sequence[str], similarity: np.ndarray) -> pd.DataFrame:
    """The full similarity matrix in long form (every ordered pair, diagonal included): treatment_a, _b, cosine."""
    names = np.asarray(names, dtype=object)
    n = len(names)
    return pd.DataFrame({"treatment_a": np.repeat(names, n), "treatment_b": np.tile(names, n),
                         "cosine": np.asarray(similarity, dtype=np.float64).ravel()})


# --------------------------------------------------------------------------- known relationships


def annotate(names: Sequence[str], moa: pd.DataFrame | dict | None, controls: Sequence[str] = ()) -> np.ndarray:
    """The MoA of each treatment (object array; None where unannotated, a control, or the control class)."""
    if moa is None:
        return np.full(len(names), None, dtype=object)
    lookup = dict(zip(moa["treatment"], moa["moa"])) if isinstance(moa, pd.DataFrame) else dict(moa)
    labels = []
    for name in names:
        label = lookup.get(name)
        missing = label is None or (isinstance(label, float) and np.isnan(label)) or str(label).strip() == ""
        labels.append(None if missing or name in controls or str(label) == CONTROL_MOA else str(label))
    return np.asarray(labels, dtype=object)


def _pair_ranking(similarity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upper-triangle pairs (i, j) ordered from most to least similar."""
    i, j = np.triu_indices(len(similarity), 1)
    order = np.argsort(-similarity[i, j], kind="stable")
    return i[order], j[order]


def _shuffled_labels(codes: np.ndarray, permutations: int, rng: np.random.Generator) -> np.ndarray:
    """(permutations, n) label codes, each row a random permutation of ``codes``."""
    return codes[np.argsort(rng.random((permutations, len(codes))), axis=1)]


def known_relationship_recall(similarity: np.ndarray, labels: Sequence[Any], fraction: float = TOP_FRACTION,
                              permutations: int = 1000, seed: int = 0) -> dict[str, Any]:
    """EFAAR recall of same-MoA pairs among the top and bottom ``fraction`` of pairs, with a label-shuffle null.

    ``labels`` holds one MoA per row of ``similarity`` (None: left out). Returns
    recall_top, recall_bottom, null_mean, null_sd (of the top recall under shuffled
    labels), p_value (one-sided, top recall), p_value_bottom, and the pair counts.
    p_floor is the p-value the same ranking would get if every selected pair were a
    same-MoA pair: the smallest this map's size allows. A small map has a tail of a few
    pairs (9 related treatments: 36 pairs, the top 5% is 2), where no ranking can reach
    p < 0.05; p_floor says so rather than leaving a large p to read as "no relationship".
    """
    labels = np.asarray(labels, dtype=object)
    rows = np.flatnonzero(np.array([label is not None for label in labels], dtype=bool))
    codes = pd.factorize(labels[rows])[0]
    n = len(rows)
    n_pairs = n * (n - 1) // 2
    # The pairs at or beyond the 95th (5th) percentile of all pairs' similarity: ceil(5% of pairs).
    n_select = max(1, math.ceil(round(fraction * n_pairs, 9))) if n_pairs else 0
    result: dict[str, Any] = dict(n_annotated=n, n_moas=int(len(np.unique(codes))), n_pairs=n_pairs,
                                  n_selected_pairs=n_select, fraction=fraction, permutations=permutations)
    group_sizes = np.bincount(codes) if n else np.zeros(0, dtype=int)
    n_same = int((group_sizes * (group_sizes - 1) // 2).sum())
    result["n_same_moa_pairs"] = n_same
    nan = float("nan")
    if n_same == 0 or n_select == 0:
        return {**result, "recall_top": nan, "recall_bottom": nan, "null_mean": nan, "null_sd": nan,
                "p_value": nan, "p_value_bottom": nan, "p_floor": nan, "top_same_moa_pairs": 0,
                "bottom_same_moa_pairs": 0}
    i, j = _pair_ranking(np.asarray(similarity, dtype=np.float64)[np.ix_(rows, rows)])
    top, bottom = slice(0, n_select), slice(n_pairs - n_select, n_pairs)
    observed_top = int((codes[i[top]] == codes[j[top]]).sum())
    observed_bottom = int((codes[i[bottom]] == codes[j[bottom]]).sum())
    # The ranking is fixed and group sizes are preserved, so only the labels of the selected pairs change.
    shuffled = _shuffled_labels(codes, permutations, np.random.default_rng(seed))
    null_top = (shuffled[:, i[top]] == shuffled[:, j[top]]).sum(axis=1)
    null_bottom = (shuffled[:, i[bottom]] == shuffled[:, j[bottom]]).sum(axis=1)
    return {**result, "recall_top": observed_top / n_same, "recall_bottom": observed_bottom / n_same,
            "null_mean": float(null_top.mean() / n_same), "null_sd": float(null_top.std() / n_same),
            "p_value": float((1 + (null_top >= observed_top).sum()) / (1 + permutations)),
            "p_value_bottom": float((1 + (null_bottom >= observed_bottom).sum()) / (1 + permutations)),
            "p_floor": float((1 + (null_top >= min(n_select, n_same)).sum()) / (1 + permutations)),
            "top_same_moa_pairs": observed_top, "bottom_same_moa_pairs": observed_bottom}


def most_similar_pairs(names: Sequence[str], similarity: np.ndarray, labels: Sequence[Any],
                       k: int = TOP_PAIRS) -> list[dict[str, Any]]:
    """The ``k`` most similar pairs, each with both MoAs and whether they share one (None: one is unannotated).

    A similar pair from two mechanisms is what a map is for ("unexpected similarities");
    the benchmark counts it as a miss, so the list shows what the recall summarises.
    """
    i, j = _pair_ranking(np.asarray(similarity, dtype=np.float64))
    labels = np.asarray(labels, dtype=object)
    pairs = []
    for a, b in zip(i[:k].tolist(), j[:k].tolist()):
        known = labels[a] is not None and labels[b] is not None
        pairs.append({"treatment_a": str(names[a]), "treatment_b": str(names[b]),
                      "cosine": float(similarity[a, b]), "moa_a": labels[a], "moa_b": labels[b],
                      "same_moa": bool(labels[a] == labels[b]) if known else None})
    return pairs


def average_precisions(positive: np.ndarray) -> np.ndarray:
    """Average precision of each row of a ranked boolean relevance matrix (NaN for a row without positives)."""
    positive = np.asarray(positive, dtype=bool)
    hits = np.cumsum(positive, axis=1, dtype=np.float64)
    ranks = np.arange(1, positive.shape[1] + 1, dtype=np.float64)
    n_positive = hits[:, -1] if positive.shape[1] else np.zeros(len(positive))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_positive > 0, (positive * hits / ranks).sum(axis=1) / n_positive, np.nan)


def moa_consistency(similarity: np.ndarray, labels: Sequence[Any], permutations: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
    """Per MoA with 2+ annotated treatments: mAP of its members retrieving each other, permutation p and BH q.

    Each annotated treatment ranks every other annotated treatment by cosine
    similarity; positives share its MoA. The null shuffles MoA labels over the
    annotated treatments and recomputes every MoA's mAP.
    """
    columns = ["moa", "n_treatments", "map", "null_mean", "p_value", "q_value"]
    labels = np.asarray(labels, dtype=object)
    rows = np.flatnonzero(np.array([label is not None for label in labels], dtype=bool))
    codes, names = pd.factorize(labels[rows])
    sizes = np.bincount(codes, minlength=len(names)) if len(rows) else np.zeros(0, dtype=int)
    if not (sizes >= 2).any():
        return pd.DataFrame(columns=columns)
    sub = np.array(np.asarray(similarity, dtype=np.float64)[np.ix_(rows, rows)])
    np.fill_diagonal(sub, np.inf)  # each treatment ranks itself first; that column is dropped
    ranked = np.argsort(-sub, axis=1, kind="stable")[:, 1:]

    def per_moa(codes_now: np.ndarray) -> np.ndarray:
        """mAP of every MoA under one labelling."""
        ap = np.nan_to_num(average_precisions(codes_now[ranked] == codes_now[:, None]))
        return np.bincount(codes_now, weights=ap, minlength=len(names)) / np.maximum(sizes, 1)

    observed = per_moa(codes)
    rng = np.random.default_rng(seed)
    exceed = np.zeros(len(names))
    null_sum = np.zeros(len(names))
    for start in range(0, permutations, 100):  # bounded memory: 100 shuffles at a time
        for shuffled in _shuffled_labels(codes, min(100, permutations - start), rng):
            null = per_moa(shuffled)
            exceed += null >= observed - 1e-12
            null_sum += null
    frame = pd.DataFrame({"moa": np.asarray(names, dtype=object), "n_treatments": sizes, "map": observed,
                          "null_mean": null_sum / permutations, "p_value": (1 + exceed) / (1 + permutations)})
    frame = frame[frame["n_treatments"] >= 2].reset_index(drop=True)
    frame["q_value"] = benjamini_hochberg(frame["p_value"].to_numpy())
    return frame.sort_values(["q_value", "moa"], kind="stable").reset_index(drop=True)[columns]


# --------------------------------------------------------------------------- everything for one profile matrix


def treatment_map(well_meta: pd.DataFrame, profiles: np.ndarray, controls: Sequence[str] = ("EMPTY",),
                  moa: pd.DataFrame | dict | None = None, neighbors: int = 5, permutations: int = 1000,
                  seed: int = 0, fraction: float = TOP_FRACTION,
                  active: Collection[str] | None = None, moa_neighbours: int = DEFAULT_NEIGHBOURS,
                  mechanism_profiles: np.ndarray | None = None) -> dict[str, Any]:
    """The whole map of one set of well profiles: tables (similarity, clusters, neighbors, doses) and benchmark.

    With ``active`` (the treatments called active under this correction), only those are
    related (EFAAR's Filter step; copairs-style consistency is likewise computed on
    phenotypically active compounds): a treatment with no detectable phenotype has a
    consensus profile of noise around the controls, so its similarity to another one says
    nothing about their mechanisms, and two inactive compounds of one class would count as a
    recovered relationship. Such a treatment keeps its row in the similarity matrix, is
    listed in the clusters table with cluster 0 after the clustered ones, and has no
    neighbours; the benchmark counts the related treatments only. With ``moa``, every related
    treatment also gets a predicted mechanism from its ``moa_neighbours`` nearest annotated
    ones (``mechanisms``; :mod:`rxray.evaluate.moa_prediction`), benchmarked leave-one-compound-out
    and as MoA retrieval (``benchmark["moa_prediction"]``, ``benchmark["moa_retrieval"]``), on
    ``mechanism_profiles`` (well rows as ``profiles``; default: ``profiles`` themselves).
    """
    table, consensus = consensus_profiles(well_meta, profiles, controls)
    names = table["treatment"].astype(str).tolist()
    similarity = cosine_similarity(consensus)
    related = np.array([active is None or name in active for name in names], dtype=bool)
    kept = np.flatnonzero(related)
    kept_similarity = similarity[np.ix_(kept, kept)]
    kept_cluster, kept_leaves = cluster_treatments(kept_similarity)
    cluster = np.zeros(len(names), dtype=np.int64)
    cluster[kept] = kept_cluster
    leaf_order = np.empty(len(names), dtype=np.int64)
    leaf_order[np.concatenate([kept[kept_leaves], np.flatnonzero(~related)]).astype(np.int64)] = np.arange(len(names))
    clusters = pd.DataFrame({"treatment": names, "cluster": cluster, "leaf_order": leaf_order, "related": related,
                             "n_wells": table["n_wells"].to_numpy()}).sort_values("leaf_order", kind="stable")

    dose_table, dose_consensus = consensus_profiles(well_meta, profiles, controls, by=("treatment", "treatment_conc"))
    parent = pd.Index(names).get_indexer(dose_table["treatment"].astype(str))
    dose_table["norm"] = np.linalg.norm(dose_consensus, axis=1)
    dose_table["cosine_to_treatment"] = np.einsum("ij,ij->i", _unit(dose_consensus), _unit(consensus[parent]))

    kept_names = [names[k] for k in kept]
    labels = annotate(kept_names, moa, controls)
    benchmark: dict[str, Any] = {"n_treatments": len(names), "n_related": len(kept),
                                 "n_clusters": int(len(np.unique(kept_cluster)))}
    per_moa = pd.DataFrame(columns=["moa", "n_treatments", "map", "null_mean", "p_value", "q_value"])
    mechanisms = None
    if moa is not None:
        benchmark.update(known_relationship_recall(kept_similarity, labels, fraction, permutations, seed))
        per_moa = moa_consistency(kept_similarity, labels, permutations, seed)
        benchmark["treatments"] = [n for n, label in zip(kept_names, labels) if label is not None]
        benchmark["top_pairs"] = most_similar_pairs(kept_names, kept_similarity, labels)
        benchmark["mean_moa_map"] = float(per_moa["map"].mean()) if len(per_moa) else float("nan")
        benchmark["n_moas_consistent"] = int((per_moa["q_value"] <= 0.05).sum()) if len(per_moa) else 0
        mechanism_wells = profiles if mechanism_profiles is None else mechanism_profiles
        mechanism_table, mechanism_consensus = consensus_profiles(well_meta, mechanism_wells, controls)
        order = pd.Index(mechanism_table["treatment"].astype(str)).get_indexer(names)
        mechanism_similarity = cosine_similarity(mechanism_consensus)[np.ix_(order, order)]
        mechanisms = predict_mechanisms(names, mechanism_similarity, annotate(names, moa, controls), related,
                                        moa_neighbours)
        rows = [k for k, label in zip(kept, labels) if label is not None]  # the annotated active treatments
        reference = {names[k]: label for k, label in zip(kept, labels) if label is not None}
        benchmark["moa_prediction"] = leave_one_out_benchmark(mechanism_similarity[np.ix_(rows, rows)],
                                                              list(reference.values()), moa_neighbours,
                                                              permutations, seed)
        batches = ("experiment",) if "experiment" in well_meta.columns else ()  # a batch: RxRx2's experiment
        batch_table, batch_profiles = consensus_profiles(well_meta, mechanism_wells, controls,
                                                         by=("treatment", "treatment_conc", *batches))
        benchmark["moa_retrieval"] = moa_retrieval(batch_table, batch_profiles, reference, permutations, seed)
    return dict(names=names, similarity=similarity, clusters=clusters.reset_index(drop=True),
                neighbors=nearest_neighbors(kept_names, kept_similarity, neighbors), doses=dose_table,
                benchmark=benchmark, moa=per_moa, mechanisms=mechanisms)
