"""`rxray tune`: a fine-tuning search killed partway (a real SIGKILL of `python -m rxray.cli tune`) that resumes
without rerunning finished trials and whose best config `rxray finetune` takes; a pretraining search under ASHA
ranked by the probe score; the space and base files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import yaml

from rxray.cli import build_parser, config_from_args
from rxray.config import ConfigError, FinetuneConfig, PretrainConfig, TuneConfig, load_config
from rxray.outputs import read_manifest
from rxray.models.checkpoints import load_checkpoint
from rxray.train.epoch_log import read_metrics
from rxray.tune import BEST_CONFIG, PLOT_FILE, RESULTS_CSV, RESULTS_PARQUET, TRIAL_RECORD, TRIALS_DIR, tune
from conftest import shard_row

pytestmark = pytest.mark.slow

SIZE = 32
PLATES = [("HUVEC-1", 1), ("HUVEC-1", 2), ("HUVEC-2", 1), ("HUVEC-2", 2)]
TREATMENTS = {"EMPTY": None, "IFN-beta": 2, "IFN-gamma": 4}  # treatment -> the stain it brightens
PER_TREATMENT = 8  # sites per treatment per plate: 96 sites


def _rows(seed: int = 0) -> list[dict]:
    """4 plates x 3 treatments x 8 sites of 32 px; each treatment brightens its own stain, plates shift levels."""
    rng = np.random.default_rng(seed)
    rows = []
    for p, (experiment, plate) in enumerate(PLATES):
        for t, (treatment, stain) in enumerate(TREATMENTS.items()):
            for i in range(PER_TREATMENT):
                image = rng.normal(60 + 5 * p, 12, (6, SIZE, SIZE))
                if stain is not None:
                    image[stain] += 40
                well = f"{'ABC'[t]}{i + 1:02d}"
                rows.append(shard_row(experiment, plate, well, 1, treatment, 0.0 if stain is None else 1.0,
                                      np.clip(image, 0, 255).astype(np.uint8)))
    return rows


@pytest.fixture(scope="module")
def shards(write_shards, tmp_path_factory):
    """The shards (9 metadata columns + image) and an ingest manifest with channel statistics, on local disk."""
    return write_shards(str(tmp_path_factory.mktemp("shards") / "ingest"), _rows())


def _write_yaml(path, data: dict) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _finetune_search(shards: str, tmp_path, **values) -> TuneConfig:
    # Three epochs: the kill lands after a trial's first epoch, and a trial of two could finish its last one in the
    # second it takes a killed driver's workers to go (seen once: the resumed trial had nothing left to train).
    base = _write_yaml(tmp_path / "base.yaml", {"finetune": {
        "positive": "IFN-beta", "backbone": "resnet18", "workers": 1, "head_hidden": 16, "val_frac": 0.25,
        "test_frac": 0.0, "patience": 5, "plate_norm": False}})
    # no test split (trials are ranked on validation) and no plate-gain pass per trial: it saves time
    space = _write_yaml(tmp_path / "space.yaml", {"batch_size": 8, "lr": {"loguniform": [1e-3, 3e-2]},
                                                  "aug_strength": {"choice": [0.0, 0.5]}})
    return load_config(TuneConfig, values={"data": shards, "out": str(tmp_path / "search"), "objective": "finetune",
                                           "base": base, "space": space, "samples": 2, "epochs": 3,
                                           "scheduler": "none", "max_concurrent": 1, **values})


def _command(cfg: TuneConfig) -> list[str]:
    """The `rxray tune` command line of ``cfg``."""
    return [sys.executable, "-m", "rxray.cli", "tune", "--data", cfg.data, "--out", cfg.out, "--objective",
            cfg.objective, "--base", cfg.base, "--space", cfg.space, "--samples", str(cfg.samples), "--epochs",
            str(cfg.epochs), "--scheduler", cfg.scheduler, "--max-concurrent", str(cfg.max_concurrent)]


def _finished_trials(search: str) -> list[str]:
    trials = os.path.join(search, TRIALS_DIR)
    if not os.path.isdir(trials):
        return []
    return sorted(t for t in os.listdir(trials) if read_manifest(os.path.join(trials, t)) is not None)


def _kill_after_one_trial_and_one_epoch(cfg: TuneConfig, ray_local, tmp_path) -> None:
    """Run `rxray tune` in a subprocess and SIGKILL it once a trial has finished and the next has trained an epoch."""
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    with open(tmp_path / "killed.log", "wb") as log:
        process = subprocess.Popen(_command(cfg), env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            # The first trial is finished and the second has trained an epoch: Tune has saved its state since.
            while not (_finished_trials(cfg.out) and _second_trial_epochs(cfg.out) >= 1):
                assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "no trial finished in time"
                time.sleep(0.1)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.chaos  # three training runs and a driver start, ~90 s on 2 cores: `make chaos`, beside the node losses
def test_a_killed_search_resumes_without_rerunning_finished_trials_and_writes_a_best_config(
        shards, ray_local, tmp_path):
    cfg = _finetune_search(shards, tmp_path)
    _kill_after_one_trial_and_one_epoch(cfg, ray_local, tmp_path)
    finished = _finished_trials(cfg.out)
    assert len(finished) == 1 and not os.path.exists(os.path.join(cfg.out, "_manifest.json"))
    first = finished[0]
    first_manifest = read_manifest(os.path.join(cfg.out, TRIALS_DIR, first))

    summary = tune(cfg)  # the same search again: it resumes
    assert summary.restored and summary.metric == "val_pr_auc" and summary.trials == 2
    table = pd.read_parquet(os.path.join(cfg.out, RESULTS_PARQUET))
    assert len(table) == 2 and table["trial_id"].is_unique and first in table["trial_id"].tolist()
    assert (table["status"] == "complete").all() and (table["epochs"] == 3).all()
    # Learning, not a range: IFN-beta's stain is 3 sd brighter, so a trained head ranks its validation sites first
    # (chance: the IFN-beta share of the validation plate's sites, 1/3).
    assert table["val_pr_auc"].max() >= 0.9, table[["trial_id", "config/lr", "val_pr_auc"]]
    assert (table["config/batch_size"] == 8).all() and table["config/lr"].between(1e-3, 3e-2).all()
    assert table["config/lr"].nunique() == 2  # each trial its own sample
    assert pd.read_csv(os.path.join(cfg.out, RESULTS_CSV))["trial_id"].tolist() == table["trial_id"].tolist()
    with open(os.path.join(cfg.out, PLOT_FILE), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    # The finished trial was not run again: one start, its manifest and its epochs untouched.
    first_out = os.path.join(cfg.out, TRIALS_DIR, first)
    assert json.load(open(os.path.join(first_out, TRIAL_RECORD)))["starts"] == 1
    assert read_manifest(first_out) == first_manifest
    assert load_checkpoint(first_out)["starts"] == [0]
    for trial_id in table["trial_id"]:  # every trial trained each epoch once: the table holds what Tune scored
        assert [entry["epoch"] for entry in read_metrics(os.path.join(cfg.out, TRIALS_DIR, trial_id))] == [1, 2, 3]
    (second,) = set(table["trial_id"]) - {first}  # interrupted after its first epoch, resumed from that checkpoint
    second_out = os.path.join(cfg.out, TRIALS_DIR, second)
    starts = load_checkpoint(second_out)["starts"]
    assert len(starts) == 2 and starts[0] == 0 and 1 <= starts[1] < 3, starts
    assert json.load(open(os.path.join(second_out, TRIAL_RECORD)))["starts"] == 2

    best = table.loc[table["val_pr_auc"].idxmax()]
    assert summary.best["trial_id"] == best["trial_id"]
    manifest = read_manifest(cfg.out)
    assert manifest["step"] == "tune" and manifest["best"]["trial_id"] == best["trial_id"]
    best_config = load_config(FinetuneConfig, os.path.join(cfg.out, BEST_CONFIG))
    assert best_config.positive == "IFN-beta" and best_config.batch_size == 8 and best_config.epochs == 3
    assert best_config.lr == pytest.approx(best["config/lr"]) and best_config.head_hidden == 16

    # What `rxray finetune --config best_config.yaml` runs: the command line parsed into its config, as the CLI
    # does before training (training on it again, another 20 s fit, is the finetune tests' business).
    args = build_parser().parse_args(["finetune", "--config", os.path.join(cfg.out, BEST_CONFIG), "--epochs", "1"])
    command = config_from_args(FinetuneConfig, args)
    assert command.lr == pytest.approx(best["config/lr"]) and command.batch_size == 8 and command.epochs == 1
    assert command.positive == "IFN-beta" and command.data == cfg.data


def test_space_and_base_errors_name_the_field_before_any_trial(shards, tmp_path):
    bad_range = _write_yaml(tmp_path / "bad-range.yaml", {"dropout": {"uniform": [0.0, 2.0]}})
    with pytest.raises(ConfigError, match=r"^tune.space: pretrain.dropout: must be <= 0.95"):
        tune(load_config(TuneConfig, values={"data": shards, "out": str(tmp_path / "a"), "space": bad_range}))
    unknown = _write_yaml(tmp_path / "unknown.yaml", {"momentum": {"uniform": [0.1, 0.9]}})
    with pytest.raises(ConfigError, match=r"^tune.space: 'momentum' is not a searchable pretrain setting"):
        tune(load_config(TuneConfig, values={"data": shards, "out": str(tmp_path / "b"), "space": unknown}))
    with pytest.raises(ConfigError, match=r"^tune.base: finetune.positive: is required"):
        tune(load_config(TuneConfig, values={"data": shards, "out": str(tmp_path / "c"), "objective": "finetune"}))
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


def test_a_pretrain_search_under_asha_ranks_trials_by_the_probe_score(shards, tmp_path):
    # The trial streams its images from the shards every epoch (cache off), as a full-scale run does: the suite's one
    # streamed training run (its check does not depend on the order the blocks arrive in).
    base = _write_yaml(tmp_path / "base.yaml", {"backbone": "resnet18", "workers": 1, "probe_sites": 96,
                                                "cache": "off"})
    space = _write_yaml(tmp_path / "space.yaml", {"batch_size": 8, "proj_dim": {"choice": [16, 32]}})
    search = str(tmp_path / "search")
    summary = tune(load_config(TuneConfig, values={"data": shards, "out": search, "objective": "pretrain",
                                                   "base": base, "space": space, "samples": 1, "epochs": 1,
                                                   "scheduler": "asha", "max_concurrent": 1}))
    assert not summary.restored and summary.trials == 1 and summary.metric == "probe_score"
    table = pd.read_parquet(os.path.join(search, RESULTS_PARQUET))
    assert table["status"].tolist() == ["complete"] and table["probe_score"].between(0, 1).all()
    (trial_id,) = table["trial_id"]
    history = read_metrics(os.path.join(search, TRIALS_DIR, trial_id))
    # The objective measures the planted biology: each treatment brightens its own stain by 3 sd, and the trial's
    # plate-grouped probe tells the three apart (balanced accuracy; chance 1/3). Whether SimCLR adds to what a
    # random-init encoder gives is test_pretrain.py's check (fixed-view NT-Xent) and the science run's.
    assert [entry["epoch"] for entry in history] == [1] and history[0]["probe_score"] >= 0.9, history
    best = load_config(PretrainConfig, os.path.join(search, BEST_CONFIG))  # what `rxray pretrain --config` loads
    assert best.probe and best.batch_size == 8 and best.proj_dim in (16, 32) and best.backbone == "resnet18"


def _second_trial_epochs(search: str) -> int:
    """Epochs logged by the trial that is running after the first finished one (0 if none yet)."""
    trials = os.path.join(search, TRIALS_DIR)
    finished = set(_finished_trials(search))
    running = [t for t in sorted(os.listdir(trials)) if t not in finished] if os.path.isdir(trials) else []
    return max((len(read_metrics(os.path.join(trials, t))) for t in running), default=0)
