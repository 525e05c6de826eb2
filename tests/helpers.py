"""Helpers that tests and fixtures share: free loopback ports, servers started and stopped by PID.

A plain module (``from tests.helpers import ...``): importing ``tests.conftest`` instead would run
the conftest a second time, as another module.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Every port a Ray node listens on besides the GCS's: chosen free, so tests never meet Ray's defaults.
RAY_NODE_PORT_FLAGS = (
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
    "--metrics-export-port",
    "--ray-client-server-port",
    "--node-manager-port",
    "--object-manager-port",
)


class ServerExited(RuntimeError):
    """A server process ended before it answered."""


def wait_http(url: str, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServerExited(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_process(proc: subprocess.Popen) -> None:
    """Stop a server we started, and its children, by its own process group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextlib.contextmanager
def running_server(command: list[str], env: dict, log_path: Path, ready_url: str, timeout: float = 90, stop=None):
    """Start a server process in its own session, wait until ``ready_url`` answers, stop it on exit
    (by default its process group, by PID; ``stop`` for servers whose children leave the group)."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                wait_http(ready_url, timeout=timeout, proc=proc)
            except ServerExited as exc:  # say why: the failure is in its log, which the caller may delete
                tail = log_path.read_text(errors="replace")[-3000:]
                raise ServerExited(f"{exc}; the end of {log_path.name}:\n{tail}") from None
            yield proc
        finally:
            (stop or stop_process)(proc)


@contextlib.contextmanager
def running_mlflow_server(root: Path, artifacts_destination: str):
    """A real ``mlflow server`` on a free 127.0.0.1 port (SQLite under ``root``); yields its URI."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root}/mlflow.db",
        "--artifacts-destination",
        artifacts_destination,
    ]
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    uri = f"http://127.0.0.1:{port}"
    with running_server(command, env, root / "server.log", f"{uri}/health"):
        yield uri
