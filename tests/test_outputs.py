"""The manifest every step writes and the one rerun policy (rxray.outputs), without Ray."""

from __future__ import annotations

import pytest

from rxray.config import FinetuneConfig, PretrainConfig, config_to_dict, config_to_yaml, load_config
from rxray.outputs import (COMPLETE, CONFIG_FILE, CONFLICT, CONTINUE, NEW, STALE, StepResult, read_manifest,
                           rerun_decision, write_manifest)
from rxray.results import ScoreResult
from rxray.steps import RUN, SOURCE, STEPS, pipeline_steps


def _pretrain(tmp_path, **values) -> PretrainConfig:
    return load_config(PretrainConfig, values={"data": str(tmp_path / "shards"), "out": str(tmp_path / "run"),
                                               "epochs": 2, **values})


def test_every_manifest_has_the_shared_keys(tmp_path):
    write_manifest(str(tmp_path), "score", {"trees": 5},
                   ScoreResult(counts={"sites": 3}, timings={"fit": 1.5}, summary={"n_sites": 3}))
    manifest = read_manifest(str(tmp_path))
    assert {"step", "config", "versions", "created", "counts", "timings", "outputs"} <= set(manifest)
    assert manifest["counts"] == {"sites": 3} and manifest["timings"] == {"fit": 1.5}
    assert manifest["summary"] == {"n_sites": 3} and "unchanged" not in manifest
    write_manifest(str(tmp_path), "report", {})
    assert read_manifest(str(tmp_path))["counts"] == {} and read_manifest(str(tmp_path))["outputs"] == []


def test_rerun_decision_follows_each_fields_role(tmp_path):
    cfg = _pretrain(tmp_path)
    assert rerun_decision(cfg.out, cfg).action == NEW
    # A run cut off part-way (config.yaml, no manifest): it continues, with new settings for what is left.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / CONFIG_FILE).write_text(config_to_yaml(cfg))
    partial = rerun_decision(cfg.out, _pretrain(tmp_path, lr=0.01))
    assert partial.action == CONTINUE and set(partial.changed) == {"lr"}
    assert rerun_decision(cfg.out, _pretrain(tmp_path, backbone="resnet18")).action == CONFLICT

    write_manifest(cfg.out, "pretrain", config_to_dict(cfg))
    assert rerun_decision(cfg.out, cfg).action == COMPLETE
    resources = _pretrain(tmp_path, workers=3, threads=2, cache="off", probe=True)
    assert rerun_decision(cfg.out, resources).action == COMPLETE  # where and how it runs is not what it made
    assert rerun_decision(cfg.out, _pretrain(tmp_path, epochs=4)).action == CONTINUE
    assert rerun_decision(cfg.out, _pretrain(tmp_path, epochs=1)).action == COMPLETE
    stale = rerun_decision(cfg.out, _pretrain(tmp_path, lr=0.01, workers=2))
    assert stale.action == STALE and stale.changes() == "lr: 0.001 -> 0.01"
    conflict = rerun_decision(cfg.out, _pretrain(tmp_path, stem="project"))
    assert conflict.action == CONFLICT and list(conflict.changed) == ["stem"]


def test_classifier_identity_fields(tmp_path):
    base = {"data": str(tmp_path / "d"), "out": str(tmp_path / "c"), "positive": "IFN-beta"}
    cfg = load_config(FinetuneConfig, values=base)
    write_manifest(cfg.out, "finetune", config_to_dict(cfg))
    assert rerun_decision(cfg.out, load_config(FinetuneConfig, values={**base, "channels": [1, 2]})).action == CONFLICT
    assert rerun_decision(cfg.out, load_config(FinetuneConfig, values={**base, "lr": 0.1})).action == STALE


