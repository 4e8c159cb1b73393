"""`rxray score`: metrics, folds, batch correction, mAP activity and the step end to end."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from rxray import storage
from rxray.batch.forest import plate_folds, plate_matched_controls
from rxray.batch.score import score
from rxray.cli import main
from rxray.config import ScoreConfig, load_config
from rxray import layout
from rxray.evaluate.correction import center_by_plate, correct, split_controls, tvn
from rxray.evaluate.metrics import classification_metrics
from rxray.evaluate.profiles import (
    benjamini_hochberg,
    load_embeddings,
    map_permutation_test,
    plate_keys,
    unit_rows,
    well_profiles,
)

PLANTED_DIMS = [0, 1, 2, 3]


def synthetic_embeddings(dim=16, n_plates=4, control_wells=16, wells_per_treatment=6, sites=3, shift=2.5,
                         plate_offset=0.5, seed=0):
    """Site embeddings over 2 experiments: PLANTED shifted along a few dims, NOISE unchanged,
    ONE_PLATE (no effect) on plate 1 only; every plate carries its own offset."""
    rng = np.random.default_rng(seed)
    rows, vectors = [], []
    for p in range(n_plates):
        experiment, plate = f"HUVEC-{p % 2 + 1}", p // 2 + 1
        offset = rng.normal(0, plate_offset, dim)
        layout_plan = [("EMPTY", control_wells), ("PLANTED", wells_per_treatment), ("NOISE", wells_per_treatment)]
        if p == 0:
            layout_plan.append(("ONE_PLATE", wells_per_treatment))
        well_index = 0
        for treatment, n_wells in layout_plan:
            for _ in range(n_wells):
                well = layout.well_name(well_index // 48, well_index % 48)
                well_index += 1
                effect = np.zeros(dim)
                if treatment == "PLANTED":
                    effect[PLANTED_DIMS] = shift
                well_effect = rng.normal(0, 0.3, dim)
                for site in range(1, sites + 1):
                    rows.append({"site_id": layout.make_site_id(experiment, plate, well, site),
                                 "well_id": layout.make_well_id(experiment, plate, well), "cell_type": "HUVEC",
                                 "experiment": experiment, "plate": plate, "well": well, "site": site,
                                 "treatment": treatment, "treatment_conc": np.nan if treatment == "EMPTY" else 1.0})
                    vectors.append(offset + effect + well_effect + rng.normal(0, 1, dim))
    return pd.DataFrame(rows, columns=layout.METADATA_COLUMNS), np.asarray(vectors, dtype=np.float32)


def write_embed_parquet(meta, X, folder, files=2):
    """An `rxray embed`-shaped output: sites/ with the metadata columns + a fixed-size float32 `embedding`,
    a wells/ folder of another shape (which score must not read) and a manifest."""
    os.makedirs(os.path.join(folder, "sites"), exist_ok=True)
    os.makedirs(os.path.join(folder, "wells"), exist_ok=True)
    for k, part in enumerate(np.array_split(np.arange(len(meta)), files)):
        table = pa.Table.from_pandas(meta.iloc[part].reset_index(drop=True), preserve_index=False)
        flat = pa.array(X[part].ravel(), pa.float32())
        table = table.append_column("embedding", pa.FixedSizeListArray.from_arrays(flat, X.shape[1]))
        pq.write_table(table, os.path.join(folder, "sites", f"part-{k}.parquet"))
    pq.write_table(pa.table({"well_id": ["x"], "n_sites": [1]}), os.path.join(folder, "wells", "w.parquet"))
    with open(os.path.join(folder, "_manifest.json"), "w") as handle:
        json.dump({"step": "embed", "layout": {"sites": "sites", "wells": "wells"}}, handle)
    return folder


def write_rxrx2_csv(meta, X, folder):
    """RxRx2's own embeddings.csv (site_id, feature_0..) with metadata.csv beside it."""
    os.makedirs(folder, exist_ok=True)
    features = pd.DataFrame(X, columns=[f"feature_{i}" for i in range(X.shape[1])])
    features.insert(0, "site_id", meta["site_id"])
    features.sample(frac=1.0, random_state=0).to_csv(os.path.join(folder, "embeddings.csv"), index=False)
    meta.to_csv(os.path.join(folder, "metadata.csv"), index=False)
    return os.path.join(folder, "embeddings.csv")


