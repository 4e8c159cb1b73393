"""Which sites a probe embeds: a small, seeded, class-stratified sample, each plate topped up with controls.

:func:`select_probe_sites` chooses them from the shards' metadata alone;
:func:`probe_dataset` reads only their images (a site_id filter inside the Parquet scan).
Both `rxray probe` and the per-epoch probe of `rxray pretrain --probe` use them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from rxray import storage
from rxray.layout import CONTROL, plate_groups

if TYPE_CHECKING:
    import pandas as pd
    import ray.data

PROBE_TASKS = ("treatment", "control")
TREATED = "treated"
# Columns a probe needs besides the image: the label and the plate (the group).
PROBE_COLUMNS = ("site_id", "experiment", "plate", "treatment")


def probe_targets(treatments: Iterable[Any], task: str, control: str = CONTROL) -> np.ndarray:
    """The class of each site: its treatment (``treatment``), or ``control`` / ``treated`` (``control``)."""
    values = np.asarray([str(t) for t in treatments], dtype=object)
    if task == "treatment":
        return values
    if task == "control":
        return np.where(values == control, "control", TREATED).astype(object)
    raise ValueError(f"unknown probe task {task!r}; choose one of {', '.join(PROBE_TASKS)}")


def select_probe_sites(meta: "pd.DataFrame", *, task: str, treatments: Sequence[str] | None = None,
                       max_sites: int = 1024, seed: int = 0, control: str = CONTROL,
                       plate_controls: int = 0) -> "pd.DataFrame":
    """A seeded, class-stratified sample of about ``max_sites`` probe sites (rows of ``meta``, PROBE_COLUMNS).

    ``treatments`` restricts the sites to those treatments (controls are always
    kept). Each probe class gets an equal share of the sites, drawn at random from
    all its plates; a class with fewer sites gives its unused share to none (the
    sample stays small and balanced). ``plate_controls`` > 0 tops every plate up to
    that many control sites (so each plate can be centred on its own controls) and
    leaves out plates that have fewer. Raises ValueError if fewer than 2 classes or
    plates remain.
    """
    frame = meta.sort_values("site_id", kind="stable").reset_index(drop=True)
    if treatments:
        unknown = sorted(set(treatments) - set(frame["treatment"].astype(str)))
        if unknown:
            raise ValueError(f"probe treatments not in the data: {', '.join(unknown)}")
        frame = frame[frame["treatment"].astype(str).isin([*treatments, control])].reset_index(drop=True)
    targets = probe_targets(frame["treatment"], task, control)
    classes = sorted(set(targets.tolist()))
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least 2 classes; the selected sites hold {classes}")
    share = max(1, max_sites // len(classes))
    rng = np.random.default_rng(seed)
    chosen = []
    for name in classes:
        rows = np.flatnonzero(targets == name)
        chosen.extend(rng.permutation(rows)[:share].tolist())
    if plate_controls > 0:
        chosen = _with_plate_controls(frame, chosen, plate_controls, rng, control)
    sample = frame.iloc[sorted(chosen)].reset_index(drop=True)
    n_plates = len(set(plate_groups(sample["experiment"], sample["plate"])))
    if n_plates < 2:
        raise ValueError(f"a grouped probe needs sites from at least 2 plates; the selected sites span {n_plates}")
    return sample


def _with_plate_controls(frame: "pd.DataFrame", chosen: list[int], per_plate: int, rng: np.random.Generator,
                         control: str) -> list[int]:
    """``chosen`` rows plus random controls until each plate has ``per_plate``, minus plates that cannot."""
    plates = plate_groups(frame["experiment"], frame["plate"])
    is_control = (frame["treatment"].astype(str) == control).to_numpy()
    picked = np.zeros(len(frame), dtype=bool)
    picked[chosen] = True
    for plate in np.unique(plates):
        on_plate = plates == plate
        controls = np.flatnonzero(on_plate & is_control)
        if len(controls) < per_plate:
            picked[on_plate] = False
            continue
        missing = per_plate - int(picked[controls].sum())
        if missing > 0:
            picked[rng.permutation(controls[~picked[controls]])[:missing]] = True
    return np.flatnonzero(picked).tolist()


def probe_dataset(data: str, *, task: str, treatments: Sequence[str] | None, max_sites: int, seed: int,
                  plate_controls: int = 0, task_cpus: float | None = None) -> tuple["ray.data.Dataset", "pd.DataFrame"]:
    """The probe's sites chosen from the shards' metadata (:func:`select_probe_sites`) as a lazy Ray Dataset
    (image + :data:`PROBE_COLUMNS`), and the chosen rows.

    Only metadata columns are read to choose the sites; the images of the chosen
    ones are read by a site_id filter inside the Parquet scan. Raises ValueError
    when the selection is unusable. ``task_cpus``: the logical CPUs each read task asks for (a training run's
    input: see :data:`rxray.train.launch.INPUT_TASK_CPUS`).
    """
    import pyarrow.dataset as pads
    from ray.data.expressions import col

    from rxray.data.shards import read_shards

    fs, path = storage.pyarrow_filesystem(data)
    meta = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=list(PROBE_COLUMNS)).to_pandas()
    sample = select_probe_sites(meta, task=task, treatments=treatments, max_sites=max_sites, seed=seed,
                                plate_controls=plate_controls)
    site_ids = sample["site_id"].astype(str).tolist()
    sites = read_shards(data, columns=["image", *PROBE_COLUMNS], task_cpus=task_cpus)
    return sites.filter(expr=col("site_id").is_in(site_ids), **({"num_cpus": task_cpus} if task_cpus else {})), sample


__all__ = ["PROBE_COLUMNS", "PROBE_TASKS", "TREATED", "probe_dataset", "probe_targets", "select_probe_sites"]
