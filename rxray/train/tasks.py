"""What a classifier learns from: the task's classes, its labelled rows, and the grouped splits they fall in.

A task (:class:`TaskPlan`) maps label values to classes in logit order: one treatment
against controls (binary), one label value against the rest (e.g. GPCR vs rest with
``--label-col moa``), or the identity of several classes (multiclass). Whole plates (or
experiments) go to the train, validation and test splits (:mod:`rxray.data.splits`); Ray
Data reads each split with the group filter pushed into the Parquet scan and labels its
rows (:func:`label_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from rxray import storage
from rxray.config import ConfigError, FinetuneConfig
from rxray.layout import CONTROL, row_gains

if TYPE_CHECKING:
    import pandas as pd
    import ray.data
    from ray.data.expressions import Expr

GAIN_COLUMN = "gain"  # per-row stain gains (6,) that plate normalisation multiplies images by
REST = "rest"  # --negative rest: every label value but the positive one
OTHER_CLASS = "other"  # name of a negative class made of several label values
# Metadata read for planning the task and the splits, and kept with every test prediction.
SITE_COLUMNS = ("site_id", "well_id", "well", "experiment", "plate", "treatment")


@dataclass
class TaskPlan:
    """The classes of a run (logit order) and how label values map to them."""

    task: str
    label_col: str
    classes: list[str]
    value_to_class: dict[str, int]  # label value -> class index
    rest_class: int | None = None  # class of every other labelled value (binary vs rest), else None
    positive: str | None = None
    negative_classes: list[str] = field(default_factory=list)  # label values of the negative class (binary)

    def class_indices(self, values: Iterable[Any]) -> np.ndarray:
        """Class index of each label value (int64), -1 for rows outside the task or without a label."""
        import pandas as pd

        series = pd.Series(list(values), dtype=object)
        missing = series.isna() | (series.astype(str).str.strip() == "")
        index = series.astype(str).map(self.value_to_class)
        if self.rest_class is not None:
            index = index.fillna(self.rest_class)
        index = index.fillna(-1).astype(np.int64).to_numpy()
        return np.where(missing.to_numpy(), -1, index)


def plan_task(cfg: FinetuneConfig, values: Sequence[str]) -> TaskPlan:
    """The task of a config over the label values present in the data; ConfigError names a bad field."""
    present = sorted({str(v) for v in values if v is not None and str(v).strip() and str(v) != "nan"})
    shown = ", ".join(present[:12]) + (", ..." if len(present) > 12 else "")

    def require(name: str, wanted: Sequence[str]) -> None:
        absent = [w for w in wanted if w not in present]
        if absent:
            raise ConfigError(f"finetune.{name}", f"{', '.join(absent)} not among the {cfg.label_col!r} values in "
                                                  f"{cfg.data} ({shown})")

    if cfg.task == "multiclass":
        classes = list(cfg.classes) if cfg.classes else present
        require("classes", classes)
        if len(classes) < 2:
            raise ConfigError("finetune.classes", f"a multiclass task needs at least 2 classes, got {classes}")
        return TaskPlan("multiclass", cfg.label_col, classes, {c: k for k, c in enumerate(classes)})

    positive = str(cfg.positive)
    require("positive", [positive])
    negatives = list(cfg.negative) if cfg.negative else ([CONTROL] if cfg.label_col == "treatment" else [REST])
    if REST in negatives:
        if len(negatives) > 1:
            raise ConfigError("finetune.negative", "'rest' stands alone (every value but the positive one)")
        rest = [v for v in present if v != positive]
        if not rest:
            raise ConfigError("finetune.negative", f"no {cfg.label_col!r} value other than {positive!r} in {cfg.data}")
        return TaskPlan("binary", cfg.label_col, [OTHER_CLASS, positive], {positive: 1}, rest_class=0,
                        positive=positive, negative_classes=rest)
    if positive in negatives:
        raise ConfigError("finetune.negative", f"{positive!r} is the positive class; it cannot be negative too")
    require("negative", negatives)
    negative_name = negatives[0] if len(negatives) == 1 else OTHER_CLASS
    return TaskPlan("binary", cfg.label_col, [negative_name, positive], {v: 0 for v in negatives} | {positive: 1},
                    positive=positive, negative_classes=negatives)


def label_batch(batch: dict[str, np.ndarray], *, plan: TaskPlan, keep: Sequence[str] = (),
                gains: dict[str, list[float]] | None = None, unlabelled: bool = False) -> dict[str, np.ndarray]:
    """Ray Data batch function: the task's rows as ``image``, ``label`` (class index), ``conc``, ``gain`` and ``keep``.

    Rows outside the task (other label values, no label) are dropped; with ``unlabelled``
    the rows without a label are the ones kept (label -1), to be predicted. Concentration
    is 0 where missing (controls carry none). ``gain`` is the row's plate gain per
    stain from ``gains`` (keyed by plate group), 1 without.
    """
    index = plan.class_indices(batch[plan.label_col])
    rows = index < 0 if unlabelled else index >= 0
    conc = np.nan_to_num(np.asarray(batch["treatment_conc"], dtype=np.float32)[rows], nan=0.0)
    gain = row_gains(gains, batch["experiment"][rows], batch["plate"][rows], batch["well"][rows])
    out = {"image": np.ascontiguousarray(batch["image"][rows]), "label": index[rows], "conc": conc,
           GAIN_COLUMN: gain}
    out.update({name: batch[name][rows] for name in keep})
    return out


def class_weights(counts: Sequence[int], mode: str) -> list[float]:
    """Loss weight per class: inverse to its training frequency ("auto", mean weight over samples 1) or 1."""
    counts = np.asarray(counts, dtype=np.float64)
    if mode == "none":
        return [1.0] * len(counts)
    return (counts.sum() / (len(counts) * np.maximum(counts, 1.0))).tolist()


def selection_metric(task: str) -> str:
    """The validation metric early stopping and model selection use: PR-AUC (binary) or macro F1."""
    return "pr_auc" if task == "binary" else "f1_macro"


# --------------------------------------------------------------------------- the splits


def read_metadata(cfg: FinetuneConfig) -> "pd.DataFrame":
    """The shards' metadata and label columns (no images): the work list for classes, splits and counts."""
    import pyarrow.dataset as pads

    fs, path = storage.pyarrow_filesystem(cfg.data)
    try:
        dataset = pads.dataset(path, filesystem=fs, format="parquet")
        names = dataset.schema.names
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise ConfigError("finetune.data", f"no ingest shards at {cfg.data}: {str(exc).splitlines()[0]}") from None
    if cfg.label_col not in names:
        labels = [n for n in names if n not in ("image", "site_id", "well_id", "site", "well", "treatment_conc")]
        raise ConfigError("finetune.label_col", f"{cfg.label_col!r} is not a column of {cfg.data} (columns: "
                                                f"{', '.join(labels)}; join labels at ingest with --labels)")
    columns = list(dict.fromkeys([*SITE_COLUMNS, cfg.label_col]))
    meta = dataset.to_table(columns=columns).to_pandas()
    if meta.empty:
        raise ConfigError("finetune.data", f"the shards at {cfg.data} hold no rows")
    return meta


