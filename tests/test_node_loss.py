"""A bad day on a real cluster, on one machine: worker nodes lost mid-step, the head lost, the job resubmitted.

A multi-node Ray cluster (:class:`rxray_testing.cluster.LocalCluster`: a head with no CPUs,
as in cluster.yaml, and one-CPU worker nodes, each its own raylet and object store,
token authentication on) runs the pipeline as a submitted job on S3. A node killer
SIGKILLs a whole worker node (raylet, object store, workers) in the middle of ingest,
pretraining (2 workers holding both nodes' CPUs, images cached in the object store; killed as
soon as its first checkpoint file is in storage) and, after the job
is resubmitted, embedding and scoring; each lost node is replaced a second later, as
cluster.yaml's autoscaler replaces a reclaimed instance. As soon as the first job's training has
its epoch-2 checkpoint file in storage (while Ray Train may still be registering it, or epoch 3
already runs) the head node itself is killed, which loses the job and its driver; the same job
submitted to a new cluster skips ingest and resumes training from the checkpoints the first one
left in S3.

Every step's output is then compared with what an undisturbed run gives: ingest with the writer's own
recipe applied to every site of the source, embed and score with runs of those steps on the same inputs on
the session's local Ray. One shared scenario, one test per guarantee; the token checks use its second cluster.
Per-step runs with timings (fine-tuning too, and the cache off) are `rxray bench chaos`'s job.

The scenario takes about 4 minutes of a 2-core machine, more than a third of what `make test` may take, so its
tests carry the ``chaos`` marker and run with `make chaos`; the harness's own tests below run in `make test`.
"""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml

from rxray import storage
from rxray.batch.embed import EMBEDDING_COLUMN, embed
from rxray.batch.score import score
from rxray.bench.chaos import checkpoint_in_storage
from rxray.bench.ingest import process_tree
from rxray_testing.cluster import FAST_FAILURE_DETECTION, RAY, Fault, LocalCluster, NodeKiller, free_ports
from rxray.config import EmbedConfig, ScoreConfig, SynthConfig, load_config
from rxray.data.synth import synthesize
from rxray.models.checkpoints import load_checkpoint
from rxray.outputs import read_manifest
from rxray.train.epoch_log import read_metrics
from rxray.train.simclr import RUN_NAME
from test_ingest import rows_by_site
from test_pretrain import same_tensors
from test_pipeline import TINY_SECTIONS

ROOT = Path(__file__).resolve().parents[1]
# Two: the training workers hold every CPU (0.5 of each node), so Ray Data, and the tasks rebuilding the cached
# blocks lost with a node, run beside them or not at all, as on a cluster with no spare node.
WORKER_NODES = 2
JOB_TIMEOUT_S = 600
SECTIONS = {
    "ingest": {"size": 32, "shard_rows": 4},  # 10 shards: the pool is still writing when its node goes
    # mobilenet_v2: its checkpoint (weights and Adam state) is 26 MiB where resnet18's is 128 MiB, and every
    # checkpoint goes to S3 and back through the test's proxy, several times in the scenario.
    # Three epochs: a worker node lost after the first checkpoint, the head after the second, one epoch left.
    "pretrain": {**TINY_SECTIONS["pretrain"], "backbone": "mobilenet_v2", "epochs": 3, "workers": 2, "cache": "on",
                 "stall_timeout": 60},
    "embed": TINY_SECTIONS["embed"],
    "score": TINY_SECTIONS["score"],
}


def submit(cluster: LocalCluster, config: Path, log: Path, faults: list[Fault]) -> tuple[int, NodeKiller]:
    """`ray job submit` the pipeline to ``cluster`` (tailing its log into ``log``) while ``faults`` happen."""
    command = [RAY, "job", "submit", "--address",
               cluster.dashboard_url, "--submission-id", f"rxray-{secrets.token_hex(4)}", "--working-dir", str(ROOT),
               "--", "python", "rayjobs/pipeline.py", "--config", str(config)]
    with NodeKiller(cluster, log, faults) as killer, open(log, "w") as out:
        returncode = subprocess.run(command, cwd=ROOT, env=cluster.env, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=JOB_TIMEOUT_S).returncode
    assert killer.error is None, f"the node killer failed: {killer.error!r}"
    return returncode, killer


def start_cluster(workdir: Path, nodes: int = WORKER_NODES) -> LocalCluster:
    """A head with no CPUs (the driver's node, as in cluster.yaml) and one-CPU worker nodes."""
    cluster = LocalCluster(workdir, system_config=FAST_FAILURE_DETECTION).start()
    try:
        for _ in range(nodes):
            cluster.add_node(1)
    except BaseException:  # a node that fails to start must not leave the head and the others running
        cluster.stop()
        raise
    return cluster


