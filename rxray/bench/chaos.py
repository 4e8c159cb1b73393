"""`rxray bench chaos`: each heavy step run three times on a multi-node cluster — warm-up, undisturbed, and
with a worker node killed partway — in the style of Ray's release chaos tests.

The cluster is :class:`~rxray_testing.cluster.LocalCluster` on this machine: a head with no
CPUs (the drivers' node, as in cluster.yaml) and one-CPU worker nodes, each its own raylet
and object store. Each run is the step's own command (``rxray <step> ...``) as a driver on
the head; the third has a :class:`~rxray_testing.cluster.NodeKiller` SIGKILL the worker node
doing the step's work (training: at ``--kill-at``, by default as soon as the first epoch's
checkpoint is in storage, before Ray Train has registered it) and a replacement
node join a second later, as cluster.yaml's autoscaler would. Per run: wall time and the
peak proportional set size of the driver and every Ray process on every node; per step:
whether the node-loss run's outputs equal the undisturbed run's (training: every epoch
logged once, the epoch it resumed from, and whether the weights came out identical). The
table goes to the "Chaos benchmark" section of ``cfg.table`` (docs/reliability.md). The cluster and the
node killer are rxray's test support (``testing/``, which ``make setup`` installs from a source checkout),
not part of the rxray wheel.
"""

from __future__ import annotations

import os
import platform
import random
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rxray import storage
from rxray.bench.ingest import PeakMemory
from rxray.bench.tables import record_rows
from rxray.config import option
from rxray.errors import ConfigError
from rxray.outputs import read_manifest

try:
    from rxray_testing.cluster import FAST_FAILURE_DETECTION, Fault, LocalCluster, NodeKiller
except ImportError:  # an installed wheel without the test support: bench_chaos says how to get it
    LocalCluster = None

CASES = ["ingest", "pretrain", "pretrain-streamed", "finetune", "finetune-streamed", "embed", "score"]
KILL_MOMENTS = ["checkpoint", "mid-epoch", "epoch-logged"]
MID_EPOCH_DELAY_S = (2.0, 10.0)  # after epoch 1's checkpoint: within a later epoch (they take ~5-20 s here)
RUNS = ("warm-up", "undisturbed", "node loss")
SECTION = "## Chaos benchmark (`rxray bench chaos`)"
INTRO = ("Each step three times on a cluster of this machine (a head with no CPUs and one-CPU worker nodes, each "
         "its own raylet and object store): warm-up, undisturbed, and with the worker node doing the step's work "
         "SIGKILLed partway (training: at the kill moment under the table) and replaced a second later. Peak "
         "memory: the driver and every Ray process of every node (PSS). *Outputs* compares the node-loss run with "
         "the undisturbed one.")
HEADER = ("| step | warm-up s | undisturbed s | node loss s | peak MiB undisturbed / node loss | killed (s into "
          "the run) | outputs |")
STEP_TIMEOUT_S = 1800


@dataclass
class BenchChaosConfig:
    """`rxray bench chaos`: warm-up, undisturbed and node-loss runs of each heavy step on a local multi-node cluster."""

    section = "bench_chaos"

    workdir: str = option("bench-chaos", "local folder for the dataset, the runs and the cluster's logs", uri=True)
    steps: list[str] = option(CASES, "steps to run ('-streamed': training with --cache off)", choices=CASES)
    nodes: int = option(3, "worker nodes of one CPU each (training takes two, Ray Data the rest)", minimum=3)
    wells: int = option(24, "wells per plate of the generated dataset (2 experiments x 2 plates x 2 sites)",
                        minimum=12)
    size: int = option(32, "image side of the generated dataset and the shards", minimum=16)
    epochs: int = option(3, "training epochs (the node is lost after the first)", minimum=2)
    kill_at: str = option("checkpoint", "when training loses its node: as soon as epoch 1's checkpoint file is in "
                                        "storage, a seeded random 2-10 s later (within a later epoch), or once "
                                        "epoch 1 is logged", choices=KILL_MOMENTS)
    fast_detection: bool = option(False, "detect a lost node in ~3 s instead of Ray's default ~15 s")
    table: str = option("docs/reliability.md", "markdown file whose chaos section is rewritten (path or URI)")
    note: str = option("", "a line written under the table (e.g. what else the machine was doing)")


@dataclass
class Case:
    """One step of the benchmark: its command, the fault that hits it, and how its two outputs are compared."""

    name: str
    command: Callable[[dict[str, str], str], list[str]]
    fault: Callable[[str], Fault]
    compare: Callable[[dict[str, str], str], str]  # (output of each run, the node-loss run's log) -> verdict


