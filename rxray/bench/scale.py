"""`rxray bench scale`: the pipeline on RxRx2's real layout at 1/8, 1/2 and full size, measured per step.

The dataset is ``rxray synth --preset rxrx2`` (131,953 sites, 791,718 PNGs, 433
treatments + EMPTY, 24 plates) at a small pixel size, written once under the work
folder and reused. A fraction of the screen is its first plates in (experiment, plate)
order (1/8 = 3 plates, 1/2 = HUVEC-1's 12), so every fraction keeps all 433
treatments at RxRx2's per-plate density and only the number of plates (and sites)
grows. Each fraction runs as one pipeline (:func:`rxray.pipeline.execute`) whose step
runner records, per step: wall time, sites/s, the peak proportional set size of the
driver alone and of the driver plus every Ray process (as ``bench ingest`` measures
it), and the bytes the step wrote. The table, with the growth of time and memory
from each size to the next against the growth in sites, goes to ``cfg.table``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import pandas as pd
import ray
import yaml

from rxray import layout, storage
from rxray.bench.ingest import PeakMemory
from rxray.config import SynthConfig, load_config, option
from rxray.outputs import read_manifest
from rxray.runtime import ensure_ray

PLATES = 24  # RxRx2: 2 experiments x 12 plates
MIB = 2 ** 20
# Reading smaps_rollup of every Ray process costs tens of ms each: sampled every 0.25 s (as `bench ingest` does
# for its short runs) it took a fifth of a core from a 2-core machine during minutes-long steps.
SAMPLE_EVERY_S = 2.0
DEFAULT_STEPS = ["ingest", "pretrain", "finetune", "embed", "score", "explain", "report"]
PROSE_MARKER = "<!-- everything above is rewritten by `rxray bench scale`; what follows is kept -->"
LINEAR = 1.25  # growth exponent below which a step counts as (near-)linear in sites: time ~ sites^exponent


@dataclass
class BenchScaleConfig:
    """`rxray bench scale`: every pipeline step on the RxRx2 layout at several fractions of its 24 plates."""

    section = "bench_scale"

    workdir: str = option("bench-scale", "local folder for the generated dataset (reused) and the runs", uri=True)
    size: int = option(32, "side of the generated PNGs (RxRx2: 1024)", minimum=32, maximum=1024)
    out_size: int = option(32, "side of the ingested images", minimum=8)
    fractions: list[float] = option([0.125, 0.5, 1.0], "fractions of RxRx2's 24 plates to run, smallest first",
                                    minimum=1 / PLATES, maximum=1.0)
    steps: list[str] = option(DEFAULT_STEPS, "pipeline steps to run at each fraction",
                              choices=["ingest", "pretrain", "probe", "finetune", "embed", "score", "explain",
                                       "report"])
    epochs: int = option(1, "pretraining and fine-tuning epochs", minimum=1)
    backbone: str = option("resnet18", "backbone for pretraining")
    corrections: list[str] = option(["center"], "score corrections (each one multiplies the score step's time)",
                                    choices=["none", "center", "tvn"])
    threads: Optional[int] = option(None, "torch threads per training worker (default: every CPU)", minimum=1)
    seed: int = option(0, "dataset and run seed")
    table: str = option("docs/scale.md", "markdown output (path or URI)")
    note: str = option("", "a line written under the table (e.g. what else the machine was doing)")


# --------------------------------------------------------------------------- data


def _generate(root: str, cfg: BenchScaleConfig) -> dict[str, Any]:
    """The full RxRx2-layout dataset at ``root`` (generated unless complete): its synth manifest's figures."""
    from rxray.data.synth import synthesize
    from rxray.results import SynthResult

    if read_manifest(root) is None:
        synthesize(load_config(SynthConfig, values=dict(out=root, preset="rxrx2", size=cfg.size, seed=cfg.seed)))
    result = SynthResult.from_manifest(read_manifest(root) or {})
    return {"seconds": result.timings.get("total", sum(result.timings.values())), "sites": result.counts["sites"],
            "bytes": _folder_bytes(root)}


def plates_for(fraction: float) -> int:
    """The number of RxRx2 plates in a fraction of the screen (at least one)."""
    return max(1, round(fraction * PLATES))


def subset_root(full: str, dest: str, plates: int) -> int:
    """A dataset root at ``dest`` with the first ``plates`` plates of ``full`` (images shared by symlink)."""
    os.makedirs(dest, exist_ok=True)
    metadata = pd.read_csv(os.path.join(full, layout.METADATA_FILE), dtype={"site_id": str, "well_id": str},
                           keep_default_na=False)
    order = metadata[["experiment", "plate"]].drop_duplicates().sort_values(["experiment", "plate"])
    kept = order.head(plates).merge(metadata, on=["experiment", "plate"])[list(metadata.columns)]
    kept.to_csv(os.path.join(dest, layout.METADATA_FILE), index=False)
    for name in ("images", "moa.csv", "truth.json"):
        link = os.path.join(dest, name)
        if os.path.exists(os.path.join(full, name)) and not os.path.lexists(link):
            os.symlink(os.path.join(full, name), link)
    return len(kept)