class DashboardThatNeverAnswers(LocalCluster):
    """A cluster whose head starts but whose dashboard check fails (as when its port is taken), noting the pids."""

    head_pids: list[int] = []

    def _wait_for_dashboard(self, timeout_s: float = 0.0) -> None:
        self.head_pids = process_tree(self.head.process.pid)
        raise RuntimeError("the dashboard never answered")


def running(pid: int) -> bool:
    """True while ``pid`` is a live (not zombie) process."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def test_a_cluster_whose_start_fails_leaves_no_process_running(tmp_path):
    """`with LocalCluster(...)` never reaches __exit__ when start fails: start itself must stop the head."""
    cluster = DashboardThatNeverAnswers(tmp_path / "cluster", dashboard=True)
    with pytest.raises(RuntimeError, match="dashboard never answered"):
        with cluster:
            pass
    assert len(cluster.head_pids) > 1, "the head's raylet and GCS should have been running"
    assert cluster.head.killed
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously: a process may take a moment to go
    while [pid for pid in cluster.head_pids if running(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in cluster.head_pids if running(pid)]


def test_ports_drawn_again_skip_the_ones_already_handed_out():
    """A head's ports and its node ports are drawn apart; one port given twice made `ray start` refuse to run."""
    first = free_ports(200)
    again = free_ports(200, taken=first)
    assert len(set(first)) == len(set(again)) == 200 and not set(first) & set(again)


def undisturbed_shard_images(source: str, size: int) -> dict[str, np.ndarray]:
    """What an undisturbed ingest writes for every site of ``source``: each site through the writer's own recipe."""
    from rxray.data.shard_writer import ShardWriter

    filesystem, root = storage.pyarrow_filesystem(source)
    writer = ShardWriter(filesystem, root, filesystem, root, size=size, fetch_threads=1, rename_commit=False)
    sites = list(pd.read_csv(io.StringIO(storage.read_text(f"{source}/metadata.csv"))).itertuples())
    with ThreadPoolExecutor(8) as pool:  # 6 PNGs a site from S3: fetched side by side, as the writer does
        images = pool.map(lambda row: writer.load_site(row.experiment, int(row.plate), row.well, int(row.site)),
                          sites)
        return {row.site_id: image for row, image in zip(sites, images)}


chaos = pytest.mark.chaos


@pytest.fixture(scope="module")
def bad_day(s3_server, ray_local, tmp_path_factory):
    """Run the scenario once; yields its logs, kills, outputs and undisturbed references."""
    bucket = f"s3://test-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(bucket)
    work = tmp_path_factory.mktemp("bad-day")
    source, run = f"{bucket}/rxrx2", f"{bucket}/runs/bad-day"
    synthesize(load_config(SynthConfig, values={**TINY_SECTIONS["synth"], "out": source}))
    config = work / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"pipeline": {"run": run, "source": source}, **SECTIONS}, sort_keys=False))

    first = start_cluster(work / "first")
    try:
        first_rc, first_killer = submit(first, config, work / "first.log", [
            Fault("ingest", "ShardWriter"),
            Fault("pretrain", "RayTrainWorker", after=checkpoint_in_storage(f"{run}/pretrain", "simclr", 1)),
            Fault("head", "RayTrainWorker", head=True, after=checkpoint_in_storage(f"{run}/pretrain", "simclr", 2)),
        ])
    finally:
        first.stop()
    left_by_first = {"record": json.loads(storage.read_text(f"{run}/_pipeline.json")),
                     "ingest": read_manifest(f"{run}/shards"), "pretrain": read_manifest(f"{run}/pretrain")}
    second = start_cluster(work / "second", nodes=2)  # embed and score: one node to lose, one to go on
    try:
        second_rc, second_killer = submit(second, config, work / "second.log", [
            Fault("embed", "EmbedBatch"),
            Fault("score", "score_treatment"),
        ])
        # Undisturbed training on this cluster (the same topology as the first one): the same config and shards.
        reference_config = work / "reference.yaml"
        reference_config.write_text(yaml.safe_dump({
            "pipeline": {"run": f"{bucket}/reference/run", "source": source},
            "pretrain": {**SECTIONS["pretrain"], "data": f"{run}/shards"}}, sort_keys=False))
        reference_rc, _ = submit(second, reference_config, work / "reference.log", [])
        assert reference_rc == 0, (work / "reference.log").read_text()[-3000:]
        references = {"embed": f"{bucket}/reference/embed", "score": f"{bucket}/reference/score",
                      "pretrain": f"{bucket}/reference/run/pretrain"}
        embed(load_config(EmbedConfig, values={**SECTIONS["embed"], "data": f"{run}/shards",
                                               "model": f"{run}/pretrain", "out": references["embed"]}))
        score(load_config(ScoreConfig, values={**SECTIONS["score"], "embeddings": f"{run}/embed",
                                               "out": references["score"]}))
    except BaseException:  # the cluster stays up for the token tests only when the scenario got that far
        second.stop()
        raise
    yield {"run": run, "source": source, "references": references, "cluster": second, "left_by_first": left_by_first,
           "logs": {"first": (work / "first.log").read_text(), "second": (work / "second.log").read_text()},
           "returncodes": {"first": first_rc, "second": second_rc},
           "kills": {kill.label: kill for kill in [*first_killer.kills, *second_killer.kills]},
           "killed_in": {kill.label: "first" for kill in first_killer.kills}
                        | {kill.label: "second" for kill in second_killer.kills}}
    second.stop()


