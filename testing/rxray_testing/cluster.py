"""A multi-node Ray cluster on one machine, and a node killer: how rxray shows it survives losing a node.

:class:`LocalCluster` starts a head and worker nodes with ``ray start`` (each node its own
raylet, object store and worker processes, on its own ports), with token authentication on
as ``ray start`` sets it, and stops exactly the processes it started (never ``ray stop``).
Like ``cluster.yaml``, the head runs no tasks by default: the driver lives there and the
work goes to the worker nodes. :meth:`LocalCluster.kill_node` SIGKILLs a node's raylet and
every process under it (its workers, its object store, its agents): what a reclaimed spot
instance or a dead machine does. :class:`NodeKiller` does that when a running step prints
a given line, then optionally adds a replacement node as an autoscaler would.

Used by ``rxray bench chaos`` and by the node-loss tests; part of the test support, not of the rxray wheel.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection

from rxray.bench.ingest import process_tree

RAY = str(Path(sys.executable).parent / "ray")
WORKER_PORTS = 48  # worker processes one node may run at once (each needs a port of its own)
START_TIMEOUT_S = 120.0
# Ray marks a node dead after 5 missed health checks 3 s apart (about 15 s); tests that lose several nodes
# use 3 checks 1 s apart. Only detection gets faster: what happens after it is Ray's and rxray's own policy.
FAST_FAILURE_DETECTION = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
STARTED = "Ray runtime started."  # what `ray start` prints once its node is up


def free_ports(count: int, taken: Collection[int] = ()) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that nothing listens on right now and that are not in ``taken``.

    A port handed out earlier but not yet bound by its process is free again to the OS,
    so a caller that draws ports several times passes the earlier ones as ``taken``.
    """
    sockets, ports = [], []
    try:
        while len(ports) < count:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)  # held open until the end, so the OS hands out a new port each time
            if sock.getsockname()[1] not in taken:
                ports.append(sock.getsockname()[1])
        return ports
    finally:
        for sock in sockets:
            sock.close()