def test_an_option_newer_than_the_run_counts_as_its_default(tmp_path):
    # A run recorded before `tta` existed was made without it: asking for it is another model, its default is not.
    base = {"data": str(tmp_path / "d"), "out": str(tmp_path / "c"), "positive": "IFN-beta"}
    cfg = load_config(FinetuneConfig, values=base)
    recorded = {name: value for name, value in config_to_dict(cfg).items() if name != "tta"}
    write_manifest(cfg.out, "finetune", recorded)
    assert rerun_decision(cfg.out, cfg).action == COMPLETE
    newer = rerun_decision(cfg.out, load_config(FinetuneConfig, values={**base, "tta": True}))
    assert newer.action == CONFLICT and newer.changed == {"tta": (False, True)}


def test_the_registry_names_resolvable_configs_functions_and_inputs():
    names = {step.name for step in STEPS}
    for step in STEPS:
        assert step.config_class().__name__.endswith("Config")
        assert callable(step.run) and step.function.split(":")[1]
        assert issubclass(step.result_class(), StepResult) or step.name == "pipeline"
        for field, producer in step.inputs.items():
            assert producer in (*pipeline_steps(), SOURCE, RUN) and field in step.config_class().__dataclass_fields__
        for field in (*step.source_files, *step.input_alternatives.values()):
            assert field in step.config_class().__dataclass_fields__, (step.name, field)
    assert {"synth", "ingest", "pretrain", "finetune", "embed", "score", "explain", "report", "tune",
            "pipeline"} <= names


@pytest.mark.parametrize("step", [s for s in STEPS])
def test_every_step_function_loads(step):
    from rxray.steps import resolve

    assert callable(resolve(step.function))


def test_every_pipeline_step_has_its_ray_job_entry():
    from pathlib import Path

    rayjobs = Path(__file__).resolve().parents[1] / "rayjobs"
    for name in (*pipeline_steps(), "pipeline"):
        source = (rayjobs / f"{name}.py").read_text()
        assert "from rxray.cli import main" in source, name
        if name != "pipeline":
            assert f'"--steps", "{name}"' in source, name


def test_an_output_of_another_step_is_a_conflict(tmp_path):
    cfg = _pretrain(tmp_path)
    write_manifest(cfg.out, "embed", {"out": cfg.out})
    rerun = rerun_decision(cfg.out, cfg)
    assert rerun.action == CONFLICT and rerun.changed == {"step": ("embed", "pretrain")}


# Runs write_manifest in a child that SIGKILLs itself at the moment the written file would be renamed into place:
# the manifest's bytes are on disk under a temporary name, the rename has not happened.
_KILLED_AT_RENAME = """
import os, signal, sys
from rxray.outputs import write_manifest
os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)
write_manifest(sys.argv[1], "score", {"trees": 50})
"""


@pytest.mark.parametrize("earlier", [False, True], ids=["first-run", "over-an-earlier-manifest"])
def test_a_step_killed_while_writing_its_manifest_leaves_no_half_manifest(tmp_path, earlier):
    import subprocess
    import sys

    from rxray.config import ScoreConfig

    cfg = load_config(ScoreConfig, values={"embeddings": str(tmp_path / "embed"), "out": str(tmp_path / "score"),
                                           "trees": 50})
    (tmp_path / "score").mkdir()
    if earlier:
        write_manifest(cfg.out, "score", {**config_to_dict(cfg), "trees": 10})
    killed = subprocess.run([sys.executable, "-c", _KILLED_AT_RENAME, cfg.out], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert [p.name for p in (tmp_path / "score").iterdir() if p.name.startswith("_manifest.json.tmp-")], \
        "the child was not killed in the middle of the write"
    manifest = read_manifest(cfg.out)  # whole or absent: never half a JSON document
    if earlier:  # the earlier run's manifest, intact: its settings are not these, so the step runs again
        assert manifest["config"]["trees"] == 10 and rerun_decision(cfg.out, cfg).action == STALE
    else:
        assert manifest is None and rerun_decision(cfg.out, cfg).action == NEW
    write_manifest(cfg.out, "score", config_to_dict(cfg))  # the rerun commits past the leftover temporary file
    assert rerun_decision(cfg.out, cfg).action == COMPLETE
