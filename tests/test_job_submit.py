"""`ray job submit` for real: a token-authenticated Ray head on 127.0.0.1 runs the pipeline job on a
synthetic dataset in the local S3 server; a submission without the token is refused.

The head runs `ray start --head --block` from this venv with its own temp dir and ports, so it never
meets the session's in-process Ray; teardown stops exactly the processes it started (never `ray stop`,
which stops every Ray process on the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from rxray import storage
from rxray.config import SynthConfig, load_config
from rxray.data.synth import synthesize
from rxray.outputs import read_manifest
from test_pipeline import TINY_SECTIONS, process_tree, runnable_sections

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """Run this venv's `ray` command."""
    return subprocess.run([str(VENV_BIN / "ray"), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def wait_for_dashboard(url: str, token: str, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """Poll the dashboard (with the token) until it answers, or fail with the head's log."""
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
    while True:
        assert head.poll() is None, f"ray start exited:\n{log.read_text()[-3000:]}"
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        assert time.monotonic() < deadline, f"the dashboard never came up:\n{log.read_text()[-3000:]}"
        time.sleep(1)


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """SIGTERM `ray start --block` (it shuts its processes down), then SIGKILL whatever it started."""
    started = set(process_tree(head.pid))
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=3)  # it rarely finishes in time; what it leaves is killed below
    except subprocess.TimeoutExpired:
        pass
    # Processes of this head that outlived it: its descendants, or anything naming its own temp dir.
    for pid in started | set(_pids_mentioning(temp_dir)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if head.poll() is None:
        head.wait(timeout=30)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [pid for pid in pids if pid != os.getpid()]


@pytest.fixture(scope="module")
def ray_head(s3_server, tmp_path_factory):
    """A Ray head with token authentication on 127.0.0.1 (2 CPUs); yields its address and environments."""
    temp_dir = tempfile.mkdtemp(prefix="rxray-head-", dir="/tmp")  # short: Ray's socket paths live under it
    token = secrets.token_hex(32)
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    client_env = {key: value for key, value in os.environ.items()
                  if not key.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    # The venv first on PATH: `python` in a job's entrypoint is the interpreter the head runs.
    client_env.update(PATH=f"{VENV_BIN}{os.pathsep}{client_env.get('PATH', '')}", RAY_USAGE_STATS_ENABLED="0",
                      AWS_ENDPOINT_URL=s3_server)
    token_env = {**client_env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}

    dashboard = free_port()
    log = Path(temp_dir) / "head.log"
    command = ["start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(free_port()),
               "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
               "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
               "--num-cpus", "2", "--object-store-memory", str(400 * 1024**2), "--temp-dir", temp_dir,
               "--disable-usage-stats"]
    with open(log, "w") as out:
        head = subprocess.Popen([str(VENV_BIN / "ray"), *command], cwd=ROOT, env=token_env, stdout=out,
                                stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(address, token, head, log)
        yield {"address": address, "token_env": token_env, "client_env": client_env, "temp_dir": temp_dir}
    finally:
        stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_submitted_pipeline_runs_on_s3_with_the_token(ray_head, ray_local, s3_bucket, tmp_path):
    source, run = f"{s3_bucket}/rxrx2", f"{s3_bucket}/runs/job"
    synthesize(load_config(SynthConfig, values={**TINY_SECTIONS["synth"], "out": source}))
    # Training, and loading the trained model from S3 on the cluster; score, report and the classifiers run on
    # S3 in their own tests.
    sections = {k: v for k, v in runnable_sections().items() if k in ("ingest", "pretrain", "embed")}
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"pipeline": {"run": run, "source": source}, **sections}, sort_keys=False))

    submission_id = f"rxray-test-{secrets.token_hex(4)}"
    submitted = ray_cli("job", "submit", "--address", ray_head["address"], "--submission-id", submission_id,
                        "--working-dir", str(ROOT), "--", "python", "rayjobs/pipeline.py", "--config", str(config),
                        env=ray_head["token_env"], timeout=900)
    status = ray_cli("job", "status", "--address", ray_head["address"], submission_id, env=ray_head["token_env"])
    logs = ray_cli("job", "logs", "--address", ray_head["address"], submission_id, env=ray_head["token_env"])
    report = "\n".join(["submit:", submitted.stdout[-3000:], submitted.stderr[-3000:], "status:", status.stdout,
                        status.stderr, "logs:", logs.stdout[-3000:]])
    assert "succeeded" in (status.stdout + status.stderr).lower(), report
    assert submitted.returncode == 0, report
    assert "pipeline: complete" in logs.stdout, report

    record = json.loads(storage.read_text(storage.join(run, "_pipeline.json")))
    assert record["status"] == "complete" and set(record["steps"]) >= {"ingest", "pretrain", "embed"}
    for key, entry in record["steps"].items():
        manifest = read_manifest(entry["out"])
        assert entry["out"].startswith(run) and manifest is not None and manifest["step"] == entry["step"], key
    assert read_manifest(storage.join(run, "shards"))["counts"]["written"] == 40


@pytest.mark.slow
@pytest.mark.parametrize("credentials", ["none", "wrong"])
def test_a_submission_without_the_token_is_refused(ray_head, tmp_path, credentials):
    env = {**ray_head["client_env"], "HOME": str(tmp_path)}  # no ~/.ray/auth_token to fall back on
    if credentials == "wrong":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    refused = ray_cli("job", "submit", "--address", ray_head["address"], "--", "echo", "should not run", env=env)
    output = (refused.stdout + refused.stderr).lower()
    assert refused.returncode != 0, output
    assert "unauthorized" in output or "authentication" in output or "401" in output, output[-2000:]
    jobs = ray_cli("job", "list", "--address", ray_head["address"], env=ray_head["token_env"])
    assert "should not run" not in jobs.stdout