# --------------------------------------------------------------------------- metrics


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 200)
    p = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    m = classification_metrics(y, p, labels=[0, 1])
    predicted = (p > 0.5).astype(int)  # the highest-scoring class; a tie goes to the negative
    assert m["f1"] == pytest.approx(f1_score(y, predicted))
    assert m["roc_auc"] == pytest.approx(roc_auc_score(y, p))
    assert m["pr_auc"] == pytest.approx(average_precision_score(y, p))
    assert m["f1_macro"] == pytest.approx(f1_score(y, predicted, average="macro"))
    assert np.sum(m["confusion_matrix"]) == 200 and len(m["per_class"]) == 2


def test_multiclass_metrics_survive_a_missing_class():
    labels = ["a", "b", "c"]
    y = np.array(["a", "a", "b", "b", "a", "b"])  # "c" is missing from this fold
    proba = np.array([[.8, .1, .1], [.6, .3, .1], [.1, .8, .1], [.2, .2, .6], [.7, .2, .1], [.3, .6, .1]])
    m = classification_metrics(y, proba, labels)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["per_class"]["c"]["support"] == 0 and m["per_class"]["c"]["precision"] == 0.0
    assert m["f1"] == pytest.approx(np.mean([m["per_class"][c]["f1"] for c in ("a", "b")]))
    assert 0.9 < m["roc_auc"] <= 1.0 and np.array(m["confusion_matrix"]).shape == (3, 3)
    one_class = classification_metrics(np.zeros(4, int), np.full(4, 0.2), labels=[0, 1])
    assert np.isnan(one_class["roc_auc"]) and one_class["accuracy"] == 1.0


# --------------------------------------------------------------------------- folds and sampling


def test_folds_never_share_a_plate():
    rng = np.random.default_rng(0)
    plates = rng.choice([f"E_{i}" for i in range(7)], size=300)
    y = rng.integers(0, 2, 300)
    folds = plate_folds(plates, y, n_folds=5, seed=3)
    assert (folds >= 0).all() and len(np.unique(folds)) == 5
    for plate in np.unique(plates):
        assert len(np.unique(folds[plates == plate])) == 1, plate
    assert len(np.unique(plate_folds(plates[:], y, n_folds=10, seed=3))) == 7  # capped at the plate count
    np.testing.assert_array_equal(folds, plate_folds(plates, y, n_folds=5, seed=3))
    with pytest.raises(ValueError):
        plate_folds(np.zeros(10), np.r_[np.zeros(5), np.ones(5)], 5, 0)


def test_controls_are_matched_to_the_treated_plates():
    plates = np.array([0] * 10 + [1] * 10 + [2] * 10)
    control_rows = np.r_[0:8, 10:12, 20:28]  # plate 1 has only 2 controls
    treated_rows = np.r_[8:10, 12:20]  # 2 treated on plate 0, 8 on plate 1, none on plate 2
    chosen = plate_matched_controls(plates, treated_rows, control_rows, np.random.default_rng(0))
    assert set(chosen) <= set(control_rows)
    assert (plates[chosen] == 0).sum() == 2 and (plates[chosen] == 1).sum() == 2 and (plates[chosen] == 2).sum() == 0


# --------------------------------------------------------------------------- correction