def epoch_logged(out: str, epoch: int) -> Callable[[], bool]:
    """A Fault's precondition: the training run at ``out`` has logged ``epoch`` (its checkpoint is then in storage).

    The epoch log is written after Ray Train has persisted the epoch's checkpoint; the
    checkpoint file itself can be seen while it is still being copied, and a kill then
    leaves it damaged (the restore passes over it and the run starts again from scratch).
    """
    from rxray.train.epoch_log import read_metrics

    return lambda: any(entry.get("epoch") == epoch for entry in read_metrics(out))


def checkpoint_in_storage(out: str, run_name: str, epoch: int) -> Callable[[], bool]:
    """A Fault's precondition: the epoch's checkpoint file of the training run at ``out`` is in storage.

    The earliest moment a whole checkpoint exists: on S3 a file appears only once uploaded, and the kill
    lands before the controller has registered it or the epoch is logged, so the restarted workers must
    find it in storage themselves. (A kill while the folder is still being filled leaves a checkpoint the
    restore passes over: tests/test_pretrain.py.)
    """
    from rxray.models.checkpoints import CHECKPOINT_FILE

    file = storage.join(out, run_name, f"checkpoint_epoch{epoch:04d}", CHECKPOINT_FILE)
    return lambda: storage.exists(file)


def kill_moment(out: str, run_name: str, kill_at: str, seed: int = 0,
                delay_s: tuple[float, float] = MID_EPOCH_DELAY_S) -> Callable[[], bool]:
    """A training Fault's precondition for ``kill_at`` (one of KILL_MOMENTS), for the run at ``out``."""
    if kill_at == "epoch-logged":
        return epoch_logged(out, 1)
    saved = checkpoint_in_storage(out, run_name, 1)
    if kill_at == "checkpoint":
        return saved
    delay = random.Random(seed).uniform(*delay_s)
    seen_at: list[float] = []

    def mid_epoch() -> bool:
        if not seen_at and saved():
            seen_at.append(time.monotonic())
        return bool(seen_at) and time.monotonic() - seen_at[0] >= delay

    return mid_epoch


def _training_fault(name: str, run_name: str, kill_at: str) -> Callable[[str], Fault]:
    return lambda out: Fault(name, "RayTrainWorker", after=kill_moment(out, run_name, kill_at))


def _weight_difference(a_uri: str, b_uri: str) -> float:
    """The largest absolute difference between the weights (encoder and head) of two runs' final checkpoints."""
    from rxray.models.checkpoints import load_checkpoint

    a, b = load_checkpoint(a_uri), load_checkpoint(b_uri)
    return max(float((a[part][k].float() - b[part][k].float()).abs().max())
               for part in ("encoder", "head") for k in a[part])


def _compare_training(outputs: dict[str, str], log: str) -> str:
    """Training after a node loss: epochs logged once, where it resumed, and its weights against the undisturbed
    run's, beside how far two undisturbed runs (warm-up and undisturbed) already differ."""
    from rxray.train.epoch_log import read_metrics

    clean, disturbed = outputs["undisturbed"], outputs["node loss"]
    epochs = [entry["epoch"] for entry in read_metrics(disturbed)]
    once = epochs == sorted(set(epochs)) and epochs == [entry["epoch"] for entry in read_metrics(clean)]
    resumed = re.findall(r"workers restored the epoch (\d+) checkpoint", log)
    diff, baseline = _weight_difference(clean, disturbed), _weight_difference(outputs["warm-up"], clean)
    weights = ("weights identical" if diff == 0 else
               f"weights differ by up to {diff:.2g} (two undisturbed runs: {baseline:.2g})")
    return (f"{'every epoch once' if once else f'epochs logged {epochs}'}; resumed from epoch "
            f"{', '.join(sorted(set(resumed))) if resumed else 'none (no restart seen)'}; {weights}")


def _compare_shards(outputs: dict[str, str], log: str) -> str:
    """Ingest after a node loss against the undisturbed ingest: the same sites, pixels and rejects."""
    from rxray.data.shards import read_shards

    clean, disturbed = outputs["undisturbed"], outputs["node loss"]

    def rows(uri: str) -> tuple[dict[str, np.ndarray], int]:
        found: dict[str, np.ndarray] = {}
        duplicates = 0
        for batch in read_shards(uri, columns=["site_id", "image"]).iter_batches(batch_format="numpy"):
            for site_id, image in zip(batch["site_id"], batch["image"]):
                duplicates += site_id in found
                found[site_id] = image
        return found, duplicates

    (got, duplicates), (want, _) = rows(disturbed), rows(clean)
    same = sorted(got) == sorted(want) and all(np.array_equal(got[k], want[k]) for k in want)
    rejects = [storage.read_text(storage.join(uri, "_rejects.csv")) for uri in (clean, disturbed)]
    return (f"{'identical' if same else 'DIFFERENT'} rows ({len(got)} sites, "
            f"{f'{duplicates} DUPLICATE rows' if duplicates else 'no duplicates'})"
            + ("" if rejects[0] == rejects[1] else "; rejects DIFFER"))


