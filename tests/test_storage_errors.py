"""Storage mistakes end in one line, exit 2, within seconds: the real CLI against the real local S3 server.

Each case runs ``python -m rxray.cli`` as a user would and checks that it stops before any work (no
step starts Ray) with exactly one stderr line ``rxray: error: <section>.<field>: <URI>: <cause>`` and no
traceback. Refused credentials come from a second moto server with IAM authentication on (moto checks
keys and policies once its first ``INITIAL_NO_AUTH_ACTION_COUNT`` requests have set it up).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from rxray import storage
from rxray.errors import ConfigError
from rxray.storage_check import FIELD_KINDS, check_plan, storage_error_cause

TIME_LIMIT_S = 30.0
AUTH_SETUP_ACTIONS = 4  # create the bucket, put one object, create a user, create its access key


def free_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rxray(*argv: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, float]:
    """Run the real CLI in a fresh process; the result and its wall time in seconds."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "rxray.cli", *argv], capture_output=True, text=True,
                          env=env if env is not None else dict(os.environ), timeout=120)
    return done, time.perf_counter() - started


def assert_one_line(done: subprocess.CompletedProcess, seconds: float, field: str, uri: str, cause: str) -> str:
    """Exit 2, one stderr line naming the field, the URI and the cause, no traceback, in time; the line."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"rxray: error: {field}: {uri}: ") and cause in lines[0], lines[0]
    assert seconds < TIME_LIMIT_S, f"{seconds:.1f} s: {lines[0]}"
    print(f"\n{seconds:5.1f} s  {lines[0]}")
    return lines[0]


def no_credentials_env(tmp_path) -> dict[str, str]:
    """The environment of a machine with no AWS credentials anywhere (variables, files, instance metadata)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") or k in (
        "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION")}
    for name in ("credentials", "config"):
        (tmp_path / name).write_text("")
    # Disabled so that a test machine with an instance profile still has no credentials.
    return {**env, "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "credentials"),
            "AWS_CONFIG_FILE": str(tmp_path / "config"), "AWS_EC2_METADATA_DISABLED": "true"}


def s3_client(endpoint: str, service: str = "s3", region: str = "us-east-1", **credentials: str):
    """A botocore client on a test endpoint (the suite's fake credentials unless given)."""
    import botocore.session

    return botocore.session.get_session().create_client(
        service, region_name=region, endpoint_url=endpoint,
        aws_access_key_id=credentials.get("key", "testing"), aws_secret_access_key=credentials.get("secret", "testing"))