def test_center_removes_plate_offsets_and_tvn_whitens_controls():
    rng = np.random.default_rng(0)
    plates = np.repeat(np.arange(3), 200)
    is_control = np.tile(np.r_[np.ones(150, bool), np.zeros(50, bool)], 3)
    offsets = np.array([[0, 0, 0], [5, -3, 1], [-4, 2, 8]], dtype=float)
    scales = np.array([1.0, 3.0, 0.5])
    mixing = np.array([[1, 0.8, 0], [0, 1, 0.5], [0, 0, 1]])
    X = offsets[plates] + scales[plates, None] * rng.normal(size=(600, 3)) @ mixing
    centered = center_by_plate(X, plates, is_control)
    for p in range(3):
        controls = centered[(plates == p) & is_control]
        np.testing.assert_allclose(controls.mean(axis=0), 0, atol=1e-9)
        np.testing.assert_allclose(controls.std(axis=0), 1, atol=1e-9)
    whitened_cov = np.cov(tvn(X, plates, is_control)[is_control], rowvar=False)
    # Ledoit-Wolf shrinks towards a scaled identity: same eigenvectors, so controls are exactly decorrelated.
    np.testing.assert_allclose(whitened_cov - np.diag(np.diag(whitened_cov)), 0, atol=1e-9)
    np.testing.assert_allclose(np.diag(whitened_cov), 1, atol=0.1)
    # Fewer controls than features: whitening stays bounded instead of blowing unspanned directions up.
    wide = rng.normal(size=(40, 64))
    few = np.r_[np.ones(20, bool), np.zeros(20, bool)]
    assert np.abs(tvn(wide, np.zeros(40), few)).max() < 20
    np.testing.assert_array_equal(correct(X, plates, is_control, "none"), X.astype(np.float32))
    with pytest.raises(ValueError, match="fewer than"):
        center_by_plate(X, plates, is_control & (plates != 2))


def test_a_feature_constant_on_one_plates_controls_does_not_blow_up():
    """A ReLU unit that is zero on one plate's controls (or on all of them) stays on the scale of the others."""
    rng = np.random.default_rng(1)
    plates = np.repeat(np.arange(4), 50)
    is_control = np.tile(np.r_[np.ones(30, bool), np.zeros(20, bool)], 4)
    X = np.maximum(rng.normal(size=(200, 8)), 0.0)
    X[:, 7] = np.abs(rng.normal(size=200))
    X[(plates == 2) & is_control, 7] = 0.0  # dead on plate 2's controls only
    X[is_control, 6] = 0.0  # dead on every control, alive in some treated sites
    for method in ("center", "tvn"):
        corrected = correct(X, plates, is_control, method)
        assert np.isfinite(corrected).all()
        assert np.abs(corrected).max() < 100, method
    centered = center_by_plate(X, plates, is_control)
    np.testing.assert_allclose(centered[:, 6], X[:, 6])  # no scale anywhere: left as it is (StandardScaler)
    treated_on_plate_2 = (plates == 2) & ~is_control
    assert np.abs(centered[treated_on_plate_2, 7]).max() < 50  # floored at a tenth of the typical std


# --------------------------------------------------------------------------- mAP


def naive_average_precision(positive_scores, negative_scores):
    """AP straight from its definition: mean over positives of precision at that positive's rank."""
    scores = np.r_[positive_scores, negative_scores]
    is_positive = np.r_[np.ones(len(positive_scores), bool), np.zeros(len(negative_scores), bool)]
    order = np.argsort(-scores, kind="stable")
    hits = np.cumsum(is_positive[order])
    return np.mean([hits[r] / (r + 1) for r in range(len(order)) if is_positive[order][r]])


def naive_map(profiles, plates, queries, negatives):
    """Each replicate ranks the other replicates and its own plate's negatives by cosine similarity."""
    aps = []
    for q in queries:
        positives = [profiles[q] @ profiles[j] for j in queries if j != q]
        same_plate = [profiles[q] @ profiles[j] for j in negatives if plates[j] == plates[q]]
        aps.append(naive_average_precision(np.array(positives), np.array(same_plate)))
    return float(np.mean(aps))


