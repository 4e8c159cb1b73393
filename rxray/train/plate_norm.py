"""Plate normalisation: per-plate, per-stain gains measured on each plate's control sites.

Plate gain effects (a plate imaged brighter or dimmer, stain by stain) look like
intensity phenotypes, so `rxray finetune` scales every image, stain by stain, by the
ratio of all controls' mean intensity to its own plate's controls' mean. The gains are
measured here by one streaming pass over the control sites and recorded in the
checkpoint (``plate_gains``); :mod:`rxray.models.inputs` applies them.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from rxray.layout import CONTROL, plate_groups

# Plate gains are clipped to this range: a plate's controls 4x dimmer than the rest is an imaging fault, not a gain.
GAIN_LIMITS = (0.25, 4.0)


def control_sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch function: per plate group in the batch, its site count and per-stain sums of site means."""
    import pandas as pd

    means = batch["image"].reshape(*batch["image"].shape[:2], -1).mean(axis=2, dtype=np.float64)  # (B, 6)
    groups = pd.Series(plate_groups(batch["experiment"], batch["plate"]))
    sums = pd.DataFrame(means).groupby(groups.to_numpy()).agg(["sum", "count"])
    names = sums.index.to_numpy(dtype=object)
    totals = np.stack([sums[(c, "sum")].to_numpy() for c in range(means.shape[1])], axis=1)
    return {"group": names, "sites": sums[(0, "count")].to_numpy(dtype=np.int64), "sums": totals}


def plate_gains(uri: str, plates: Iterable[str]) -> dict[str, list[float]]:
    """Per plate group: all controls' mean intensity / this plate's controls' mean, per stain (clipped).

    One streaming pass over the control sites (the filter runs in the Parquet scan);
    only per-plate sums reach the driver. A plate without controls keeps gain 1.
    """
    from ray.data.expressions import col

    from rxray.data.shards import read_shards

    sums: dict[str, np.ndarray] = {}
    sites: dict[str, int] = {}
    controls = read_shards(uri, columns=["image", "experiment", "plate", "treatment"]).filter(
        expr=col("treatment") == CONTROL).map_batches(control_sums, batch_format="numpy")
    for batch in controls.iter_batches(batch_format="numpy", batch_size=None):
        for group, count, total in zip(batch["group"], batch["sites"], batch["sums"]):
            sums[group] = sums.get(group, 0.0) + total
            sites[group] = sites.get(group, 0) + int(count)
    plates = sorted(set(plates))
    if not sites:
        print(f"finetune: warning: no {CONTROL} sites in the data: plate normalisation is off", flush=True)
        return {}
    overall = sum(sums.values()) / sum(sites.values())
    missing = [p for p in plates if p not in sites]
    if missing:
        print(f"finetune: warning: no {CONTROL} sites on {len(missing)} plate(s) ({', '.join(missing[:5])}); "
              f"their gain stays 1", flush=True)
    return {group: np.clip(overall / np.maximum(sums[group] / sites[group], 1e-3), *GAIN_LIMITS).round(5).tolist()
            for group in plates if group in sites}