@pytest.fixture(scope="module")
def locked_s3(tmp_path_factory):
    """A moto server that checks credentials: bucket `locked` holding `data/moa.csv`, and a user with no
    permission; yields (endpoint, the user's key id, its secret)."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(AUTH_SETUP_ACTIONS)},
                              stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "moto server did not start"
                time.sleep(0.1)
        s3 = s3_client(endpoint)
        s3.create_bucket(Bucket="locked")
        s3.put_object(Bucket="locked", Key="data/moa.csv", Body=b"treatment,moa\n")
        iam = s3_client(endpoint, "iam")
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()


def with_keys(endpoint: str, key: str, secret: str) -> dict[str, str]:
    return {**os.environ, "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}


# --------------------------------------------------------------------------- credentials and endpoint


def test_no_credentials(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/rxrx2"
    done, seconds = rxray("ingest", "--source", uri, "--out", str(tmp_path / "shards"),
                          env=no_credentials_env(tmp_path))
    assert_one_line(done, seconds, "ingest.source", uri, "no AWS credentials found (set AWS_ACCESS_KEY_ID/"
                                                         "AWS_SECRET_ACCESS_KEY or a profile)")


def test_closed_port_fails_in_seconds_not_after_a_minute_of_retries(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    uri = "s3://some-bucket/x"
    done, seconds = rxray("ingest", "--source", uri, "--out", str(tmp_path / "shards"),
                          env={**os.environ, "AWS_ENDPOINT_URL": endpoint})
    assert_one_line(done, seconds, "ingest.source", uri, f"cannot connect to the S3 endpoint {endpoint} "
                                                         "(AWS_ENDPOINT_URL)")


def test_unknown_access_key(locked_s3, tmp_path):
    endpoint, _, _ = locked_s3
    uri = "s3://locked/data"
    done, seconds = rxray("ingest", "--source", uri, "--out", str(tmp_path / "shards"),
                          env=with_keys(endpoint, "AKIAIOSFODNN7NOTREAL", "whatever"))
    assert_one_line(done, seconds, "ingest.source", uri, "the AWS access key id is not known (InvalidAccessKeyId")


def test_wrong_secret_key(locked_s3, tmp_path):
    endpoint, key, _ = locked_s3
    uri = "s3://locked/data/moa.csv"
    embeddings = tmp_path / "embeddings.csv"
    embeddings.write_text("site_id\n")
    done, seconds = rxray("score", "--embeddings", str(embeddings), "--out", str(tmp_path / "score"),
                          "--moa", uri, env=with_keys(endpoint, key, "not-the-secret"))
    assert_one_line(done, seconds, "score.moa", uri, "the AWS secret key does not match the access key id "
                                                     "(SignatureDoesNotMatch")


def test_access_denied(locked_s3, tmp_path):
    endpoint, key, secret = locked_s3
    uri = "s3://locked/data/moa.csv"
    done, seconds = rxray("finetune", "--data", str(tmp_path), "--out", str(tmp_path / "classifier"),
                          "--positive", "IFN-beta", "--weights", uri, env=with_keys(endpoint, key, secret))
    assert_one_line(done, seconds, "finetune.weights", uri, "access denied to the bucket (AccessDenied")


# --------------------------------------------------------------------------- buckets, regions, kinds


def test_missing_bucket_of_an_input(s3_server, tmp_path):
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{bucket}/embed"
    done, seconds = rxray("score", "--embeddings", uri, "--out", str(tmp_path / "score"))
    assert_one_line(done, seconds, "score.embeddings", uri, f"bucket {bucket!r} does not exist")


def test_missing_bucket_of_an_output(s3_bucket, tmp_path):
    storage.write_bytes(f"{s3_bucket}/shards/part-0.parquet", b"not read")
    bucket = f"missing-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{bucket}/pretrain"
    done, seconds = rxray("pretrain", "--data", f"{s3_bucket}/shards", "--out", uri)
    assert_one_line(done, seconds, "pretrain.out", uri, f"bucket {bucket!r} does not exist")


def test_bucket_in_another_region(s3_server, tmp_path):
    bucket = f"eu-{uuid.uuid4().hex[:8]}"
    s3_client(s3_server).create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"})
    uri = f"s3://{bucket}/embed"
    env = {k: v for k, v in os.environ.items() if k != "AWS_REGION"}
    done, seconds = rxray("score", "--embeddings", uri, "--out", str(tmp_path / "score"),
                          env={**env, "AWS_DEFAULT_REGION": "us-east-1"})
    assert_one_line(done, seconds, "score.embeddings", uri, f"bucket {bucket!r} is in region eu-west-1, not "
                                                            "us-east-1 (set AWS_REGION=eu-west-1)")


def test_s3_file_where_a_folder_belongs_and_the_reverse(s3_bucket, tmp_path):
    shards = f"{s3_bucket}/shards.parquet"
    storage.write_bytes(shards, b"one object, not a folder")
    done, seconds = rxray("pretrain", "--data", shards, "--out", str(tmp_path / "pretrain"))
    assert_one_line(done, seconds, "pretrain.data", shards, "is a file, expected a folder")

    weights = f"{s3_bucket}/weights"
    storage.write_bytes(f"{weights}/resnet18.pt", b"a file inside a folder")
    done, seconds = rxray("finetune", "--data", str(tmp_path), "--out", str(tmp_path / "classifier"),
                          "--positive", "IFN-beta", "--weights", weights)
    assert_one_line(done, seconds, "finetune.weights", weights, "is a folder, expected a file")


def test_local_out_that_is_a_file(tmp_path):
    embeddings, out = tmp_path / "embeddings.csv", tmp_path / "score"
    embeddings.write_text("site_id\n")
    out.write_text("a file where the output folder goes")
    done, seconds = rxray("score", "--embeddings", str(embeddings), "--out", str(out))
    assert_one_line(done, seconds, "score.out", str(out), "is a file, expected a folder")


def test_missing_local_inputs(tmp_path):
    embeddings = tmp_path / "embeddings.csv"
    done, seconds = rxray("score", "--embeddings", str(embeddings), "--out", str(tmp_path / "score"))
    assert_one_line(done, seconds, "score.embeddings", str(embeddings), "does not exist")

    embeddings.write_text("site_id\n")
    moa = tmp_path / "moa.csv"
    done, seconds = rxray("score", "--embeddings", str(embeddings), "--out", str(tmp_path / "score"), "--moa", str(moa))
    assert_one_line(done, seconds, "score.moa", str(moa), "does not exist")


# --------------------------------------------------------------------------- the pipeline, before any step


def pipeline_file(tmp_path, run: str, source: str, **sections) -> str:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({"pipeline": {"run": run, "source": source}, **sections}))
    return str(path)


def test_pipeline_checks_every_section_before_any_step_runs(tmp_path):
    source, run = tmp_path / "rxrx2", tmp_path / "run"
    source.mkdir()
    (source / "metadata.csv").write_text("site_id\n")
    weights = str(tmp_path / "resnet18.pt")
    config = pipeline_file(tmp_path, str(run), str(source), ingest={},
                           finetune={"positive": "IFN-beta", "weights": weights})
    done, seconds = rxray("pipeline", "--config", config)
    assert_one_line(done, seconds, "finetune.weights", weights, "does not exist")
    assert not (run / "_pipeline.json").exists()  # no step ran, nothing was recorded


def test_pipeline_source_bucket_missing(s3_server, tmp_path):
    source = f"s3://missing-{uuid.uuid4().hex[:8]}/rxrx2"
    done, seconds = rxray("pipeline", "--config", pipeline_file(tmp_path, str(tmp_path / "run"), source, ingest={}))
    assert_one_line(done, seconds, "pipeline.source", source, "does not exist")


def test_pipeline_on_a_closed_port_fails_before_planning_reads_the_source(tmp_path):
    endpoint = f"http://127.0.0.1:{free_port()}"
    source = "s3://rxrx2/data"  # planning looks for the source's moa.csv: a minute of retries without the check
    config = pipeline_file(tmp_path, str(tmp_path / "run"), source, ingest={}, score={})
    done, seconds = rxray("pipeline", "--config", config, env={**os.environ, "AWS_ENDPOINT_URL": endpoint})
    assert_one_line(done, seconds, "pipeline.source", source, "cannot connect to the S3 endpoint")


def test_pipeline_does_not_require_what_its_own_steps_write(tmp_path):
    from rxray.pipeline import load_pipeline, plan_pipeline

    source, run = tmp_path / "rxrx2", str(tmp_path / "run")
    source.mkdir()  # empty: synth writes the dataset, ingest the shards...
    config = pipeline_file(tmp_path, run, str(source), synth={}, ingest={}, pretrain={}, embed={}, score={})
    check_plan(plan_pipeline(load_pipeline(config)))
    with pytest.raises(ConfigError, match=r"embed\.data: .*/run/shards: does not exist"):
        check_plan(plan_pipeline(load_pipeline(config, steps=["embed"])))  # ...unless they are not run now


# --------------------------------------------------------------------------- the safety net and the field table


def test_errors_escaping_a_step_are_one_line(locked_s3):
    """A refused write during a step's work (after the check passed) is translated, whichever client saw it."""
    import pyarrow.fs as pafs

    endpoint, key, secret = locked_s3
    with pytest.raises(Exception) as botocore_error:
        s3_client(endpoint, key=key, secret=secret).put_object(Bucket="locked", Key="out/x", Body=b"x")
    assert storage_error_cause(botocore_error.value).startswith("access denied to the bucket (AccessDenied")
    arrow = pafs.S3FileSystem(access_key=key, secret_key=secret, region="us-east-1", scheme="http",
                              endpoint_override=endpoint.split("://")[1],
                              retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
    with pytest.raises(OSError) as arrow_error:
        arrow.open_output_stream("locked/out/x").close()
    assert storage_error_cause(arrow_error.value).startswith("access denied to bucket 'locked' (AccessDenied")
    assert storage_error_cause(ValueError("not storage")) is None


def test_an_unknown_scheme_is_one_line(tmp_path):
    done, _ = rxray("ingest", "--source", "ftp://host/rxrx2", "--out", str(tmp_path / "shards"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "rxray: error: storage: unsupported storage scheme 'ftp' in 'ftp://host/rxrx2' " \
                                  "(use a local path, s3:// or gs://)"


def test_every_uri_field_has_a_kind():
    import dataclasses

    from rxray.steps import BENCHMARKS, STEPS

    unknown = {f"{step.name}.{f.name}" for step in STEPS + BENCHMARKS if step.name != "pipeline"
               for f in dataclasses.fields(step.config_class()) if f.metadata.get("uri") and f.name not in FIELD_KINDS}
    assert not unknown, f"say in rxray/storage_check.py FIELD_KINDS what these must be: {unknown}"