def _compare_tables(folders: tuple[str, ...]) -> Callable[[dict[str, str], str], str]:
    """A comparison of the Parquet ``folders`` (or files) of the undisturbed and node-loss outputs, in
    site_id / well_id order where they have one (rows are written in the order batches finished)."""
    def compare(outputs: dict[str, str], log: str) -> str:
        import pandas as pd
        import pyarrow.parquet as pq

        for folder in folders:
            frames = []
            for root in (outputs["undisturbed"], outputs["node loss"]):
                filesystem, path = storage.pyarrow_filesystem(storage.join(root, folder))
                frame = pq.read_table(path, filesystem=filesystem).to_pandas()
                keys = [key for key in ("site_id", "well_id") if key in frame]
                frames.append(frame.sort_values(keys[:1]).reset_index(drop=True) if keys else frame)
            try:
                pd.testing.assert_frame_equal(*frames)
            except AssertionError as error:
                return f"DIFFERENT {folder}: {str(error).splitlines()[0]}"
        return f"identical {', '.join(folders)}"
    return compare


def cases(cfg: BenchChaosConfig) -> dict[str, Case]:
    """Every case by name; inputs (source, shards, model, embeddings) come from earlier cases' warm-up runs."""
    from rxray.train.classify import RUN_NAME as CLASSIFIER_RUN
    from rxray.train.simclr import RUN_NAME as SIMCLR_RUN

    train = ["--backbone", "resnet18", "--epochs", str(cfg.epochs), "--workers", "2"]

    def training(step: str, cache: str, extra: list[str]) -> Callable[[dict[str, str], str], list[str]]:
        return lambda inputs, out: [step, "--data", inputs["shards"], "--out", out, *train, "--cache", cache, *extra]

    pretrain_args = ["--batch-size", "16"]
    finetune_args = lambda inputs: ["--positive", "IFN-beta", "--batch-size", "8", "--encoder", inputs["model"]]
    return {
        "ingest": Case("ingest", lambda i, out: ["ingest", "--source", i["source"], "--out", out, "--size",
                                                 str(cfg.size), "--shard-rows", "8"],
                       lambda out: Fault("ingest", "ShardWriter"), _compare_shards),
        "pretrain": Case("pretrain", training("pretrain", "on", pretrain_args),
                         _training_fault("pretrain", SIMCLR_RUN, cfg.kill_at), _compare_training),
        "pretrain-streamed": Case("pretrain-streamed", training("pretrain", "off", pretrain_args),
                                  _training_fault("pretrain-streamed", SIMCLR_RUN, cfg.kill_at), _compare_training),
        "finetune": Case("finetune", lambda i, out: training("finetune", "on", finetune_args(i))(i, out),
                         _training_fault("finetune", CLASSIFIER_RUN, cfg.kill_at), _compare_training),
        "finetune-streamed": Case("finetune-streamed",
                                  lambda i, out: training("finetune", "off", finetune_args(i))(i, out),
                                  _training_fault("finetune-streamed", CLASSIFIER_RUN, cfg.kill_at), _compare_training),
        "embed": Case("embed", lambda i, out: ["embed", "--data", i["shards"], "--model", i["model"], "--out", out,
                                               "--batch-size", "16"],
                      lambda out: Fault("embed", "EmbedBatch"), _compare_tables(("sites", "wells"))),
        "score": Case("score", lambda i, out: ["score", "--embeddings", i["embeddings"], "--out", out, "--trees",
                                               "50", "--folds", "2", "--permutations", "200"],
                      lambda out: Fault("score", "score_treatment"), _compare_tables(("scores.parquet",))),
    }


OUTPUT_OF = {"ingest": "shards", "pretrain": "model", "embed": "embeddings"}  # what later cases read


def run_step(cluster: LocalCluster, args: list[str], log: Path, fault: Fault | None) -> dict[str, Any]:
    """One run of ``rxray <args>`` as a driver of ``cluster``: seconds, peak memory, return code, kills."""
    command = [str(Path(sys.executable).parent / "rxray"), *args]  # the installed command, as a user runs it
    started = time.perf_counter()
    with PeakMemory(interval_s=0.5) as memory, open(log, "w") as out, \
            NodeKiller(cluster, log, [fault] if fault else []) as killer:
        returncode = subprocess.run(command, env=cluster.client_env(), stdout=out, stderr=subprocess.STDOUT,
                                    timeout=STEP_TIMEOUT_S).returncode
    if killer.error is not None:
        raise RuntimeError(f"the node killer failed: {killer.error!r}")
    kills = killer.kills
    return {"seconds": round(time.perf_counter() - started, 1), "peak_mib": round(memory.peak / 2**20),
            "returncode": returncode, "kills": kills}


