"""A simulated autoscaling multi-node Ray cluster on this machine, for the ``cluster`` test group.

    pytest -m cluster tests/cluster       (``make test`` runs it as its second step)

The cluster is Ray's own ``fake_multinode`` provider (see node_provider.py for the one change): the head
runs the real autoscaler (monitor.py), which starts each worker node as a real raylet process group of
this machine when a task, actor or placement group asks for a resource no live node has, and removes
idle ones. The node types are those of ``ray_cluster.yaml`` - the same custom resources, so a stage's
``resources`` lands it on the same node type as on AWS - scaled down to one CPU each, from zero workers.
Losing a node is simulated by killing its raylet (and everything under it) by PID.

Everything the cluster starts carries its temp dir in its command line (the Ray Client server: its GCS
address); :func:`running_cluster` stops exactly those processes and their children (TERM, then KILL) and
nothing else: never ``ray stop``, which would stop every Ray on the machine, and never
``ray.cluster_utils.AutoscalingCluster`` (it runs ``ray stop --force``).

A plain module, imported by the tests and by conftest.py (importing a conftest would load it twice).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from tests.helpers import RAY_NODE_PORT_FLAGS, free_port, wait_http

REPO = Path(__file__).resolve().parents[2]
HEAD_TYPE = "ray.head.default"  # the fake provider tags its head with this type name
SCALED_CPUS = 1  # per worker node: this machine has 2 cores for the whole cluster (and its neighbours)
MAX_WORKERS = {"cpu_decode": 3, "gpu_annotate": 2, "gpu_train": 3}  # a train node lost is replaced: 2 + 1
OBJECT_STORE_BYTES = 200 * 2**20  # per node; the default (30% of RAM each) would oversubscribe the machine
PROVIDER = "tests.cluster.node_provider.SeparateDisksFakeProvider"  # fake_multinode, a runtime-env dir per node


def cluster_config(gcs_port: int) -> dict:
    """ray_cluster.yaml with the fake provider: its worker node types and custom resources, scaled down."""
    launcher = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    head = launcher["head_node_type"]
    node_types = {HEAD_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "min_workers": 0, "max_workers": 0}}
    for name, spec in launcher["available_node_types"].items():
        if name == head:
            continue
        custom = {r: 1 for r in spec["resources"] if r not in ("CPU", "GPU")}  # one unit: one stage worker a node
        node_types[name] = {
            "resources": {"CPU": SCALED_CPUS, **custom, "object_store_memory": OBJECT_STORE_BYTES},
            "node_config": {},
            "min_workers": 0,
            "max_workers": MAX_WORKERS[name],
        }
    return {
        "cluster_name": "zeroconv-fake",
        "max_workers": 5,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 0.25,  # return a stage's nodes before the next test asks for others
        "provider": {
            "type": "external",
            "module": PROVIDER,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": f"127.0.0.1:{gcs_port}",  # else new nodes dial 6379 and never join
        },
        "available_node_types": node_types,
        "head_node_type": HEAD_TYPE,
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


# The driver's Ray Train settings reach the controller and workers. Workers importing torch on a loaded
# machine can take minutes to start; Ray Train's default (60 s) would count that as a failed start.
DRIVER_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}


def cluster_env() -> dict:
    """The head's environment; the autoscaler starts the worker nodes with it."""
    return dict(
        os.environ,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",  # every listener on 127.0.0.1
        RAY_AUTH_MODE="disabled",
        AUTOSCALER_METRIC_PORT=str(free_port()),  # not the fixed default: another Ray on the machine may hold it
        # A loaded machine starts agents and workers slowly: wait for them instead of failing the node's start.
        RAY_agent_register_timeout_ms="120000",
        RAY_worker_register_timeout_seconds="120",
        # A node whose raylet died is declared dead after 3 missed 1 s health checks (default 5 x 3 s).
        RAY_health_check_period_ms="1000",
        RAY_health_check_failure_threshold="3",
        # Worker processes on every node import this checkout, as cluster nodes import the installed project.
        PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )


def wait_for(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.5):
    """Poll until ``predicate()`` is truthy (and return it); a bound against hangs, not a speed check."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s")


def processes_of(*markers: str) -> list[psutil.Process]:
    """Every process with one of ``markers`` in an argument, and their descendants (workers rename themselves)."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(m in arg for arg in proc.info["cmdline"] or () for m in markers):
                for p in (proc, *proc.children(recursive=True)):
                    found[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def terminate(procs: list[psutil.Process], grace: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, procs = psutil.wait_procs(procs, timeout=grace)
        if not procs:
            return


@dataclass
class FakeCluster:
    address: str  # GCS address, for ray.init(address=...)
    dashboard: str  # http://127.0.0.1:PORT: the Jobs API
    temp_dir: str
    config: dict
    # Node id -> node type of every node seen alive: a node the autoscaler removed (idle) or a test killed
    # is listed by Ray without its resources, so its type is remembered while it lives (see watch_nodes).
    seen_types: dict[str, str | None] = field(default_factory=dict)

    def watch_nodes(self, stop: threading.Event, every: float = 1.0) -> None:
        """Record the type of each alive node until ``stop`` is set (a thread of the fixture)."""
        import ray

        while not stop.wait(every):
            try:
                for n in ray.nodes():
                    if n["Alive"] and n["NodeID"] not in self.seen_types:
                        self.seen_types[n["NodeID"]] = self.type_of(n["Resources"])
            except Exception:  # noqa: BLE001 - a GCS call failing under load: try again next round
                continue

    def worker_nodes(self, node_type: str | None = None) -> list[dict]:
        """Alive worker nodes (``ray.nodes()`` entries), optionally of one node type of ray_cluster.yaml."""
        import ray

        nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
        if node_type is not None:
            marker = self.type_resource(node_type)
            nodes = [n for n in nodes if marker in n["Resources"]]
        return nodes

    def node_type(self, node_id: str) -> str | None:
        """The node type a node was started as, from the custom resource only that type offers."""
        import ray

        alive = [n["Resources"] for n in ray.nodes() if n["NodeID"] == node_id and n["Alive"]]
        if alive:
            return self.type_of(alive[0])
        return self.seen_types.get(node_id)

    def type_of(self, resources: dict) -> str | None:
        types = self.config["available_node_types"]
        return next((t for t in types if t != HEAD_TYPE and self.type_resource(t) in resources), None)

    def type_resource(self, node_type: str) -> str:
        resources = self.config["available_node_types"][node_type]["resources"]
        return next(r for r in resources if r not in ("CPU", "GPU", "object_store_memory"))

    def raylet(self, node_id: str) -> psutil.Process:
        for proc in processes_of(self.temp_dir):
            try:
                if proc.name() == "raylet" and f"--node_id={node_id}" in proc.cmdline():
                    return proc
            except psutil.NoSuchProcess:
                continue
        raise LookupError(f"no raylet process for node {node_id}")

    def kill_node(self, node_id: str) -> None:
        """Lose a node the way a spot reclaim does: its raylet and every process under it, SIGKILL, at once."""
        import ray

        raylet = self.raylet(node_id)
        family = [raylet, *raylet.children(recursive=True)]
        terminate(family, grace=0)  # straight to SIGKILL after an instant TERM: no graceful drain
        wait_for(
            lambda: not any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes()),
            60,
            f"node {node_id[:8]} declared dead",
        )


def start_head(command: list[str], env: dict, temp_dir: str, attempts: int = 3) -> None:
    """``ray start --head``; again after a failed start (Ray gives a node 30 s to register with its GCS,
    which a loaded machine can miss), having stopped what the failed attempt left running."""
    for _ in range(attempts):
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if started.returncode == 0:
            return
        terminate(processes_of(temp_dir))
    raise RuntimeError(
        f"the head did not start in {attempts} attempts (exit {started.returncode}):\n"
        f"{(started.stdout + started.stderr)[-4000:]}"
    )


def train_worker_nodes() -> dict[str, str]:
    """Ray Train worker actors ever started (alive or dead): actor id -> node id."""
    from ray.util.state import list_actors

    return {
        a.actor_id: a.node_id
        for a in list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000, detail=True)
    }


@contextmanager
def running_cluster() -> Iterator[FakeCluster]:
    """Start the head (no CPUs: nothing runs on it but drivers and the control plane), connect this process,
    yield a :class:`FakeCluster`; at the end stop every process of this cluster by PID."""
    import ray

    temp_dir = tempfile.mkdtemp(prefix="zc-cl-", dir="/tmp")  # short: Unix socket paths are limited
    port, dashboard = free_port(), free_port()
    config = cluster_config(port)
    config_path = Path(temp_dir) / "cluster.yaml"
    config_path.write_text(yaml.safe_dump(config))
    ports = {flag: free_port() for flag in RAY_NODE_PORT_FLAGS}
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=0",
        f"--autoscaling-config={config_path}",
        f"--temp-dir={temp_dir}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        "--disable-usage-stats",
        *[f"{flag}={value}" for flag, value in ports.items()],
    ]
    cluster = FakeCluster(f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}", temp_dir, config)
    # Ray code that finds "the" cluster by itself (state API, Ray Train's placement-group cleaner) must find
    # this one, not another Ray on the same machine: in this process and in every process of the cluster.
    saved = {k: os.environ.get(k) for k in (*DRIVER_ENV, "RAY_ADDRESS")}
    os.environ.update(DRIVER_ENV, RAY_ADDRESS=cluster.address)
    env = cluster_env()
    stop_watching, watcher = threading.Event(), None
    try:
        start_head(command, env, temp_dir)
        wait_http(f"{cluster.dashboard}/api/version", timeout=120)
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        watcher = threading.Thread(target=cluster.watch_nodes, args=(stop_watching,), daemon=True)
        watcher.start()
        yield cluster
    finally:
        stop_watching.set()
        if watcher is not None:
            watcher.join(timeout=10)
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        # The temp dir is in every command line but the Ray Client server's, which names the GCS address.
        # Twice: a process may start another while the first round is stopping (e.g. the autoscaler a node).
        for _ in range(2):
            terminate(processes_of(temp_dir, f"--address={cluster.address}"))
        shutil.rmtree(temp_dir, ignore_errors=True)