def make_splits(cfg: FinetuneConfig, meta: "pd.DataFrame", plan: TaskPlan) -> dict[str, Any]:
    """Group -> split for the task's rows, the filter values of each split, and per-split counts."""
    from rxray.data.splits import assign_compound_splits, assign_splits, group_keys, split_counts

    groups = group_keys(meta, cfg.split_by)
    names = meta["class"].map(dict(enumerate(plan.classes)))
    try:
        if cfg.split_by == "treatment":
            treated = (meta["treatment"] != CONTROL).to_numpy()
            class_of_compound = names[treated].groupby(meta["treatment"][treated]).first().to_dict()
            assignment = assign_compound_splits(class_of_compound, groups[~treated].unique(), cfg.val_frac,
                                                cfg.test_frac, cfg.seed)
        else:
            classes_by_group = names.groupby(groups).agg(lambda s: set(s)).to_dict()
            assignment = assign_splits(groups.unique(), cfg.val_frac, cfg.test_frac, cfg.seed, classes_by_group)
    except ValueError as exc:
        raise ConfigError("finetune.split_by", str(exc)) from None
    # The values each split's Parquet filter matches: (experiment, plate) pairs, experiments, or treatments and
    # control wells.
    members: dict[str, list[Any]] = {split: [] for split in ("train", "val", "test")}
    if cfg.split_by == "treatment":
        for group, split in assignment.items():
            members[split].append(group)
    else:
        plates = meta[["experiment", "plate"]].drop_duplicates().sort_values(["experiment", "plate"])
        for (experiment, plate), group in zip(plates.itertuples(index=False), group_keys(plates, cfg.split_by)):
            members[assignment[group]].append((str(experiment), plate.item() if hasattr(plate, "item") else plate))
    counts = split_counts(groups, assignment, names)
    document = {"by": cfg.split_by, "seed": cfg.seed, "groups": assignment}
    # The task's label values as the shards store them: the Parquet filter keeps only the task's rows.
    labels = [value.item() if hasattr(value, "item") else value for value in meta[plan.label_col].unique()]
    plates = sorted({(str(e), p.item() if hasattr(p, "item") else p) for e, p in zip(meta["experiment"], meta["plate"])})
    return {"assignment": assignment, "members": members, "counts": counts, "document": document,
            "sites_per_group": groups.value_counts().to_dict(), "label_values": labels, "plates": plates}


