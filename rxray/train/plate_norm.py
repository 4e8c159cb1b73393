"""Plate normalisation: per-plate, per-stain gains measured on each plate's control sites, and the rim's.

Plate gain effects (a plate imaged brighter or dimmer, stain by stain) look like
intensity phenotypes, so `rxray finetune` scales every image, stain by stain, by the
ratio of all controls' mean intensity to its own plate's controls' mean. Wells on the
plate's outer ring (evaporation) are brighter again: a rim control passes for a weak
intensity phenotype (on the default synthetic screen, which uses the ring, two rim control
wells of a test plate outscored IFN-beta's lowest dose; RxRx2 leaves the ring empty, as
`rxray synth --no-rim-wells` does). Their extra gain is measured on every plate's rim
controls together against the interior ones (a plate has 0-2 rim control wells of 8, too
few to measure alone) and applied to rim wells on top of the plate's. The gains are
measured here by one streaming pass over the control sites and recorded in the
checkpoint (``plate_gains``, the rim's under ``RIM_GAIN_KEY``); :mod:`rxray.models.inputs`
applies them.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from rxray.layout import CONTROL, RIM_GAIN_KEY, is_edge_well, plate_groups

RIM = "@rim"  # suffix of a plate group's rim wells in the control sums

# Plate gains are clipped to this range: a plate's controls 4x dimmer than the rest is an imaging fault, not a gain.
GAIN_LIMITS = (0.25, 4.0)


def control_sums(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch function: per plate group (and its rim, ``<group>@rim``) in the batch, its site count and
    per-stain sums of site means."""
    import pandas as pd

    means = batch["image"].reshape(*batch["image"].shape[:2], -1).mean(axis=2, dtype=np.float64)  # (B, 6)
    rim = np.array([is_edge_well(str(w)) for w in batch["well"]], dtype=bool)
    groups = pd.Series(plate_groups(batch["experiment"], batch["plate"])) + np.where(rim, RIM, "")
    sums = pd.DataFrame(means).groupby(groups.to_numpy()).agg(["sum", "count"])
    names = sums.index.to_numpy(dtype=object)
    totals = np.stack([sums[(c, "sum")].to_numpy() for c in range(means.shape[1])], axis=1)
    return {"group": names, "sites": sums[(0, "count")].to_numpy(dtype=np.int64), "sums": totals}


def plate_gains(uri: str, plates: Iterable[str]) -> dict[str, list[float]]:
    """Per plate group: all controls' mean intensity / this plate's interior controls' mean, per stain (clipped);
    and under RIM_GAIN_KEY the interior controls' mean / the rim controls' mean, over all plates.

    One streaming pass over the control sites (the filter runs in the Parquet scan);
    only per-plate sums reach the driver. A plate without interior controls is measured on
    its rim ones (divided by the rim gain); a plate without controls keeps gain 1; no rim
    gain without rim controls.
    """
    from ray.data.expressions import col

    from rxray.data.shards import read_shards

    sums: dict[str, np.ndarray] = {}
    sites: dict[str, int] = {}
    controls = read_shards(uri, columns=["image", "experiment", "plate", "well", "treatment"]).filter(
        expr=col("treatment") == CONTROL).map_batches(control_sums, batch_format="numpy")
    for batch in controls.iter_batches(batch_format="numpy", batch_size=None):
        for group, count, total in zip(batch["group"], batch["sites"], batch["sums"]):
            sums[group] = sums.get(group, 0.0) + total
            sites[group] = sites.get(group, 0) + int(count)
    plates = sorted(set(plates))
    if not sites:
        print(f"finetune: warning: no {CONTROL} sites in the data: plate normalisation is off", flush=True)
        return {}
    interior = {g: sums[g] / sites[g] for g in sums if not g.endswith(RIM)}
    rim_sums = [g for g in sums if g.endswith(RIM)]
    rim_gain = None
    if rim_sums and interior:
        interior_mean = sum(sums[g] for g in interior) / sum(sites[g] for g in interior)
        rim_mean = sum(sums[g] for g in rim_sums) / sum(sites[g] for g in rim_sums)
        rim_gain = np.clip(interior_mean / np.maximum(rim_mean, 1e-3), *GAIN_LIMITS)
    means = dict(interior)
    for group in rim_sums:  # a plate whose controls all sit on the rim: its interior level, through the rim gain
        plate = group[:-len(RIM)]
        if plate not in means:
            means[plate] = sums[group] / sites[group] * (rim_gain if rim_gain is not None else 1.0)
    overall = sum(sums[g] * (rim_gain if g.endswith(RIM) and rim_gain is not None else 1.0) for g in sums) \
        / sum(sites.values())
    missing = [p for p in plates if p not in means]
    if missing:
        print(f"finetune: warning: no {CONTROL} sites on {len(missing)} plate(s) ({', '.join(missing[:5])}); "
              f"their gain stays 1", flush=True)
    gains = {group: np.clip(overall / np.maximum(means[group], 1e-3), *GAIN_LIMITS).round(5).tolist()
             for group in plates if group in means}
    if rim_gain is not None:
        gains[RIM_GAIN_KEY] = rim_gain.round(5).tolist()
    return gains
