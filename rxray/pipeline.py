"""`rxray pipeline`: every step from one YAML file, all outputs under one run URI, resumable.

The file holds a ``pipeline:`` section (``run`` and ``source`` URIs, optional ``steps``)
and one section per step with that step's own config fields::

    pipeline: {run: s3://bucket/runs/ifn, source: s3://bucket/rxrx2}
    ingest: {size: 256, group: interferons}
    pretrain: {backbone: densenet121, epochs: 20}
    probe: {}                       # the SimCLR encoder beside random-init encoders
    finetune:                       # one mapping, or a list of named classifier runs
      - {name: ifn-beta, positive: IFN-beta}
    embed: {}
    score: {trees: 100}
    explain: {n: 64}
    report: {}

The fields that connect steps are set here from the run layout (:class:`RunLayout`), never
in a section: every output (``out``), ``ingest.source`` and ``report.run``. Step inputs
(``pretrain.data``, ``embed.model``, ``finetune.encoder``, ...) are wired to the producing
step's output unless the section names another input. Every section is validated
before any step runs, so a typo anywhere fails at once.

A step whose output holds a manifest of the same config is skipped, unless a step it
reads from ran in this invocation; so a failed or killed pipeline resumes where it
stopped, and a step cut off half-way resumes through its own resume logic. A finished
training run (pretrain, finetune) whose inputs or settings changed is removed and
trained from scratch; only a larger ``epochs`` continues it.
``run/_pipeline.json`` records the config, versions, and per-step status, timings and
counts after every step.
"""

from __future__ import annotations

import json
import posixpath
import re
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from rxray import storage
from rxray.config import ConfigError, config_to_dict, load_config, option, read_yaml
from rxray.outputs import read_manifest
from rxray.runner import SKIP, START_OVER, decide
from rxray.runtime import Timer, package_versions, wait_for_a_free_cpu
from rxray.steps import RUN, SOURCE, get_step, pipeline_steps, resolve
from rxray.storage_check import check_plan, check_reachable

RUN_RECORD = "_pipeline.json"
DEFAULT_CLASSIFIER = "classifier"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class PipelineConfig:
    """`rxray pipeline`: run the steps of one YAML file, every output under one run URI."""

    section = "pipeline"

    run: str = option(help="run URI: every step writes under it (local folder or s3://bucket/prefix)", uri=True)
    source: str = option(help="dataset root URI (metadata.csv, images/); a synth section writes it if absent",
                         uri=True)
    steps: Optional[list[str]] = option(None, "steps to run, in pipeline order (default: every step with a section "
                                              f"in the file): {', '.join(pipeline_steps())}")
    # The CLI keeps `--config FILE` under the name `_config`; a field of that name receives the file's path,
    # which the pipeline needs because the step sections live beside this one in the same file.
    _config: Optional[str] = option(None, "the pipeline YAML (the same as --config)", flag="--file")


@dataclass(frozen=True)
class RunLayout:
    """Where each step writes under one run URI."""

    run: str
    source: str

    def out(self, step: str, name: str | None = None) -> str:
        """The output URI of a step (of one named classifier run for finetune)."""
        folder = get_step(step).output
        if folder == SOURCE:
            return self.source
        return storage.join(self.run, *folder.format(name=name or DEFAULT_CLASSIFIER).split("/"))

    @property
    def record(self) -> str:
        """The run record, rewritten after every step."""
        return storage.join(self.run, RUN_RECORD)


@dataclass
class PlannedStep:
    """One validated step of a plan: its config, where it writes, and which planned steps it reads."""

    key: str  # "ingest", or "finetune/<name>" for each run of a step with named runs
    step: str
    config: Any
    out: str
    needs: tuple[str, ...]
    function_ref: str