def profile_setup(meta, X, method, seed=0):
    """Well profiles corrected on the reference half of the controls, plate codes and the comparison wells."""
    site_plates = plate_keys(meta)
    reference = split_controls(meta["well_id"], site_plates, (meta["treatment"] == "EMPTY").to_numpy(), seed)
    wells, profiles = well_profiles(meta, correct(X, pd.factorize(site_plates)[0], reference, method))
    well_plates = pd.Index(pd.unique(site_plates)).get_indexer(plate_keys(wells))
    comparison = (wells["treatment"] == "EMPTY") & ~wells["well_id"].isin(meta["well_id"][reference])
    return wells, unit_rows(profiles), well_plates, np.flatnonzero(comparison)


def test_average_precision_reference_and_bh_match_sklearn_and_naive():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 7), rng.normal(0, 1, 20)
    expected = average_precision_score(np.r_[np.ones(7), np.zeros(20)], np.r_[pos, neg])
    assert naive_average_precision(pos, neg) == pytest.approx(expected)
    p = np.array([0.01, 0.04, np.nan, 0.03, 0.5, 0.2])
    tested = np.sort(p[~np.isnan(p)])
    m = len(tested)
    naive = [min(1.0, min(tested[j] * m / (j + 1) for j in range(m) if tested[j] >= x)) for x in p[~np.isnan(p)]]
    q = benjamini_hochberg(p)
    assert np.isnan(q[2])
    np.testing.assert_allclose(q[~np.isnan(p)], naive)


def test_controls_split_by_well_into_halves_per_plate():
    meta, _ = synthetic_embeddings(control_wells=7)
    is_control = (meta["treatment"] == "EMPTY").to_numpy()
    reference = split_controls(meta["well_id"], plate_keys(meta), is_control, seed=0)
    assert not (reference & ~is_control).any()
    for plate in plate_keys(meta).unique():
        on_plate = (plate_keys(meta) == plate).to_numpy()
        assert meta["well_id"][reference & on_plate].nunique() == 4
        assert meta["well_id"][~reference & on_plate & is_control].nunique() == 3
    by_well = pd.Series(reference).groupby(meta["well_id"]).nunique()
    assert (by_well == 1).all()  # a well's sites stay on one side
    np.testing.assert_array_equal(reference, split_controls(meta["well_id"], plate_keys(meta), is_control, seed=0))


def test_map_matches_the_naive_definition_and_is_high_for_a_planted_treatment():
    meta, X = synthetic_embeddings(seed=4)
    wells, profiles, plates, negatives = profile_setup(meta, X, "center")
    for treatment in ("PLANTED", "NOISE", "ONE_PLATE"):
        queries = np.flatnonzero(wells["treatment"] == treatment)
        observed, p = map_permutation_test(profiles, plates, queries, negatives, 200, np.random.default_rng(0))
        assert observed == pytest.approx(naive_map(profiles, plates, queries, negatives), abs=1e-5)
        if treatment == "PLANTED":
            assert observed > 0.9 and p < 0.01
    assert np.isnan(map_permutation_test(profiles, plates, queries[:1], negatives, 10, np.random.default_rng(0))[0])


def test_map_is_near_chance_for_shuffled_labels():
    p_values = []
    for trial in range(10):
        meta, X = synthetic_embeddings(seed=20 + trial)
        wells, profiles, plates, negatives = profile_setup(meta, X, "center")
        planted = np.flatnonzero(wells["treatment"] == "PLANTED")
        planted_map, _ = map_permutation_test(profiles, plates, planted, negatives, 10, np.random.default_rng(0))
        # The planted label moved to random wells without an effect: its structure is gone.
        null_wells = np.flatnonzero(wells["treatment"].isin(["NOISE", "ONE_PLATE"]))
        fake = np.random.default_rng(trial).choice(null_wells, size=12, replace=False)
        fake_map, p = map_permutation_test(profiles, plates, fake, negatives, 200, np.random.default_rng(trial))
        assert planted_map > 0.9 and fake_map < planted_map - 0.2
        p_values.append(p)
    assert np.median(p_values) > 0.2 and np.mean(np.array(p_values) < 0.05) <= 0.2, sorted(p_values)