def split_dataset(cfg: FinetuneConfig, plan: TaskPlan, splits: dict[str, Any], split: str | Sequence[str],
                  keep: Sequence[str] = (), gains: dict[str, list[float]] | None = None) -> "ray.data.Dataset":
    """The task's rows of one split (or several) as a lazy Ray Dataset, filtered inside the Parquet scan."""
    return _labelled_rows(cfg, plan, split_filter(cfg, plan, splits, split), keep, gains)


def unlabelled_dataset(cfg: FinetuneConfig, plan: TaskPlan, keep: Sequence[str] = (),
                       gains: dict[str, list[float]] | None = None) -> "ray.data.Dataset":
    """The treated sites whose label is missing (compounds without an annotation), as a lazy Ray Dataset."""
    from ray.data.expressions import col

    missing = col(plan.label_col).is_null() & (col("treatment") != CONTROL)
    return _labelled_rows(cfg, plan, missing, keep, gains, unlabelled=True)


def _labelled_rows(cfg: FinetuneConfig, plan: TaskPlan, rows: Any, keep: Sequence[str],
                   gains: dict[str, list[float]] | None, unlabelled: bool = False) -> "ray.data.Dataset":
    """The shards' ``rows`` (a Ray Data expression) with the task's label columns, every task at INPUT_TASK_CPUS."""
    from rxray.data.shards import read_shards
    from rxray.train.launch import INPUT_TASK_CPUS

    columns = list(dict.fromkeys(["image", "experiment", "plate", "well", "treatment", "well_id", "treatment_conc",
                                  plan.label_col, *keep]))
    options = {"plan": plan, "keep": list(keep), "gains": gains} | ({"unlabelled": True} if unlabelled else {})
    return read_shards(cfg.data, columns=columns, task_cpus=INPUT_TASK_CPUS).filter(
        expr=rows, num_cpus=INPUT_TASK_CPUS).map_batches(label_batch, fn_kwargs=options, batch_format="numpy",
                                                          num_cpus=INPUT_TASK_CPUS)


def unlabelled_treatments(meta: "pd.DataFrame", label_col: str) -> list[str]:
    """The treated compounds (not controls) whose sites carry no value in the label column."""
    values = meta[label_col]
    missing = values.isna() | (values.astype(str).str.strip() == "")
    return sorted(set(meta.loc[missing & (meta["treatment"] != CONTROL), "treatment"].astype(str)))


def split_filter(cfg: FinetuneConfig, plan: TaskPlan, splits: dict[str, Any], split: str | Sequence[str]) -> "Expr":
    """The rows of the split's groups that carry one of the task's labels, as a Ray Data expression.

    Filtering on the label in the scan passes no other treatment's images on to Ray (Parquet still reads the row
    groups they share with the task's rows), and no batch of other rows reaches `label_batch` to come out empty
    (Ray stores an empty image column as pickled objects, with a warning).
    """
    from ray.data.expressions import col

    members = [member for name in ([split] if isinstance(split, str) else split) for member in splits["members"][name]]
    if cfg.split_by == "treatment":
        from rxray.data.splits import CONTROL_WELL_PREFIX

        wells = [m[len(CONTROL_WELL_PREFIX):] for m in members if m.startswith(CONTROL_WELL_PREFIX)]
        predicate = col("treatment").is_in([m for m in members if not m.startswith(CONTROL_WELL_PREFIX)])
        if wells:
            predicate = predicate | col("well_id").is_in(wells)
    elif cfg.split_by == "experiment":
        predicate = col("experiment").is_in(sorted({experiment for experiment, _ in members}))
    else:
        predicate = None
        for experiment, plate in members:
            term = (col("experiment") == experiment) & (col("plate") == plate)
            predicate = term if predicate is None else predicate | term
    labelled = col(plan.label_col).is_in(splits["label_values"])
    return labelled if predicate is None else predicate & labelled


def write_split_files(cfg: FinetuneConfig, splits: dict[str, Any]) -> None:
    """splits.json and splits.csv under the output (group -> split, and counts)."""
    from rxray.data.splits import write_splits

    write_splits(cfg.out, splits["assignment"], splits["counts"], by=cfg.split_by, seed=cfg.seed,
                 val_frac=cfg.val_frac, test_frac=cfg.test_frac, sites_per_group=splits["sites_per_group"])
    counts = splits["counts"]
    print("finetune: splits by " + cfg.split_by + ": " + "; ".join(
        f"{s} {len(counts[s]['groups'])} group(s), {counts[s]['sites']} sites" for s in counts), flush=True)