@dataclass
class Plan:
    """The validated pipeline: every planned step in order, and which of them this invocation runs."""

    config: PipelineConfig
    layout: RunLayout
    steps: list[PlannedStep]
    selected: list[str]  # step names to run

    def to_run(self) -> list[PlannedStep]:
        """The planned steps this invocation runs (or skips when complete), in order."""
        return [s for s in self.steps if s.step in self.selected]


# --------------------------------------------------------------------------- planning


def load_pipeline(path: str, **overrides: Any) -> PipelineConfig:
    """The validated pipeline config of a YAML file (path or URI), with optional field overrides."""
    return load_config(PipelineConfig, path, {**overrides, "_config": path})


def plan_pipeline(cfg: PipelineConfig) -> Plan:
    """Validate every step section of the pipeline file and wire the steps together; runs nothing."""
    if not cfg._config:
        raise ConfigError("pipeline.config", "give the pipeline YAML with --config FILE.yaml")
    document = read_yaml(cfg._config)
    order = pipeline_steps()
    for key in document:
        if key != PipelineConfig.section and key not in order:
            raise ConfigError(str(key), f"unknown section; expected {PipelineConfig.section}, {', '.join(order)}")
    sections = {step: document[step] for step in order if step in document}
    selected = list(cfg.steps) if cfg.steps else list(sections)
    if not selected:
        raise ConfigError("pipeline.steps", f"{cfg._config} has no step sections and no steps are given")
    for name in selected:
        if name not in order:
            raise ConfigError("pipeline.steps", f"no pipeline step {name!r}; steps: {', '.join(order)}")
    layout = RunLayout(cfg.run, cfg.source)

    named_runs = {step: _named_sections(step, sections.get(step)) for step in order if get_step(step).named}
    configured = set(sections) | set(selected)
    planned: list[PlannedStep] = []
    for step in order:
        if step not in sections and step not in selected:
            continue
        row = get_step(step)
        runs = named_runs[step] if row.named else [(None, _mapping(step, sections.get(step)))]
        for name, values in runs:
            label = f"{step}[{name}]" if row.named and isinstance(sections.get(step), list) else step
            wired, needs = _wiring(step, name, values, layout, configured, named_runs, planned)
            config = _validated(row.config_class(), step, label, values, wired)
            key = f"{step}/{name}" if row.named else step
            planned.append(PlannedStep(key, step, config, layout.out(step, name), needs, row.function))
    return Plan(cfg, layout, planned, selected)


def _mapping(label: str, values: Any) -> dict[str, Any]:
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(label, f"must be a mapping of config fields, got {values!r}")
    return dict(values)


def _named_sections(step: str, section: Any) -> list[tuple[str, dict[str, Any]]]:
    """(name, fields) per run of a step with named runs (finetune's classifiers): one mapping (named
    `classifier` unless it says) or a list."""
    if section is None:
        return [(DEFAULT_CLASSIFIER, {})]
    entries = section if isinstance(section, list) else [section]
    runs: list[tuple[str, dict[str, Any]]] = []
    for index, entry in enumerate(entries):
        values = _mapping(f"{step}[{index}]", entry)
        name = str(values.pop("name", DEFAULT_CLASSIFIER if not isinstance(section, list) else ""))
        if not _NAME_PATTERN.match(name):
            raise ConfigError(f"{step}[{index}].name", "every run in a list needs a name of letters, digits, "
                                                       f"'.', '_' or '-', got {name!r}")
        if name in (n for n, _ in runs):
            raise ConfigError(f"{step}[{index}].name", f"{name!r} is used twice")
        runs.append((name, values))
    if not runs:
        raise ConfigError(step, "the list of runs is empty")
    return runs


