"""Connecting to Ray, shared by every stage that runs on it (annotate, train, serve), and the one
actor-pool runner of annotate, precompute and evaluate.

    ensure_ray(config.ray)   # reuse an initialised Ray, else join config.ray.address, else start a local one
    for batch in run_actor_pool(Actor, items, compute=config.compute, ray_config=config.ray, ...): ...

A local Ray listens on 127.0.0.1 only (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and starts without
the dashboard. Inside a Ray Job (``RAY_ADDRESS`` set by ``ray job submit``) it joins that cluster.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
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
        # On a cluster the autoscaler's lines ("Adding 2 node(s) of type cpu_decode") are the progress a user
        # waits on; they come through Ray's log stream, which quiet mode would otherwise keep off.
        context = ray.init(address=address, log_to_driver=True)
        if not log_to_driver:
            _only_autoscaler_lines()
    else:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # every Ray listener on loopback
        context = ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=log_to_driver)
    session_dir = context.address_info.get("session_dir")
    if session_dir:
        console.record_log_location("Ray", f"{session_dir}/logs")
    return True


def _only_autoscaler_lines() -> None:
    """Of Ray's log stream to this driver, print the autoscaler's events to the terminal and drop the workers'
    output (it stays in the session's log folder). Ray has no public switch for that: its printer of the
    stream is replaced by a filtering one, under the same name, so that ``ray.shutdown()`` removes it."""
    from ray._private import worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    def print_autoscaler_events(data: dict) -> None:
        if data.get("pid") == "autoscaler":
            worker.print_worker_logs(data, console.terminal())

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", print_autoscaler_events)


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


DEFAULT_MAX_ACTORS = 64  # most actors a pool grows to unless compute.max_actors says otherwise


class ActorCompute(Section):
    """How a stage's actor pool is sized and placed (annotate, precompute, evaluate).

    On a Ray that zeroconv started, the pool starts with one actor and Ray Data adds actors, up to
    ``max_actors``, while work is queued and the machine has room. On a cluster (joined by address) it
    asks for ``max_actors`` at once and the autoscaler adds nodes for those still pending (see
    :func:`actor_pool_options`). Custom resources that pin actors to a node type are the stage's
    ``ray.resources``.
    """

    batch_size: int = Field(default=16, ge=1, description="Rows per model call inside an actor.")
    max_actors: int | None = Field(
        default=None,
        ge=1,
        description=f"Most actors the pool grows to. Default: one per work item, at most {DEFAULT_MAX_ACTORS}; "
        "on CPUs one for stages whose model already uses every core (precompute, evaluate).",
    )
    use_gpu: bool = Field(default=False, description="Give each actor gpus_per_actor GPUs.")
    gpus_per_actor: float = Field(default=1.0, gt=0, description="GPUs each actor reserves when use_gpu is set.")
    cpus_per_actor: float = Field(
        default=0.9,
        gt=0,
        description="CPUs each actor reserves. Keep it fractional: whole CPUs per actor can leave nothing for "
        "Ray Data's own tasks on small machines, and the job hangs.",
    )


def actor_pool_options(
    compute: ActorCompute,
    work_items: int,
    resources: dict[str, float] | None = None,
    single_threaded: bool = False,
    cluster_may_grow: bool = False,
) -> dict:
    """``map_batches`` keyword arguments for an autoscaling actor pool, from the config alone.

    Nothing here looks at the cluster as it is now: an autoscaling cluster may have no worker yet.
    ``single_threaded`` stages (annotation) scale out on CPUs too; the others get one CPU actor
    unless ``max_actors`` says otherwise, because their torch model already uses every core.

    On a cluster that may grow (``cluster_may_grow``: joined by address, not a Ray this process
    started), the pool asks for all its actors at once. Ray Data adds actors only within the
    resources the cluster has now (Ray Data 2.60 budgets from what its autoscaling coordinator
    reserved, which is what exists), so a pool starting on a cluster without its node type would stay
    at one actor: its wish for more never becomes demand the cluster autoscaler sees. Pending actors
    are that demand: the autoscaler adds nodes for them, each starts working as its node joins, and
    the pool shrinks when its inputs run out (the nodes are then removed when idle).
    """
    import ray

    if compute.max_actors is not None:
        most = compute.max_actors
    elif compute.use_gpu or single_threaded:
        most = DEFAULT_MAX_ACTORS
    else:
        most = 1
    size = max(1, min(most, work_items))
    options = {
        "compute": ray.data.ActorPoolStrategy(
            min_size=size if cluster_may_grow else 1, max_size=size, max_tasks_in_flight_per_actor=1
        ),
        "num_cpus": compute.cpus_per_actor,
    }
    if compute.use_gpu:
        options["num_gpus"] = compute.gpus_per_actor
    if resources:
        options["resources"] = dict(resources)
    return options


def actor_request(options: dict) -> dict[str, float]:
    """The resources one actor of the pool ``options`` describes reserves."""
    request = {"CPU": options["num_cpus"], **options.get("resources", {})}
    if "num_gpus" in options:
        request["GPU"] = options["num_gpus"]
    return request


def started_fixed_ray() -> bool:
    """True when this process started Ray itself (a local Ray: its nodes are all there will ever be)."""
    from ray._private import worker

    node = worker._global_node
    return node is not None and node.head and not node._ray_params.autoscaling_config


def check_schedulable(options: dict) -> None:
    """Raise a clear error if no node can ever host one actor of the pool ``options`` describes.

    Decidable in two cases: the cluster's autoscaler publishes its node types (autoscaler v2,
    KubeRay), or this process started Ray itself (a fixed local cluster). On a cluster joined by
    address without published node types, Ray's autoscaler logs "No available node types can
    fulfill resource request ..." to the driver instead, and the pool waits.
    """
    import ray
    from ray._private import state

    request = actor_request(options)
    cluster_config = state.state.get_cluster_config()
    if cluster_config is not None and cluster_config.node_group_configs:
        shapes = [dict(g.resources) for g in cluster_config.node_group_configs if g.max_count != 0]
        where = "no node type of the cluster offers"
    else:
        if not started_fixed_ray():
            return  # joined a cluster that may grow: see the docstring
        shapes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        where = "this local Ray has no node with"
    if any(all(shape.get(k, 0) >= v for k, v in request.items()) for shape in shapes):
        return
    missing = [f"{k}: {v:g}" for k, v in request.items() if not any(shape.get(k, 0) >= v for shape in shapes)]
    raise ValueError(
        f"actors cannot be placed: each asks for {_resources_text(request)} and {where} {', '.join(missing)} "
        "(check compute.use_gpu, compute.cpus_per_actor and ray.resources)"
    )


def _resources_text(request: dict[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(request.items())) + "}"


@dataclass(frozen=True)
class ItemStream:
    """Work items for :func:`run_actor_pool` when a list would not fit the driver: a small key per item (e.g.
    its byte offset in a file on the driver's node) and ``read(keys) -> items`` (dicts, one row each), which
    must pickle: Ray Data read tasks on the driver's node call it (pipelines/common/item_stream.py)."""

    keys: list
    read: Callable[[list], list[dict]]

    def __len__(self) -> int:
        return len(self.keys)


def run_actor_pool(
    actor: type,
    items: list[dict] | ItemStream,
    *,
    compute: ActorCompute,
    ray_config: RayConfig,
    constructor_kwargs: dict,
    rows_per_call: int = 1,
    single_threaded: bool = False,
    runtime_env: dict | None = None,
    progress: Callable[[dict[str, np.ndarray]], int] | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
) -> Iterator[dict[str, np.ndarray]]:
    """Map ``items`` through an autoscaling pool of ``actor`` on Ray Data; yield each output batch as it comes.

    ``actor(**constructor_kwargs)`` loads its model once in ``__init__``; ``actor(batch)`` maps up to
    ``rows_per_call`` items (a numpy batch) to output columns. Items are cut into blocks of
    ``rows_per_call`` and each actor has one in flight, so no actor sits on a queue while another is
    idle at the end. ``progress(batch)`` says how much of ``total`` a batch finished (for the bar).
    ``items`` is a list, or an :class:`ItemStream` the driver does not hold.
    """
    import ray

    ensure_ray(ray_config)
    blocks = math.ceil(len(items) / rows_per_call)
    options = actor_pool_options(
        compute, blocks, ray_config.resources, single_threaded, cluster_may_grow=not started_fixed_ray()
    )
    check_schedulable(options)
    if isinstance(items, ItemStream):
        from pipelines.common.item_stream import read_streamed

        dataset = read_streamed(items.keys, items.read, rows_per_block=rows_per_call)
    else:
        dataset = ray.data.from_items(items, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        actor,
        batch_size=rows_per_call,
        fn_constructor_kwargs=constructor_kwargs,
        runtime_env=runtime_env,
        **options,
    )
    with console.progress(total, desc, unit) as bar:
        for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            bar.update(progress(batch) if progress else len(next(iter(batch.values()))))
            yield batch


def actor_device():
    """The GPU Ray gave this actor, else the CPU."""
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