def _folder_bytes(path: str) -> int:
    """Bytes of the regular files under a local folder (symlinks not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total


# --------------------------------------------------------------------------- one fraction


def pipeline_document(cfg: BenchScaleConfig, run: str, source: str) -> dict[str, Any]:
    """The pipeline YAML of one fraction: the chosen steps with small-image, few-epoch settings."""
    threads = cfg.threads or max(1, int(os.cpu_count() or 1))
    sections = {
        "ingest": {"size": cfg.out_size},
        "pretrain": {"backbone": cfg.backbone, "epochs": cfg.epochs, "batch_size": 128, "threads": threads,
                     "seed": cfg.seed},
        "probe": {"baseline_seeds": 1},
        "finetune": {"name": "ifn-beta", "positive": "IFN-beta", "epochs": cfg.epochs, "threads": threads},
        "embed": {"batch_size": 256},
        "score": {"correct": list(cfg.corrections), "seed": cfg.seed},
        "explain": {"n": 16, "panels": 2},
        "report": {},
    }
    return {"pipeline": {"run": run, "source": source},
            **{step: sections[step] for step in cfg.steps}}


def run_fraction(cfg: BenchScaleConfig, source: str, run: str, sites: int) -> list[dict[str, Any]]:
    """Run the pipeline on one dataset root in a fresh process (and Ray); one measurement row per step.

    A fresh driver per size keeps its memory comparable between sizes: in one process,
    each step's peak would carry what the steps of the smaller sizes left allocated.
    """
    path = os.path.join(cfg.workdir, f"{os.path.basename(run)}.yaml")
    write_pipeline(pipeline_document(cfg, run, source), path)
    rows_path = path + ".rows.json"
    subprocess.run([sys.executable, "-m", "rxray.bench.scale", path, str(sites), rows_path], check=True)
    with open(rows_path) as handle:
        return json.load(handle)


def write_pipeline(document: dict[str, Any], path: str) -> str:
    """Write a pipeline document as YAML to ``path``; returns the path."""
    with open(path, "w") as handle:
        yaml.safe_dump(document, handle, sort_keys=False)
    return path


def run_measured_pipeline(path: str, sites: int | None = None, label: str = "bench scale") -> list[dict[str, Any]]:
    """Run every step of the pipeline YAML at ``path`` afresh; one measurement row per step.

    ``sites`` is what sites/s is counted against (default: the ingest step's count).
    """
    from rxray.pipeline import execute, load_pipeline, plan_pipeline
    from rxray.steps import resolve

    plan = plan_pipeline(load_pipeline(path))
    if storage.exists(plan.layout.run):  # every step runs again: a pipeline would skip the complete ones
        storage.remove(plan.layout.run, recursive=True)
    ensure_ray()  # before the first step, so its start-up is not in the first step's figures
    rows: list[dict[str, Any]] = []

    def measured(step: Any) -> Any:
        nonlocal sites
        start = time.perf_counter()
        with PeakMemory(interval_s=SAMPLE_EVERY_S) as memory:
            result = resolve(step.function_ref)(step.config)
        seconds = time.perf_counter() - start
        if sites is None and step.step == "ingest":
            sites = int(result["written"]) if isinstance(result, dict) and "written" in result else None
        rows.append({"step": step.key, "sites": sites, "seconds": round(seconds, 1),
                     "sites_per_second": round(sites / max(seconds, 1e-9), 1) if sites else None,
                     "peak_mib": round(memory.peak / MIB), "driver_peak_mib": round(memory.driver_peak / MIB),
                     "output_mib": round(_folder_bytes(step.out) / MIB, 1)})
        print(f"{label}: {step.key} on {sites} sites: {seconds:.1f} s, peak {memory.peak / MIB:.0f} MiB "
              f"(driver {memory.driver_peak / MIB:.0f} MiB)", flush=True)
        return result

    start = time.perf_counter()
    execute(plan, run_step=measured)
    total = time.perf_counter() - start
    rows.append({"step": "pipeline", "sites": sites, "seconds": round(total, 1),
                 "sites_per_second": round(sites / total, 1) if sites else None,
                 "peak_mib": max(r["peak_mib"] for r in rows),
                 "driver_peak_mib": max(r["driver_peak_mib"] for r in rows),
                 "output_mib": round(sum(r["output_mib"] for r in rows), 1)})
    return rows


# --------------------------------------------------------------------------- the table


def growth(frame: pd.DataFrame) -> pd.DataFrame:
    """Per step, from each size to the next: the sites ratio and the time and memory growth exponents.

    An exponent of 1 is linear (time doubles when sites double), 0 is flat; start-up
    costs pull it below 1 at small sizes.
    """
    rows = []
    for step, group in frame.groupby("step", sort=False):
        group = group.sort_values("sites")
        for (_, small), (_, large) in zip(group.iloc[:-1].iterrows(), group.iloc[1:].iterrows()):
            ratio = large["sites"] / small["sites"]

            def exponent(column: str) -> float:
                return round(math.log(max(large[column], 1e-9) / max(small[column], 1e-9)) / math.log(ratio), 2)

            rows.append({"step": step, "sites": f"{small['sites']} -> {large['sites']}", "x sites": round(ratio, 2),
                         "time exponent": exponent("seconds"), "memory exponent": exponent("peak_mib"),
                         "driver memory exponent": exponent("driver_peak_mib")})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, generated: dict[str, Any], cfg: BenchScaleConfig) -> str:
    """docs/scale.md: what was run, the per-step table, the growth table and the machine."""
    table = frame.rename(columns={"sites_per_second": "sites/s", "peak_mib": "peak MiB (driver + Ray)",
                                  "driver_peak_mib": "driver peak MiB", "output_mib": "output MiB"})
    grown = growth(frame)
    over = grown[grown["time exponent"] > LINEAR]["step"].unique().tolist() if len(grown) else []
    lines = [
        "# At RxRx2's size: every step on the real layout",
        "",
        f"`rxray bench scale` on `rxray synth --preset rxrx2 --size {cfg.size}` ({generated['sites']:,} sites, "
        f"433 treatments + EMPTY, 24 plates; generated in {generated['seconds']:.0f} s, "
        f"{generated['bytes'] / 2 ** 30:.2f} GiB of files), ingested at {cfg.out_size} px. A fraction is the first "
        f"plates of the screen ({', '.join(str(plates_for(f)) for f in sorted(cfg.fractions))} of its 24), so "
        f"every size keeps all 433 treatments. Pretrain and finetune: {cfg.epochs} epoch(s), {cfg.backbone}; score: "
        f"{', '.join(cfg.corrections)} correction(s) with the default 100 trees, 5 folds and 1,000 permutations. "
        f"Peak memory is the PSS of the driver plus every Ray process it started, sampled every {SAMPLE_EVERY_S:g} s.",
        "",
        _markdown_table(table),
        "",
        "## Growth with the number of sites",
        "",
        "Exponent e in time ~ sites^e between consecutive sizes: 1 is linear, 0 flat; fixed start-up costs "
        "(Ray Train's ~20 s per fit, actor pools) pull it below 1 at small sizes.",
        "",
        _markdown_table(grown) if len(grown) else "(one size only)",
        "",
        (f"Steps growing faster than sites^{LINEAR}: {', '.join(over)}." if over
         else f"No step grows faster than sites^{LINEAR}."),
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d')}." + (f" {cfg.note}" if cfg.note else ""),
        "",
    ]
    return "\n".join(lines)


def with_prose(document: str, uri: str) -> str:
    """The measured document followed by what is written by hand under PROSE_MARKER in the file at ``uri``."""
    previous = storage.read_text(uri) if storage.exists(uri) else ""
    _, marker, prose = previous.partition(PROSE_MARKER)
    return document.rstrip("\n") + "\n\n" + PROSE_MARKER + (prose if marker else "\n")


def _markdown_table(frame: pd.DataFrame) -> str:
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in row) + " |"
            for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def bench_scale(cfg: BenchScaleConfig) -> dict[str, Any]:
    """Generate (or reuse) the RxRx2-layout dataset, run every fraction, write the table; returns the rows."""
    os.makedirs(cfg.workdir, exist_ok=True)
    full = os.path.join(cfg.workdir, f"rxrx2-{cfg.size}px")
    generated = _generate(full, cfg)
    if ray.is_initialized():  # the sizes run in processes of their own, each with its own Ray
        ray.shutdown()
    rows: list[dict[str, Any]] = []
    for fraction in sorted(cfg.fractions):
        plates = plates_for(fraction)
        source = full if plates == PLATES else os.path.join(cfg.workdir, f"rxrx2-{cfg.size}px-{plates}plates")
        sites = subset_root(full, source, plates) if source != full else generated["sites"]
        run = os.path.join(cfg.workdir, "runs", f"{plates}plates")
        for row in run_fraction(cfg, source, run, sites):
            rows.append({"plates": plates, **row})
    frame = pd.DataFrame(rows)
    document = markdown(frame.drop(columns=["plates"]), generated, cfg)
    storage.write_text(cfg.table, with_prose(document, cfg.table))
    print(document)
    return {"rows": rows, "table": cfg.table, "generated": generated}



def _run_one_size(argv: list[str]) -> None:
    """One size of `bench scale` in the process `run_fraction` starts: argv = pipeline.yaml, sites, rows.json."""
    document_path, sites, rows_path = argv
    rows = run_measured_pipeline(document_path, int(sites))
    with open(rows_path, "w") as handle:
        json.dump(rows, handle)


if __name__ == "__main__":
    _run_one_size(sys.argv[1:4])