def bench_chaos(cfg: BenchChaosConfig) -> dict[str, Any]:
    """Generate a small dataset, start the cluster, run every chosen case three times, write the table."""
    if LocalCluster is None:
        raise ConfigError("bench_chaos", "needs rxray's test support (its multi-node cluster): run it from a source "
                                         "checkout after `make setup`, or `pip install -e testing/` there")
    from rxray.config import SynthConfig, load_config
    from rxray.data.synth import synthesize

    import ray

    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    inputs = {"source": str(work / "dataset")}
    if read_manifest(inputs["source"]) is None:
        synthesize(load_config(SynthConfig, values=dict(out=inputs["source"], wells=cfg.wells, controls=6,
                                                        sites=2, size=cfg.size, seed=11)))
    # Every run is a driver of the cluster below: no Ray of this process's own may stay up beside it (Ray Train's
    # placement-group cleaner finds "multiple active Ray instances" on the machine and dies).
    if ray.is_initialized():
        ray.shutdown()
    chosen = [name for name in CASES if name in cfg.steps]
    results = []
    detection = FAST_FAILURE_DETECTION if cfg.fast_detection else None
    with LocalCluster(work / "cluster", system_config=detection) as cluster:
        for _ in range(cfg.nodes):
            cluster.add_node(1)
        for case in (cases(cfg)[name] for name in CASES if name in chosen or _feeds(name, chosen)):
            row = _run_case(cluster, case, inputs, work, RUNS if case.name in chosen else RUNS[:1])
            if case.name in OUTPUT_OF:
                inputs[OUTPUT_OF[case.name]] = row["outputs"]["warm-up"]
            if case.name in chosen:
                results.append(row)
                print(f"bench chaos: {_row(row)}", flush=True)
    note = (cfg.note or f"{platform.node()}: {os.cpu_count()} CPUs, {cfg.nodes} one-CPU worker nodes, "
            f"{'fast' if cfg.fast_detection else 'default'} failure detection, training killed at: {cfg.kill_at}, "
            f"{time.strftime('%Y-%m-%d')}")
    record_rows(cfg.table, SECTION, INTRO, HEADER, [_row(row) for row in results], note, replace=True)
    return {"table": cfg.table, "rows": [{k: v for k, v in row.items() if k != "outputs"} for row in results]}


def _feeds(name: str, chosen: list[str]) -> bool:
    """Whether case ``name`` must run (as a warm-up for its output) because a chosen case reads it."""
    readers = {"ingest": CASES[1:], "pretrain": ["finetune", "finetune-streamed", "embed", "score"],
               "embed": ["score"]}
    return any(other in chosen for other in readers.get(name, []))


def _run_case(cluster: LocalCluster, case: Case, inputs: dict[str, str], work: Path,
              runs: tuple[str, ...]) -> dict[str, Any]:
    """Run ``case`` once per name in ``runs`` (fresh outputs each time); its measurements and verdict."""
    outputs = {run: str(work / "runs" / case.name / run.replace(" ", "-")) for run in RUNS}
    measured, logs = {}, {}
    for run in runs:
        if storage.exists(outputs[run]):
            storage.remove(outputs[run], recursive=True)
        log = work / "logs" / f"{case.name}-{run.replace(' ', '-')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        fault = case.fault(outputs[run]) if run == "node loss" else None
        measured[run] = run_step(cluster, case.command(inputs, outputs[run]), log, fault)
        logs[run] = log.read_text(errors="replace")
        if measured[run]["returncode"] != 0:
            raise RuntimeError(f"{case.name} ({run}) exited {measured[run]['returncode']}:\n{logs[run][-3000:]}")
    if "node loss" not in measured:
        return {"step": case.name, "runs": measured, "kills": [], "verdict": "", "outputs": outputs}
    kills = measured["node loss"]["kills"]
    verdict = (case.compare(outputs, logs["node loss"]) if kills
               else "no node was killed (the step ended first)")
    return {"step": case.name, "runs": measured, "kills": kills, "verdict": verdict, "outputs": outputs}


def _row(row: dict[str, Any]) -> str:
    runs = row["runs"]
    killed = ", ".join(f"{kill.node} at {kill.seconds:.0f} s" for kill in row["kills"]) or "none"
    return (f"| {row['step']} | {runs['warm-up']['seconds']:.1f} | {runs['undisturbed']['seconds']:.1f} | "
            f"{runs['node loss']['seconds']:.1f} | {runs['undisturbed']['peak_mib']:,} / "
            f"{runs['node loss']['peak_mib']:,} | {killed} | {row['verdict']} |")
