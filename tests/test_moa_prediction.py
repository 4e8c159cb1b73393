"""MoA prediction from the treatment map: the vote on hand-made similarities, its null, and MoA retrieval."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rxray.evaluate.moa_prediction import (NO_NEIGHBOUR, NO_PHENOTYPE, leave_one_out_benchmark, moa_retrieval,
                                           predict_mechanisms)

# Six treatments; a, b, c annotated "X" and "Y"; u unannotated; i inactive; z active but dissimilar to all.
NAMES = ["a", "b", "c", "d", "u", "i", "z"]
LABELS = ["X", "X", "Y", "Y", None, "X", "Z"]
ACTIVE = [True, True, True, True, True, False, True]
SIMILARITY = np.array([
    # a     b     c     d     u     i     z
    [1.0, 0.9, 0.2, 0.1, 0.8, 0.9, -0.1],  # a
    [0.9, 1.0, 0.3, 0.2, 0.6, 0.9, -0.2],  # b
    [0.2, 0.3, 1.0, 0.7, 0.6, 0.1, -0.3],  # c
    [0.1, 0.2, 0.7, 1.0, 0.1, 0.1, -0.1],  # d
    [0.8, 0.6, 0.6, 0.1, 1.0, 0.9, -0.2],  # u
    [0.9, 0.9, 0.1, 0.1, 0.9, 1.0, 0.0],   # i: very similar to a and b, but inactive: never a voter
    [-0.1, -0.2, -0.3, -0.1, -0.2, 0.0, 1.0],  # z: no positive similarity to anyone
])


def _by_name(frame: pd.DataFrame) -> dict[str, dict]:
    return {row["treatment"]: row for row in frame.to_dict("records")}


def test_the_vote_on_a_hand_made_map_gives_the_known_answers():
    rows = _by_name(predict_mechanisms(NAMES, SIMILARITY, LABELS, ACTIVE, k=2))
    # a: its two nearest annotated active neighbours are b (X, 0.9) and c (Y, 0.2); itself and the inactive i never vote.
    assert rows["a"]["predicted_moa"] == "X" and rows["a"]["correct"] is True
    assert rows["a"]["confidence"] == pytest.approx(0.9 / 1.1) and rows["a"]["nearest_similarity"] == pytest.approx(0.9)
    assert rows["a"]["neighbours"] == "b (X, 0.90); c (Y, 0.20)"
    # d: c (Y, 0.7) then b (X, 0.2): Y.
    assert rows["d"]["predicted_moa"] == "Y" and rows["d"]["correct"] is True
    # u (unannotated): a (X, 0.8), then b (X, 0.6) and c (Y, 0.6) tie for second place; k=2 keeps b (the first
    # of equals in map order): X, and `correct` stays None (no annotation to check).
    assert rows["u"]["predicted_moa"] == "X" and pd.isna(rows["u"]["correct"]) and not rows["u"]["annotated"]
    # The inactive treatment gets no mechanism, whatever it resembles.
    assert pd.isna(rows["i"]["predicted_moa"]) and rows["i"]["status"] == NO_PHENOTYPE
    # z is active, but no annotated treatment is similar to it: no prediction rather than a guess.
    assert pd.isna(rows["z"]["predicted_moa"]) and rows["z"]["status"] == NO_NEIGHBOUR
    # c is Y; its neighbours: d (Y, 0.7) and b (X, 0.3).
    assert rows["c"]["predicted_moa"] == "Y"


def test_a_tied_vote_goes_to_the_mechanism_of_the_nearer_neighbour():
    names, labels, active = ["q", "p1", "p2", "r1"], [None, "P", "P", "R"], [True] * 4
    similarity = np.array([[1.0, 0.5, 0.3, 0.8], [0.5, 1.0, 0.0, 0.0], [0.3, 0.0, 1.0, 0.0], [0.8, 0.0, 0.0, 1.0]])
    rows = _by_name(predict_mechanisms(names, similarity, labels, active, k=3))
    # P's votes 0.5 + 0.3 = 0.8 equal R's 0.8: R's member is the nearest neighbour, so R wins.
    assert rows["q"]["predicted_moa"] == "R" and rows["q"]["top_moas"] == "R; P"
    assert rows["q"]["confidence"] == pytest.approx(0.5)


def test_a_compound_whose_mechanism_has_no_other_member_is_not_scored_but_still_predicted():
    benchmark = leave_one_out_benchmark(SIMILARITY[:4, :4], LABELS[:4], k=2, permutations=50, seed=0)
    assert benchmark["n_evaluable"] == 4 and benchmark["top1"] == 1.0
    lonely = leave_one_out_benchmark(SIMILARITY[[0, 1, 2], :][:, [0, 1, 2]], ["X", "X", "Y"], k=2, permutations=50)
    assert lonely["n_evaluable"] == 2 and lonely["top1"] == 1.0  # c (the only Y) cannot be named: left out


def _clustered_profiles(rng: np.random.Generator, n_moas: int, per_moa: int, own: float) -> tuple[np.ndarray, list]:
    """Unit profiles: a shared direction per MoA plus a compound's own direction of relative strength `own`."""
    dims = 64
    shared = rng.standard_normal((n_moas, dims))
    profiles = np.vstack([shared[m] / np.linalg.norm(shared[m]) + own * _unit(rng.standard_normal(dims))
                          for m in range(n_moas) for _ in range(per_moa)])
    return profiles, [f"moa{m}" for m in range(n_moas) for _ in range(per_moa)]


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _cosine(X: np.ndarray) -> np.ndarray:
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    return unit @ unit.T


