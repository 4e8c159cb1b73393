"""`rxray bench features`: what CellProfiler profiles cost through `rxray features`, by image size and site count.

Each run writes shards of generated control sites (:func:`rxray.features.truth.render`: the
generator's own cells, ~20 per site) and runs the features step on them as the pipeline
does (actor pool, selection, standardisation, well medians), under :class:`PeakMemory`:
sites/s of the profiling pass, the step's wall time, the peak memory of the driver alone
and of the driver plus every Ray process. At the first size it runs three site counts and
reports the growth exponent of time and driver memory in sites (1: linear, 0: flat).
Rows go to ``docs/benchmarks.md``; the time per measurement (one core, no Ray) beside them
says what each of CellProfiler's measurements costs.
"""

from __future__ import annotations

import math
import os
import platform
import time
from dataclasses import dataclass
from typing import Any

from rxray import storage
from rxray.bench.ingest import PeakMemory
from rxray.bench.tables import record_rows
from rxray.config import FEATURE_MEASUREMENTS, FeaturesConfig, load_config, option
from rxray.runtime import ensure_ray

MIB = 2 ** 20
SECTION = "## CellProfiler features (`rxray bench features`)"
INTRO = ("`rxray features` on shards of generated control sites (~20 cells each): segmentation, the chosen cp_measure "
         "measurements, pycytominer selection, standardisation and well medians, on every CPU of the machine. "
         "Growth: exponent of time (and driver memory) in sites between the smallest and largest count at that "
         "size (1 = linear, 0 = flat).")
HEADER = ("| date | machine | px | sites | measurements | features kept / measured | profiling sites/s | step s | "
          "time growth | driver peak MiB | driver growth | all-Ray peak MiB |")


@dataclass
class BenchFeaturesConfig:
    """`rxray bench features`: the features step's throughput, growth and memory on generated sites."""

    section = "bench_features"

    workdir: str = option("bench-features", "local folder for the generated shards and outputs", uri=True)
    sizes: list[int] = option([64, 256], "image sides to run (px); the first also runs every count of --sites",
                              minimum=32)
    sites: list[int] = option([96, 192, 384], "site counts at the first size (growth), smallest first", minimum=8)
    sites_large: int = option(48, "sites at every other size", minimum=8)
    measurements: list[str] = option(list(FEATURE_MEASUREMENTS), "cp_measure measurements to take",
                                     choices=FEATURE_MEASUREMENTS)
    table: str = option("docs/benchmarks.md", "markdown output (path or URI)")
    note: str = option("", "a line written under the table (e.g. what else the machine was doing)")


def write_generated_shards(uri: str, n: int, size: int) -> str:
    """``n`` generated control sites of ``size`` px as ingest shards (2 plates, 2 sites per well) at ``uri``."""
    import ray

    from rxray.features.truth import render
    from rxray.layout import make_site_id, make_well_id

    def row(k: int) -> dict[str, Any]:
        plate, well, site = 1 + k % 2, f"W{k // 4:03d}", 1 + (k // 2) % 2
        return {"site_id": make_site_id("HUVEC-1", plate, well, site), "well_id": make_well_id("HUVEC-1", plate, well),
                "cell_type": "HUVEC", "experiment": "HUVEC-1", "plate": plate, "well": well, "site": site,
                "treatment": "EMPTY", "treatment_conc": None, "image": render(k, size)}

    fs, path = storage.pyarrow_filesystem(uri)
    ray.data.from_items([row(k) for k in range(n)]).repartition(max(1, n // 64)).write_parquet(path, filesystem=fs)
    return uri


def run_once(cfg: BenchFeaturesConfig, size: int, n: int) -> dict[str, Any]:
    """One features run on ``n`` generated sites of ``size`` px: its rates, wall time and memory peaks."""
    from rxray.features.step import features

    root = storage.join(cfg.workdir, f"{size}px-{n}")
    storage.remove(root, recursive=True)
    shards = write_generated_shards(storage.join(root, "shards"), n, size)
    step_cfg = load_config(FeaturesConfig, values=dict(data=shards, out=storage.join(root, "features"),
                                                       measurements=cfg.measurements))
    start = time.perf_counter()
    with PeakMemory(interval_s=1.0) as memory:
        result = features(step_cfg)
    return {"size": size, "sites": n, "seconds": time.perf_counter() - start, "sites_per_s": result.sites_per_s,
            "kept": result.features_kept, "measured": result.features_measured,
            "driver_mib": memory.driver_peak / MIB, "all_mib": memory.peak / MIB}


def exponent(small: dict[str, Any], large: dict[str, Any], key: str) -> float:
    """Growth exponent of ``key`` in sites between two runs."""
    return math.log(large[key] / small[key]) / math.log(large["sites"] / small["sites"])


def measurement_costs(size: int) -> str:
    """Seconds per site of segmentation and of each measurement at ``size`` px, most expensive first."""
    from rxray.features.benchmark import benchmark_sites

    seconds = benchmark_sites(size, n=8)["seconds_per_measurement"]
    return ", ".join(f"{name} {value:.3f}" for name, value in sorted(seconds.items(), key=lambda kv: -kv[1]))


def bench_features(cfg: BenchFeaturesConfig) -> dict[str, Any]:
    """Run every size and count, write the rows to ``cfg.table``, return the runs."""
    ensure_ray()
    runs = [run_once(cfg, cfg.sizes[0], n) for n in cfg.sites]
    runs += [run_once(cfg, size, cfg.sites_large) for size in cfg.sizes[1:]]
    growth = {"time": exponent(runs[0], runs[len(cfg.sites) - 1], "seconds"),
              "driver": exponent(runs[0], runs[len(cfg.sites) - 1], "driver_mib")} if len(cfg.sites) > 1 else {}
    machine = f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"
    names = "all" if set(cfg.measurements) == set(FEATURE_MEASUREMENTS) else ", ".join(cfg.measurements)
    rows = []
    for k, run in enumerate(runs):
        at_growth_end = bool(growth) and k == len(cfg.sites) - 1  # the largest count at the first size
        cells = [time.strftime("%Y-%m-%d"), machine, run["size"], run["sites"], names,
                 f"{run['kept']} / {run['measured']}", f"{run['sites_per_s']:.2f}", f"{run['seconds']:.1f}",
                 f"{growth['time']:.2f}" if at_growth_end else "", f"{run['driver_mib']:.0f}",
                 f"{growth['driver']:.2f}" if at_growth_end else "", f"{run['all_mib']:.0f}"]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    costs = "; ".join(f"{size} px: " + measurement_costs(size) for size in cfg.sizes)
    note = f"{time.strftime('%Y-%m-%d')}: seconds per site on one core (8 sites, no Ray): {costs}" + (
        f". {cfg.note}" if cfg.note else "")
    record_rows(cfg.table, SECTION, INTRO, HEADER, rows, note)
    for row in rows:
        print(row, flush=True)
    return {"runs": runs, "growth": growth}
