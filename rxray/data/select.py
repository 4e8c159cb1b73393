"""Which sites a step works on: the metadata work list, subsets, balance and labels.

Everything here works on ``metadata.csv`` (never on a bucket listing) and is
deterministic: the same metadata, config and seed give the same sites in the same
order (sorted by ``site_id``).
"""

from __future__ import annotations

import io
import zlib
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from rxray import storage
from rxray.config import ConfigError
from rxray import layout

REJECT_COLUMNS = ["site_id", "path", "reason"]
# The header is line 1 of metadata.csv, so row i of the frame is on line i + 2.
_FIRST_DATA_LINE = 2


def read_metadata(source: str) -> pd.DataFrame:
    """``metadata.csv`` under a dataset root, every value a string ('' when empty), plus its line number.

    Values stay strings so that bad ones are reported per row by :func:`validate_metadata`
    instead of failing the whole read. The ``line`` column locates each row in the file.
    """
    uri = storage.join(source, layout.METADATA_FILE)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ConfigError("ingest.source", f"no {layout.METADATA_FILE} at {uri}") from None
    frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
    missing = [c for c in layout.METADATA_COLUMNS if c not in frame.columns]
    if missing:
        raise ConfigError("ingest.source", f"{uri} lacks the column(s) {', '.join(missing)}")
    frame = frame[layout.METADATA_COLUMNS].apply(lambda column: column.str.strip())
    frame["line"] = np.arange(len(frame), dtype=np.int64) + _FIRST_DATA_LINE
    return frame


def resolve_treatments(treatments: Sequence[str] | None, group: str | None, controls: Sequence[str],
                       known: Iterable[str]) -> list[str] | None:
    """The treatment names to keep (requested ones plus controls), or None for every site.

    Raises ConfigError naming the field when a requested name is not in the metadata
    or the request is empty.
    """
    if treatments is None and group is None:
        return None
    known = set(known)
    field = "ingest.group" if group is not None else "ingest.treatments"
    wanted = list(layout.TREATMENT_GROUPS[group]) if group is not None else list(treatments or [])
    if not wanted:
        raise ConfigError(field, "selects no treatments")
    _require_known(field, wanted, known)
    _require_known("ingest.controls", list(controls), known)
    return list(dict.fromkeys([*wanted, *controls]))


def _require_known(field: str, names: list[str], known: set[str]) -> None:
    unknown = [n for n in names if n not in known]
    if unknown:
        sample = ", ".join(sorted(known)[:8]) + (", ..." if len(known) > 8 else "")
        raise ConfigError(field, f"not in metadata.csv: {', '.join(unknown)} (known: {sample})")


def select_sites(metadata: pd.DataFrame, treatments: Sequence[str] | None = None,
                 balance: int | None = None, seed: int = 0) -> pd.DataFrame:
    """Rows with a treatment in ``treatments`` (all when None), optionally balanced; sorted by site_id.

    With ``balance``, every class (treatment, controls included) is downsampled to
    min(balance, its size) with ``seed`` (:func:`balance_classes`).
    """
    selected = metadata if treatments is None else metadata[metadata["treatment"].isin(list(treatments))]
    if balance is not None:
        selected = balance_classes(selected, balance, seed)
    return selected.sort_values("site_id", kind="stable").reset_index(drop=True)


def balance_classes(frame: pd.DataFrame, per_class: int, seed: int, column: str = "treatment") -> pd.DataFrame:
    """Every class of ``column`` downsampled to min(per_class, its size), reproducibly.

    Each class draws with its own generator seeded by (seed, crc32(class name)) from its
    rows in site_id order, so a class's sample does not depend on which other classes
    are selected or on the row order of the file.
    """
    picked = []
    for name, rows in frame.groupby(column, sort=True, dropna=False):
        rows = rows.sort_values("site_id", kind="stable")
        if len(rows) > per_class:
            rng = np.random.default_rng([seed, zlib.crc32(str(name).encode("utf-8"))])
            rows = rows.iloc[np.sort(rng.choice(len(rows), size=per_class, replace=False))]
        picked.append(rows)
    if not picked:
        return frame.iloc[0:0]
    return pd.concat(picked)


def class_counts(frame: pd.DataFrame, column: str = "treatment") -> dict[str, int]:
    """Number of rows per class, for manifests."""
    return {str(k): int(v) for k, v in frame[column].value_counts(sort=False).sort_index().items()}


