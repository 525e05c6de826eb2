"""`zeroconv submit`: stages run as Ray Jobs on a real Ray head (started here, on 127.0.0.1) and the
command's exit status is the job's."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import psutil
import pytest

from pipelines.common.config import ConfigError
from pipelines.submit import SubmitConfig, build_entrypoint, run_submit
from tests.helpers import RAY_NODE_PORT_FLAGS, ServerExited, free_port, running_server

REPO = Path(__file__).resolve().parents[2]


def _kill(processes: list[psutil.Process]) -> None:
    for p in processes:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=15)


def _stop_tree(proc: subprocess.Popen) -> None:
    """Kill the `ray start --block` process and every process it started (found by parentage, by PID)."""
    try:
        _kill([psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)])
    except psutil.NoSuchProcess:
        return


def _head_command(temp_dir: str) -> tuple[list[str], str]:
    """`ray start --head` on fresh free loopback ports; the command and the dashboard's address."""
    dashboard = free_port()
    ports = {flag: free_port() for flag in ("--port", *RAY_NODE_PORT_FLAGS)}
    command = [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        "--block",
        "--num-cpus",
        "2",
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--temp-dir",
        temp_dir,
        "--disable-usage-stats",
        "--object-store-memory",
        str(256 * 2**20),
        *[str(x) for pair in ports.items() for x in pair],
    ]
    return command, f"http://127.0.0.1:{dashboard}"


def _stop_leftovers(temp_dir: str) -> None:
    """Kill the processes of a head that failed to start: `ray start` exits, its GCS or raylet may not. Found
    by PID through this head's own temp dir on their command lines, nothing broader."""
    _kill([p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])])


@pytest.fixture(scope="module")
def ray_head():
    """A separate one-node Ray cluster with the Jobs API (dashboard) on loopback ports of its own.

    The head sees the venv's `zeroconv` on PATH, as a cluster node that installed the project does. Its nine
    ports are picked free here and bound by Ray moments later; meanwhile the suite's other Ray clusters open
    connections from ephemeral ports, so one can be taken (CI saw `ray start` exit 1): a head that exits before
    it answers is started again on new ports, up to 3 times."""
    temp_dir = tempfile.mkdtemp(prefix="zc-head-", dir="/tmp")  # short: Unix socket paths are limited
    env = dict(
        os.environ,
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_AUTH_MODE="disabled",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )
    env.pop("RAY_ADDRESS", None)
    try:
        with contextlib.ExitStack() as running:
            for attempt in range(1, 4):
                command, address = _head_command(temp_dir)
                log = Path(temp_dir) / f"head-{attempt}.log"
                try:
                    running.enter_context(
                        running_server(command, env, log, f"{address}/api/version", timeout=120, stop=_stop_tree)
                    )
                    break
                except ServerExited:
                    _stop_leftovers(temp_dir)
                    if attempt == 3:
                        raise
            yield address
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Mistakes caught before anything is submitted (no cluster needed)
# ---------------------------------------------------------------------------------------------


def test_entrypoint_is_the_local_command_with_the_config_inside_working_dir(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "annotate.yaml").write_text("shard_size: 2\n")
    config = SubmitConfig(
        stage="annotate",
        stage_config=str(tmp_path / "configs" / "annotate.yaml"),
        stage_overrides=["input=my photos"],
        working_dir=str(tmp_path),
    )
    assert build_entrypoint(config) == "zeroconv annotate --config configs/annotate.yaml 'input=my photos'"


@pytest.mark.parametrize(
    "values, message",
    [
        ({"stage": "submit"}, "cannot submit stage 'submit'"),
        ({"stage": "nope"}, "cannot submit stage 'nope'; choose one of .*annotate"),
        ({"stage": "annotate", "stage_overrides": ["no_such_field=1"]}, "no_such_field: unknown field"),
        ({"stage": "annotate", "stage_config": "/no/such/file.yaml"}, "does not exist"),
    ],
)
def test_mistakes_fail_before_submitting(values, message):
    with pytest.raises((ConfigError, FileNotFoundError), match=message):
        run_submit(SubmitConfig(address="http://127.0.0.1:1", working_dir=str(REPO), **values))


def test_config_outside_working_dir_is_refused(tmp_path):
    (tmp_path / "annotate.yaml").write_text("shard_size: 2\n")
    with pytest.raises(ConfigError, match="outside working_dir"):
        build_entrypoint(
            SubmitConfig(stage="annotate", stage_config=str(tmp_path / "annotate.yaml"), working_dir=str(REPO))
        )


def test_credentials_never_travel_with_a_job():
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY may not travel"):
        SubmitConfig(stage="annotate", env={"AWS_SECRET_ACCESS_KEY": "x", "MLFLOW_TRACKING_URI": "http://m"})


# ---------------------------------------------------------------------------------------------
# Real jobs on a real head
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_submits_a_stage_follows_it_and_exits_with_its_status(ray_head, tmp_path):
    """`zeroconv submit annotate ...`: the project ships as working_dir, the job runs the real stage on the
    cluster's Ray (its actors included), its log lines stream back and the command exits 0."""
    from pipelines.data.synthetic import write_image_folder

    images = write_image_folder(tmp_path / "images", n=4, size=64, seed=0, broken=False)
    out = tmp_path / "annotated"
    overrides = [f"input={images}", f"output={out}", "resolution=64", "min_side=32"]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "submit",
            "annotate",
            *overrides,
            f"submit.address={ray_head}",
            f"submit.working_dir={REPO}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"annotated 4 inputs -> {out}" in done.stdout  # the job's own summary, streamed back
    assert "SUCCEEDED" in done.stdout
    assert list(out.glob("data/train-*.parquet"))
    jobs = json.load(urllib.request.urlopen(f"{ray_head}/api/jobs/", timeout=10))
    job = next(j for j in jobs if j["metadata"].get("zeroconv_stage") == "annotate")
    assert job["entrypoint"] == "zeroconv annotate " + " ".join(overrides)
    assert job["runtime_env"]["working_dir"].startswith("gcs://")  # the project travelled with the job


@pytest.mark.slow
def test_a_failing_job_returns_its_non_zero_status(ray_head, tmp_path, capsys):
    """The config file travels in working_dir; the stage fails on the cluster with a user error (exit 2)."""
    project = tmp_path / "project"
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "bad.yaml").write_text(f"input: /no/such/images\noutput: {tmp_path / 'out'}\n")
    result = run_submit(
        SubmitConfig(
            stage="annotate",
            stage_config=str(project / "configs" / "bad.yaml"),
            address=ray_head,
            working_dir=str(project),
        )
    )
    logs = capsys.readouterr().out
    assert (result.status, result.exit_code) == ("FAILED", 2), logs
    assert "error:" in logs and "/no/such/images" in logs  # read from the shipped config, reported by the job
    assert "exit status 2" in str(result)
