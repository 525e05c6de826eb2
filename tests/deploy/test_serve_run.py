"""``zeroconv serve`` end to end: run_serve (non-blocking) deploys on 127.0.0.1 and answers HTTP."""

from __future__ import annotations

import base64
import socket

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
    finally:
        serve.shutdown()


def test_unknown_model_is_refused_before_anything_starts(registry, capsys):
    code = cli(["serve", "models=[no-such-model]", f"mlflow.tracking_uri={registry.tracking_uri}", "block=false"])
    assert code == 2
    assert "models:/no-such-model@champion is not in the registry" in capsys.readouterr().err


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
