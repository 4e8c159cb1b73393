"""The step registry: one row per `rxray` command, read by the CLI, the pipeline, the runner and the report.

A row names the step's config class, function and result class (as ``"module:name"``
strings, so that ``rxray --help`` does not import torch), which config fields read
another step's output (or the dataset root, or the run), where the step writes under a
pipeline run, what a rerun replaces, and the report section that shows it. Adding a step
is its config, its function returning its result, and one row here (docs/architecture.md);
:func:`register` adds a row from outside this module (a plugin, a test).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

SOURCE = "<source>"  # the dataset root: synth's output, and what `inputs` maps ingest's source to
RUN = "<run>"  # the pipeline's run URI: what the report reads (it needs every step planned before it)


@dataclass(frozen=True)
class Step:
    """One `rxray` command: what it takes, runs and returns, where it writes in a run, how the report shows it."""

    name: str
    config: str  # "module:ConfigClass"
    function: str  # "module:function"
    help: str
    inputs: dict[str, str] = field(default_factory=dict)  # config field -> the step (or SOURCE, RUN) feeding it
    output: str | None = None  # folder under a pipeline run ("{name}" for named runs); None: not a pipeline step
    trains: bool = False  # writes a trained model: a stale one is refused by the CLI, replaced by the pipeline
    report_title: str | None = None  # title of the step's report section; None: under "Other step outputs"
    report_renderer: str | None = None  # "module:function" (StepOutput, Context) -> HTML; None: a generic table
    result: str = "rxray.outputs:StepResult"  # "module:ResultClass": what the function returns, the manifest holds
    replaces: tuple[str, ...] = ()  # what a rerun removes under the output before the step runs (the manifest too)
    keeps_output: bool = False  # the step picks up its own earlier output (resumes): a rerun removes nothing
    complete_file: str | None = None  # an output holding this file is complete whatever else it holds
    named: bool = False  # the pipeline section may list several runs, each with a name (output "{name}")
    source_files: dict[str, str] = field(default_factory=dict)  # config field -> a file of the dataset root, if any
    input_alternatives: dict[str, str] = field(default_factory=dict)  # input field -> a field that replaces it

    def config_class(self) -> type:
        """The step's config dataclass (imports its module)."""
        return resolve(self.config)

    def result_class(self) -> type:
        """The step's result dataclass (imports its module)."""
        return resolve(self.result)

    def run(self, cfg: Any) -> Any:
        """Check every storage location of a validated config (one line for a mistake), then run the step on it."""
        from rxray.storage_check import check_config  # imports storage, which `rxray --help` does not need

        if self.name != "pipeline":  # the pipeline checks its file's URIs itself, knowing which of them it writes
            check_config(cfg)
        return resolve(self.function)(cfg)


SECTIONS = "rxray.report.sections"  # the module of the built-in steps' report renderers