def _wiring(step: str, name: str | None, values: dict[str, Any], layout: RunLayout, configured: set[str],
            named_runs: dict[str, list[tuple[str, dict[str, Any]]]], planned: list[PlannedStep]
            ) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The fields the pipeline sets for one step, and the planned steps whose outputs it reads, from its row.

    ``out``, and inputs fed by the dataset root (SOURCE) or the run (RUN), are the pipeline's to set; an input fed
    by a step is wired to that step's output (its first named run) unless the section names its own, or names the
    field that replaces it (``Step.input_alternatives``); a dataset-root file (``Step.source_files``) is wired
    when the dataset has it or a synth section writes it.
    """
    row = get_step(step)
    wired: dict[str, Any] = {"out": layout.out(step, name)}
    needs: list[str] = []
    for field, producer in row.inputs.items():
        if producer == SOURCE:
            wired[field] = layout.source
            needs += [s for s in pipeline_steps() if get_step(s).output == SOURCE]
        elif producer == RUN:
            wired[field] = layout.run
            needs += [s.key for s in planned]
        elif field not in values and producer in configured and row.input_alternatives.get(field) not in values:
            producer_name = named_runs[producer][0][0] if get_step(producer).named else None
            wired[field] = layout.out(producer, producer_name)
            needs.append(f"{producer}/{producer_name}" if producer_name else producer)
    for field, file in row.source_files.items():
        uri = storage.join(layout.source, file)
        if field not in values and (any(get_step(s).output == SOURCE for s in configured) or storage.exists(uri)):
            wired[field] = uri
    planned_keys = {s.key for s in planned}
    return wired, tuple(k for k in dict.fromkeys(needs) if k in planned_keys)


def _validated(config_class: type, step: str, label: str, values: dict[str, Any], wired: dict[str, Any]) -> Any:
    """The step's config from its section plus the wired fields; ConfigError names the section."""
    for field in wired:
        if field in values:
            raise ConfigError(f"{label}.{field}", f"is set by the pipeline (to {wired[field]}); remove it")
    try:
        return load_config(config_class, values={**values, **wired})
    except ConfigError as exc:
        field, message = exc.field_name.split(".", 1)[-1], str(exc).split(": ", 1)[1]
        producer = get_step(step).inputs.get(field)
        if producer and message == "is required":
            message += f" (give it, or add a{'n' if producer[0] in 'aeiou' else ''} {producer} section that writes it)"
        raise ConfigError(f"{label}.{field}", message) from None


# --------------------------------------------------------------------------- running


def _comparable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _say(line: str) -> None:
    print(f"pipeline: {line}", file=sys.stderr, flush=True)


def _step_counts(out: str) -> Any:
    """The counts a step recorded in its manifest, or None."""
    return (read_manifest(out) or {}).get("counts") or None


