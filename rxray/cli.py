"""`rxray <step>`: parse flags into a step config and call the library. No logic lives here.

Every step takes ``--config FILE.yaml`` (a path or URI) plus one flag per config
field; flags override the file, the file overrides the defaults in code. A bad
value prints one line naming the field and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import typing
from typing import Any, Callable

from rxray.config import _unwrap_optional, load_config
from rxray.errors import ConfigError, StepFailed


# command -> (config class, step function, one-line help); "a.b:c" strings keep startup fast.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "synth": ("rxray.config:SynthConfig", "rxray.data.synth:synthesize",
              "write an RxRx2-format synthetic dataset"),
    "ingest": ("rxray.config:IngestConfig", "rxray.data.ingest:ingest",
               "stream images from storage into Parquet shards"),
    "pretrain": ("rxray.config:PretrainConfig", "rxray.train.simclr:pretrain",
                 "SimCLR pretraining with Ray Train"),
    "finetune": ("rxray.config:FinetuneConfig", "rxray.train.classify:finetune",
                 "transfer-learning classifiers (linear probe or fine-tuning) with Ray Train"),
    "embed": ("rxray.config:EmbedConfig", "rxray.batch.embed:embed",
              "embeddings for every site with a Ray Data actor pool"),
    "explain": ("rxray.config:ExplainConfig", "rxray.batch.gradcam:explain",
                "Grad-CAM maps and per-stain attributions of a classifier"),
    "report": ("rxray.config:ReportConfig", "rxray.evaluate.report:report",
               "one HTML page with the figures of every step under a run"),
    "probe": ("rxray.config:ProbeConfig", "rxray.evaluate.probe:probe",
              "plate-grouped probes on a trained encoder beside random-init encoders"),
    "score": ("rxray.config:ScoreConfig", "rxray.batch.forest:score",
              "Random-Forest scores, batch correction and mAP per treatment"),
    "tune": ("rxray.config:TuneConfig", "rxray.tune:tune",
             "hyperparameter search over pretraining or fine-tuning with Ray Tune (ASHA, resumable)"),
    "pipeline": ("rxray.pipeline:PipelineConfig", "rxray.pipeline:run_pipeline",
                 "every step from one YAML file under one run URI; complete steps are skipped"),
}
BENCHMARKS: dict[str, tuple[str, str, str]] = {
    "ingest": ("rxray.bench.ingest:BenchIngestConfig", "rxray.bench.ingest:bench_ingest",
               "ingest throughput against a decode-only ceiling and the seeds' loop"),
    "train": ("rxray.bench.train:BenchTrainConfig", "rxray.bench.train:bench_train",
              "Ray Train images/s against a plain PyTorch loop"),
    "embed": ("rxray.bench.embed:BenchEmbedConfig", "rxray.bench.embed:bench_embed",
              "actor-pool embedding images/s against a plain PyTorch loop, and Grad-CAM images/s"),
}


def _resolve(ref: str) -> Any:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field (values are strings, coerced and validated by load_config)."""
    parser.add_argument("--config", dest="_config", metavar="FILE", help="YAML config (path or URI)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        tp, _ = _unwrap_optional(hints[f.name])
        default = "required" if meta.get("required") else f.default if f.default is not dataclasses.MISSING \
            else f.default_factory()  # type: ignore[misc]
        help_text = meta.get("help", "")
        if "(default:" not in help_text:  # a help text that explains its own default keeps that wording
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse formats help
        if tp is bool:
            group = parser.add_mutually_exclusive_group()
            group.add_argument(_flag(f), dest=f.name, action="store_const", const="true", default=None,
                               help=help_text)
            group.add_argument(meta.get("negative_flag") or "--no-" + f.name.replace("_", "-"), dest=f.name,
                               action="store_const", const="false",
                               help=argparse.SUPPRESS if not meta.get("negative_flag") else None)
        else:
            parser.add_argument(_flag(f), dest=f.name, default=None, metavar=f.name.upper(), help=help_text)


def config_from_args(cls: type, args: argparse.Namespace):
    """The validated config from parsed flags and the optional --config file."""
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)}
    return load_config(cls, getattr(args, "_config", None), overrides)


def build_parser() -> argparse.ArgumentParser:
    """The `rxray` argument parser with every step and benchmark."""
    parser = argparse.ArgumentParser(prog="rxray", description="Cell-microscopy deep learning on Ray.")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own logs and progress bars (the same as RXRAY_VERBOSE=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (config_ref, fn_ref, help_text) in COMMANDS.items():
        step = sub.add_parser(name, help=help_text, description=help_text)
        add_config_arguments(step, _resolve(config_ref))
        step.set_defaults(_config_ref=config_ref, _fn_ref=fn_ref)
    bench = sub.add_parser("bench", help="benchmarks that write a table")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, (config_ref, fn_ref, help_text) in BENCHMARKS.items():
        step = bench_sub.add_parser(name, help=help_text, description=help_text)
        try:
            add_config_arguments(step, _resolve(config_ref))
        except (ImportError, AttributeError):  # a benchmark whose module is not built yet
            continue
        step.set_defaults(_config_ref=config_ref, _fn_ref=fn_ref)
    return parser


def run(argv: list[str] | None = None) -> Any:
    """Parse argv, validate the config and run the step; returns the step's result."""
    args = build_parser().parse_args(argv)
    if args.verbose:
        from rxray.runtime import VERBOSE_ENV  # imports Ray: only when asked for

        os.environ[VERBOSE_ENV] = "1"
    if not hasattr(args, "_fn_ref"):
        raise ConfigError(args.command, "this command is not available in this build")
    cfg = config_from_args(_resolve(args._config_ref), args)
    fn: Callable[[Any], Any] = _resolve(args._fn_ref)
    return fn(cfg)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 2 on bad input, 1 on a failed step."""
    try:
        result = run(argv)
    except ConfigError as exc:
        print(f"rxray: error: {exc}", file=sys.stderr)
        return 2
    except StepFailed as exc:
        print(f"rxray: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rxray: interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
