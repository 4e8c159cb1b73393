"""Config, CLI and storage basics."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from rxray import storage
from rxray.cli import main
from rxray.config import ConfigError, IngestConfig, SynthConfig, load_config
from rxray import layout


def test_well_names_round_trip():
    assert layout.well_name(0, 0) == "A01"
    assert layout.well_name(26, 2) == "AA03"
    assert layout.well_name(31, 47) == "AF48"
    for row in range(32):
        for col in (0, 17, 47):
            assert layout.parse_well(layout.well_name(row, col)) == (row, col)
    for bad in ("AG01", "A49", "A00", "a01", "A1", "../x"):
        with pytest.raises(ValueError):
            layout.parse_well(bad)


def test_site_ids_and_paths_match_rxrx2():
    assert layout.make_site_id("HUVEC-1", 1, "AA03", 1) == "HUVEC-1_1_AA03_1"
    assert layout.make_well_id("HUVEC-1", 1, "AA03") == "HUVEC-1_1_AA03"
    path = layout.image_path("HUVEC-2", 12, "B07", 3, 5)
    assert path == "images/HUVEC-2/Plate12/B07_s3_w5.png"
    key = layout.parse_image_path(path)
    assert (key.experiment, key.plate, key.well, key.site, key.channel) == ("HUVEC-2", 12, "B07", 3, 5)


def test_config_overrides_yaml_and_defaults(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("ingest:\n  source: /data\n  out: /out\n  size: 128\n  treatments: [IFN-beta]\n")
    cfg = load_config(IngestConfig, str(cfg_file), {"size": "64"})
    assert cfg.size == 64 and cfg.source == "/data" and cfg.treatments == ["IFN-beta"]
    assert cfg.controls == ["EMPTY"] and cfg.shard_rows == 256


@pytest.mark.parametrize(
    "values, field",
    [
        ({"out": "x", "sizee": 3}, "synth.sizee"),
        ({"out": "x", "size": "big"}, "synth.size"),
        ({"out": "x", "size": -4}, "synth.size"),
        ({"size": 64}, "synth.out"),
        ({"out": "x", "controls": 50, "wells": 10}, "synth.controls"),
    ],
)
def test_config_errors_name_the_field(values, field):
    with pytest.raises(ConfigError) as err:
        load_config(SynthConfig, values=values)
    assert err.value.field_name == field
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["synth", "--out", "x", "--size", "-5"], "synth.size"),
        (["synth", "--out", "x", "--plates", "two"], "synth.plates"),
        (["ingest", "--config", "/nonexistent/config.yaml"], "file not found"),
        (["ingest", "--source", "a", "--out", "b", "--group", "kinases"], "ingest.group"),
    ],
)
def test_cli_config_errors_exit_2_with_one_line(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "rxray.cli", *argv], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_error_in_process(capsys):
    assert main(["synth", "--out", "x", "--wells", "0"]) == 2
    assert "synth.wells" in capsys.readouterr().err


def test_local_storage_round_trip(tmp_path):
    uri = storage.join(str(tmp_path), "a", "b.txt")
    storage.write_text(uri, "hello")
    assert storage.exists(uri) and storage.read_text(uri) == "hello"
    assert storage.list_dir(storage.join(str(tmp_path), "a")) == [uri]
    storage.remove(uri)
    assert not storage.exists(uri)


def test_s3_storage_round_trip(s3_bucket):
    uri = storage.join(s3_bucket, "prefix", "obj.bin")
    storage.write_bytes(uri, b"\x00\x01\x02")
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == b"\x00\x01\x02"
    assert storage.list_dir(storage.join(s3_bucket, "prefix")) == [uri]
    fs, path = storage.pyarrow_filesystem(uri)
    with fs.open_input_stream(path) as handle:
        assert handle.read() == b"\x00\x01\x02"


# Ray Train uploads checkpoints and Ray Data writes shards through pyarrow's S3 filesystem, which sends a file of
# more than one 5 MiB part as a multipart upload; rxray's own streamed writes (fsspec) do past their 50 MiB block.
MULTIPART_WRITERS = {"pyarrow": 12 << 20, "fsspec": 60 << 20}


@pytest.mark.parametrize("fault", ["applied-reset", "truncated"])
@pytest.mark.parametrize("writer", sorted(MULTIPART_WRITERS))
def test_a_multipart_upload_whose_calls_half_happen_stores_the_whole_file(s3_proxy, s3_bucket, writer, fault):
    # Each call of the upload (create, one part, complete) meets the fault once: applied by the server but
    # unheard by the client (applied-reset), or answered with half its body (truncated); a refusal before the
    # server acts is the flaky() schedule's (every S3 test of a step).
    # A retried complete succeeds again on AWS S3, as on moto (minio and some mocks answer NoSuchUpload instead:
    # minio/minio#13318, adobe/S3Mock#2586), so the clients' own retries carry each case.
    data = np.random.default_rng(0).bytes(MULTIPART_WRITERS[writer])
    uri = storage.join(s3_bucket, writer, fault, "checkpoint.pt")
    with s3_proxy.multipart_faults(fault) as met:
        if writer == "pyarrow":
            fs, path = storage.pyarrow_filesystem(uri)
            with fs.open_output_stream(path) as out:
                out.write(data)
        else:
            with storage.open_file(uri, "wb") as out:
                out.write(data)
    assert met == {"create": 1, "part": 1, "complete": 1}, "the write was not a multipart upload"
    assert storage.read_bytes(uri) == data


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(storage.StorageError, match="unsupported storage scheme"):
        storage.exists("ftp://host/x")


QUIET_SCRIPT = """
import os, sys
import ray.data  # imported before Ray is joined, as a step module does
from rxray.runtime import VERBOSE_ENV, ensure_ray
os.environ[VERBOSE_ENV] = "1"
ensure_ray()
ray.data.range(4).map_batches(lambda batch: batch).count()
sys.stderr.write("=== quiet ===\\n"); sys.stderr.flush()
os.environ[VERBOSE_ENV] = "0"
ensure_ray()
ray.data.range(4).map_batches(lambda batch: batch).count()
"""


def test_ray_data_logs_only_with_verbose_even_when_imported_first(ray_local):
    # A fresh process: earlier steps of this session set RAY_DATA_LOG_LEVEL in the environment it would inherit.
    env = {k: v for k, v in os.environ.items() if k != "RAY_DATA_LOG_LEVEL"}
    env["RAY_ADDRESS"] = ray_local.get_runtime_context().gcs_address
    run = subprocess.run([sys.executable, "-c", QUIET_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    verbose, quiet = run.stderr.split("=== quiet ===")
    assert "Starting execution of Dataset" in verbose
    assert "Starting execution of Dataset" not in quiet and "INFO" not in quiet, quiet[-2000:]


def test_a_dataset_with_hidden_progress_bars_quietens_each_process_it_reaches(ray_local):
    # Ray Train streams a training dataset through actors of its own (DatasetManager, SplitCoordinator) whose
    # notices ("Progress bars disabled", a deprecated execution option) reached the console once per streamed
    # split: the context carries a marker that quietens whichever process unpickles it. A fresh worker (its own
    # runtime env) shows the process before and after.
    import logging
    import pickle
    import uuid

    import ray

    from rxray.runtime import RAY_DATA_PROGRESS_LOGGER, hide_progress_bars

    dataset = ray.data.range(4)
    hide_progress_bars(dataset)

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"RXRAY_FRESH_WORKER": uuid.uuid4().hex}})
    def unpickle(context: bytes) -> tuple[int, int, bool]:
        logger = logging.getLogger(RAY_DATA_PROGRESS_LOGGER)
        before = logger.getEffectiveLevel()
        bars = pickle.loads(context).enable_progress_bars
        return before, logger.getEffectiveLevel(), bars

    before, after, bars = ray.get(unpickle.remote(pickle.dumps(dataset.context)))
    assert before < logging.ERROR <= after and not bars


def test_the_next_step_waits_for_the_cpus_of_the_step_before(ray_local):
    """A read started while the previous step still holds every CPU would make Ray Data warn of a hang."""
    import threading
    import time

    from rxray.runtime import wait_for_a_free_cpu

    @ray_local.remote
    class Busy:
        def ready(self) -> bool:
            return True

    assert wait_for_a_free_cpu(timeout_s=30)
    busy = Busy.options(num_cpus=ray_local.available_resources()["CPU"]).remote()  # every CPU free now
    ray_local.get(busy.ready.remote(), timeout=60)
    assert not wait_for_a_free_cpu(timeout_s=0.5)  # every CPU held: it gives up after the timeout
    threading.Timer(0.5, ray_local.kill, [busy]).start()
    started = time.monotonic()
    assert wait_for_a_free_cpu(timeout_s=30)
    assert 0.4 < time.monotonic() - started < 20 and ray_local.available_resources().get("CPU")
