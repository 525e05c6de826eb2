"""Connecting to Ray, shared by every stage that runs on it (annotate, train, serve).

    ensure_ray(config.ray)   # reuse an initialised Ray, else join config.ray.address, else start a local one

A local Ray listens on 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and starts without
the dashboard. Inside a Ray Job (``RAY_ADDRESS`` set by ``ray job submit``) it joins that cluster.
"""

from __future__ import annotations

import os

from pipelines.config import RayConfig

# Where S3 is, for workers: endpoint, region, profile name. Never credentials: Ray writes runtime_env
# verbatim to its logs, so secrets must reach workers the way they reach any process - the standard
# AWS chain on each node (environment the node was started with, instance role, IRSA, profile).
_STORAGE_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
                "MLFLOW_S3_ENDPOINT_URL")


def ensure_ray(config: RayConfig | None = None) -> bool:
    """Make sure this process is connected to Ray; returns True if this call connected it."""
    import ray

    if ray.is_initialized():  # e.g. the test session's Ray, or a previous stage in the same process
        return False
    config = config or RayConfig()
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return True
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray listener on loopback
    ray.init(num_cpus=config.num_cpus, include_dashboard=False)
    return True


def storage_runtime_env() -> dict:
    """A Ray ``runtime_env`` telling workers where this process's S3 is (endpoint, region, profile).

    Credentials are deliberately not forwarded (see _STORAGE_ENV): a local Ray started by zeroconv
    inherits them from the environment, and cluster nodes get them from their own AWS chain.
    """
    env = {k: os.environ[k] for k in _STORAGE_ENV if os.environ.get(k)}
    return {"env_vars": env} if env else {}
