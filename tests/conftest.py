"""Shared test fixtures: one local S3 server (moto) and one local Ray per session, small datasets.

The S3 server is real HTTP on 127.0.0.1, reached through AWS_ENDPOINT_URL exactly as
production code reaches AWS; it starts before Ray so Ray's workers inherit the setting.
"""

from __future__ import annotations

import os
import uuid

import pytest

# Before anything imports boto/s3fs: fake credentials, never the developer's real ones.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("AWS_PROFILE", None)
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train polls its workers every 2 s by default: each tiny training run here waits on a few polls.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="session")
def s3_proxy():
    """A real S3 endpoint (moto's server) on 127.0.0.1 behind a fault-injecting proxy; yields the proxy.

    AWS_ENDPOINT_URL names the proxy, so every client (this process, Ray's workers, jobs)
    goes through it; it forwards faithfully until a test asks for faults (``flaky()``).
    """
    from moto.server import ThreadedMotoServer

    from s3_proxy import FaultyS3Proxy

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = FaultyS3Proxy(f"http://{host}:{port}").start()
    os.environ["AWS_ENDPOINT_URL"] = proxy.url
    yield proxy
    proxy.stop()
    server.stop()


@pytest.fixture(scope="session")
def s3_server(s3_proxy):
    """The S3 endpoint every test uses (the proxy in front of moto); yields its URL."""
    return s3_proxy.url


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; yields its s3:// URI."""
    from rxray import storage

    uri = f"s3://test-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(uri)
    return uri


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session (started after the S3 server so workers see it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=512 * 1024**2, logging_level="ERROR", log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, ray_local):
    """A small synthetic RxRx2 dataset on local disk (2 experiments x 1 plate, 64 px); yields its path."""
    from rxray.config import SynthConfig, load_config
    from rxray.data.synth import synthesize

    out = str(tmp_path_factory.mktemp("rxrx2") / "dataset")
    cfg = load_config(SynthConfig, values=dict(out=out, experiments=2, plates=1, wells=12, controls=4,
                                               sites=2, size=64, treatments=6, seed=7))
    synthesize(cfg)
    return out


def shard_row(experiment: str, plate: int, well: str, site: int, treatment: str, conc: float | None, image,
              **labels) -> dict:
    """One shard row: the 9 RxRx2 metadata columns (HUVEC), any label columns, then the uint8 image."""
    from rxray.layout import make_site_id, make_well_id

    return {"site_id": make_site_id(experiment, plate, well, site), "well_id": make_well_id(experiment, plate, well),
            "cell_type": "HUVEC", "experiment": experiment, "plate": plate, "well": well, "site": site,
            "treatment": treatment, "treatment_conc": conc, **labels, "image": image}


@pytest.fixture(scope="session")
def write_shards(ray_local):
    """A function writing metadata+image rows as ingest shards plus a manifest with channel statistics."""
    import numpy as np

    from rxray import storage
    from rxray.layout import METADATA_COLUMNS
    from rxray.outputs import write_manifest
    from rxray.results import IngestResult

    def write(uri: str, rows: list[dict], partitions: int = 3) -> str:
        assert list(rows[0])[:9] == METADATA_COLUMNS
        images = np.stack([row["image"] for row in rows]).astype(np.float64)
        fs, path = storage.pyarrow_filesystem(uri)
        ray_local.data.from_items(rows).repartition(partitions).write_parquet(path, filesystem=fs)
        write_manifest(uri, "ingest", {}, IngestResult(
            counts={"written": len(rows)}, channel_mean=images.mean(axis=(0, 2, 3)).tolist(),
            channel_std=images.std(axis=(0, 2, 3)).tolist(), image_shape=list(images.shape[1:])))
        return uri

    return write


