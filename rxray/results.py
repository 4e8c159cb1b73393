"""What each step makes: one result dataclass per step, which its manifest records and the report reads.

A step's function returns its result; the step runner (:mod:`rxray.runner`) writes it as
the manifest beside the keys every step shares (``step``, ``config``, ``versions``,
``created``), and :meth:`~rxray.outputs.StepResult.from_manifest` reads it back, so the
report and the tests name fields, not strings. Every field has a default: a result read
from an older manifest lacks the fields added since. Light on purpose (no torch, no Ray),
like :mod:`rxray.config`, so the report imports it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from rxray.outputs import StepResult


@dataclass
class SynthResult(StepResult):
    """`rxray synth`: counts of what was drawn (sites, images, wells, plates, treatments, nulls, size)."""

    chunks: int = 0  # rendering tasks
    sites_per_second: Optional[float] = None


@dataclass
class IngestResult(StepResult):
    """`rxray ingest`: the shards' counts, their per-stain statistics and image layout."""

    status: str = "complete"  # "already complete" when a rerun found this exact ingest done
    sites_per_second: Optional[float] = None
    fingerprint: Optional[str] = None  # of the selected metadata and settings: a rerun never mixes two ingests
    channel_mean: list[float] = field(default_factory=list)  # per stain, 0-255
    channel_std: list[float] = field(default_factory=list)
    channel_names: list[str] = field(default_factory=list)
    image_shape: list[int] = field(default_factory=list)  # (channels, side, side)
    image_dtype: str = "uint8"
    label_columns: list[str] = field(default_factory=list)
    selected_per_class: dict[str, int] = field(default_factory=dict)
    rejects_file: Optional[str] = None


@dataclass
class PretrainResult(StepResult):
    """`rxray pretrain`: how far the SimCLR run got and its last checkpoint."""

    status: str = "trained"  # or "complete": nothing left to train
    epochs_completed: Optional[int] = None
    resumed_from: int = 0  # epochs that were already trained when this invocation started
    checkpoint: Optional[str] = None
    final_metrics: Optional[dict[str, Any]] = None
    rows: Optional[int] = None
    cpus_per_worker: Optional[float] = None
    history: list[dict[str, Any]] = field(default_factory=list, metadata={"manifest": False})  # per epoch


@dataclass
class ProbeResult(StepResult):
    """`rxray probe`: the trained encoder against its random-init baselines, per task and method."""

    model: dict[str, Any] = field(default_factory=dict)
    comparison: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class FinetuneResult(StepResult):
    """`rxray finetune`: the classifier, its training and its held-out scores."""

    status: str = "trained"  # or "complete": nothing left to train
    task: Optional[str] = None  # binary or multiclass
    classes: list[str] = field(default_factory=list)
    negative_classes: list[str] = field(default_factory=list)
    checkpoint: Optional[str] = None
    best_epoch: Optional[int] = None
    epochs_completed: Optional[int] = None
    resumed_from: int = 0
    stopped_early: bool = False
    encoder_init: Optional[str] = None
    splits: dict[str, Any] = field(default_factory=dict)  # how the sites were split: by, seed, group -> split
    test: dict[str, Any] = field(default_factory=dict)  # headline metrics on the held-out split
    figures: list[str] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list, metadata={"manifest": False})  # per epoch


@dataclass
class EmbedResult(StepResult):
    """`rxray embed`: the model, the embedding size, the actor pool and its throughput."""

    model: dict[str, Any] = field(default_factory=dict)
    dim: Optional[int] = None
    pool: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)  # folders of the site and well tables, embedding column
    images_per_s: Optional[float] = None


@dataclass
class FeaturesResult(StepResult):
    """`rxray features`: the measurements taken, the features measured and kept, the pool and its throughput."""

    size: Optional[int] = None  # image side of the shards, pixels
    measurements: list[str] = field(default_factory=list)
    stains: list[str] = field(default_factory=list)
    features_measured: Optional[int] = None
    features_kept: Optional[int] = None  # after pycytominer's feature selection
    pool: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)  # folders of the profiles score reads, all features, wells
    sites_per_s: Optional[float] = None


@dataclass
class ScoreResult(StepResult):
    """`rxray score`: per-correction activity calls and the treatment map's benchmark (``summary``)."""

    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class CompareResult(StepResult):
    """`rxray compare`: the leaderboard's rows (one per representation) and what could not be scored."""

    correction: Optional[str] = None  # the correction the leaderboard ranks by
    leaderboard: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # representation -> why it is not on the board


@dataclass
class ExplainResult(StepResult):
    """`rxray explain`: Grad-CAM and stain attributions, the top stain per target and the planted ranks."""

    model: dict[str, Any] = field(default_factory=dict)
    images_per_s: Optional[float] = None
    pool: dict[str, Any] = field(default_factory=dict)
    importance_method: Optional[str] = None
    targets: dict[str, str] = field(default_factory=dict)  # treatment -> the class explained
    figures: list[str] = field(default_factory=list)
    tables: dict[str, Any] = field(default_factory=dict)
    layout: dict[str, Any] = field(default_factory=dict)
    top_stain: dict[str, Any] = field(default_factory=dict)
    truth: Optional[str] = None
    planted: Optional[dict[str, Any]] = None


@dataclass
class ReportResult(StepResult):
    """`rxray report`: the page, the steps it found and what it could not render."""

    report: Optional[str] = None  # the HTML page's URI
    steps: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class TuneResult(StepResult):
    """`rxray tune`: the search, its trials' outcomes and the best trial."""

    status: str = "complete"
    objective: Optional[str] = None
    metric: Optional[str] = None
    mode: Optional[str] = None
    restored: bool = False
    concurrency: Optional[int] = None
    space: dict[str, Any] = field(default_factory=dict)
    trials: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    best: dict[str, Any] = field(default_factory=dict)
    best_config: Optional[str] = None
    results: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


__all__ = ["CompareResult", "EmbedResult", "ExplainResult", "FeaturesResult", "FinetuneResult", "IngestResult", "PretrainResult",
           "ProbeResult", "ReportResult", "ScoreResult", "StepResult", "SynthResult", "TuneResult"]
