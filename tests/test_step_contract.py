"""The step contract: a step is its config, its function returning its result, and one registry row.

A toy step defined here, and nowhere else, runs in the pipeline, is skipped when complete,
runs again when an identity or result option changes (not a resource one), and shows in
the report; every built-in step's manifest round-trips through its result type. No Ray:
the toy counts the rows of the dataset's metadata.csv.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import pytest

from rxray import steps, storage
from rxray.config import load_config
from rxray.errors import ConfigError
from rxray.options import option
from rxray.outputs import COMMON_KEYS, MANIFEST_FILE, StepResult, read_manifest, write_manifest
from rxray.pipeline import execute, load_pipeline, plan_pipeline
from rxray.runner import step_function
from rxray.steps import SOURCE, Step

from conftest import write_pipeline

CALLS: list[dict] = []


@dataclass
class ToyConfig:
    """`rxray toy`: count the dataset's sites in groups of ``group``."""

    section = "toy"

    source: str = option(help="dataset root", uri=True)
    out: str = option(help="output URI", uri=True, role="resource")
    group: int = option(2, "sites per group", minimum=1, role="identity")
    label: str = option("sites", "what the count is called")
    threads: int = option(1, "threads", minimum=1, role="resource")


@dataclass
class ToyResult(StepResult):
    """What the toy step made: its groups."""

    groups: int = 0
    label: str = ""


