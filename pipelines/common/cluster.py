"""Connecting to Ray, shared by every stage that runs on it (annotate, train, serve).

    ensure_ray(config.ray)   # reuse an initialised Ray, else join config.ray.address, else start a local one

A local Ray listens on 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and starts without
the dashboard. Inside a Ray Job (``RAY_ADDRESS`` set by ``ray job submit``) it joins that cluster.
"""

from __future__ import annotations

import os

from pydantic import Field

from pipelines.common import console
from pipelines.common.config import RayConfig, Section

# The only environment variables that travel to Ray workers and Ray Jobs (every stage's runtime_env and
# `zeroconv submit`): where things are, never secrets. Ray writes runtime_env verbatim to its logs, so
# credentials reach workers the way they reach any process - the standard chain on each node
# (environment the node was started with, instance role, IRSA, profile, ~/.netrc for MLflow).
TRAVELLING_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
    "AWS_CA_BUNDLE",
    "MLFLOW_S3_ENDPOINT_URL",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "HF_HUB_OFFLINE",
)


def travelling_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` checked against :data:`TRAVELLING_ENV`: a variable outside it, or a URI carrying a
    password or token (``http://user:pass@host``), is refused with a ValueError naming it."""
    from pipelines.common.tracking import redact_uri

    refused = sorted(k for k in env if k not in TRAVELLING_ENV)
    if refused:
        raise ValueError(
            f"{', '.join(refused)} may not travel to Ray workers or jobs (Ray logs their environment); "
            f"allowed: {', '.join(TRAVELLING_ENV)}. Secrets reach nodes through their own environment or role"
        )
    secret = sorted(k for k, v in env.items() if redact_uri(v) != v)
    if secret:
        raise ValueError(
            f"{', '.join(secret)} holds a password or token; it may not travel to Ray workers or jobs "
            "(Ray logs their environment): give the nodes the credentials instead (e.g. MLFLOW_TRACKING_PASSWORD)"
        )
    return env


def ensure_ray(config: RayConfig | None = None) -> bool:
    """Make sure this process is connected to Ray; returns True if this call connected it."""
    import ray

    if ray.is_initialized():  # e.g. the test session's Ray, or a previous stage in the same process
        return False
    config = config or RayConfig()
    address = config.address or os.environ.get("RAY_ADDRESS")
    # Workers' output is streamed here only with `zeroconv --verbose` (or without the CLI); otherwise
    # it stays in Ray's session log folder, which the run's summary names.
    log_to_driver = console.streams_worker_logs()
    if address:
        context = ray.init(address=address, log_to_driver=log_to_driver)
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray listener on loopback
        context = ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    session_dir = context.address_info.get("session_dir")
    if session_dir:
        console.record_log_location("Ray", f"{session_dir}/logs")
    return True


def storage_runtime_env() -> dict:
    """A Ray ``runtime_env`` telling workers where this process's S3 and MLflow are (:data:`TRAVELLING_ENV`).

    Credentials are deliberately not forwarded: a local Ray started by zeroconv inherits them from the
    environment, and cluster nodes get them from their own chain. A variable whose value carries a
    password or token (a tracking URI with ``user:pass@``) stays behind too.
    """
    from pipelines.common.tracking import redact_uri

    env = {
        k: os.environ[k] for k in TRAVELLING_ENV if os.environ.get(k) and redact_uri(os.environ[k]) == os.environ[k]
    }
    return {"env_vars": env} if env else {}


class ActorCompute(Section):
    """How a stage's Ray Data actor pool is sized and placed (annotate, precompute, evaluate)."""

    batch_size: int = Field(default=16, ge=1, description="Rows per model call inside an actor.")
    num_actors: int | None = Field(
        default=None,
        ge=1,
        description="Model actors. Default: one per GPU when GPUs are used, else one (torch already uses every core).",
    )
    use_gpu: bool | None = Field(default=None, description="Put actors on GPUs. Default: if the Ray cluster has any.")
    gpus_per_actor: float = Field(default=1.0, gt=0, description="GPUs each actor reserves when GPUs are used.")
    cpus_per_actor: float = Field(
        default=0.9,
        gt=0,
        description="CPUs each actor reserves. Keep it fractional: whole CPUs per actor can leave nothing for "
        "Ray Data's own tasks on small machines, and the job hangs.",
    )


def actor_pool(
    compute: ActorCompute, work_items: int, extra_resources: dict[str, float] | None = None, cpu_actors: int = 1
) -> dict:
    """``map_batches`` keyword arguments for an actor pool: size, GPUs or fractional CPUs.

    Without GPUs the pool has ``cpu_actors`` actors unless ``num_actors`` says otherwise: one for stages
    whose model already uses every core, one per CPU for single-threaded work such as annotation.
    """
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    use_gpu = compute.use_gpu if compute.use_gpu is not None else gpus > 0
    if use_gpu and gpus <= 0:
        raise ValueError("compute.use_gpu=true but the Ray cluster has no GPUs")
    actors = compute.num_actors or (max(1, int(gpus // compute.gpus_per_actor)) if use_gpu else cpu_actors)
    options = {
        "compute": ray.data.ActorPoolStrategy(size=max(1, min(actors, work_items)), max_tasks_in_flight_per_actor=1),
        "num_cpus": compute.cpus_per_actor,
    }
    if use_gpu:
        options["num_gpus"] = compute.gpus_per_actor
    if extra_resources:
        options["resources"] = dict(extra_resources)
    return options


def actor_device():
    """The GPU Ray gave this actor, else the CPU."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
