"""The plate-grouped probe: high on planted separable embeddings, chance on noise, plates never on both sides."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from rxray.layout import plate_groups
from rxray.evaluate import probe
from rxray.evaluate.probe import grouped_folds, probe_score
from rxray.evaluate.probe_step import PROBE_TABLE, embed_batches
from rxray.models.inputs import InputRecipe
from rxray.evaluate.probe_sites import probe_targets, select_probe_sites
from conftest import shard_row

CLASSES = ["EMPTY", "IFN-beta", "IFN-gamma", "etoposide"]


def planted(n_plates: int = 6, per_class: int = 10, dim: int = 32, signal: float = 3.0, plate_shift: float = 2.0,
            seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings with one direction per class (strength ``signal``) and a random offset per plate."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(size=(len(CLASSES), dim))
    X, treatments, groups = [], [], []
    for plate in range(n_plates):
        offset = plate_shift * rng.normal(size=dim)
        for k, name in enumerate(CLASSES):
            X.append(rng.normal(size=(per_class, dim)) + signal * directions[k] + offset)
            treatments += [name] * per_class
            groups += [f"HUVEC-{plate % 2 + 1}_{plate // 2 + 1}"] * per_class
    return np.concatenate(X), np.asarray(treatments, dtype=object), np.asarray(groups, dtype=object)


@pytest.mark.parametrize("method", ["logistic", "knn"])
def test_planted_classes_score_high(method):
    X, treatments, groups = planted()
    result = probe_score(X, treatments, groups, method=method)
    assert result["score"] > 0.9 and result["accuracy"] > 0.9
    assert result["chance"] == 0.25 and result["classes"] == sorted(CLASSES)
    assert result["n"] == len(X) and result["groups"] == 6 and result["folds"] == 5


def test_noise_scores_near_chance():
    X, treatments, groups = planted(signal=0.0, per_class=20, seed=3)
    result = probe_score(X, treatments, groups)
    assert abs(result["score"] - result["chance"]) < 0.12


def test_treated_vs_control_is_binary_with_an_auc():
    X, treatments, groups = planted()
    targets = probe_targets(treatments, "control")
    assert set(targets) == {"control", "treated"} and (targets == "control").sum() == (treatments == "EMPTY").sum()
    result = probe_score(X, targets, groups)
    assert result["score"] > 0.9 and result["roc_auc"] > 0.95 and result["chance"] == 0.5


def test_knn_votes_are_class_balanced_so_a_small_control_class_is_still_called():
    """10 % controls, treated shifted by 1.5 sd on one feature: plain 5-NN votes call nearly every site treated
    (balanced accuracy 0.53 before the votes were weighed), class-balanced votes recover what logistic sees."""
    rng = np.random.default_rng(0)
    X = np.concatenate([np.concatenate([rng.normal(0, 1, (10, 8)), rng.normal(0, 1, (90, 8)) + 1.5 * np.eye(8)[0]])
                        for _ in range(4)])
    targets = np.asarray((["control"] * 10 + ["treated"] * 90) * 4, dtype=object)
    groups = np.repeat([f"p{plate}" for plate in range(4)], 100)
    knn, logistic = (probe_score(X, targets, groups, method=m)["score"] for m in ("knn", "logistic"))
    assert knn > 0.65 and knn > logistic - 0.1, (knn, logistic)


def test_a_plate_effect_larger_than_the_signal_is_removed_by_centering_on_controls():
    X, treatments, groups = planted(signal=1.0, plate_shift=25.0, per_class=12, seed=5)
    raw = probe_score(X, treatments, groups)
    centered = probe_score(X, treatments, groups, center_on=treatments == "EMPTY")
    assert centered["score"] > raw["score"] + 0.1 and centered["score"] > 0.8


def test_folds_never_share_a_plate_and_test_every_site_once():
    _, _, groups = planted(n_plates=7)
    folds = grouped_folds(groups)
    tested = np.concatenate([test for _, test in folds])
    assert sorted(tested.tolist()) == list(range(len(groups)))
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
    assert len(grouped_folds(groups, max_folds=10)) == 7  # leave-one-plate-out when plates are few


def test_the_probe_never_sees_a_test_plate_in_training(monkeypatch):
    """Spy on the fitted folds: the training rows of a fold hold none of its test plates."""
    X, treatments, groups = planted()
    seen = []
    original = probe._fit_predict

    def spy(X_train, y_train, X_test, *args):
        train_rows = [int(np.flatnonzero((X == row).all(axis=1))[0]) for row in X_train]
        test_rows = [int(np.flatnonzero((X == row).all(axis=1))[0]) for row in X_test]
        seen.append((set(groups[train_rows]), set(groups[test_rows])))
        return original(X_train, y_train, X_test, *args)

    monkeypatch.setattr(probe, "_fit_predict", spy)
    probe_score(X, treatments, groups)
    assert len(seen) == 5 and all(not train & test for train, test in seen)
    assert set().union(*(test for _, test in seen)) == set(groups)


def test_a_single_plate_or_class_is_refused():
    X, treatments, groups = planted(n_plates=2)
    with pytest.raises(ValueError, match="at least 2 plates"):
        probe_score(X, treatments, np.full(len(X), "HUVEC-1_1"))
    with pytest.raises(ValueError, match="at least 2 classes"):
        probe_score(X, np.full(len(X), "EMPTY"), groups)


def test_site_selection_is_stratified_seeded_and_bounded():
    _, treatments, groups = planted(n_plates=4, per_class=30)
    experiments, plates = zip(*(g.split("_") for g in groups))
    meta = pd.DataFrame({"site_id": [f"s{i:05d}" for i in range(len(treatments))], "experiment": experiments,
                         "plate": np.asarray(plates, dtype=int), "treatment": treatments})
    sample = select_probe_sites(meta, task="treatment", max_sites=40, seed=1)
    assert sample["treatment"].value_counts().to_dict() == {name: 10 for name in CLASSES}
    assert len(set(plate_groups(sample["experiment"], sample["plate"]))) == 4
    again = select_probe_sites(meta.sample(frac=1.0, random_state=0), task="treatment", max_sites=40, seed=1)
    assert again["site_id"].tolist() == sample["site_id"].tolist()  # independent of row order

    subset = select_probe_sites(meta, task="control", treatments=["IFN-beta"], max_sites=1000)
    assert set(subset["treatment"]) == {"EMPTY", "IFN-beta"}
    with pytest.raises(ValueError, match="not in the data: nope"):
        select_probe_sites(meta, task="treatment", treatments=["nope"])


def test_embed_batches_runs_the_encoder_in_eval_mode_and_keeps_row_order():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Conv2d(6, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.AdaptiveAvgPool2d(1),
                                  torch.nn.Flatten())
    images = np.random.default_rng(0).integers(0, 255, (5, 6, 8, 8), dtype=np.uint8)
    batches = [{"image": images[:3], "site_id": np.array(["a", "b", "c"])},
               {"image": images[3:], "site_id": np.array(["d", "e"])}]
    recipe = InputRecipe((100.0,) * 6, (50.0,) * 6)
    features, columns = embed_batches(encoder, batches, recipe=recipe, device=torch.device("cpu"))
    assert features.shape == (5, 4) and features.dtype == np.float32 and not encoder.training
    assert columns["site_id"].tolist() == ["a", "b", "c", "d", "e"]
    with torch.no_grad():
        expected = encoder((torch.from_numpy(images).float() - 100.0) / 50.0).numpy()
    np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-5)
    # Blocks read in another order (Ray Data hands them over as they finish) give the same rows: by site_id.
    shuffled, again = embed_batches(encoder, batches[::-1], recipe=recipe, device=torch.device("cpu"))
    assert again["site_id"].tolist() == ["a", "b", "c", "d", "e"]
    np.testing.assert_allclose(shuffled, features, rtol=1e-6, atol=1e-6)


def test_plate_controls_top_up_every_plate_and_leave_out_plates_without_enough():
    _, treatments, groups = planted(n_plates=4, per_class=30)
    experiments, plates = zip(*(g.split("_") for g in groups))
    meta = pd.DataFrame({"site_id": [f"s{i:05d}" for i in range(len(treatments))], "experiment": experiments,
                         "plate": np.asarray(plates, dtype=int), "treatment": treatments})
    # the last plate keeps a single control site
    lone = (groups == groups[-1]) & (treatments == "EMPTY")
    meta = meta.drop(index=np.flatnonzero(lone)[1:])
    sample = select_probe_sites(meta, task="treatment", max_sites=8, seed=2, plate_controls=3)
    counts = sample[sample["treatment"] == "EMPTY"].groupby(["experiment", "plate"]).size()
    assert len(counts) == 3 and (counts >= 3).all()
    assert groups[-1] not in set(plate_groups(sample["experiment"], sample["plate"]))


# --------------------------------------------------------------------------- `rxray probe` end to end

PLATES = [("HUVEC-1", 1), ("HUVEC-1", 2), ("HUVEC-2", 1), ("HUVEC-2", 2)]
STAINS = {"EMPTY": None, "IFN-beta": 2, "IFN-gamma": 4}  # treatment -> the stain it brightens


def _probe_rows(size: int = 32, per_treatment: int = 6) -> list[dict]:
    """4 plates x 3 treatments of 32 px sites; a treatment doubles its stain, each plate has its own gain."""
    rng = np.random.default_rng(0)
    rows = []
    for p, (experiment, plate) in enumerate(PLATES):
        for t, (treatment, stain) in enumerate(STAINS.items()):
            for i in range(per_treatment):
                image = rng.normal(50, 10, (6, size, size)) * (1 + 0.15 * p)
                if stain is not None:
                    image[stain] *= 2
                well = f"{'ABC'[t]}{i + 1:02d}"
                rows.append(shard_row(experiment, plate, well, 1, treatment, 0.0 if stain is None else 1.0,
                                      np.clip(image, 0, 255).astype(np.uint8)))
    return rows


@pytest.fixture(scope="module")
def probe_shards(write_shards, tmp_path_factory):
    """The shards of :func:`_probe_rows`, on local disk."""
    return write_shards(str(tmp_path_factory.mktemp("probe") / "shards"), _probe_rows())


def test_probe_command_scores_the_encoder_beside_random_init_baselines(probe_shards, encoder_checkpoint, tmp_path,
                                                                      capsys):
    import json

    from rxray import storage
    from rxray.cli import main as cli_main

    # An "encoder" that is exactly random init with seed 0 must score exactly like the seed-0 baseline.
    model = encoder_checkpoint(str(tmp_path / "pretrain"), seed=0, perturb_batch_norm=False)
    out = str(tmp_path / "probe")
    assert cli_main(["probe", "--data", probe_shards, "--model", model, "--out", out, "--baseline-seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "72 sites of 3 treatment(s) on 4 plates" in printed and "margin" in printed

    table = pd.read_csv(storage.join(out, PROBE_TABLE))
    assert len(table) == 3 * 2 * 2 and set(table["encoder"]) == {"trained", "random_init_seed0", "random_init_seed1"}
    assert (table["n"] == 72).all() and (table["groups"] == 4).all()
    scores = table.set_index(["encoder", "task", "method"])["score"]
    for task in ("control", "treatment"):
        for method in ("logistic", "knn"):
            assert scores["trained", task, method] == scores["random_init_seed0", task, method]
    # a doubled stain is plain to any conv net once plates are centred on their controls
    assert scores["trained", "control", "logistic"] > 0.85 and scores["trained", "treatment", "logistic"] > 0.6

    manifest = json.loads(storage.read_text(storage.join(out, "_manifest.json")))
    comparison = {(row["task"], row["method"]): row for row in manifest["comparison"]}
    row = comparison["control", "logistic"]
    assert row["trained"] == round(scores["trained", "control", "logistic"], 4) and len(row["random_init"]) == 2
    assert row["margin"] == round(row["trained"] - max(row["random_init"]), 4) and row["margin"] <= 0
    assert manifest["counts"] == {"sites": 72, "plates": 4}


def test_probe_command_names_the_field_of_a_bad_value(probe_shards, encoder_checkpoint, tmp_path, capsys):
    from rxray.cli import main as cli_main

    model = encoder_checkpoint(str(tmp_path / "pretrain"))
    base = ["probe", "--data", probe_shards, "--model", model, "--out", str(tmp_path / "out")]
    assert cli_main([*base, "--treatments", "nope"]) == 2
    assert "probe.treatments: probe treatments not in the data: nope" in capsys.readouterr().err
    assert cli_main([*base, "--methods", "svm"]) == 2
    assert "probe.methods" in capsys.readouterr().err
    assert cli_main(["probe", "--data", probe_shards, "--model", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "probe.model" in capsys.readouterr().err