def command_line(pid: int) -> str:
    """A process's command line with spaces between arguments ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and every descendant, children first found before any dies; returns the pids."""
    pids = process_tree(pid)
    for each in pids:
        try:
            os.kill(each, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


@dataclass
class Node:
    """One `ray start --block` process of a :class:`LocalCluster` and what it was started with."""

    name: str
    process: subprocess.Popen
    log: Path
    cpus: float
    resources: dict[str, float] = field(default_factory=dict)
    killed: bool = False

    def runs(self, pattern: str) -> bool:
        """True when a live process of this node has a command line matching ``pattern`` (e.g. 'RayTrainWorker')."""
        return any(re.search(pattern, command_line(pid)) for pid in process_tree(self.process.pid)[1:])


class LocalCluster:
    """A head plus worker nodes on 127.0.0.1, each its own raylet; token authentication on. Use as a context."""

    def __init__(self, workdir: str | os.PathLike, head_cpus: float = 0, object_store_mib: int = 200,
                 dashboard: bool = True, env: dict[str, str] | None = None,
                 system_config: dict[str, object] | None = None):
        self.workdir = Path(workdir)
        self.head_cpus = head_cpus
        self.object_store_mib = object_store_mib
        self.dashboard = dashboard
        self.system_config = system_config
        # Ray's socket paths live under its temp dir and must stay short: not under a deep work folder.
        self.temp_dir = tempfile.mkdtemp(prefix="rxray-cluster-", dir="/tmp")
        self.token_file = Path(self.temp_dir) / "auth_token"
        base = {key: value for key, value in (env or os.environ).items()
                if not key.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
        self.env = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.token_file),
                    "RAY_USAGE_STATS_ENABLED": "0",
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}"}
        self.nodes: list[Node] = []
        self.ports: set[int] = set()  # every port handed to a node of this cluster: never handed out twice
        self.gcs_port = 0
        self.dashboard_port = 0

    @property
    def address(self) -> str:
        """The GCS address a driver joins (RAY_ADDRESS)."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The dashboard's URL (`ray job submit --address`); only with ``dashboard=True``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """The environment of a driver of this cluster: its address and the token."""
        return {**self.env, "RAY_ADDRESS": self.address}

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> "LocalCluster":
        """Start the head node and wait until it answers."""
        self.token_file.write_text(secrets.token_hex(32))
        self.token_file.chmod(0o600)
        self.gcs_port, self.dashboard_port, client_port = self._free_ports(3)
        head = ["--head", "--port", str(self.gcs_port), "--temp-dir", self.temp_dir,
                "--ray-client-server-port", str(client_port)]
        if self.system_config:
            head += ["--system-config", json.dumps(self.system_config)]
        if self.dashboard:
            head += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                     "--dashboard-port", str(self.dashboard_port)]
        else:
            head += ["--include-dashboard", "false"]
        self._start_node("head", self.head_cpus, {}, head)
        if self.dashboard:
            try:
                self._wait_for_dashboard()
            except BaseException:
                self.stop()  # a `with` block whose start fails never reaches __exit__
                raise
        return self

    def _wait_for_dashboard(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Poll the dashboard with the token until it answers (jobs are submitted through it)."""
        import urllib.error
        import urllib.request

        request = urllib.request.Request(f"{self.dashboard_url}/api/version",
                                         headers={"Authorization": f"Bearer {self.token_file.read_text()}"})
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if self.head.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the dashboard never answered:\n{self.head.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def _free_ports(self, count: int) -> list[int]:
        """``count`` free ports that no node of this cluster was given (its own may not be bound yet)."""
        ports = free_ports(count, taken=self.ports)
        self.ports.update(ports)
        return ports

    def add_node(self, cpus: float, resources: dict[str, float] | None = None) -> Node:
        """Start one more worker node with ``cpus`` CPUs (and custom ``resources``); returns once it has joined."""
        # Each node its own temp folder, as each machine of a real cluster has. Sharing the head's, the nodes
        # shared the job's unpacked working dir, and a replacement node's runtime-env agent unpacks it afresh
        # (deleting it first) under the workers of the others: their cwd vanished, and so did an embed job.
        # Its own folder also keeps its own logs, which its own log monitor forwards once.
        name = f"worker-{len(self.nodes)}"
        return self._start_node(name, cpus, resources or {},
                                ["--address", self.address, "--temp-dir", str(Path(self.temp_dir) / name)])

    def _start_node(self, name: str, cpus: float, resources: dict[str, float], role: list[str]) -> Node:
        ports = self._free_ports(6 + WORKER_PORTS)
        command = [RAY, "start", "--block", "--node-ip-address", "127.0.0.1", *role,
                   "--num-cpus", str(int(cpus)), "--object-store-memory", str(self.object_store_mib * 2**20),
                   "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
                   "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
                   "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]),
                   "--worker-port-list", ",".join(map(str, ports[6:])), "--disable-usage-stats"]
        if resources:
            command += ["--resources", json.dumps(resources)]
        log = self.workdir / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            process = subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        node = Node(name, process, log, cpus, resources)
        self.nodes.append(node)
        try:
            self._wait_started(node)
        except BaseException:  # a node that never joined is stopped here: no caller holds it to stop later
            self.kill_node(node)
            raise
        return node

    def alive_nodes(self) -> list[Node]:
        """The nodes not killed."""
        return [node for node in self.nodes if not node.killed]

    def worker_nodes(self) -> list[Node]:
        """The live nodes other than the head."""
        return [node for node in self.alive_nodes() if node.name != "head"]

    @staticmethod
    def _wait_started(node: Node, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until ``ray start`` says the node's runtime started (its raylet has registered with the head).

        Read from its log: asking the head would need this process to hold the cluster's token.
        """
        deadline = time.monotonic() + timeout_s
        while STARTED not in (node.log.read_text(errors="replace") if node.log.exists() else ""):
            if node.process.poll() is not None:
                raise RuntimeError(f"ray start for {node.name} exited:\n{node.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"ray start for {node.name} did not finish in {timeout_s:g} s")
            time.sleep(0.2)

    @property
    def head(self) -> Node:
        """The head node (the GCS, the dashboard, and the drivers of submitted jobs)."""
        return self.nodes[0]

    def kill_node(self, node: Node) -> int:
        """SIGKILL ``node``'s raylet and every process under it; returns how many processes died.

        Killing the head loses the cluster's state and every job on it, as on a real cluster;
        its worker nodes are left to :meth:`stop`.
        """
        pids = kill_tree(node.process.pid)
        node.process.wait(timeout=30)
        node.killed = True
        return len(pids)

    def stop(self) -> None:
        """Stop every process this cluster started (workers first, then the head), and remove its temp dir."""
        for node in reversed(self.nodes):
            if not node.killed:
                self.kill_node(node)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class Fault:
    """One node loss: once ``after()`` holds (if given; e.g. "training has logged epoch 1"), kill the worker node
    that runs ``holding``.

    ``holding`` is a regex on command lines (Ray names a worker process after its task or
    actor, e.g. 'ShardWriter', 'RayTrainWorker', 'score_treatment'), so the kill lands
    while that work is in flight on the victim.
    """

    label: str
    holding: str
    after: Callable[[], bool] | None = None
    head: bool = False  # kill the head node instead (once a worker node runs ``holding``): the whole job is lost


@dataclass
class Kill:
    """What a :class:`NodeKiller` did for one fault: the node, when, and how much log there was by then."""

    label: str
    node: str
    seconds: float
    log_offset: int
    replacement: str | None = None


class NodeKiller:
    """Injects ``faults`` in order while a step runs, each a SIGKILL of one worker node; use as a context.

    After each kill a replacement node with the victim's CPUs and resources joins
    ``replace_after_s`` later (None: never), as an autoscaler replaces a lost
    instance. ``kills`` records what happened; ``error`` holds an exception of the
    killer thread itself, and a fault whose moment never came is simply not in ``kills``.
    """

    def __init__(self, cluster: LocalCluster, log: str | os.PathLike, faults: list[Fault],
                 replace_after_s: float | None = 1.0, poll_s: float = 0.2):
        self.cluster, self.log, self.faults = cluster, Path(log), faults
        self.replace_after_s, self.poll_s = replace_after_s, poll_s
        self.kills: list[Kill] = []
        self.error: BaseException | None = None
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="node-killer")

    def __enter__(self) -> "NodeKiller":
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=START_TIMEOUT_S)

    def _log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def _run(self) -> None:
        try:
            for fault in self.faults:
                victim = self._wait_for(fault)
                if victim is None:
                    return
                offset = len(self._log_text())
                if fault.head:
                    victim = self.cluster.head
                self.cluster.kill_node(victim)
                kill = Kill(fault.label, victim.name, round(time.monotonic() - self._started, 2), offset)
                self.kills.append(kill)
                if fault.head:
                    return
                if self.replace_after_s is not None and not self._stop.wait(self.replace_after_s):
                    kill.replacement = self.cluster.add_node(victim.cpus, victim.resources).name
        except BaseException as exc:  # the caller checks `error` and `kills`
            self.error = exc

    def _wait_for(self, fault: Fault) -> Node | None:
        """The node to kill for ``fault`` once its moment comes; None when stopped first."""
        due = False
        while not self._stop.is_set():
            due = due or fault.after is None or bool(fault.after())
            if due:
                for node in self.cluster.worker_nodes():
                    if node.runs(fault.holding):
                        return node
            self._stop.wait(self.poll_s)
        return None
