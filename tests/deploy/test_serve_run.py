"""``zeroconv serve`` end to end: run_serve (non-blocking) deploys on 127.0.0.1 and answers HTTP."""

from __future__ import annotations

import _thread
import base64
import signal
import socket
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from deploy.app import ServeConfig, run_serve
from pipelines.cli import main as cli
from pipelines.common.config import load_config
from pipelines.common.images import encode_png


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def serve_is_running() -> bool:
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False) is not None


def test_run_serve_deploys_on_loopback_and_answers(ray_session, registry):
    from ray import serve

    registry("serve-run", seed=5)
    port = _free_port()
    config = load_config(
        ServeConfig,
        overrides=[
            "models=[serve-run]",
            f"mlflow.tracking_uri={registry.tracking_uri}",
            f"port={port}",
            "block=false",
            "replicas.num_cpus=0.5",
            "reload_interval_s=0",
        ],
    )
    try:
        result = run_serve(config)
        assert result.url == f"http://127.0.0.1:{port}"
        assert result.models == {"serve-run": "1"}
        assert str(result).startswith(f"serving zeroconv at http://127.0.0.1:{port}")
        listening = {
            c.laddr.ip for c in psutil.net_connections("tcp") if c.laddr.port == port and c.status == "LISTEN"
        }
        assert listening == {"127.0.0.1"}

        condition = base64.b64encode(encode_png(np.zeros((64, 64, 3), np.uint8))).decode()
        answer = requests.post(
            f"{result.url}/v1/generate",
            timeout=60,
            json={"prompt": "a circle", "controls": [{"image": condition}], "steps": 2, "seed": 0},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["models"] == [{"name": "serve-run", "version": "1"}]
        result.stop()
        assert result.stopped and not serve_is_running()  # it started Serve, so it stopped it
    finally:
        serve.shutdown()


def test_a_request_whose_replica_dies_is_answered_by_its_replacement(ray_session, registry):
    """A model replica killed while generating (as when its node is lost): the gateway sends the request again
    and it is answered 200 - here by the replacement Serve starts - where Serve's proxy alone answers 500."""
    import ray
    from ray import serve

    registry("serve-replica-loss", seed=6)
    app_name = "replica-loss"
    config = load_config(
        ServeConfig,
        overrides=[
            "models=[serve-replica-loss]",
            f"mlflow.tracking_uri={registry.tracking_uri}",
            f"port={_free_port()}",
            f"app_name={app_name}",
            "block=false",
            "replicas.num_cpus=0.5",
            "reload_interval_s=0",
        ],
    )
    condition = base64.b64encode(encode_png(np.zeros((64, 64, 3), np.uint8))).decode()
    body = {"prompt": "a circle", "controls": [{"image": condition}], "steps": 100, "seed": 0}  # seconds of work
    try:
        result = run_serve(config)
        # Serve names each replica actor SERVE_REPLICA::<app>#<deployment>#<id> (in its own namespace).
        (replica,) = [
            a
            for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(f"SERVE_REPLICA::{app_name}#ControlNetServer#")
        ]
        answers: list[requests.Response] = []
        request = threading.Thread(
            target=lambda: answers.append(requests.post(f"{result.url}/v1/generate", json=body, timeout=300))
        )
        replica_actor = ray.get_actor(replica["name"], namespace=replica["namespace"])
        request.start()
        # Kill it the moment it is generating, as its own log says. Two earlier signals were races: a fixed sleep
        # (the request finished first on a fast machine), and the replica's ongoing-request count, which already
        # counts the slot Serve's router reserves before sending - a kill then is retried by the router itself.
        serve_logs = Path(ray._private.worker._global_node.get_logs_dir_path(), "serve")
        deadline = time.time() + 120
        while not any(
            "generating 1 request(s)" in p.read_text()
            for p in serve_logs.glob(f"replica_{app_name}_ControlNetServer_*.log")
        ):
            assert request.is_alive() and time.time() < deadline, "the request never reached the model replica"
            time.sleep(0.05)
        ray.kill(replica_actor, no_restart=True)
        request.join(timeout=300)

        assert answers and answers[0].status_code == 200, answers and answers[0].text
        gateway_logs = serve_logs.glob(f"replica_{app_name}_Gateway_*.log")
        assert any("model replica lost" in p.read_text() for p in gateway_logs)  # it was retried, not luck
    finally:
        serve.shutdown()


def _interrupt_when_serving(url: str) -> None:
    """Ctrl-C for the main thread once ``url`` answers, as a user would press it."""
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                break
        except requests.RequestException:
            pass
        time.sleep(0.5)
    time.sleep(2)  # run_serve is in its wait loop by now
    _thread.interrupt_main()


def test_ctrl_c_removes_only_its_own_application(ray_session, registry):
    from ray import serve

    # Ctrl-C as in a terminal: Python's handler. A pytest started in the background by a shell ignores SIGINT
    # (SIG_IGN), and then the interrupt below would do nothing and this test would wait forever.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)

    registry("serve-ctrl-c", seed=5)
    port = _free_port()

    @serve.deployment
    def bystander() -> str:
        return "still here"

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(bystander.bind(), name="bystander", route_prefix="/bystander")
        config = load_config(
            ServeConfig,
            overrides=[
                "models=[serve-ctrl-c]",
                f"mlflow.tracking_uri={registry.tracking_uri}",
                f"port={port}",
                "app_name=zc-ctrl-c",
                "route_prefix=/zc",
                "replicas.num_cpus=0.5",
                "reload_interval_s=0",
            ],
        )
        threading.Thread(target=_interrupt_when_serving, args=(f"http://127.0.0.1:{port}/zc",), daemon=True).start()
        result = run_serve(config)  # blocks until the Ctrl-C
        assert result.stopped
        applications = serve.status().applications
        assert "zc-ctrl-c" not in applications and "bystander" in applications
        assert requests.get(f"http://127.0.0.1:{port}/bystander", timeout=30).text == "still here"
    finally:
        signal.signal(signal.SIGINT, previous)
        serve.shutdown()


def test_a_failed_deploy_stops_what_it_started(ray_session, registry, tmp_path):
    registry("serve-fails", seed=5)
    assert not serve_is_running()
    config = load_config(
        ServeConfig,
        overrides=[
            "models=[serve-fails]",
            f"mlflow.tracking_uri={registry.tracking_uri}",
            f"port={_free_port()}",
            "block=false",
            "replicas.num_cpus=0.5",
            f"base_model={tmp_path}",  # every replica fails to start: an empty folder is no base model
        ],
    )
    with pytest.raises(RuntimeError, match="Deploying application zeroconv failed"):  # the replica log says why
        run_serve(config)
    assert not serve_is_running()  # the Serve instance this call started is gone again


def test_unknown_model_is_refused_before_anything_starts(registry, capsys):
    code = cli(["serve", "models=[no-such-model]", f"mlflow.tracking_uri={registry.tracking_uri}", "block=false"])
    assert code == 2
    assert "models:/no-such-model@champion is not in the registry" in capsys.readouterr().err


def test_a_missing_registry_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)  # outside the folder anything was trained in: work_dir=runs is empty here
    assert cli(["serve", "block=false"]) == 2
    err = capsys.readouterr().err
    assert f"no MLflow registry at {tmp_path}/runs/mlflow.db" in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and not serve_is_running()


def test_cli_help_lists_the_serving_fields(capsys):
    assert cli(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for field in (
        "models=",
        "alias=",
        "batching.max_batch_size=",
        "limits.max_image_pixels=",
        "auth_token_env=",
        "reload_interval_s=",
        "replicas.autoscaling=",
    ):
        assert field in out, field


@pytest.mark.parametrize("override, field", [("port=0", "port"), ("replicas.dtype=fp64", "replicas.dtype")])
def test_bad_config_is_a_clear_error(override, field, capsys):
    assert cli(["serve", override, "block=false"]) == 2
    assert field in capsys.readouterr().err
