"""`rxray bench science`: a pipeline config run on several draws of a generated dataset, scored against its truth.

A finding that holds on one seed may be luck. This runs the pipeline file (the demo's by
default) once per seed, each in a fresh folder and its own local Ray, with the ``synth``
section's seed set (and any other synth fields overridden: another layout, effect
strength or moa_share), scores every run against the dataset's truth.json
(:func:`rxray.report.truth_check.truth_check`) and writes one row per run to the
"Findings over seeds" section of ``cfg.table`` (docs/science-checks.md), with the rates
across seeds that the demo's goals are stated in.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from rxray import storage
from rxray.bench.tables import record_rows
from rxray.config import option, read_yaml
from rxray.report.truth_check import truth_check

SECTION = "## Findings over seeds (`rxray bench science`)"
INTRO = ("Each row: the pipeline file run on one draw of a generated dataset (the synth fields changed are in the "
         "first column), scored against the dataset's truth.json. Active: planted treatments called active "
         "(q <= 0.05, headline correction). Map: the same-MoA recall test's p and the same-MoA pairs behind it. "
         "IFN-beta ROC-AUC: on the held-out plate, with the lower bound of its 95% bootstrap interval over wells "
         "(rows before 2026-12-08 have none). "
         "MoA top-1/top-3: leave-one-compound-out prediction from profiles (p against shuffled labels). "
         "Unannotated: each compound left out of moa.csv, its predicted mechanism (true one in brackets where "
         "wrong). MoA per-compound accuracy: the classifier with held-out plates (its test compounds seen in "
         "training) / held-out compounds.")
HEADER = ("| dataset | seed | active (planted) | interferons | nulls called | map p (pairs) | IFN-beta ROC-AUC / F1 | "
          "MoA top-1 / top-3 (p) | unannotated | MoA per-compound acc. plate / compound split | probe | s |")
RUN_TIMEOUT_S = 1800


@dataclass
class BenchScienceConfig:
    """`rxray bench science`: the pipeline on several seeds of a generated dataset, findings against truth."""

    section = "bench_science"

    pipeline: str = option("rayjobs/configs/demo.yaml", "pipeline YAML with a synth section", uri=True)
    seeds: list[int] = option([0, 1, 2, 3, 4], "synth seeds, one run each", minimum=0)
    synth: Optional[list[str]] = option(None, "synth fields to override, as field=value (e.g. moa_share=0.5,"
                                              "treatments=30): another dataset than the config's")
    workdir: str = option("bench-science", "local folder for the datasets and runs", uri=True)
    table: str = option("docs/science-checks.md", "markdown file whose 'Findings over seeds' section gets the rows")
    note: str = option("", "a line written under the table (e.g. the machine)")


def synth_overrides(pairs: list[str] | None) -> dict[str, Any]:
    """``["moa_share=0.5", ...]`` as a dict of YAML-typed values."""
    overrides = {}
    for pair in pairs or []:
        name, _, value = pair.partition("=")
        overrides[name.strip()] = yaml.safe_load(value)
    return overrides


def run_seed(config: str, seed: int, overrides: dict[str, Any], work: Path) -> dict[str, Any]:
    """Run the pipeline file on the seed's dataset in ``work`` (a subprocess with its own Ray); its truth check."""
    document = read_yaml(config)
    document["synth"] = {**(document.get("synth") or {}), **overrides, "seed": seed}
    work.mkdir(parents=True, exist_ok=True)
    path = work / "pipeline.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    run, source = work / "run", work / "synth"
    started = time.perf_counter()
    command = str(Path(sys.executable).parent / "rxray")  # the installed command, as `make demo` runs it
    result = subprocess.run([command, "pipeline", "--config", str(path), "--run", str(run), "--source", str(source)],
                            capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    (work / "console.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise RuntimeError(f"the pipeline on seed {seed} failed (see {work / 'console.log'}): "
                           f"{result.stderr.strip().splitlines()[-1:]}")
    return {"seed": seed, "seconds": round(time.perf_counter() - started, 1), **truth_check(str(run), str(source))}


def rates(checks: list[dict[str, Any]]) -> dict[str, Any]:
    """The goals stated as rates over runs: how many runs met each."""
    def count(condition) -> int:
        return sum(1 for check in checks if condition(check))

    return {"runs": len(checks),
            "all_interferons": count(lambda c: c["interferons_active"] == c["interferons"]),
            "no_null_called": count(lambda c: not c["nulls_called"]),
            "planted_active_share_min": round(min(c["planted_active"] / c["planted"] for c in checks), 3),
            "map_p_le_005": count(lambda c: c.get("map_p") is not None and c["map_p"] <= 0.05),
            "ifn_beta_roc_auc_ge_095": count(lambda c: (c.get("ifn_beta_roc_auc") or 0) >= 0.95),
            "moa_top1_mean": _mean([c.get("moa_top1") for c in checks]),
            "moa_p_le_001": count(lambda c: c.get("moa_p") is not None and c["moa_p"] <= 0.01),
            "unannotated_correct": sum(call["correct"] for c in checks for call in c.get("unannotated_calls", [])),
            "unannotated": sum(len(c.get("unannotated_calls", [])) for c in checks)}


def _mean(values: list[Any]) -> float | None:
    present = [v for v in values if v is not None]
    return round(sum(present) / len(present), 3) if present else None


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def table_row(dataset: str, check: dict[str, Any]) -> str:
    """One markdown row of the section's table."""
    calls = ", ".join(f"{c['treatment']} -> {c['predicted']}" + ("" if c["correct"] else f" ({c['true']})")
                      for c in check.get("unannotated_calls", [])) or "-"
    return (f"| {dataset} | {check['seed']} | {check['planted_active']} of {check['planted']} | "
            f"{check['interferons_active']} of {check['interferons']} | {', '.join(check['nulls_called']) or 'none'} "
            f"of {check['nulls']} | {_fmt(check.get('map_p'))} ({_fmt(check.get('map_pairs'))}) | "
            f"{_fmt(check.get('ifn_beta_roc_auc'))} (>= {_fmt(check.get('ifn_beta_roc_auc_low'))}) / "
            f"{_fmt(check.get('ifn_beta_f1'))} | "
            f"{_fmt(check.get('moa_top1'))} / {_fmt(check.get('moa_top3'))} ({_fmt(check.get('moa_p'))}) | {calls} | "
            f"{_fmt(check.get('moa_compound_accuracy_plate_split'))} / "
            f"{_fmt(check.get('moa_compound_accuracy_compound_split'))} | "
            f"{'beats' if check.get('probe_beats_random_init') else 'ties or loses'} | {check['seconds']:.0f} |")


def bench_science(cfg: BenchScienceConfig) -> dict[str, Any]:
    """Run every seed, score each against truth, write the rows and return the checks with their rates."""
    overrides = synth_overrides(cfg.synth)
    dataset = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "default"
    checks = []
    for seed in cfg.seeds:
        print(f"bench science: {dataset}, seed {seed} ...", file=sys.stderr, flush=True)
        check = run_seed(cfg.pipeline, seed, overrides, Path(cfg.workdir) / f"{dataset.replace(' ', '')}-seed{seed}")
        checks.append(check)
        print(f"bench science: {table_row(dataset, check)}", file=sys.stderr, flush=True)
    summary = rates(checks)
    note = f"{dataset}: " + ", ".join(f"{k} {v}" for k, v in summary.items()) + (f"; {cfg.note}" if cfg.note else "")
    if cfg.table:
        record_rows(cfg.table, SECTION, INTRO, HEADER, [table_row(dataset, c) for c in checks], note)
    return {"dataset": dataset, "checks": checks, "rates": summary,
            "table": cfg.table if cfg.table and storage.exists(cfg.table) else None}


__all__ = ["BenchScienceConfig", "bench_science", "rates", "run_seed", "synth_overrides", "table_row"]