def save_encoder_checkpoint(root: str, seed: int = 1, perturb_batch_norm: bool = True) -> str:
    """A `rxray pretrain` output under ``root`` with one resnet18 checkpoint in its documented format.

    The encoder is built under ``torch.manual_seed(seed)``; ``perturb_batch_norm`` gives its batch-norm
    layers non-trivial running statistics, as a trained encoder has.
    """
    import torch

    from rxray.models.backbones import build_encoder
    from rxray.models.checkpoints import Checkpoint, checkpoint_dir_name, save_checkpoint_file

    torch.manual_seed(seed)
    encoder = build_encoder("resnet18", stem="adapt", in_channels=6)
    if perturb_batch_norm:
        with torch.no_grad():
            for module in encoder.modules():
                if isinstance(module, torch.nn.BatchNorm2d):
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)
    directory = os.path.join(root, "simclr", checkpoint_dir_name(1))
    os.makedirs(directory)
    checkpoint = Checkpoint(encoder=encoder.state_dict(), backbone="resnet18", stem="adapt",
                            channel_mean=[60.0] * 6, channel_std=[20.0] * 6, head={}, optimizer={}, epoch=1,
                            config={}, metrics=[])
    save_checkpoint_file(checkpoint.to_state(), directory)
    return root


@pytest.fixture(scope="session")
def encoder_checkpoint():
    """The function that saves a `rxray pretrain`-format checkpoint (:func:`save_encoder_checkpoint`)."""
    return save_encoder_checkpoint


def write_pipeline(path, run: str, source: str, sections: dict, **pipeline) -> str:
    """A pipeline YAML file at ``path`` (a pathlib.Path); returns its path."""
    import yaml

    path.write_text(yaml.safe_dump({"pipeline": {"run": run, "source": source, **pipeline}, **sections},
                                   sort_keys=False))
    return str(path)


# A screen small enough for a minute of CPU: 4 plates x 24 wells (8 controls) x 2 sites at 32 px, the 4
# interferons, one active compound and one planted null, each at its top dose. Its SimCLR pretraining runs on 2
# workers from images cached in the object store, so its weights are its seed's alone: test_pretrain.py repeats it
# with a worker death and compares them bitwise. Its classifier is that encoder, frozen and cut to stains 1-3
# (IFN-beta's phenotype is on actin, w3), under a head trained on one worker from cached images (20 s; streamed on
# 2 workers it took 33-37 s; streamed training is test_tune.py's ASHA trial). Seeds 3 and 5 (2026-12-07): the 4
# interferons active, the null not, IFN-beta's classifier at ROC-AUC 1.0 and F1 0.89 / 1.0; with every gradient
# zeroed (seed 3) nothing active and F1 0.0; what training adds: test_pipeline.py's science test.
SCIENCE_SECTIONS = {
    "synth": {"experiments": 2, "plates": 2, "wells": 24, "controls": 8, "sites": 2, "size": 32, "treatments": 6,
              "doses": 1, "null_fraction": 0.5, "unannotated": 0, "seed": 3},
    "ingest": {"size": 32, "shard_rows": 64},
    "pretrain": {"backbone": "resnet18", "epochs": 2, "batch_size": 16, "workers": 2, "cache": "on"},
    "finetune": {"name": "ifn-beta", "positive": "IFN-beta", "epochs": 5, "batch_size": 8, "aug_strength": 0.0,
                 "val_frac": 0.0, "channels": [1, 2, 3], "tta": True},
    "embed": {"batch_size": 64},
    "features": {"measurements": ["intensity"], "batch_size": 32},  # the suite's time: IFN-beta's is intensity
    "score": {"trees": 10, "folds": 2, "permutations": 100, "correct": ["tvn"]},
    "compare": {"trees": 10, "folds": 2, "permutations": 100},  # the score section's: SimCLR's row is its tables
    "report": {},
}


@pytest.fixture(scope="session")
def science_run(tmp_path_factory, ray_local):
    """`rxray pipeline` from relative paths, as `make demo` runs it, on a driver that joins a running Ray (as a
    `ray job submit` driver joins its cluster, so the workers' working directory is Ray's, not the driver's):
    synth through report on the small science screen, once for the session (each Ray Train run costs ~20 s of
    process starts). Yields (plan, console, folder)."""
    import subprocess
    import sys
    from pathlib import Path

    from rxray.pipeline import load_pipeline, plan_pipeline

    folder = tmp_path_factory.mktemp("joined")
    path = write_pipeline(folder / "pipeline.yaml", "run", "data", SCIENCE_SECTIONS)
    here = Path.cwd()
    os.chdir(folder)
    try:
        plan = plan_pipeline(load_pipeline(path))
    finally:
        os.chdir(here)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done = subprocess.run([sys.executable, "-m", "rxray.cli", "pipeline", "--config", path], cwd=folder,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    yield plan, done.stdout + done.stderr, folder
