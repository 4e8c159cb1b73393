"""`rxray <step>`: parse flags into a step config and call the library. No logic lives here.

Every step takes ``--config FILE.yaml`` (a path or URI) plus one flag per config
field; flags override the file, the file overrides the defaults in code. A bad
value prints one line naming the field and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from typing import Any

from rxray.errors import ConfigError, StepFailed
from rxray.options import field_default, load_config, unwrap_optional
from rxray import steps
from rxray.steps import BENCHMARKS, Step


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per config field (values are strings, coerced and validated by load_config)."""
    parser.add_argument("--config", dest="_config", metavar="FILE", help="YAML config (path or URI)")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        tp, _ = unwrap_optional(hints[f.name])
        default = "required" if meta.get("required") else field_default(f)
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
    parser.add_argument("--json", action="store_true",
                        help="print the command's result as JSON at the end (steps do without asking; the pipeline, "
                             "whose findings close its output, only with this)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for step in steps.STEPS:
        _add_step(sub, step)
    bench = sub.add_parser("bench", help="benchmarks that write a table")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for step in BENCHMARKS:
        _add_step(bench_sub, step)
    return parser


def _add_step(subparsers: Any, step: Step) -> None:
    parser = subparsers.add_parser(step.name, help=step.help, description=step.help)
    add_config_arguments(parser, step.config_class())
    parser.set_defaults(_step=step)


def run(argv: list[str] | None = None) -> Any:
    """Parse argv, validate the config and run the step; returns the step's result."""
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> Any:
    return args._step.run(_config(args))


def _config(args: argparse.Namespace) -> Any:
    """The validated config of the parsed command (and --verbose in the environment, for every Ray worker)."""
    if args.verbose:
        from rxray.runtime import VERBOSE_ENV  # imports Ray: only when asked for

        os.environ[VERBOSE_ENV] = "1"
    step: Step = args._step
    return config_from_args(step.config_class(), args)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 2 on bad input, 1 on a failed step."""
    args = build_parser().parse_args(argv)
    cfg = None
    try:
        cfg = _config(args)
        result = args._step.run(cfg)
    except ConfigError as exc:
        print(f"rxray: error: {exc}", file=sys.stderr)
        return 2
    except StepFailed as exc:
        print(f"rxray: failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("rxray: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a storage error that escaped the check before the step (e.g. a write refused later)
        from rxray.storage_check import storage_error_cause

        cause = storage_error_cause(exc)
        if cause is None:
            raise
        print(f"rxray: error: storage: {cause}", file=sys.stderr)
        return 2
    from rxray.outputs import StepResult  # imports storage, which `rxray --help` does not need

    if isinstance(result, StepResult):
        print(json.dumps(result.printable(getattr(cfg, "out", None)), indent=2, default=str))
    elif isinstance(result, dict) and (args.json or args._step.name != "pipeline"):  # the pipeline's findings close
        print(json.dumps(result, indent=2, default=str))                              # its output already
    return 0


if __name__ == "__main__":
    sys.exit(main())