def test_the_benchmark_finds_shared_mechanisms_and_its_null_is_calibrated():
    rng = np.random.default_rng(3)
    profiles, labels = _clustered_profiles(rng, n_moas=5, per_moa=3, own=1.0)  # own as strong as shared
    found = leave_one_out_benchmark(_cosine(profiles), labels, permutations=500, seed=0)
    assert found["top1"] >= 0.8 and found["p_value"] <= 0.01 and found["null_mean"] < 0.35
    assert {row["moa"] for row in found["per_moa"]} == set(labels) and found["confusion"]
    # Labels unrelated to the profiles: accuracy near chance and p not small, draw after draw.
    p_values, accuracies = [], []
    for seed in range(20):
        draw = np.random.default_rng(100 + seed)
        random_profiles = draw.standard_normal((15, 32))
        result = leave_one_out_benchmark(_cosine(random_profiles), labels, permutations=200, seed=seed)
        p_values.append(result["p_value"])
        accuracies.append(result["top1"])
    assert 0.05 < np.mean(accuracies) < 0.4  # chance: two same-MoA of 14 others, voted by 3 nearest
    assert np.mean(np.array(p_values) <= 0.05) <= 0.15 and np.median(p_values) > 0.2


def test_moa_retrieval_leaves_same_compound_pairs_out():
    """Doses of one compound are near copies; other compounds of its MoA are unrelated: mAP must stay at chance."""
    rng = np.random.default_rng(0)
    rows, profiles = [], []
    for compound in range(8):
        base = rng.standard_normal(16)
        for dose in (1.0, 2.0):
            for experiment in ("E1", "E2"):
                rows.append({"treatment": f"c{compound}", "treatment_conc": dose, "experiment": experiment})
                profiles.append(base + 0.01 * rng.standard_normal(16))
    labels = {f"c{c}": f"moa{c % 2}" for c in range(8)}
    result = moa_retrieval(pd.DataFrame(rows), np.array(profiles), labels, permutations=200, seed=0)
    assert set(result) == {"not_same_compound", "not_same_compound_or_batch"}
    assert result["not_same_compound"]["mean_map"] < 0.75  # chance ~0.5 for two balanced MoAs
    # The same table where same-MoA compounds share their profile: retrieval is perfect under both rules.
    shared = np.array([profiles[0] if labels[r["treatment"]] == "moa0" else -profiles[0] for r in rows])
    perfect = moa_retrieval(pd.DataFrame(rows), shared, labels, permutations=200, seed=0)
    assert perfect["not_same_compound"]["mean_map"] == pytest.approx(1.0)
    assert perfect["not_same_compound_or_batch"]["mean_map"] == pytest.approx(1.0)
