"""Treatment similarity map: consensus, cosine, clustering, neighbours, EFAAR recall and per-MoA mAP."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from rxray.evaluate.treatment_map import (
    annotate,
    average_precisions,
    cluster_treatments,
    consensus_profiles,
    cosine_similarity,
    known_relationship_recall,
    moa_consistency,
    nearest_neighbors,
    treatment_map,
)

DIM = 32


def planted_map(seed=0, groups=5, members=3, null_groups=5, noise=0.35):
    """Consensus profiles of treatments: `groups` MoAs whose members share a direction (plus noise),
    and `null_groups` annotated pairs of pure-noise profiles (an MoA with no phenotype)."""
    rng = np.random.default_rng(seed)
    names, labels, rows = [], [], []
    for g in range(groups):
        direction = rng.normal(size=DIM)
        direction /= np.linalg.norm(direction)
        for m in range(members):
            names.append(f"moa{g}-{m}")
            labels.append(f"MOA-{g}")
            rows.append(direction + noise * rng.normal(size=DIM) / math.sqrt(DIM))
    for g in range(null_groups):
        for m in range(2):
            names.append(f"null{g}-{m}")
            labels.append(f"NULL-{g}")
            rows.append(rng.normal(size=DIM) / math.sqrt(DIM))
    return names, np.asarray(labels, dtype=object), np.asarray(rows)


def naive_average_precision(similarity_row, positive):
    """AP written out: walk the list from most similar, precision at each positive, averaged."""
    order = sorted(range(len(similarity_row)), key=lambda k: -similarity_row[k])
    hits, total = 0, 0.0
    for rank, k in enumerate(order, start=1):
        if positive[k]:
            hits += 1
            total += hits / rank
    return total / hits


# --------------------------------------------------------------------------- the map itself


def test_consensus_is_the_mean_unit_well_profile_without_controls():
    rng = np.random.default_rng(0)
    well_meta = pd.DataFrame({"treatment": ["EMPTY"] * 3 + ["B"] * 4 + ["A"] * 2,
                              "treatment_conc": [np.nan] * 3 + [1.0, 1.0, 2.0, 2.0, 5.0, 5.0]})
    profiles = rng.normal(size=(9, 6)) * rng.uniform(0.5, 3, (9, 1))
    table, consensus = consensus_profiles(well_meta, profiles, controls=["EMPTY"])
    assert table["treatment"].tolist() == ["A", "B"] and table["n_wells"].tolist() == [2, 4]
    unit = profiles / np.linalg.norm(profiles, axis=1, keepdims=True)
    np.testing.assert_allclose(consensus[0], unit[7:9].mean(0))
    np.testing.assert_allclose(consensus[1], unit[3:7].mean(0))

    doses, by_dose = consensus_profiles(well_meta, profiles, ["EMPTY"], by=("treatment", "treatment_conc"))
    assert list(zip(doses["treatment"], doses["treatment_conc"], doses["n_wells"])) == [
        ("A", 5.0, 2), ("B", 1.0, 2), ("B", 2.0, 2)]
    np.testing.assert_allclose(by_dose[2], unit[5:7].mean(0))


def test_cosine_clusters_and_neighbours_follow_the_planted_groups():
    names, labels, X = planted_map(groups=3, members=4, null_groups=0, noise=0.3)
    similarity = cosine_similarity(X * np.arange(1, len(X) + 1)[:, None])  # row scale must not matter
    assert similarity.shape == (12, 12) and np.allclose(similarity, similarity.T)
    assert np.allclose(np.diag(similarity), 1.0) and np.all(np.abs(similarity) <= 1.0)
    np.testing.assert_allclose(similarity, cosine_similarity(X))

    cluster, leaves = cluster_treatments(similarity)
    assert sorted(leaves.tolist()) == list(range(12))
    for g in range(3):
        members = np.flatnonzero(labels == f"MOA-{g}")
        assert len(set(cluster[members])) == 1  # one cluster per planted group ...
        positions = np.flatnonzero(np.isin(leaves, members))
        assert positions.max() - positions.min() == len(members) - 1  # ... contiguous in the heatmap order
    assert len(set(cluster)) == 3

    table = nearest_neighbors(names, similarity, k=5)
    assert list(table.columns) == ["treatment", "rank", "neighbor", "cosine"] and len(table) == 12 * 5
    for name, rows in table.groupby("treatment"):
        assert rows["rank"].tolist() == [1, 2, 3, 4, 5] and name not in set(rows["neighbor"])
        assert rows["cosine"].is_monotonic_decreasing
        group = name.split("-")[0]
        assert all(n.startswith(group) for n in rows["neighbor"][:3])  # the 3 other members come first
    assert len(nearest_neighbors(names[:3], similarity[:3, :3], k=5)) == 3 * 2  # k capped at n - 1


# --------------------------------------------------------------------------- known relationships


def test_a_planted_shared_moa_pair_is_recovered():
    names, labels, X = planted_map(seed=1)
    similarity = cosine_similarity(X)
    result = known_relationship_recall(similarity, labels, permutations=1000, seed=0)
    n = len(names)
    assert result["n_pairs"] == n * (n - 1) // 2 and result["n_selected_pairs"] == math.ceil(0.05 * result["n_pairs"])
    assert result["n_same_moa_pairs"] == 5 * 3 + 5
    # Every planted pair is among the top 5% of pairs; the null pairs are not.
    top = np.sort(similarity[np.triu_indices(n, 1)])[-result["n_selected_pairs"]]
    for g in range(5):
        members = np.flatnonzero(labels == f"MOA-{g}")
        assert similarity[np.ix_(members, members)].min() >= top
    assert result["recall_top"] == pytest.approx(15 / 20)
    assert abs(result["null_mean"] - 0.05) < 0.01 and result["null_sd"] > 0
    assert result["recall_top"] > result["null_mean"] + 5 * result["null_sd"]
    assert result["p_value"] < 0.01 and result["recall_bottom"] <= 0.1
    assert result["p_floor"] <= result["p_value"]
    assert names[int(np.argsort(-similarity[0])[1])] in {"moa0-1", "moa0-2"}


def test_a_map_too_small_to_reach_significance_says_so():
    # 9 related treatments as in a small screen: 36 pairs, the top 5% is 2 of them. Even when both are same-MoA
    # pairs the label shuffle gives p ~ 9/36 * 8/35 = 0.057, so p_floor is above 0.05 whatever the ranking.
    names, labels, X = planted_map(seed=1, groups=3, members=3, null_groups=0)
    result = known_relationship_recall(cosine_similarity(X), labels, permutations=2000, seed=0)
    assert (result["n_pairs"], result["n_selected_pairs"], result["n_same_moa_pairs"]) == (36, 2, 9)
    assert result["recall_top"] == pytest.approx(2 / 9)  # the two most similar pairs are same-MoA pairs
    assert result["p_value"] == result["p_floor"] == pytest.approx(9 / 36 * 8 / 35, abs=0.015)
    assert result["p_floor"] > 0.05


def test_nulls_have_no_relationship_among_themselves():
    names, labels, X = planted_map(seed=2)
    only_nulls = np.array([label if label.startswith("NULL") else None for label in labels], dtype=object)
    result = known_relationship_recall(cosine_similarity(X), only_nulls, permutations=1000, seed=0)
    assert result["n_annotated"] == 10 and result["n_same_moa_pairs"] == 5
    assert result["p_value"] > 0.05 and result["recall_top"] <= result["null_mean"] + 2 * result["null_sd"]
    per_moa = moa_consistency(cosine_similarity(X), labels, permutations=500, seed=0)
    nulls = per_moa[per_moa["moa"].str.startswith("NULL")]
    assert (nulls["q_value"] > 0.05).all(), nulls


def test_only_active_treatments_are_related():
    # Two inactive compounds of one class share a component (here planted: both look like the same shifted
    # control) and would be each other's nearest neighbour and a "recovered" same-MoA pair; given the activity
    # calls, the map leaves them out of clusters, neighbours and the benchmark, and keeps their similarity row.
    rng = np.random.default_rng(4)
    shared = rng.normal(size=DIM)
    phenotypes = {"A1": rng.normal(size=DIM), "A2": None, "B1": rng.normal(size=DIM), "B2": None}
    phenotypes["A2"] = phenotypes["A1"] + 0.3 * rng.normal(size=DIM)
    phenotypes["B2"] = phenotypes["B1"] + 0.3 * rng.normal(size=DIM)
    rows, profiles = [], []
    for name, vector in {**phenotypes, "NULL1": shared, "NULL2": shared}.items():
        for _ in range(3):
            rows.append((name, 1.0))
            profiles.append(vector + 0.1 * rng.normal(size=DIM))
    well_meta = pd.DataFrame(rows, columns=["treatment", "treatment_conc"])
    moa = pd.DataFrame({"treatment": ["A1", "A2", "B1", "B2", "NULL1", "NULL2"], "moa": ["A", "A", "B", "B", "N", "N"]})
    every = treatment_map(well_meta, np.asarray(profiles), [], moa, neighbors=2, permutations=100)
    assert every["benchmark"]["n_same_moa_pairs"] == 3 and every["clusters"]["related"].all()
    result = treatment_map(well_meta, np.asarray(profiles), [], moa, neighbors=2, permutations=100,
                           active={"A1", "A2", "B1", "B2"})
    clusters = result["clusters"].set_index("treatment")
    assert (clusters.loc[["NULL1", "NULL2"], "cluster"] == 0).all()
    assert not clusters.loc[["NULL1", "NULL2"], "related"].any() and clusters.loc[["A1", "B2"], "related"].all()
    assert clusters.loc[["NULL1", "NULL2"], "leaf_order"].min() == 4  # after the related ones
    assert clusters.loc["A1", "cluster"] == clusters.loc["A2", "cluster"] != clusters.loc["B1", "cluster"]
    assert set(result["neighbors"]["treatment"]) == set(result["neighbors"]["neighbor"]) == {"A1", "A2", "B1", "B2"}
    bench = result["benchmark"]
    assert bench["n_treatments"] == 6 and bench["n_related"] == 4 and bench["n_same_moa_pairs"] == 2
    assert result["similarity"].shape == (6, 6) and set(result["moa"]["moa"]) == {"A", "B"}


def test_shuffled_moa_labels_give_recall_at_the_null():
    names, labels, X = planted_map(seed=3)
    similarity = cosine_similarity(X)
    rng = np.random.default_rng(0)
    shuffled = labels[rng.permutation(len(labels))]
    result = known_relationship_recall(similarity, shuffled, permutations=1000, seed=1)
    assert result["p_value"] > 0.05
    assert abs(result["recall_top"] - result["null_mean"]) <= 2 * result["null_sd"]
    # Calibration over many shuffles: recall averages to the null, few p-values fall below 0.05.
    recalls, p_values = [], []
    for k in range(60):
        r = known_relationship_recall(similarity, labels[rng.permutation(len(labels))], permutations=200, seed=k)
        recalls.append(r["recall_top"])
        p_values.append(r["p_value"])
    assert abs(np.mean(recalls) - result["null_mean"]) < 0.03
    assert np.mean(np.array(p_values) < 0.05) <= 0.12


def test_per_moa_map_matches_the_naive_definition():
    names, labels, X = planted_map(seed=4, noise=2.0)  # noisy enough that ranks are not trivial
    similarity = cosine_similarity(X)
    per_moa = moa_consistency(similarity, labels, permutations=200, seed=0).set_index("moa")
    assert len(per_moa) == 10 and list(per_moa.columns) == ["n_treatments", "map", "null_mean", "p_value",
                                                            "q_value"]
    for moa, row in per_moa.iterrows():
        aps = []
        for q in np.flatnonzero(labels == moa):
            others = [k for k in range(len(labels)) if k != q]
            aps.append(naive_average_precision(similarity[q, others], labels[others] == moa))
        assert row["map"] == pytest.approx(np.mean(aps)), moa
        assert row["n_treatments"] == (labels == moa).sum()
    positive = np.array([[True, False, True, False], [False, False, False, False]])
    np.testing.assert_allclose(average_precisions(positive), [(1 + 2 / 3) / 2, np.nan])

    clean = moa_consistency(cosine_similarity(planted_map(seed=4)[2]), labels, permutations=500, seed=0)
    assert (clean.loc[clean["moa"].str.startswith("MOA"), "q_value"] < 0.05).all()
    assert (clean.loc[clean["moa"].str.startswith("MOA"), "map"] > 0.9).all()


def test_annotation_leaves_out_controls_and_missing_labels():
    moa = pd.DataFrame({"treatment": ["EMPTY", "A", "B", "C"], "moa": ["control", "x", "", "control"]})
    assert annotate(["A", "B", "C", "D", "EMPTY"], moa, controls=["EMPTY"]).tolist() == ["x", None, None, None, None]
    assert annotate(["A"], None).tolist() == [None]
    result = known_relationship_recall(np.eye(3), [None, "x", "y"], permutations=10)
    assert result["n_same_moa_pairs"] == 0 and np.isnan(result["recall_top"])


def test_treatment_map_from_well_profiles():
    names, labels, X = planted_map(seed=5, groups=3, members=2, null_groups=2)
    rng = np.random.default_rng(0)
    rows, profiles = [], []
    for name, vector in zip(names, X):
        for conc in (1.0, 2.0):
            for _ in range(3):
                rows.append((name, conc))
                profiles.append(conc * vector + 0.2 * rng.normal(size=DIM) / math.sqrt(DIM))
    for _ in range(6):
        rows.append(("EMPTY", np.nan))
        profiles.append(rng.normal(size=DIM))
    well_meta = pd.DataFrame(rows, columns=["treatment", "treatment_conc"])
    moa = pd.DataFrame({"treatment": names + ["EMPTY"], "moa": list(labels) + ["control"]})
    result = treatment_map(well_meta, np.asarray(profiles), ["EMPTY"], moa, neighbors=3, permutations=200)
    assert result["names"] == sorted(names) and result["similarity"].shape == (10, 10)
    assert list(result["clusters"].columns) == ["treatment", "cluster", "leaf_order", "related", "n_wells"]
    assert result["clusters"]["leaf_order"].tolist() == list(range(10))
    assert len(result["neighbors"]) == 30 and len(result["doses"]) == 20
    assert (result["doses"].loc[result["doses"]["treatment"].str.startswith("moa"), "cosine_to_treatment"] > 0.9).all()
    bench = result["benchmark"]
    assert bench["n_treatments"] == 10 and bench["n_annotated"] == 10 and sorted(bench["treatments"]) == sorted(names)
    assert bench["recall_top"] == pytest.approx(3 / 5)  # the 3 planted pairs are the top 3 = ceil(5% of 45)
    pairs = bench["top_pairs"]  # what the recall summarises, pair by pair, with both MoAs
    assert len(pairs) == 10 and [p["cosine"] for p in pairs] == sorted((p["cosine"] for p in pairs), reverse=True)
    assert all(p["same_moa"] and p["moa_a"] == p["moa_b"] for p in pairs[:3])
    assert all(p["same_moa"] == (p["moa_a"] == p["moa_b"]) for p in pairs)
    similarity = pd.DataFrame(result["similarity"], index=result["names"], columns=result["names"])
    assert pairs[0]["cosine"] == pytest.approx(similarity.loc[pairs[0]["treatment_a"], pairs[0]["treatment_b"]])
    no_moa = treatment_map(well_meta, np.asarray(profiles), ["EMPTY"], None)
    assert "recall_top" not in no_moa["benchmark"] and no_moa["moa"].empty


# --------------------------------------------------------------------------- through `rxray score`


def test_score_writes_the_treatment_map(tmp_path, ray_local):
    from test_score import synthetic_embeddings, write_rxrx2_csv

    from rxray.batch.score import score
    from rxray.config import ScoreConfig, load_config

    meta, X = synthetic_embeddings(dim=8, n_plates=2, control_wells=8, wells_per_treatment=3, sites=2, seed=2)
    embeddings = write_rxrx2_csv(meta, X, str(tmp_path / "rxrx2"))
    moa_csv = tmp_path / "moa.csv"
    moa_csv.write_text("treatment,moa\nEMPTY,control\nPLANTED,M1\nNOISE,M1\nONE_PLATE,M2\n")
    out = str(tmp_path / "scores")
    summary = score(load_config(ScoreConfig, values=dict(
        embeddings=embeddings, out=out, trees=5, folds=2, permutations=100, correct=["none", "center"],
        moa=str(moa_csv), map_permutations=20)))
    similarity = pd.read_parquet(os.path.join(out, "treatment_similarity.parquet"))
    assert list(similarity.columns) == ["correction", "treatment_a", "treatment_b", "cosine"]
    assert len(similarity) == 2 * 3 * 3
    clusters = pd.read_csv(os.path.join(out, "treatment_clusters.csv"))
    assert list(clusters.columns) == ["correction", "treatment", "cluster", "leaf_order", "related", "n_wells"]
    assert set(clusters["treatment"]) == {"PLANTED", "NOISE", "ONE_PLATE"}
    neighbors = pd.read_csv(os.path.join(out, "treatment_neighbors.csv"))
    assert list(neighbors.columns) == ["correction", "treatment", "rank", "neighbor", "cosine"]
    table = pd.read_parquet(os.path.join(out, "scores.parquet"))
    for correction in ("none", "center"):  # the map relates the treatments called active, and only those
        active = set(table.loc[(table["correction"] == correction) & table["active"], "treatment"])
        rows = clusters[clusters["correction"] == correction]
        assert set(rows.loc[rows["related"], "treatment"]) == active
        assert (rows.loc[~rows["related"], "cluster"] == 0).all()
        assert set(neighbors.loc[neighbors["correction"] == correction, "treatment"]) == (active if len(active) > 1
                                                                                          else set())
    assert "PLANTED" in active
    doses = pd.read_csv(os.path.join(out, "treatment_doses.csv"))
    assert list(doses.columns) == ["correction", "treatment", "treatment_conc", "n_wells", "norm",
                                   "cosine_to_treatment"]
    detail = json.loads(open(os.path.join(out, "treatment_map.json")).read())
    center = detail["corrections"]["center"]
    assert center["n_treatments"] == 3 and center["n_related"] == len(active)
    assert center["n_same_moa_pairs"] == (1 if {"PLANTED", "NOISE"} <= active else 0)
    assert len(center["top_pairs"]) == len(active) * (len(active) - 1) // 2  # fewer than 10 pairs: all of them
    assert all({p["treatment_a"], p["treatment_b"]} <= active for p in center["top_pairs"])
    manifest = json.loads(open(os.path.join(out, "_manifest.json")).read())
    assert set(manifest["summary"]["treatment_map"]) == {"none", "center"}
    assert summary.summary["treatment_map"]["center"]["n_treatments"] == 3
    assert "treatment_map.json" in " ".join(manifest["outputs"])
