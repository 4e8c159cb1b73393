"""Step outputs under a run, found by their ``_manifest.json``, and what each one holds.

Outputs are found whatever their folders are called, in a shallow walk of the run URI
that never lists bulk folders (images, shards' bookkeeping, heatmaps, site tables), so
it costs a few listings even on object storage. The readers below get from a found
output what the report and the findings show: its PNG figures, its per-epoch training
metrics and its timings (``timings`` or ``seconds``, whichever the step wrote).
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass, field
from typing import Any

from rxray import storage
from rxray.outputs import MANIFEST_FILE

# The report's own folders (rxray.report.folder): copies of step outputs, never one.
FIGURES_DIR = "figures"
TABLES_DIR = "tables"
# Folder levels below the run searched for manifests: run/<step>/<variant>/<sub> covers every layout
# the steps write, and bounds the listings on object storage.
SEARCH_DEPTH = 4
# Folders that hold bulk data or step bookkeeping, never a step output: listing them on S3 would
# page through up to ~800k objects.
BULK_DIRS = frozenset({"images", "heatmaps", "panels", "sites", "wells", "tensorboard", FIGURES_DIR,
                       TABLES_DIR})
# Folders inside a step output that may hold its PNG figures (besides its top level).
FIGURE_SUBDIRS = ("plots", "figures")
# Per-epoch metrics of training runs: rxray.train.epoch_log.METRICS_FILE, named here because importing
# that module loads torch, seconds of start-up for a report that never trains anything.
TRAINING_METRICS_FILE = "metrics.jsonl"


@dataclass
class StepOutput:
    """One completed step output: its folder URI, path under the run, manifest and top-level listing."""

    uri: str
    relative: str
    manifest: dict[str, Any]
    files: list[str] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    @property
    def step(self) -> str:
        """The step that wrote it (the manifest's ``step``)."""
        return str(self.manifest.get("step") or "unknown")

    @property
    def result(self) -> Any:
        """The manifest as the step's result type (:mod:`rxray.results`); a plain StepResult for an unknown step."""
        from rxray.outputs import StepResult
        from rxray.steps import get_step

        try:
            result_class = get_step(self.step).result_class()
        except KeyError:  # an output of a step this build does not know
            result_class = StepResult
        return result_class.from_manifest(self.manifest)

    @property
    def config(self) -> dict[str, Any]:
        """The config the step ran with, as recorded ({} if none)."""
        return self.manifest.get("config") or {}

    @property
    def label(self) -> str:
        """A short name for headings: the folder under the run ('.' for the run itself)."""
        return self.relative or "."


# --------------------------------------------------------------------------- finding step outputs


def list_entries(uri: str) -> tuple[list[str], list[str]]:
    """(file names, folder names) directly under a folder URI, sorted; empty if it does not exist."""
    fs, path = storage.filesystem(uri)
    try:
        entries = fs.ls(path, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    files, dirs = [], []
    for entry in entries:
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if not name or entry["name"].rstrip("/") == path.rstrip("/"):
            continue  # some object stores list the prefix itself
        (dirs if entry.get("type") == "directory" else files).append(name)
    return sorted(files), sorted(dirs)


def _skipped(name: str) -> bool:
    """Folders never searched: bulk data, Ray Train checkpoints, hidden and bookkeeping folders."""
    return name in BULK_DIRS or name.startswith((".", "_", "checkpoint_"))


def find_step_outputs(run: str, depth: int = SEARCH_DEPTH, exclude: str | None = None) -> list[StepOutput]:
    """Every folder under ``run`` (itself included, ``depth`` levels down) that holds a step manifest.

    A step output's own folders are its step's business and are not searched: the outputs
    `rxray compare` runs for each representation (a score, an embed) are the compare's
    parts, not the run's score or embed. ``exclude`` is a folder URI not to search (the
    report's own output when it lies inside the run). Report manifests are left out.
    Sorted by path.
    """
    excluded = storage.strip_scheme(exclude).rstrip("/") if exclude else None
    found: list[StepOutput] = []
    pending = [(run, "", 0)]
    while pending:
        uri, relative, level = pending.pop()
        if excluded and storage.strip_scheme(uri).rstrip("/") == excluded:
            continue
        files, dirs = list_entries(uri)
        if MANIFEST_FILE in files:
            manifest = json.loads(storage.read_text(storage.join(uri, MANIFEST_FILE)))
            if manifest.get("step") != "report":
                found.append(StepOutput(uri, relative, manifest, files, dirs))
            if level > 0:
                continue
        if level < depth:
            pending += [(storage.join(uri, name), posixpath.join(relative, name) if relative else name, level + 1)
                        for name in dirs if not _skipped(name)]
    return sorted(found, key=lambda output: (output.relative, output.step))


# --------------------------------------------------------------------------- what an output holds


def step_figures(output: StepOutput) -> list[str]:
    """Relative paths of a step's PNG figures: those its result names, at its top level and in plots/."""
    named = getattr(output.result, "figures", None) or []
    paths = [p for p in named if isinstance(p, str) and p.lower().endswith(".png")]
    paths += [name for name in output.files if name.lower().endswith(".png")]
    for folder in FIGURE_SUBDIRS:
        if folder in output.dirs:
            files, _ = list_entries(storage.join(output.uri, folder))
            paths += [f"{folder}/{name}" for name in files if name.lower().endswith(".png")]
    return list(dict.fromkeys(p.strip("/") for p in paths))


def training_history(output: StepOutput) -> list[dict[str, Any]]:
    """The per-epoch metrics a training run wrote (metrics.jsonl), or [] if it wrote none."""
    if TRAINING_METRICS_FILE not in output.files:
        return []
    text = storage.read_text(storage.join(output.uri, TRAINING_METRICS_FILE))
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def step_timings(output: StepOutput) -> dict[str, float]:
    """Named seconds of an output's ``timings`` (every step records its phases there)."""
    return {str(k): float(v) for k, v in (output.result.timings or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def total_seconds(timings: dict[str, float]) -> float:
    """The step's wall time: its ``total`` if recorded, else the sum of its phases."""
    return timings["total"] if "total" in timings else float(sum(timings.values()))