def test_center_restores_the_planted_map_under_plate_offsets():
    meta, X = synthetic_embeddings(plate_offset=4.0, shift=1.5, seed=2)
    maps = {}
    for method in ("none", "center"):
        wells, profiles, plates, negatives = profile_setup(meta, X, method)
        queries = np.flatnonzero(wells["treatment"] == "PLANTED")
        maps[method] = map_permutation_test(profiles, plates, queries, negatives, 10, np.random.default_rng(0))[0]
    assert maps["center"] > 0.9 and maps["center"] > maps["none"] + 0.2, maps


@pytest.mark.parametrize("method", ["center", "tvn"])
def test_correction_does_not_make_a_null_treatment_active(method):
    """A null treatment on one plate with few controls: p-values stay spread out, not piled near 0."""
    p_values = []
    for seed in range(24):
        meta, X = synthetic_embeddings(shift=0.0, plate_offset=2.0, seed=100 + seed)
        wells, profiles, plates, negatives = profile_setup(meta, X, method, seed=seed)
        queries = np.flatnonzero(wells["treatment"] == "ONE_PLATE")
        p_values.append(map_permutation_test(profiles, plates, queries, negatives, 100,
                                             np.random.default_rng(seed))[1])
    assert np.median(p_values) > 0.3 and np.mean(np.array(p_values) < 0.05) <= 0.15, sorted(p_values)


# --------------------------------------------------------------------------- the step


def test_load_embeddings_reads_embed_parquet_and_rxrx2_csv_in_site_order(tmp_path):
    meta, X = synthetic_embeddings(dim=8, n_plates=2, control_wells=2, wells_per_treatment=1, sites=2)
    # Written out of order, as blocks that finish out of order leave them: read back in site_id order.
    written = np.random.default_rng(0).permutation(len(meta))
    got_meta, got_X = load_embeddings(write_embed_parquet(meta.iloc[written].reset_index(drop=True), X[written],
                                                          str(tmp_path / "embed")))
    in_site_order = np.argsort(meta["site_id"].to_numpy(dtype=str), kind="stable")
    expected = meta.iloc[in_site_order].reset_index(drop=True)
    pd.testing.assert_frame_equal(got_meta, expected.astype(got_meta.dtypes.to_dict()))
    np.testing.assert_array_equal(got_X, X[in_site_order])
    csv_meta, csv_X = load_embeddings(write_rxrx2_csv(meta, X, str(tmp_path / "rxrx2")))
    order = meta.set_index("site_id").index.get_indexer(csv_meta["site_id"])
    np.testing.assert_allclose(csv_X, X[order], rtol=1e-6)
    assert list(csv_meta.columns) == layout.METADATA_COLUMNS
    assert (csv_meta["treatment"].to_numpy() == meta["treatment"].iloc[order].to_numpy()).all()


def test_score_separates_planted_from_noise(tmp_path, ray_local):
    meta, X = synthetic_embeddings(seed=0)
    # Written by Ray Data as `rxray embed` writes it: the embedding is Ray's tensor extension type.
    items = [{**row, "embedding": X[i]} for i, row in enumerate(meta.to_dict("records"))]
    ray_local.data.from_items(items).write_parquet(str(tmp_path / "embed" / "sites"))
    out = str(tmp_path / "scores")
    cfg = load_config(ScoreConfig, values=dict(embeddings=str(tmp_path / "embed"),
                                               out=out, trees=30, folds=4, permutations=200,
                                               correct=["none", "center", "tvn"]))
    summary = score(cfg)
    table = pd.read_parquet(os.path.join(out, "scores.parquet"))
    assert len(table) == 9 and set(table["correction"]) == {"none", "center", "tvn"}
    assert list(pd.read_csv(os.path.join(out, "scores.csv")).columns) == list(table.columns)
    by = table.set_index(["treatment", "correction"])
    for correction in ("none", "center", "tvn"):
        planted, noise = by.loc[("PLANTED", correction)], by.loc[("NOISE", correction)]
        assert planted["f1"] > 0.9 and planted["roc_auc"] > 0.9, planted.to_dict()
        assert abs(noise["roc_auc"] - 0.5) < 0.15, noise.to_dict()
        assert planted["active"] and planted["map"] > 0.8 and not noise["active"]
        assert planted["n_treated"] == 4 * 6 * 3 and planted["n_control"] == planted["n_treated"]
        one_plate = by.loc[("ONE_PLATE", correction)]
        assert np.isnan(one_plate["f1"]) and "cross-validate" in one_plate["status"] and not one_plate["active"]
    assert summary.summary["corrections"]["center"]["n_active"] == 1
    manifest = json.loads(open(os.path.join(out, "_manifest.json")).read())
    assert manifest["step"] == "score" and manifest["counts"]["scored_sites"] == len(meta)


