"""``zeroconv submit STAGE``: run any stage on a Ray cluster as a Ray Job, and follow it.

    zeroconv submit train --config configs/train.yaml max_steps=5000 submit.address=http://127.0.0.1:8265

The job's entrypoint is the same command you would type locally (``zeroconv train --config
configs/train.yaml max_steps=5000``); the project directory travels with it as the job's
``working_dir``, so the cluster runs the code and the config files you have here. The stage's config
is validated here first, so a typo fails in a second instead of after the cluster scaled up.

Submission settings are ``submit.KEY=VALUE`` overrides (see ``zeroconv submit --help``); the rest of
the command line belongs to the stage. Logs stream until the job ends and the exit status is the
job's, so schedulers and CI can use ``zeroconv submit`` like a local run.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from pipelines.common.cluster import travelling_env
from pipelines.common.config import ConfigError, Section, load_config

DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # where `ray dashboard ray_cluster.yaml` tunnels the head's Jobs API


class SubmitConfig(Section):
    """Submit a stage to a Ray cluster as a Ray Job: zeroconv submit STAGE [--config FILE] [key=value ...].

    key=value pairs configure the stage; submit.KEY=VALUE pairs configure the submission (fields below)."""

    stage: str = Field(default="", description="Stage to run on the cluster, e.g. annotate, train, pipeline.")
    stage_config: str | None = Field(
        default=None,
        description="The stage's YAML config; it must lie inside working_dir, which travels with the job.",
    )
    stage_overrides: list[str] = Field(default_factory=list, description="The stage's key=value overrides.")
    address: str | None = Field(
        default=None,
        description=f"Ray Jobs API of the cluster (the head's dashboard). Default: RAY_API_SERVER_ADDRESS, else an "
        f"http:// RAY_ADDRESS, else {DEFAULT_ADDRESS} (`ray dashboard ray_cluster.yaml` tunnels it there).",
    )
    working_dir: str = Field(default=".", description="Project directory shipped with the job (code and configs).")
    excludes: list[str] = Field(
        default_factory=lambda: [".venv", ".git", "runs", "demo-output", "__pycache__", "*.egg-info", ".pytest_cache"],
        description="Paths in working_dir never shipped (gitignore syntax).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables for the job, e.g. {MLFLOW_TRACKING_URI: ...}; only the names in "
        "pipelines.common.cluster.TRAVELLING_ENV, never credentials: the cluster's nodes use their own.",
    )
    entrypoint_resources: dict[str, float] = Field(
        default_factory=dict, description="Custom resources the job's driver needs; empty: it runs on the head."
    )
    submission_id: str | None = Field(
        default=None, description="Job id to use; the cluster refuses a second job with the same id (once-only runs)."
    )
    follow: bool = Field(default=True, description="Stream the job's logs and wait for it; false: submit and return.")

    @field_validator("env")
    @classmethod
    def _only_travelling_env(cls, env: dict[str, str]) -> dict[str, str]:
        return travelling_env(env)


@dataclass
class SubmitResult:
    job_id: str
    address: str
    entrypoint: str
    status: str  # a ray.job_submission.JobStatus value
    exit_code: int  # what `zeroconv submit` exits with: 0, or the job's own non-zero status
    message: str = ""

    def __str__(self) -> str:
        line = f"job {self.job_id} {self.status} on {self.address}"
        if self.status in ("PENDING", "RUNNING"):
            return f"{line}\n  follow it: ray job logs --follow {self.job_id} --address {self.address}"
        return line + (f" (exit status {self.exit_code})" if self.exit_code else "")


def resolve_address(address: str | None) -> str:
    if address:
        return address
    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        value = os.environ.get(name, "")
        if value.startswith(("http://", "https://")):  # RAY_ADDRESS may also name the GCS (host:6379)
            return value
    return DEFAULT_ADDRESS


def build_entrypoint(config: SubmitConfig) -> str:
    """Validate the stage's config here and return the command the job runs on the cluster."""
    from pipelines.stages import STAGES, load_stage

    runnable = [name for name in STAGES if name != "submit"]
    if config.stage not in runnable:
        raise ConfigError(f"cannot submit stage {config.stage!r}; choose one of {', '.join(runnable)}")
    working_dir = Path(config.working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"working_dir {config.working_dir!r} is not a directory")

    command = ["zeroconv", config.stage]
    if config.stage_config:
        path = Path(config.stage_config).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"config file {config.stage_config!r} does not exist")
        if not path.is_relative_to(working_dir):
            raise ConfigError(
                f"config file {str(path)!r} is outside working_dir {str(working_dir)!r}, so the job "
                "would not find it; move it inside (e.g. configs/) or set submit.working_dir"
            )
        command += ["--config", path.relative_to(working_dir).as_posix()]
    config_cls, _ = load_stage(config.stage)
    load_config(config_cls, config.stage_config, config.stage_overrides)  # fail here, not after the cluster scaled up
    return shlex.join(command + list(config.stage_overrides))


def job_runtime_env(config: SubmitConfig) -> dict:
    """What travels with the job: the project directory, and ``submit.env`` (checked against the allow-list)."""
    runtime_env = {"working_dir": str(Path(config.working_dir).expanduser().resolve()), "excludes": config.excludes}
    if config.env:
        runtime_env["env_vars"] = travelling_env(config.env)
    return runtime_env


AGENT_WAIT_S = 120  # how long a head may answer "No available agent to submit job, please try again later"


def submit_when_ready(client, **job) -> str:
    """``client.submit_job``, waiting out a head whose job agent is not up yet (a head that has just started,
    or a busy one): Ray answers that with a 500 that says to try again later."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(**job)
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(2)


def run_submit(config: SubmitConfig) -> SubmitResult:
    from ray.job_submission import JobStatus, JobSubmissionClient

    entrypoint = build_entrypoint(config)
    address = resolve_address(config.address)
    try:
        client = JobSubmissionClient(address)
    except ConnectionError as exc:
        raise ValueError(
            f"cannot reach the Ray Jobs API at {address} ({exc}); is the cluster up and "
            "`ray dashboard ray_cluster.yaml` running?"
        ) from None
    job_id = submit_when_ready(
        client,
        entrypoint=entrypoint,
        runtime_env=job_runtime_env(config),
        submission_id=config.submission_id,
        entrypoint_resources=config.entrypoint_resources or None,
        metadata={"zeroconv_stage": config.stage},
    )
    print(f"submitted {job_id} to {address}: {entrypoint}", flush=True)
    if not config.follow:
        return SubmitResult(job_id, address, entrypoint, str(client.get_job_status(job_id).value), 0)

    try:
        asyncio.run(_print_logs(client, job_id))
        while not (status := client.get_job_status(job_id)).is_terminal():  # logs can end a moment before status
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job_id} keeps running. Stop it with: "
            f"ray job stop {job_id} --address {address}",
            flush=True,
        )
        raise
    info = client.get_job_info(job_id)
    exit_code = 0 if status == JobStatus.SUCCEEDED else (info.driver_exit_code or 1)
    return SubmitResult(job_id, address, entrypoint, status.value, exit_code, info.message or "")


async def _print_logs(client, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        print(chunk, end="", flush=True)
