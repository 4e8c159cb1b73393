"""The step registry: one row per `rxray` command, read by the CLI, the pipeline, rayjobs/ and the report.

A row names the step's config class and function (as ``"module:name"`` strings, so that
``rxray --help`` does not import torch), which config fields read another step's output,
where the step writes under a pipeline run, and the report section that shows it.
Adding a step is its config, its function and one row here (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

SOURCE = "<source>"  # the output of synth is the dataset root, not a folder under the run


@dataclass(frozen=True)
class Step:
    """One `rxray` command: what it takes, what it runs, where it writes in a run, how the report shows it."""

    name: str
    config: str  # "module:ConfigClass"
    function: str  # "module:function"
    help: str
    inputs: dict[str, str] = field(default_factory=dict)  # config field -> the step whose output feeds it
    output: str | None = None  # folder under a pipeline run ("{name}" for named runs); None: not a pipeline step
    trains: bool = False  # writes a trained model: a stale one is refused by the CLI, replaced by the pipeline
    report_title: str | None = None  # title of the step's report section; None: under "Other step outputs"

    def config_class(self) -> type:
        """The step's config dataclass (imports its module)."""
        return resolve(self.config)

    def run(self, cfg: Any) -> Any:
        """Check every storage location of a validated config (one line for a mistake), then run the step on it."""
        from rxray.storage_check import check_config  # imports storage, which `rxray --help` does not need

        if self.name != "pipeline":  # the pipeline checks its file's URIs itself, knowing which of them it writes
            check_config(cfg)
        return resolve(self.function)(cfg)


STEPS: tuple[Step, ...] = (
    Step("synth", "rxray.config:SynthConfig", "rxray.data.synth:synthesize",
         "write an RxRx2-format synthetic dataset", output=SOURCE),
    Step("ingest", "rxray.config:IngestConfig", "rxray.data.ingest:ingest",
         "stream images from storage into Parquet shards", output="shards", report_title="Ingest"),
    Step("pretrain", "rxray.config:PretrainConfig", "rxray.train.simclr:pretrain",
         "SimCLR pretraining with Ray Train", {"data": "ingest"}, "pretrain", trains=True,
         report_title="SimCLR pretraining"),
    Step("probe", "rxray.config:ProbeConfig", "rxray.evaluate.probe:probe",
         "plate-grouped probes on a trained encoder beside random-init encoders",
         {"data": "ingest", "model": "pretrain"}, "probe", report_title="Probes: trained vs random-init encoder"),
    Step("finetune", "rxray.config:FinetuneConfig", "rxray.train.classify:finetune",
         "transfer-learning classifiers (linear probe or fine-tuning) with Ray Train",
         {"data": "ingest", "encoder": "pretrain"}, "finetune/{name}", trains=True,
         report_title="Classifiers (finetune)"),
    Step("embed", "rxray.config:EmbedConfig", "rxray.batch.embed:embed",
         "embeddings for every site with a Ray Data actor pool", {"data": "ingest", "model": "pretrain"}, "embed",
         report_title="Embeddings"),
    Step("score", "rxray.config:ScoreConfig", "rxray.batch.score:score",
         "Random-Forest scores, batch correction and mAP per treatment", {"embeddings": "embed"}, "score",
         report_title="Random-Forest scores and mAP"),
    Step("explain", "rxray.config:ExplainConfig", "rxray.batch.explain:explain",
         "Grad-CAM maps and per-stain attributions of a classifier", {"data": "ingest", "model": "finetune"},
         "explain", report_title="Grad-CAM and channel importance"),
    Step("report", "rxray.config:ReportConfig", "rxray.report.page:report",
         "one HTML page with the figures of every step under a run", output="report"),
    Step("tune", "rxray.config:TuneConfig", "rxray.tune:tune",
         "hyperparameter search over pretraining or fine-tuning with Ray Tune (ASHA, resumable)"),
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
    Step("scale", "rxray.bench.scale:BenchScaleConfig", "rxray.bench.scale:bench_scale",
         "every pipeline step on the RxRx2 layout (131,953 sites) at 1/8, 1/2 and full size: time, memory, growth"),
    Step("chaos", "rxray.bench.chaos:BenchChaosConfig", "rxray.bench.chaos:bench_chaos",
         "each heavy step warm-up, undisturbed and with a worker node killed, on a local multi-node cluster"),
    Step("science", "rxray.bench.science:BenchScienceConfig", "rxray.bench.science:bench_science",
         "a pipeline config on several seeds of a generated dataset, its findings scored against truth.json"),
)

STEP_BY_NAME = {step.name: step for step in STEPS}
PIPELINE_STEPS = tuple(step.name for step in STEPS if step.output is not None)  # in the order a pipeline runs them
REPORT_SECTIONS = tuple((step.name, step.report_title) for step in STEPS if step.report_title)


def resolve(ref: str) -> Any:
    """The object a ``"module:name"`` reference names."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def get_step(name: str) -> Step:
    """The registry row of a step; KeyError names the known steps."""
    try:
        return STEP_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no step {name!r}; steps: {', '.join(STEP_BY_NAME)}") from None


__all__ = ["BENCHMARKS", "PIPELINE_STEPS", "REPORT_SECTIONS", "SOURCE", "STEPS", "STEP_BY_NAME", "Step", "get_step",
           "resolve"]