class RunRecord:
    """`run/_pipeline.json`: the config, versions and each step's status, timing and counts so far."""

    def __init__(self, plan: Plan) -> None:
        self.uri = plan.layout.record
        previous = self._read()
        self.data: dict[str, Any] = {
            "step": "pipeline", "status": "running", "config": config_to_dict(plan.config),
            "file": plan.config._config, "versions": package_versions(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "steps": {s.key: {"step": s.step, "out": s.out, "status": "pending",
                              "config": _comparable(config_to_dict(s.config))} for s in plan.to_run()},
            "attempt": int(previous.get("attempt", 0)) + 1,
        }
        self._previous_steps = previous.get("steps", {})

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(storage.read_text(self.uri))
        except (FileNotFoundError, ValueError):
            return {}

    def update(self, key: str, **fields: Any) -> None:
        """Record a step's new status (and timing or error), then rewrite the file."""
        entry = self.data["steps"][key]
        entry.update(fields)
        if fields.get("status") == "skipped" and "seconds" in self._previous_steps.get(key, {}):
            entry["seconds"] = self._previous_steps[key]["seconds"]  # the time the earlier attempt took
        self.write()

    def finish(self, status: str, seconds: float, **fields: Any) -> None:
        """Record the pipeline's outcome."""
        self.data.update(status=status, seconds=round(seconds, 3),
                         finished=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields)
        self.write()

    def write(self) -> None:
        """Rewrite the record (atomically on local disk, one PUT on object stores)."""
        storage.write_text(self.uri, json.dumps(self.data, indent=2, default=str))


def find_report(report_out: str) -> str | None:
    """The HTML page of a report output (index.html or report.html before others), or None."""
    pages = sorted(uri for uri in storage.list_dir(report_out) if uri.endswith(".html"))
    pages.sort(key=lambda uri: posixpath.basename(uri) not in ("index.html", "report.html"))
    return pages[0] if pages else None


def _check_functions(plan: Plan) -> None:
    """Fail before anything runs if a selected step's function cannot be loaded (e.g. a missing dependency)."""
    for step in plan.to_run():
        try:
            resolve(step.function_ref)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(step.step, f"this step is not available in this build ({step.function_ref}: "
                                         f"{exc})") from None


def execute(plan: Plan, run_step: Callable[[PlannedStep], Any] | None = None) -> dict[str, Any]:
    """Run (or skip when complete) every selected step in order; returns the summary."""
    if run_step is None:
        _check_functions(plan)
        run_step = lambda s: resolve(s.function_ref)(s.config)  # noqa: E731
    storage.ensure_bucket(plan.layout.run)
    storage.makedirs(plan.layout.run)
    record = RunRecord(plan)
    record.write()
    timer = Timer()
    started = time.perf_counter()
    ran: set[str] = set()
    statuses: dict[str, str] = {}
    for step in plan.to_run():
        decision = decide(get_step(step.step), step.config, [k for k in step.needs if k in ran])
        if decision.action == SKIP:
            _say(f"skip {step.key}: {decision.why}")
            record.update(step.key, status="skipped", counts=_step_counts(step.out))
            statuses[step.key] = "skipped"
            continue
        _say(f"run {step.key} -> {step.out} ({decision.why})")
        if decision.action == START_OVER:
            _say(f"start {step.key} over: removing the finished run at {step.out}")
            storage.remove(step.out, recursive=True)
        record.update(step.key, status="running")
        try:
            with timer.time(step.key):
                run_step(step)
        except BaseException as exc:  # recorded, then raised unchanged (the CLI maps it to an exit code)
            record.update(step.key, status="failed", seconds=timer.seconds.get(step.key),
                          error=(str(exc).strip().splitlines() or [type(exc).__name__])[0])
            record.finish("failed", time.perf_counter() - started, failed_step=step.key)
            raise
        ran.add(step.key)
        statuses[step.key] = "complete"
        record.update(step.key, status="complete", seconds=timer.seconds[step.key], counts=_step_counts(step.out))
        _say(f"done {step.key} in {timer.seconds[step.key]:.1f} s")
        wait_for_a_free_cpu()  # the next step reads once this one's workers have given their CPUs back

    report = find_report(plan.layout.out("report")) if "report" in plan.selected else None
    seconds = time.perf_counter() - started
    record.finish("complete", seconds, report=report)
    from rxray.report.findings import run_findings  # pandas and the report: only once the steps are done

    _say(f"complete in {seconds:.1f} s ({len(ran)} steps run, {len(statuses) - len(ran)} skipped); "
         f"record: {record.uri}" + (f"; report: {report}" if report else ""))
    findings = run_findings(plan.layout.run)
    print("\nFindings" + (f" (the report opens with them: {report})" if report else "") + ":", file=sys.stderr)
    for line in findings:
        print(f"  {line}", file=sys.stderr, flush=True)
    return {"run": plan.layout.run, "status": "complete", "steps": statuses, "seconds": round(seconds, 3),
            "record": record.uri, "report": report, "findings": findings}


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Validate every section of the pipeline file and check its storage, then run the selected steps; the summary."""
    check_reachable(cfg)  # before planning reads the source: an endpoint where nothing listens fails in seconds
    return execute(check_plan(plan_pipeline(cfg)))


__all__ = ["PipelineConfig", "Plan", "PlannedStep", "RunLayout", "execute", "find_report",
           "load_pipeline", "plan_pipeline", "run_pipeline"]
