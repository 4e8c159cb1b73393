"""Train/validation/test splits by group (plate, experiment or compound), never by image.

Sites of one well are near-duplicates and plates carry their own batch effects, so
a split that puts sites of one plate on both sides leaks. Whole groups are dealt to
the splits instead: a seeded shuffle of the sorted group names, so the same groups
and seed always give the same splits. Among a few seeded shuffles the first one
whose validation and test splits hold every class is taken (the classes a task
needs are not on every plate of a real screen); if none does, the one missing the
fewest (split, class) pairs.

A plate group is ``<experiment>_<plate>`` (RxRx2 numbers plates 1..12 within each
experiment, so the plate number alone would merge plates of different experiments).

By compound (``treatment``) asks what a classifier says of a compound it has never seen:
every treatment, all its doses and replicates, goes to one split, and each class's
compounds are dealt separately (:func:`assign_compound_splits`), so every class with
enough compounds has one in validation and test and the rest in training. Control
(EMPTY) sites are no compound: their wells are dealt like plates, so every split holds
controls and no control well spans two splits.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from rxray import storage
from rxray.layout import CONTROL

SPLITS = ("train", "val", "test")
GROUP_BY = ("plate", "experiment", "treatment")
CONTROL_WELL_PREFIX = CONTROL + "@"  # the split group of a control well under a compound split
SPLITS_CSV = "splits.csv"
SPLITS_JSON = "splits.json"
# Seeded shuffles tried in search of one with every class in validation and test; cheap
# (groups x classes set operations each), and enough to find one when it is common.
SHUFFLES_TRIED = 64


def group_keys(frame: pd.DataFrame, by: str) -> pd.Series:
    """The split group of every row: ``<experiment>_<plate>`` for plate, the experiment name for experiment,
    the treatment for treatment (``EMPTY@<well_id>`` for a control site)."""
    if by not in GROUP_BY:
        raise ValueError(f"unknown split group {by!r}; choose one of {', '.join(GROUP_BY)}")
    if by == "treatment":
        treatment = frame["treatment"].astype(str)
        control = treatment == CONTROL
        return treatment.where(~control, CONTROL_WELL_PREFIX + frame["well_id"].astype(str)).rename("group")
    experiment = frame["experiment"].astype(str)
    if by == "experiment":
        return experiment.rename("group")
    return (experiment + "_" + frame["plate"].astype(str)).rename("group")


def split_sizes(n_groups: int, val_frac: float, test_frac: float) -> tuple[int, int, int]:
    """(train, val, test) group counts: each non-zero fraction gets at least one group, train the rest.

    Raises ValueError when the groups are too few to leave one for training.
    """
    n_val = max(1, round(val_frac * n_groups)) if val_frac > 0 else 0
    n_test = max(1, round(test_frac * n_groups)) if test_frac > 0 else 0
    if n_groups - n_val - n_test < 1:
        needed = 1 + (val_frac > 0) + (test_frac > 0)
        raise ValueError(f"{n_groups} group(s) cannot be split into train/val/test with val_frac={val_frac} and "
                         f"test_frac={test_frac}: at least {needed} are needed (lower a fraction to 0, or split "
                         f"by plate instead of experiment)")
    return n_groups - n_val - n_test, n_val, n_test


def assign_splits(groups: Iterable[str], val_frac: float, test_frac: float, seed: int,
                  classes_by_group: Mapping[str, Iterable[str]] | None = None) -> dict[str, str]:
    """Group -> "train" | "val" | "test", deterministic for the groups (in any order) and seed.

    ``classes_by_group`` (the classes present in each group) makes the choice prefer
    a shuffle where the validation and test splits contain every class.
    """
    ordered = sorted(set(str(g) for g in groups))
    sizes = split_sizes(len(ordered), val_frac, test_frac)
    present = {g: frozenset(map(str, classes_by_group.get(g, ()))) for g in ordered} if classes_by_group else None
    rng = np.random.default_rng(seed)
    best, best_missing = None, math.inf
    for _ in range(SHUFFLES_TRIED if present else 1):
        order = [ordered[i] for i in rng.permutation(len(ordered))]
        assignment = _deal(order, sizes)
        missing = _missing_classes(assignment, present) if present else 0
        if missing < best_missing:
            best, best_missing = assignment, missing
        if missing == 0:
            break
    return dict(sorted(best.items()))


def assign_compound_splits(class_of_compound: Mapping[str, str], control_wells: Iterable[str], val_frac: float,
                           test_frac: float, seed: int) -> dict[str, str]:
    """Compound (and control-well group) -> split: each class's compounds dealt on their own, with the seed.

    Every class gets at least one compound in each split with a non-zero fraction and one
    in training; ValueError names the classes with too few compounds for that.
    """
    needed = 1 + (val_frac > 0) + (test_frac > 0)
    by_class: dict[str, list[str]] = {}
    for compound, label in sorted(class_of_compound.items()):
        by_class.setdefault(str(label), []).append(str(compound))
    short = {label: len(compounds) for label, compounds in by_class.items() if len(compounds) < needed}
    if short:
        listed = ", ".join(f"{label} ({n})" for label, n in sorted(short.items()))
        raise ValueError(f"a split by compound needs at least {needed} compounds per class (one for each of "
                         f"train{', val' if val_frac > 0 else ''}{', test' if test_frac > 0 else ''}); too few: "
                         f"{listed}: leave them out with --classes, or lower --val-frac to 0")
    assignment: dict[str, str] = {}
    rng = np.random.default_rng(seed)
    for label in sorted(by_class):
        compounds = by_class[label]
        sizes = split_sizes(len(compounds), val_frac, test_frac)
        assignment.update(_deal([compounds[i] for i in rng.permutation(len(compounds))], sizes))
    wells = sorted(set(map(str, control_wells)))
    if wells:
        try:
            sizes = split_sizes(len(wells), val_frac, test_frac)
        except ValueError:  # too few control wells to deal: they all train
            sizes = (len(wells), 0, 0)
        assignment.update(_deal([wells[i] for i in rng.permutation(len(wells))], sizes))
    return dict(sorted(assignment.items()))


def _deal(order: Sequence[str], sizes: tuple[int, int, int]) -> dict[str, str]:
    """Test groups first, then validation, the rest training, in the shuffled order."""
    n_train, n_val, n_test = sizes
    names = ["test"] * n_test + ["val"] * n_val + ["train"] * n_train
    return dict(zip(order, names))


def _missing_classes(assignment: Mapping[str, str], present: Mapping[str, frozenset]) -> int:
    """(split, class) pairs absent, over the splits that have groups; every class counts in every split."""
    every = frozenset().union(*present.values())
    missing = 0
    for split in set(assignment.values()):
        seen = frozenset().union(*(present[g] for g, s in assignment.items() if s == split))
        missing += len(every - seen)
    return missing


def split_counts(groups: pd.Series, assignment: Mapping[str, str],
                 labels: pd.Series | None = None) -> dict[str, dict[str, Any]]:
    """Per split: its groups, site count and (with ``labels``) sites per class."""
    split = groups.map(assignment)
    counts: dict[str, dict[str, Any]] = {}
    for name in SPLITS:
        mask = (split == name).to_numpy()
        entry: dict[str, Any] = {"groups": sorted(g for g, s in assignment.items() if s == name),
                                 "sites": int(mask.sum())}
        if labels is not None:
            entry["classes"] = {str(k): int(v) for k, v in labels[mask].value_counts().sort_index().items()}
        counts[name] = entry
    return counts


def write_splits(out: str, assignment: Mapping[str, str], counts: Mapping[str, Any], *, by: str, seed: int,
                 val_frac: float, test_frac: float, sites_per_group: Mapping[str, int] | None = None) -> list[str]:
    """Write ``splits.json`` (settings, group -> split, counts) and ``splits.csv`` under ``out``; returns URIs."""
    document = {"by": by, "seed": seed, "val_frac": val_frac, "test_frac": test_frac,
                "groups": dict(sorted(assignment.items())), "counts": counts}
    json_uri = storage.join(out, SPLITS_JSON)
    storage.write_text(json_uri, json.dumps(document, indent=2))
    table = pd.DataFrame({"group": list(assignment), "split": list(assignment.values())}).sort_values("group")
    if sites_per_group is not None:
        table["sites"] = [int(sites_per_group.get(g, 0)) for g in table["group"]]
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    csv_uri = storage.join(out, SPLITS_CSV)
    storage.write_text(csv_uri, buffer.getvalue())
    return [json_uri, csv_uri]


def read_splits(out: str) -> dict[str, Any] | None:
    """The ``splits.json`` document written under ``out``, or None if there is none."""
    uri = storage.join(out, SPLITS_JSON)
    if not storage.exists(uri):
        return None
    return json.loads(storage.read_text(uri))
