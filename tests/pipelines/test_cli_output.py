"""The ``zeroconv`` command as a person runs it, in a subprocess: what reaches the terminal (a few readable
lines, not Ray's and MLflow's logs), and that no secret from the environment or the tracking URI reaches
any log or record - Ray's session logs, the MLflow store and artifacts, zeroconv's log, or the output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "zc-secret-password-4711",
    "MLFLOW_TRACKING_TOKEN": "zc-secret-token-4712",
    "AWS_SECRET_ACCESS_KEY": "zc-secret-aws-4713",
}
URI_PASSWORD = "zc-secret-in-uri-4714"


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    environment.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=1500,
        cwd=REPO,
    )


def printed_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return (proc.stdout + proc.stderr).split("\n")[:-1]


def log_paths(proc: subprocess.CompletedProcess) -> dict[str, str]:
    """The summary's last line: ``logs: log PATH, Ray PATH``."""
    line = next(x for x in reversed(printed_lines(proc)) if x.startswith("logs: "))
    return dict(part.split(" ", 1) for part in line.removeprefix("logs: ").split(", "))


@pytest.fixture(scope="module")
def train_run(mlflow_server, fill50k_parquet, tmp_path_factory):
    """`zeroconv train` (1 worker, 5 steps, tiny) with secrets in its environment and its tracking URI,
    on a private Ray whose session logs live in a temp dir of their own."""
    ray_tmp = tempfile.mkdtemp(prefix="zc-sec-", dir="/tmp")  # short: Unix socket paths are limited
    work = tmp_path_factory.mktemp("cli-train")
    uri = mlflow_server.replace("http://", f"http://alice:{URI_PASSWORD}@")
    proc = run_cli(
        [
            "train",
            f"data={fill50k_parquet}",
            f"work_dir={work}",
            "run_name=console",
            "num_workers=1",
            "cpus_per_worker=0.5",
            "max_steps=5",
            "batch_size=2",
            "log_every=1",
            "validate_every=0",
            "checkpoint_every=5",
            "registered_model=cli-output",
            f"mlflow.tracking_uri={uri}",
            "mlflow.experiment=cli-output",
        ],
        RAY_TMPDIR=ray_tmp,
        **SECRETS,
    )
    yield proc, Path(ray_tmp), work
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_train_prints_a_few_readable_lines(train_run):
    proc, _, _ = train_run
    lines = printed_lines(proc)
    assert proc.returncode == 0, "\n".join(lines[-20:])
    assert len(lines) < 40, "\n".join(lines)
    assert any(line.startswith("trained 'console' for 5 steps") for line in lines)
    assert set(log_paths(proc)) == {"log", "Ray"}


def test_no_secret_reaches_a_log_or_a_record(train_run, mlflow_server, session_tmp):
    import mlflow

    proc, ray_tmp, work = train_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    searched = [ray_tmp, work, session_tmp / "mlflow-server", Path(log_paths(proc)["log"])]
    files = [p for root in searched for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]
    assert len([f for f in files if f.is_relative_to(ray_tmp)]) > 10  # Ray's session logs are really there
    texts = {str(f): f.read_bytes() for f in files}
    texts["output"] = (proc.stdout + proc.stderr).encode()
    for secret in [*SECRETS.values(), URI_PASSWORD]:
        leaks = [name for name, data in texts.items() if secret.encode() in data]
        assert not leaks, f"{secret} found in {leaks}"
    # What was recorded instead: the URI with its credentials masked.
    recorded = json.loads((work / "train" / "console" / "mlflow_run.json").read_text())
    assert recorded["tracking_uri"] == mlflow_server.replace("http://", "http://***@")
    params = mlflow.MlflowClient(mlflow_server).get_run(recorded["run_id"]).data.params
    assert params["mlflow.tracking_uri"] == recorded["tracking_uri"]


def test_annotate_prints_progress_and_its_summary_in_a_few_lines(tmp_path):
    from pipelines.data.synthetic import write_image_folder

    images = write_image_folder(tmp_path / "images", n=256, size=64)  # + 4 broken files
    ray_tmp = tempfile.mkdtemp(prefix="zc-ann-", dir="/tmp")
    try:
        proc = run_cli(
            ["annotate", f"input={images}", f"output={tmp_path / 'out'}", "annotators=[{name: canny}]"],
            RAY_TMPDIR=ray_tmp,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = printed_lines(proc)
    assert proc.returncode == 0, "\n".join(lines[-20:])
    assert len(lines) < 20, "\n".join(lines)
    assert any(line.startswith("annotated 260 inputs") for line in lines)
    assert any(line.startswith("annotate: ") and "images" in line for line in lines)  # progress while it ran