STEPS: tuple[Step, ...] = (
    Step("synth", "rxray.config:SynthConfig", "rxray.data.synth:synthesize",
         "write an RxRx2-format synthetic dataset",
         output=SOURCE, result="rxray.results:SynthResult", keeps_output=True, complete_file="metadata.csv"),
    Step("ingest", "rxray.config:IngestConfig", "rxray.data.ingest:ingest",
         "stream images from storage into Parquet shards",
         inputs={"source": SOURCE}, source_files={"labels": "moa.csv"}, output="shards",
         result="rxray.results:IngestResult", keeps_output=True,
         report_title="Ingest", report_renderer=f"{SECTIONS}:ingest_html"),
    Step("pretrain", "rxray.config:PretrainConfig", "rxray.train.simclr:pretrain",
         "SimCLR pretraining with Ray Train",
         inputs={"data": "ingest"}, output="pretrain", trains=True,
         result="rxray.results:PretrainResult", keeps_output=True,
         report_title="SimCLR pretraining", report_renderer=f"{SECTIONS}:pretrain_html"),
    Step("probe", "rxray.config:ProbeConfig", "rxray.evaluate.probe_step:probe",
         "plate-grouped probes on a trained encoder beside random-init encoders",
         inputs={"data": "ingest", "model": "pretrain"}, output="probe",
         result="rxray.results:ProbeResult", replaces=("probe.csv",),
         report_title="Probes: trained vs random-init encoder", report_renderer=f"{SECTIONS}:probe_html"),
    Step("finetune", "rxray.config:FinetuneConfig", "rxray.train.classify:finetune",
         "transfer-learning classifiers (linear probe or fine-tuning) with Ray Train",
         inputs={"data": "ingest", "encoder": "pretrain"}, input_alternatives={"encoder": "weights"},
         output="finetune/{name}", named=True, trains=True,
         result="rxray.results:FinetuneResult", keeps_output=True,
         report_title="Classifiers (finetune)", report_renderer=f"{SECTIONS}:finetune_html"),
    Step("embed", "rxray.config:EmbedConfig", "rxray.batch.embed:embed",
         "embeddings for every site with a Ray Data actor pool",
         inputs={"data": "ingest", "model": "pretrain"}, output="embed",
         result="rxray.results:EmbedResult", replaces=("sites", "wells"),
         report_title="Embeddings", report_renderer=f"{SECTIONS}:embed_html"),
    Step("features", "rxray.config:FeaturesConfig", "rxray.features.step:features",
         "CellProfiler profiles of every site (segmentation + cp_measure) with a Ray Data actor pool",
         inputs={"data": "ingest"}, output="features", result="rxray.results:FeaturesResult",
         replaces=("sites", "profiles", "wells", "selection.json"),
         report_title="CellProfiler features", report_renderer="rxray.report.representations:features_html"),
    Step("score", "rxray.config:ScoreConfig", "rxray.batch.score:score",
         "Random-Forest scores, batch correction and mAP per treatment",
         inputs={"embeddings": "embed"}, source_files={"moa": "moa.csv"}, output="score",
         result="rxray.results:ScoreResult",
         report_title="Random-Forest scores and mAP", report_renderer=f"{SECTIONS}:score_html"),
    Step("compare", "rxray.config:CompareConfig", "rxray.batch.compare:compare",
         "every representation (trained, random-init, CellProfiler, the dataset's) scored alike: a leaderboard",
         inputs={"embeddings": "embed", "features": "features", "data": "ingest", "model": "pretrain",
                 "probe": "probe", "scores": "score", "finetuned": "finetune"},
         source_files={"dataset_embeddings": "embeddings.csv", "moa": "moa.csv"}, output="compare",
         result="rxray.results:CompareResult", replaces=("leaderboard.csv", "representations"),
         report_title="Representation leaderboard", report_renderer="rxray.report.representations:compare_html"),
    Step("explain", "rxray.config:ExplainConfig", "rxray.batch.explain:explain",
         "Grad-CAM maps and per-stain attributions of a classifier",
         inputs={"data": "ingest", "model": "finetune"}, output="explain",
         result="rxray.results:ExplainResult",
         replaces=("heatmaps", "panels", "channel_importance.png", "channel_importance.csv",
                   "channel_importance.parquet"),
         report_title="Grad-CAM and channel importance", report_renderer=f"{SECTIONS}:explain_html"),
    Step("report", "rxray.config:ReportConfig", "rxray.report.page:report",
         "one HTML page with the figures of every step under a run",
         inputs={"run": RUN}, output="report", result="rxray.results:ReportResult", replaces=("figures", "tables")),
    Step("tune", "rxray.config:TuneConfig", "rxray.tune:tune",
         "hyperparameter search over pretraining or fine-tuning with Ray Tune (ASHA, resumable)",
         result="rxray.results:TuneResult", keeps_output=True),
    Step("pipeline", "rxray.pipeline:PipelineConfig", "rxray.pipeline:run_pipeline",
         "every step from one YAML file under one run URI; complete steps are skipped"),
)
BENCHMARKS: tuple[Step, ...] = (
    Step("ingest", "rxray.bench.ingest:BenchIngestConfig", "rxray.bench.ingest:bench_ingest",
         "ingest throughput against a decode-only ceiling and the seeds' loop"),
    Step("train", "rxray.bench.train:BenchTrainConfig", "rxray.bench.train:bench_train",
         "Ray Train images/s against a plain PyTorch loop"),
    Step("embed", "rxray.bench.embed:BenchEmbedConfig", "rxray.bench.embed:bench_embed",
         "actor-pool embedding images/s against a plain PyTorch loop, and Grad-CAM images/s"),
    Step("gpu", "rxray.bench.gpu:BenchGpuConfig", "rxray.bench.gpu:bench_gpu",
         "the GPU check: bench train, bench embed --gpu, a GPU pipeline and bench ingest (--tiny: on CPU)"),
    Step("features", "rxray.bench.features:BenchFeaturesConfig", "rxray.bench.features:bench_features",
         "CellProfiler profiles' sites/s, growth in sites and memory at two image sizes"),
    Step("scale", "rxray.bench.scale:BenchScaleConfig", "rxray.bench.scale:bench_scale",
         "every pipeline step on the RxRx2 layout (131,953 sites) at 1/8, 1/2 and full size: time, memory, growth"),
    Step("chaos", "rxray.bench.chaos:BenchChaosConfig", "rxray.bench.chaos:bench_chaos",
         "each heavy step warm-up, undisturbed and with a worker node killed, on a local multi-node cluster"),
    Step("science", "rxray.bench.science:BenchScienceConfig", "rxray.bench.science:bench_science",
         "a pipeline config on several seeds of a generated dataset, its findings scored against truth.json"),
)



def pipeline_steps() -> tuple[str, ...]:
    """The steps a pipeline can run, in the order it runs them."""
    return tuple(step.name for step in STEPS if step.output is not None)


def report_sections() -> tuple[tuple[str, str], ...]:
    """(step, title) of every step with a report section, in pipeline order."""
    return tuple((step.name, step.report_title) for step in STEPS if step.report_title)


def register(step: Step, before: str | None = None) -> None:
    """Add a step's row to the registry (before the row named ``before``, else last); replaces a row of its name."""
    global STEPS
    rows = [row for row in STEPS if row.name != step.name]
    at = next((i for i, row in enumerate(rows) if row.name == before), len(rows))
    STEPS = (*rows[:at], step, *rows[at:])


def unregister(name: str) -> None:
    """Remove a step's row from the registry (nothing if there is none)."""
    global STEPS
    STEPS = tuple(row for row in STEPS if row.name != name)


def resolve(ref: str) -> Any:
    """The object a ``"module:name"`` reference names."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def get_step(name: str) -> Step:
    """The registry row of a step; KeyError names the known steps."""
    for step in STEPS:
        if step.name == name:
            return step
    raise KeyError(f"no step {name!r}; steps: {', '.join(step.name for step in STEPS)}")


__all__ = ["BENCHMARKS", "RUN", "SOURCE", "STEPS", "Step", "get_step", "pipeline_steps", "register", "report_sections",
           "resolve", "unregister"]
