"""Connecting to Ray, shared by every stage that runs on it (annotate, train, serve).

    ensure_ray(config.ray)   # reuse an initialised Ray, else join config.ray.address, else start a local one

A local Ray listens on 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and starts without
the dashboard. Inside a Ray Job (``RAY_ADDRESS`` set by ``ray job submit``) it joins that cluster.
"""

from __future__ import annotations

import os

from pipelines.config import RayConfig

# Environment a worker needs to reach the same S3 as the driver: endpoint, region and the standard
# AWS credential chain. Workers of a local Ray were started before the driver may have set these.
_STORAGE_ENV_PREFIXES = ("AWS_",)


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
    """A Ray ``runtime_env`` handing this process's S3 settings (AWS_* variables) to workers.

    Values travel in the runtime env, never in configs or logs. On clusters whose nodes have their
    own credentials (instance roles) the driver usually has none set, and nothing is forwarded.
    """
    env = {k: v for k, v in os.environ.items() if k.startswith(_STORAGE_ENV_PREFIXES)}
    return {"env_vars": env} if env else {}