def after_kill(day: dict, label: str) -> str:
    """The job log from the moment of ``label``'s kill on; fails unless the kill happened."""
    assert label in day["kills"], f"no {label} kill happened; logs:\n{day['logs']['first'][-3000:]}"
    job = day["killed_in"][label]
    return day["logs"][job][day["kills"][label].log_offset:]


def assert_killed_mid_step(day: dict, label: str, step: str) -> str:
    """The kill for ``label`` landed while ``step`` ran (its 'done' line comes later); returns the log after it."""
    later = after_kill(day, label)
    assert f"pipeline: done {step} in" in later, f"{step} was not running when its node was killed:\n{later[-3000:]}"
    return later


def read_table(uri: str) -> pd.DataFrame:
    """A Parquet file or folder on any storage, as pandas."""
    filesystem, path = storage.pyarrow_filesystem(uri)
    return pq.read_table(path, filesystem=filesystem).to_pandas()


@chaos
def test_ingest_that_loses_a_worker_node_writes_exactly_the_undisturbed_rows(bad_day):
    assert_killed_mid_step(bad_day, "ingest", "ingest")
    got = rows_by_site(f"{bad_day['run']}/shards")  # fails on a duplicate row
    want = undisturbed_shard_images(bad_day["source"], SECTIONS["ingest"]["size"])
    assert sorted(got) == sorted(want) and len(got) == 40
    for site_id, image in want.items():
        np.testing.assert_array_equal(got[site_id], image)
    rejects = pd.read_csv(io.StringIO(storage.read_text(f"{bad_day['run']}/shards/_rejects.csv")))
    assert rejects.empty  # the source has no bad file: an undisturbed run rejects nothing


@chaos
def test_pretraining_that_loses_a_worker_node_resumes_from_its_last_checkpoint(bad_day):
    later = after_kill(bad_day, "pretrain")
    assert "pretrain: workers restored the epoch" in later, later[-3000:]


@chaos
def test_a_lost_head_loses_the_job_and_the_resubmitted_job_resumes_training_from_its_checkpoints(bad_day):
    assert bad_day["returncodes"]["first"] != 0 and "head" in bad_day["kills"]
    left = bad_day["left_by_first"]
    assert left["record"]["status"] == "running", "the lost job never got to finish its record"
    assert left["pretrain"] is None, "the head was lost after training had finished"
    second = bad_day["logs"]["second"]
    assert bad_day["returncodes"]["second"] == 0, second[-3000:]
    assert "pipeline: skip ingest" in second and "pipeline: complete" in second, second[-3000:]
    # Epoch 2's checkpoint is restored, or epoch 1's where the head went while epoch 2's was still being copied.
    restored = [line for line in second.splitlines() if "pretrain: workers restored the epoch" in line]
    assert restored and ("epoch 2 checkpoint" in restored[0] or "epoch 1 checkpoint" in restored[0]), second[-3000:]
    out = f"{bad_day['run']}/pretrain"
    assert [entry["epoch"] for entry in read_metrics(out)] == [1, 2, 3]  # every epoch logged once
    assert read_manifest(out)["epochs_completed"] == 3
    record = json.loads(storage.read_text(f"{bad_day['run']}/_pipeline.json"))
    assert record["status"] == "complete" and record["attempt"] == 2 and set(record["steps"]) == set(SECTIONS)
    assert [record["steps"][step]["status"] for step in SECTIONS] == ["skipped", "complete", "complete", "complete"]
    assert read_manifest(f"{bad_day['run']}/shards") == left["ingest"], "the committed ingest was redone"