@step_function("toy")
def toy(cfg: ToyConfig) -> ToyResult:
    """Count the metadata rows, write them in groups; the runner writes the manifest."""
    rows = storage.read_text(storage.join(cfg.source, "metadata.csv")).splitlines()[1:]
    groups = -(-len(rows) // cfg.group)
    storage.write_text(storage.join(cfg.out, "groups.txt"), f"{groups}\n")
    CALLS.append(dataclasses.asdict(cfg))
    return ToyResult(counts={"sites": len(rows)}, outputs=["groups.txt"], groups=groups, label=cfg.label)


TOY = Step("toy", f"{__name__}:ToyConfig", f"{__name__}:toy", "count the dataset's sites",
           inputs={"source": SOURCE}, output="toy", result=f"{__name__}:ToyResult", replaces=("groups.txt",))


@pytest.fixture
def toy_step():
    """The toy step's row in the registry, before the report, for one test."""
    steps.register(TOY, before="report")
    CALLS.clear()
    yield TOY
    steps.unregister("toy")


def _dataset(tmp_path) -> str:
    source = tmp_path / "data"
    source.mkdir()
    (source / "metadata.csv").write_text("site_id\n" + "".join(f"s{i}\n" for i in range(5)))
    return str(source)


def _run(tmp_path, toy: dict, with_report: bool = True) -> dict:
    sections = {"toy": toy, **({"report": {}} if with_report else {})}
    path = write_pipeline(tmp_path / "pipeline.yaml", str(tmp_path / "run"), str(tmp_path / "data"), sections)
    return execute(plan_pipeline(load_pipeline(path)))


def test_a_new_step_runs_in_the_pipeline_skips_and_reruns_by_role(tmp_path, toy_step, capsys):
    _dataset(tmp_path)
    first = _run(tmp_path, {"group": 2})
    assert first["steps"] == {"toy": "complete", "report": "complete"} and len(CALLS) == 1
    out = str(tmp_path / "run" / "toy")
    assert CALLS[0]["source"] == str(tmp_path / "data") and CALLS[0]["out"] == out  # wired from its row
    recorded = ToyResult.from_manifest(read_manifest(out), strict=True)
    assert (recorded.groups, recorded.counts, recorded.outputs) == (3, {"sites": 5}, ["groups.txt"])

    assert _run(tmp_path, {"group": 2, "threads": 4})["steps"]["toy"] == "skipped"  # a resource: still complete
    assert len(CALLS) == 1
    assert _run(tmp_path, {"group": 5, "threads": 4})["steps"]["toy"] == "complete"  # an identity: runs again
    assert read_manifest(out)["groups"] == 1 and len(CALLS) == 2
    assert _run(tmp_path, {"group": 5, "label": "wells"})["steps"]["toy"] == "complete"  # a result option too
    assert read_manifest(out)["label"] == "wells" and len(CALLS) == 3
    log = capsys.readouterr().err
    assert "run toy -> " in log and "skip toy: complete at" in log and "its config changed" in log

    page = open(tmp_path / "run" / "report" / "report.html").read()
    assert "Other step outputs" in page and ">toy<" in page and ">sites<" in page  # the toy's counts, in the report


def test_a_new_step_runs_from_the_cli(tmp_path, toy_step, capsys):
    from rxray.cli import main

    source = _dataset(tmp_path)
    out = str(tmp_path / "toy")
    assert main(["toy", "--source", source, "--out", out, "--group", "4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == out and printed["groups"] == 2 and printed["counts"] == {"sites": 5}
    assert main(["toy", "--source", source, "--out", out, "--group", "0"]) == 2  # validated like every step


def test_the_runner_clears_what_a_rerun_replaces_and_refuses_another_steps_output(tmp_path, toy_step):
    source = _dataset(tmp_path)
    out = tmp_path / "toy"
    cfg = load_config(ToyConfig, values={"source": source, "out": str(out)})
    toy(cfg)
    (out / "groups.txt").write_text("from an earlier run\n")
    (out / "notes.txt").write_text("kept\n")
    os.remove(tmp_path / "data" / "metadata.csv")
    with pytest.raises(FileNotFoundError):
        toy(cfg)  # fails half-way: the earlier manifest and what the row says a rerun replaces are gone
    assert sorted(os.listdir(out)) == ["notes.txt"]

    write_manifest(str(out), "embed", {})
    with pytest.raises(ConfigError, match="holds a embed output"):
        toy(cfg)
    assert read_manifest(str(out))["step"] == "embed"


def test_a_step_must_return_its_result_type(tmp_path, toy_step):
    @step_function("toy")
    def wrong(cfg):
        return {"groups": 1}

    with pytest.raises(TypeError, match="not its result class ToyResult"):
        wrong(load_config(ToyConfig, values={"source": str(tmp_path), "out": str(tmp_path / "t")}))
    assert not os.path.exists(tmp_path / "t" / MANIFEST_FILE)


# --------------------------------------------------------------------------- every built-in step's result


def _sample(result_class: type) -> StepResult:
    """A result with every field set to a value of its type (not its default)."""
    values = {}
    for f in dataclasses.fields(result_class):
        if not f.metadata.get("manifest", True):
            continue
        kind = str(f.type)
        values[f.name] = ({"n": 1} if "dict" in kind else ["x"] if "list" in kind else True if "bool" in kind
                          else 7 if "int" in kind else 0.5 if "float" in kind else "text")
    return result_class(**values)


@pytest.mark.parametrize("step", [s for s in steps.STEPS if s.name != "pipeline"], ids=lambda s: s.name)
def test_every_steps_manifest_round_trips_through_its_result(tmp_path, step):
    result = _sample(step.result_class())
    manifest = write_manifest(str(tmp_path), step.name, {"out": str(tmp_path)}, result)
    read = step.result_class().from_manifest(json.loads((tmp_path / MANIFEST_FILE).read_text()), strict=True)
    assert read == result and set(manifest) == set(COMMON_KEYS) | set(result.manifest_fields())


def test_a_manifest_with_a_field_its_result_lacks_is_caught(tmp_path):
    from rxray.results import EmbedResult

    with pytest.raises(ValueError, match="has no field"):
        EmbedResult.from_manifest({"step": "embed", "seconds": 1.0}, strict=True)
    assert EmbedResult.from_manifest({"step": "embed", "seconds": 1.0}).timings == {}  # the report reads on


def test_the_registry_rows_name_the_files_their_steps_write():
    from rxray.batch import embed, explain
    from rxray.evaluate.probe_step import PROBE_TABLE
    from rxray.report.step_outputs import FIGURES_DIR, TABLES_DIR

    assert set(steps.get_step("embed").replaces) == {embed.SITES_DIR, embed.WELLS_DIR}
    assert set(steps.get_step("explain").replaces) == {
        explain.HEATMAPS_DIR, explain.PANELS_DIR, explain.IMPORTANCE_FIGURE, f"{explain.IMPORTANCE_TABLE}.csv",
        f"{explain.IMPORTANCE_TABLE}.parquet"}
    assert steps.get_step("probe").replaces == (PROBE_TABLE,)
    assert set(steps.get_step("report").replaces) == {FIGURES_DIR, TABLES_DIR}


def test_real_manifests_of_the_science_run_read_strictly(science_run):
    from rxray.report.step_outputs import find_step_outputs

    plan, _, _ = science_run
    outputs = find_step_outputs(plan.layout.run) + find_step_outputs(plan.layout.source, depth=0)
    assert {o.step for o in outputs} == {"synth", "ingest", "pretrain", "finetune", "embed", "features",
                                          "score", "compare"}
    for output in outputs:
        steps.get_step(output.step).result_class().from_manifest(output.manifest, strict=True)

