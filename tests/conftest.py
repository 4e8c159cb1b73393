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


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint (moto's server) on 127.0.0.1 at a random port; yields its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    yield endpoint
    server.stop()


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
