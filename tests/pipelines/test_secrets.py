"""Secrets stay out of logs and records: one allow-list of environment variables that may travel to Ray
workers and jobs, and every recorded URI redacted. (The end-to-end check - a real train run whose Ray
logs, MLflow store and output are searched for each secret - is in test_cli_output.py.)"""

from __future__ import annotations

import pytest

from pipelines.common.cluster import TRAVELLING_ENV, storage_runtime_env, travelling_env
from pipelines.common.tracking import redact_uri
from pipelines.submit import SubmitConfig, job_runtime_env

SECRETS = {
    "MLFLOW_TRACKING_PASSWORD": "zc-secret-password",
    "MLFLOW_TRACKING_TOKEN": "zc-secret-token",
    "AWS_SECRET_ACCESS_KEY": "zc-secret-aws",
    "MLFLOW_TRACKING_URI": "http://alice:zc-secret-in-uri@127.0.0.1:5000",
}


@pytest.mark.parametrize(
    "uri, redacted",
    [
        ("http://user:pass@host:5000/x", "http://***@host:5000/x"),
        ("https://token@host", "https://***@host"),
        ("http://host/?token=abc&experiment=1", "http://host/?token=***&experiment=1"),
        (
            "https://b.s3/k?X-Amz-Signature=s&X-Amz-Credential=c&v=2",
            "https://b.s3/k?X-Amz-Signature=***&X-Amz-Credential=***&v=2",
        ),
        ("databricks://profile:abc@workspace", "databricks://***@workspace"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/x/mlflow.db", "sqlite:////tmp/x/mlflow.db"),
        ("s3://bucket/prefix", "s3://bucket/prefix"),
        ("runs", "runs"),
    ],
)
def test_redact_uri(uri, redacted):
    assert redact_uri(uri) == redacted


def test_only_allow_listed_variables_without_secrets_reach_workers(monkeypatch):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = storage_runtime_env()["env_vars"]
    assert env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"] == "http://127.0.0.1:9000"
    assert set(env) <= set(TRAVELLING_ENV) and "MLFLOW_TRACKING_URI" not in env  # it carries a password
    assert not any(secret in repr(env) for secret in SECRETS.values())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")  # no credentials in it: it may travel
    assert storage_runtime_env()["env_vars"]["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"AWS_SECRET_ACCESS_KEY": "x"}, "AWS_SECRET_ACCESS_KEY may not travel"),
        (
            {"MLFLOW_TRACKING_TOKEN": "x", "MLFLOW_TRACKING_PASSWORD": "y"},
            "MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN",
        ),
        ({"MLFLOW_TRACKING_URI": "http://u:p@host"}, "MLFLOW_TRACKING_URI holds a password or token"),
    ],
)
def test_secrets_are_refused_by_name_and_by_value(env, message):
    with pytest.raises(ValueError, match=message):
        travelling_env(env)


def test_a_submitted_job_carries_only_allowed_variables(monkeypatch, tmp_path):
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    config = SubmitConfig(stage="annotate", working_dir=str(tmp_path), env={"MLFLOW_TRACKING_URI": "http://m:5000"})
    runtime_env = job_runtime_env(config)
    assert runtime_env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://m:5000"}
    assert not any(secret in repr(runtime_env) for secret in SECRETS.values())
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI holds a password"):
        SubmitConfig(stage="annotate", env={"MLFLOW_TRACKING_URI": SECRETS["MLFLOW_TRACKING_URI"]})


def test_ending_a_run_never_prints_credentials(mlflow_server, capfd, monkeypatch):
    import mlflow

    from pipelines.common.tracking import close_run, connect

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    uri = mlflow_server.replace("http://", "http://alice:zc-secret-in-uri@")
    experiment_id = connect(uri, "secrets")
    run_id = mlflow.MlflowClient(uri).create_run(experiment_id).info.run_id
    close_run(uri, run_id, ok=True)  # MLflow's own "View run at http://alice:...@host" would leak it
    captured = capfd.readouterr()
    assert "zc-secret-in-uri" not in captured.out + captured.err
    assert mlflow.MlflowClient(mlflow_server).get_run(run_id).info.status == "FINISHED"
