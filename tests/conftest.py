"""Shared test fixtures: real servers on 127.0.0.1, started once per session, stopped by PID.

* ``ray_session``   - a local Ray (2 CPUs, no dashboard, temp dir under the test tmp)
* ``mlflow_server`` - a real ``mlflow server`` process on a free loopback port (SQLite + local artifacts)
* ``s3_server``     - a moto S3 server on 127.0.0.1 with credentials in the environment
* ``tiny_base_dir`` - the built-in tiny Stable Diffusion, built once into a session cache
* ``fill50k_parquet`` - a small annotated dataset in the training schema
* ``session_tmp``   - the run's temp folder (zc-test-*, holds ZEROCONV_CACHE), removed when the run ends
* ``without_zeroconv`` - a Python with every installed library but not zeroconv (hand-off tests)
* ``random_weights`` - ``random_weights(*files) -> dir``: annotator networks' weights, random, in their real formats

Helpers that tests import themselves (free ports, servers stopped by PID) are in ``tests/helpers.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import tempfile
import venv
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.annotator_weights import random_weights  # noqa: F401  (a fixture, offered to every test)
from tests.helpers import running_mlflow_server

# Set before anything imports ray/mlflow/huggingface: loopback only, offline, fail fast.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = "5"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Dummy S3 credentials before the session's Ray starts, so its workers inherit them (zeroconv never
# forwards secrets through runtime_env); the moto server accepts any.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")


@pytest.fixture(autouse=True, scope="module")
def isolated_mlflow_tracking_uri():
    """mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI: restore both after each test module, so a
    later module's default (SQLite under its work_dir) is not silently another module's server. (Per module,
    not per test: module-scoped fixtures point MLflow at their server for all of the module's tests.)"""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    mlflow.set_tracking_uri(None)
    if saved is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved


@pytest.fixture(scope="session", autouse=True)
def session_tmp() -> Path:
    """One temp folder for the whole run, removed at its end; the zeroconv cache (built tiny model,
    annotator weights) lives in it. Autouse: every test sees ZEROCONV_CACHE, never the user's cache."""
    root = Path(tempfile.mkdtemp(prefix="zc-test-"))
    saved = os.environ.get("ZEROCONV_CACHE")
    os.environ["ZEROCONV_CACHE"] = str(root / "cache")
    yield root
    if saved is None:
        os.environ.pop("ZEROCONV_CACHE", None)
    else:
        os.environ["ZEROCONV_CACHE"] = saved
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session(session_tmp):
    import ray

    if ray.is_initialized():
        yield ray
        return
    # Unix socket paths must stay short: a short temp dir, not pytest's deep one.
    temp_dir = tempfile.mkdtemp(prefix="zc-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server(session_tmp):
    """A real MLflow tracking server on 127.0.0.1 (local artifacts); yields its URI."""
    root = session_tmp / "mlflow-server"
    with running_mlflow_server(root, str(root / "artifacts")) as uri:
        yield uri


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; credentials and endpoint in the environment. Yields the endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL",
            "MLFLOW_S3_ENDPOINT_URL",
        )
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
        MLFLOW_S3_ENDPOINT_URL=endpoint,
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket per test; yields its name."""
    import uuid

    import boto3

    name = f"zc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_base_dir(session_tmp) -> Path:
    from model.base import TINY, resolve_base_dir

    return resolve_base_dir(TINY)


@pytest.fixture(scope="session")
def tiny_base(tiny_base_dir):
    from model.families import load

    return load(str(tiny_base_dir))


@pytest.fixture(scope="session")
def fill50k_parquet(session_tmp) -> Path:
    from pipelines.data.synthetic import write_fill50k_parquet

    return write_fill50k_parquet(session_tmp / "fill50k", n=32, size=64, seed=0)


class Isolated(NamedTuple):
    python: Path  # run it with cwd outside the repository
    env: dict[str, str]  # this environment without PYTHONPATH, the venv's bin first on PATH

    def run_json(self, code: str, *args: str, cwd: Path, **env: str) -> dict:
        """Run ``code`` (a script printing a JSON line last) in this Python, isolated (``-I``), from ``cwd``
        with extra ``env``; assert it exits 0 and return what its last line says."""
        done = subprocess.run(
            [self.python, "-I", "-c", code, *map(str, args)],
            cwd=cwd,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def without_zeroconv(session_tmp) -> Isolated:
    """A venv whose site-packages points at this environment's libraries as a plain path entry.

    Plain, so the ``.pth`` hooks there do not run, among them the editable install's import finder:
    torch, diffusers, mlflow... import, ``model`` and ``pipelines`` do not. A ``uvicorn`` shim runs the
    same interpreter, for ``mlflow models serve`` (which starts ``uvicorn`` from PATH).
    """
    env = session_tmp / "no-zeroconv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shim = env / "bin" / "uvicorn"
    shim.write_text(f'#!/bin/sh\nexec "{python}" -I -m uvicorn "$@"\n')
    shim.chmod(0o755)
    check = subprocess.run(
        [python, "-I", "-c", "import mlflow, diffusers; import pipelines"], cwd=env, capture_output=True, text=True
    )
    assert "No module named 'pipelines'" in check.stderr, check.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    return Isolated(python, env)