@chaos
def test_training_that_lost_a_node_and_then_the_head_ends_with_the_weights_of_an_undisturbed_run(bad_day):
    # Resume judged by weights: a worker node lost after epoch 1's checkpoint, the head after epoch 2's, the job
    # resubmitted to a new cluster; the final checkpoint equals that of the same config run undisturbed.
    name = f"{RUN_NAME}/checkpoint_epoch{SECTIONS['pretrain']['epochs']:04d}/checkpoint.pt"
    resumed = load_checkpoint(f"{bad_day['run']}/pretrain/{name}")
    undisturbed = load_checkpoint(f"{bad_day['references']['pretrain']}/{name}")
    assert [m["loss"] for m in resumed["metrics"]] == [m["loss"] for m in undisturbed["metrics"]]
    for part in ("encoder", "head", "optimizer"):
        assert same_tensors(resumed[part], undisturbed[part]), f"{part} differs from the undisturbed run"


@chaos
def test_embedding_that_loses_a_worker_node_gives_the_undisturbed_embeddings(bad_day):
    assert_killed_mid_step(bad_day, "embed", "embed")
    for part in ("sites", "wells"):
        got = read_table(f"{bad_day['run']}/embed/{part}")
        want = read_table(f"{bad_day['references']['embed']}/{part}")
        key = "site_id" if part == "sites" else "well_id"
        got, want = (frame.sort_values(key).reset_index(drop=True) for frame in (got, want))
        assert got[key].is_unique and got[key].tolist() == want[key].tolist()
        np.testing.assert_array_equal(np.stack(got[EMBEDDING_COLUMN]), np.stack(want[EMBEDDING_COLUMN]))


@chaos
def test_scoring_that_loses_a_worker_node_gives_the_undisturbed_table(bad_day):
    assert_killed_mid_step(bad_day, "score", "score")
    got = read_table(f"{bad_day['run']}/score/scores.parquet")
    want = read_table(f"{bad_day['references']['score']}/scores.parquet")
    pd.testing.assert_frame_equal(got, want)


@chaos
@pytest.mark.parametrize("credentials", ["none", "wrong"])
def test_a_submission_without_the_token_is_refused(bad_day, tmp_path, credentials):
    token_cluster = bad_day["cluster"]  # the scenario's second cluster, still up
    env = {key: value for key, value in token_cluster.env.items() if not key.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    if credentials == "wrong":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    refused = subprocess.run([RAY, "job", "submit", "--address", token_cluster.dashboard_url, "--", "echo",
                              "should not run"], env=env, capture_output=True, text=True, timeout=120)
    output = (refused.stdout + refused.stderr).lower()
    assert refused.returncode != 0, output
    assert "unauthorized" in output or "authentication" in output or "401" in output, output[-2000:]
    jobs = subprocess.run([RAY, "job", "list", "--address", token_cluster.dashboard_url], env=token_cluster.env,
                          capture_output=True, text=True, timeout=120)
    assert jobs.returncode == 0 and "should not run" not in jobs.stdout


def test_the_chaos_table_is_rewritten_by_each_run_and_keeps_the_prose_under_it(tmp_path):
    from rxray.bench.chaos import HEADER, INTRO, SECTION
    from rxray.bench.tables import record_rows

    path = str(tmp_path / "reliability.md")
    storage.write_text(path, "# Reliability\n\nWritten by hand.\n")
    record_rows(path, SECTION, INTRO, HEADER, ["| ingest | 1 |"], "first run", replace=True)
    text = storage.read_text(path)
    storage.write_text(path, text.rstrip("\n") + "\n\nWhat the numbers mean, by hand.\n\n## Later section\n\nKept.\n")
    record_rows(path, SECTION, INTRO, HEADER, ["| ingest | 2 |", "| embed | 3 |"], "second run", replace=True)
    text = storage.read_text(path)
    assert text.startswith("# Reliability\n\nWritten by hand.\n")
    assert "| ingest | 2 |\n| embed | 3 |" in text and "| ingest | 1 |" not in text
    assert "- second run" in text and "first run" not in text
    assert "What the numbers mean, by hand." in text and text.rstrip().endswith("## Later section\n\nKept.")


@pytest.mark.parametrize("kill_at", ["checkpoint", "mid-epoch", "epoch-logged"])
def test_a_training_kill_waits_for_its_moment(tmp_path, kill_at):
    """`rxray bench chaos --kill-at`: nothing before epoch 1's checkpoint file exists; then at once, a little later,
    or once the epoch is logged."""
    from rxray.bench.chaos import kill_moment
    from rxray.models.checkpoints import CHECKPOINT_FILE

    out = str(tmp_path / "run")
    ready = kill_moment(out, "simclr", kill_at, delay_s=(0.2, 0.3))
    assert not ready()
    folder = tmp_path / "run" / "simclr" / "checkpoint_epoch0001"
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_FILE).write_bytes(b"weights")
    assert ready() == (kill_at == "checkpoint")
    time.sleep(0.35)
    assert ready() == (kill_at != "epoch-logged")
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"epoch": 1}) + "\n")
    assert ready()