def _row_problem(row: dict[str, str]) -> str | None:
    """Why a string-valued metadata row cannot be ingested, or None if it can."""
    for name in ("site_id", "experiment", "well", "treatment"):
        if not row[name]:
            return f"missing {name}"
    if not layout.is_safe_component(row["experiment"]):
        return f"experiment {row['experiment']!r} would escape the dataset root"
    for name in ("plate", "site"):
        if not row[name].isdigit():
            return f"{name} {row[name]!r} is not a non-negative integer"
    try:
        layout.parse_well(row["well"])
    except ValueError:
        return f"well {row['well']!r} is not a 1536-well name"
    if row["treatment_conc"]:
        try:
            float(row["treatment_conc"])
        except ValueError:
            return f"treatment_conc {row['treatment_conc']!r} is not a number"
    expected = layout.make_site_id(row["experiment"], int(row["plate"]), row["well"], int(row["site"]))
    if row["site_id"] != expected:
        return f"site_id {row['site_id']!r} does not match experiment/plate/well/site ({expected!r})"
    return None


def validate_metadata(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split string rows into (typed valid rows, rejects with site_id, path, reason).

    Valid rows get int ``plate``/``site`` and float ``treatment_conc`` (NaN when empty).
    A reject's path is ``metadata.csv:LINE``; a repeated site_id keeps its first row.
    """
    columns = layout.METADATA_COLUMNS
    problems = [_row_problem(dict(zip(columns, values)))
                for values in zip(*(frame[c].tolist() for c in columns))]
    reasons = pd.Series(problems, index=frame.index, dtype=object)
    duplicate = frame["site_id"].duplicated(keep="first") & reasons.isna()
    reasons[duplicate] = "duplicate site_id (an earlier row has it)"
    bad = reasons.notna()
    rejects = pd.DataFrame({
        "site_id": frame.loc[bad, "site_id"],
        "path": [f"{layout.METADATA_FILE}:{line}" for line in frame.loc[bad, "line"]],
        "reason": "metadata: " + reasons[bad].astype(str),
    }, columns=REJECT_COLUMNS).reset_index(drop=True)
    valid = frame.loc[~bad, layout.METADATA_COLUMNS].reset_index(drop=True)
    valid["plate"] = valid["plate"].astype(np.int64)
    valid["site"] = valid["site"].astype(np.int64)
    valid["treatment_conc"] = pd.to_numeric(valid["treatment_conc"].replace("", np.nan), errors="raise")
    valid["treatment_conc"] = valid["treatment_conc"].astype(np.float64)
    return valid, rejects


def join_labels(sites: pd.DataFrame, labels_uri: str | None) -> tuple[pd.DataFrame, list[str]]:
    """Sites with the columns of a label CSV (e.g. moa.csv) joined on ``treatment``, and those columns' names.

    Treatments missing from the label file get empty (null) labels. Raises ConfigError
    for a label file without a ``treatment`` column, with repeated treatments, or with
    columns that clash with the metadata.
    """
    if not labels_uri:
        return sites, []
    try:
        labels = pd.read_csv(io.BytesIO(storage.read_bytes(labels_uri)))
    except FileNotFoundError:
        raise ConfigError("ingest.labels", f"file not found: {labels_uri}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ConfigError("ingest.labels", f"{labels_uri} is not a readable CSV: {exc}") from None
    if "treatment" not in labels.columns:
        raise ConfigError("ingest.labels", f"{labels_uri} has no `treatment` column")
    label_columns = [c for c in labels.columns if c != "treatment"]
    clash = [c for c in label_columns if c in layout.METADATA_COLUMNS or c == "image"]
    if clash:
        raise ConfigError("ingest.labels", f"{labels_uri} repeats reserved column(s) {', '.join(clash)}")
    labels["treatment"] = labels["treatment"].astype(str).str.strip()
    repeated = labels["treatment"][labels["treatment"].duplicated()].unique().tolist()
    if repeated:
        raise ConfigError("ingest.labels", f"{labels_uri} lists treatment(s) more than once: "
                                           f"{', '.join(map(str, repeated[:5]))}")
    joined = sites.merge(labels, on="treatment", how="left", validate="many_to_one", sort=False)
    return joined, label_columns
