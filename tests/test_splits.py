"""Grouped train/validation/test splits: whole plates (or experiments) per split, seeded and deterministic."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from rxray.data.splits import (SPLITS_CSV, assign_splits, group_keys, read_splits, split_counts, split_sizes,
                               write_splits)


def _sites(experiments: int = 2, plates: int = 12, per_plate: int = 6) -> pd.DataFrame:
    """Metadata of a screen: RxRx2 numbers plates 1..N within each experiment."""
    rows = []
    for e in range(1, experiments + 1):
        for p in range(1, plates + 1):
            for i in range(per_plate):
                rows.append({"site_id": f"HUVEC-{e}_{p}_A{i + 1:02d}_1", "experiment": f"HUVEC-{e}", "plate": p,
                             "treatment": ["EMPTY", "IFN-beta", "IFN-gamma"][i % 3]})
    return pd.DataFrame(rows)


def test_plate_groups_keep_experiments_apart():
    sites = _sites(experiments=2, plates=2, per_plate=1)
    assert group_keys(sites, "plate").tolist() == ["HUVEC-1_1", "HUVEC-1_2", "HUVEC-2_1", "HUVEC-2_2"]
    assert group_keys(sites, "experiment").tolist() == ["HUVEC-1", "HUVEC-1", "HUVEC-2", "HUVEC-2"]
    with pytest.raises(ValueError, match="unknown split group"):
        group_keys(sites, "well")


@pytest.mark.parametrize("groups, val, test, expected", [
    (4, 0.2, 0.2, (2, 1, 1)),  # the default synthetic dataset: 2 experiments x 2 plates
    (24, 0.2, 0.2, (14, 5, 5)),  # RxRx2: 2 experiments x 12 plates
    (2, 0.0, 0.5, (1, 0, 1)),  # RxRx2 by experiment: train on one, test on the other
    (3, 0.1, 0.1, (1, 1, 1)),  # a non-zero fraction always gets a group
])
def test_split_sizes(groups, val, test, expected):
    assert split_sizes(groups, val, test) == expected


def test_too_few_groups_is_a_clear_error():
    with pytest.raises(ValueError, match="2 group\\(s\\) cannot be split .* at least 3 are needed"):
        split_sizes(2, 0.2, 0.2)


def test_no_plate_in_two_splits_and_every_site_in_one():
    sites = _sites()
    groups = group_keys(sites, "plate")
    assignment = assign_splits(groups, 0.2, 0.2, seed=0)
    assert set(assignment) == set(groups)  # a dict: each plate has exactly one split
    assert sorted(assignment.values()).count("test") == 5 and sorted(assignment.values()).count("val") == 5
    split_of_site = groups.map(assignment)
    assert split_of_site.notna().all()
    for split in ("train", "val", "test"):
        plates = set(groups[split_of_site == split])
        others = set(groups[split_of_site != split])
        assert plates and not plates & others


def test_splits_are_deterministic_for_a_seed_and_change_with_it():
    groups = group_keys(_sites(), "plate")
    first = assign_splits(groups, 0.2, 0.2, seed=3)
    assert assign_splits(list(reversed(groups.tolist())), 0.2, 0.2, seed=3) == first  # input order is irrelevant
    assert any(assign_splits(groups, 0.2, 0.2, seed=s) != first for s in (4, 5, 6))


def test_class_coverage_prefers_splits_holding_every_class():
    # Three of six plates hold the rare class: most shuffles leave it out of a split, the chosen one does not.
    present = {f"P{i}": {"EMPTY"} for i in range(6)}
    for plate in ("P0", "P3", "P5"):
        present[plate] = {"EMPTY", "rare"}
    for seed in range(5):
        assignment = assign_splits(present, 1 / 6, 1 / 6, seed=seed, classes_by_group=present)
        for split in ("train", "val", "test"):
            assert any("rare" in present[g] for g, s in assignment.items() if s == split), (seed, assignment)


def test_counts_and_files_round_trip(tmp_path):
    sites = _sites(experiments=2, plates=2, per_plate=6)
    groups = group_keys(sites, "plate")
    assignment = assign_splits(groups, 0.2, 0.2, seed=0)
    counts = split_counts(groups, assignment, sites["treatment"])
    assert sum(counts[s]["sites"] for s in counts) == len(sites)
    assert counts["test"]["classes"] == {"EMPTY": 2, "IFN-beta": 2, "IFN-gamma": 2}
    assert len(counts["train"]["groups"]) == 2

    out = str(tmp_path / "run")
    write_splits(out, assignment, counts, by="plate", seed=0, val_frac=0.2, test_frac=0.2,
                 sites_per_group=groups.value_counts().to_dict())
    document = read_splits(out)
    assert document["groups"] == assignment and document["by"] == "plate" and document["counts"] == counts
    table = pd.read_csv(tmp_path / "run" / SPLITS_CSV)
    assert table.columns.tolist() == ["group", "split", "sites"]
    assert dict(zip(table["group"], table["split"])) == assignment and table["sites"].tolist() == [6] * 4
    json.dumps(document)  # strict JSON
    assert read_splits(str(tmp_path / "nothing")) is None


def _compound_screen() -> pd.DataFrame:
    """Sites of 4 mechanisms x 3-5 compounds on 4 plates, every compound on every plate, plus control wells."""
    rows = []
    mechanisms = {"ER": 3, "HDAC": 4, "DNA": 3, "mito": 5}
    for plate in range(1, 5):
        for moa, n in mechanisms.items():
            for c in range(n):
                for site in (1, 2):
                    rows.append({"experiment": "HUVEC-1", "plate": plate, "well_id": f"HUVEC-1_{plate}_{moa}{c}",
                                 "treatment": f"{moa}-{c}", "moa": moa, "site": site})
        for well in range(6):
            rows.append({"experiment": "HUVEC-1", "plate": plate, "well_id": f"HUVEC-1_{plate}_E{well}",
                         "treatment": "EMPTY", "moa": "control", "site": 1})
    return pd.DataFrame(rows)


def test_a_compound_split_keeps_every_compound_in_one_split_and_every_mechanism_in_each():
    from rxray.data.splits import assign_compound_splits

    sites = _compound_screen()
    groups = group_keys(sites, "treatment")
    treated = sites["treatment"] != "EMPTY"
    compounds = sites[treated].groupby("treatment")["moa"].first().to_dict()
    assignment = assign_compound_splits(compounds, groups[~treated].unique(), 0.2, 0.2, seed=0)
    split_of_site = groups.map(assignment)
    assert split_of_site.notna().all()
    for compound, rows in sites[treated].groupby("treatment"):
        assert split_of_site[rows.index].nunique() == 1, compound  # all doses, plates and sites together
    for moa in ("ER", "HDAC", "DNA", "mito"):
        splits = set(split_of_site[sites["moa"] == moa])
        assert splits == {"train", "val", "test"}, (moa, splits)
    control_wells = sites[~treated].groupby("well_id").apply(lambda rows: split_of_site[rows.index].nunique())
    assert (control_wells == 1).all() and set(split_of_site[~treated]) == {"train", "val", "test"}
    assert assignment == assign_compound_splits(dict(reversed(list(compounds.items()))),
                                                groups[~treated].unique()[::-1], 0.2, 0.2, seed=0)  # deterministic


def test_a_mechanism_with_too_few_compounds_is_named_in_one_line():
    from rxray.data.splits import assign_compound_splits

    compounds = {"a": "ER", "b": "ER", "c": "ER", "d": "GPCR", "e": "kinase", "f": "kinase"}
    with pytest.raises(ValueError) as error:
        assign_compound_splits(compounds, [], 0.2, 0.2, seed=0)
    message = str(error.value)
    assert "\n" not in message and "at least 3 compounds per class" in message
    assert "GPCR (1)" in message and "kinase (2)" in message and "ER" not in message.split("too few:")[1]
    # Without a validation split two compounds are enough.
    assert set(assign_compound_splits({k: v for k, v in compounds.items() if v != "GPCR"}, [], 0.0, 0.3,
                                      seed=0).values()) == {"train", "test"}