def test_the_generators_own_embeddings_score_what_truth_json_planted(tmp_path, ray_local):
    """The synthetic screen's embeddings.csv (its planted effects, no learning) through `rxray score`: every planted
    treatment active and every planted null not, as truth.json says. Scoring itself is checked, apart from training."""
    from rxray.config import SynthConfig
    from rxray.data.synth import synthesize

    source = str(tmp_path / "synth")
    synthesize(load_config(SynthConfig, values=dict(out=source, experiments=2, plates=2, wells=32, controls=8,
                                                    sites=1, size=32, treatments=10, seed=1)))
    out = str(tmp_path / "score")
    score(load_config(ScoreConfig, values=dict(embeddings=f"{source}/embeddings.csv", out=out, trees=10, folds=2,
                                               permutations=100, correct=["tvn"])))
    planted = json.loads(storage.read_text(f"{source}/truth.json"))["treatments"]
    active = pd.read_csv(os.path.join(out, "scores.csv")).set_index("treatment")["active"]
    nulls = [name for name, truth in planted.items() if truth["null"]]
    assert nulls and len(planted) - len(nulls) >= 8
    assert {name: bool(active[name]) for name in planted} == {name: name not in nulls for name in planted}


def test_cli_scores_an_rxrx2_embeddings_csv_on_a_flaky_s3(tmp_path, ray_local, s3_bucket, s3_proxy, capsys):
    meta, X = synthetic_embeddings(dim=layout.EMBEDDING_DIM, seed=1)
    local_csv = write_rxrx2_csv(meta, X, str(tmp_path / "rxrx2"))
    for name in ("embeddings.csv", "metadata.csv"):  # metadata.csv is found beside embeddings.csv
        with open(os.path.join(os.path.dirname(local_csv), name), "rb") as handle:
            storage.write_bytes(f"{s3_bucket}/rxrx2/{name}", handle.read())
    out = f"{s3_bucket}/scores"
    with s3_proxy.flaky(failure_rate=0.1, delay_rate=0.1) as faults:  # a tenth of the requests fail: retried
        rc = main(["score", "--embeddings", f"{s3_bucket}/rxrx2/embeddings.csv", "--out", out, "--trees", "20",
                   "--permutations", "100", "--correct", "none,center", "--treatments", "PLANTED,NOISE"])
    assert rc == 0 and faults["503"] + faults["500"] + faults["reset"] > 0, faults
    assert faults["applied-reset"] + faults["truncated"] > 0, faults  # and some that half happened
    printed = json.loads(capsys.readouterr().out)
    assert printed["summary"]["n_treatments"] == 2 and set(printed["summary"]["corrections"]) == {"none", "center"}
    table = pd.read_csv(io.BytesIO(storage.read_bytes(f"{out}/scores.csv")))
    assert len(table) == 4 and storage.exists(f"{out}/scores.parquet") and storage.exists(f"{out}/_manifest.json")
    planted = table[(table["treatment"] == "PLANTED") & (table["correction"] == "center")].iloc[0]
    assert planted["active"] and planted["roc_auc"] > 0.9
    assert main(["score", "--embeddings", f"{s3_bucket}/rxrx2/embeddings.csv", "--out", out,
                 "--treatments", "NOPE"]) == 2
    assert "score.treatments" in capsys.readouterr().err
