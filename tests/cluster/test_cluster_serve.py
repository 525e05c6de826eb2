"""`zeroconv serve` with 2 replicas on 2 nodes: a node is lost under steady traffic; requests keep being
answered (none hangs; a few may fail while the replica is gone) and the replica count recovers."""

from __future__ import annotations

import base64
import threading
from collections import Counter

import pytest
import requests

from pipelines.common.images import encode_png
from pipelines.data.synthetic import fill50k
from tests.cluster.conftest import free_port, wait_for
from tests.deploy.conftest import register_controlnet

pytestmark = pytest.mark.cluster

MODEL = "cluster-serve"
APP = "zeroconv-cluster"
REQUEST_TIMEOUT_S = 60  # a request that takes longer counts as hung
MAX_FAILED = 3  # requests in flight on the lost node when it went (2 client threads, one request each)


def replica_resources() -> list[dict]:
    """What each alive replica actor asked Ray for."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
    return [a.required_resources for a in actors if a.class_name.startswith(f"ServeReplica:{APP}:")]


def replica_nodes() -> dict[str, str]:
    """Alive replicas of the application: actor id -> node id."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
    return {a.actor_id: a.node_id for a in actors if a.class_name.startswith(f"ServeReplica:{APP}:")}


def two_replicas(avoiding: str | None = None) -> dict[str, str] | None:
    replicas = replica_nodes()
    return replicas if len(replicas) == 2 and avoiding not in replicas.values() else None


@pytest.fixture
def serving(fake_cluster, mlflow_server, tiny_base, tiny_base_dir, tmp_path):
    """Two replicas pinned by a custom resource, one per node; Serve's HTTP proxy on the head only (the fake
    nodes share 127.0.0.1, so a proxy per node would compete for one port). Yields the base URL."""
    from ray import serve

    from deploy.app import run_serve
    from deploy.config import ServeConfig
    from pipelines.common.tracking import connect

    connect(mlflow_server, "cluster-serve")
    register_controlnet(tiny_base, tiny_base_dir, MODEL, seed=1, export_root=tmp_path)
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    config = ServeConfig(
        models=[MODEL],
        port=port,
        app_name=APP,
        block=False,
        reload_interval_s=0,
        mlflow={"tracking_uri": mlflow_server},
        replicas={"num_replicas": 2, "num_cpus": 0.5, "torch_threads": 1},
        ray={"resources": {"annotate_gpu": 1}},  # a GPU inference node each (one unit per node)
    )
    try:
        result = run_serve(config)
        yield result.url
    finally:
        serve.shutdown()


def test_serve_survives_a_lost_node_and_recovers_its_replicas(fake_cluster, serving):
    sample = fill50k(1, size=64, seed=3)[0]
    body = {
        "prompt": sample.text,
        "controls": [{"image": base64.b64encode(encode_png(sample.condition)).decode()}],
        "seed": 0,
        "steps": 2,
    }
    replicas = wait_for(lambda: two_replicas(), 300, "2 replicas")
    assert all(r.get("annotate_gpu") == 1 for r in replica_resources())  # ray.resources reached the replicas
    nodes = set(replicas.values())
    assert len(nodes) == 2  # one replica per node
    assert {fake_cluster.node_type(n) for n in nodes} == {"gpu_annotate"}  # pinned by the custom resource

    outcomes: list[int | str] = []
    stop = threading.Event()

    def traffic() -> None:  # bounded: until told to stop, at most 400 requests per thread
        for _ in range(400):
            if stop.is_set():
                return
            try:
                answer = requests.post(f"{serving}/v1/generate", json=body, timeout=REQUEST_TIMEOUT_S)
                outcomes.append(answer.status_code)
            except requests.Timeout:
                outcomes.append("hung")
            except requests.ConnectionError:
                outcomes.append("refused")

    clients = [threading.Thread(target=traffic, daemon=True) for _ in range(2)]
    for c in clients:
        c.start()
    wait_for(lambda: outcomes.count(200) >= 10, 300, "10 answers before the node loss")
    victim = next(iter(replicas.values()))
    fake_cluster.kill_node(victim)
    killed_at = len(outcomes)
    recovered = wait_for(lambda: two_replicas(avoiding=victim), 600, "2 replicas again, none on the lost node")
    recovered_at = len(outcomes)
    wait_for(lambda: outcomes[recovered_at:].count(200) >= 10, 300, "10 answers after recovery")
    stop.set()
    for c in clients:
        c.join(timeout=REQUEST_TIMEOUT_S + 10)

    counts = Counter(outcomes)
    assert "hung" not in counts and "refused" not in counts, counts
    failed = [o for o in outcomes if o != 200]
    assert len(failed) <= MAX_FAILED, counts
    assert set(failed) <= {500, 503}, counts
    assert all(o == 200 for o in outcomes[recovered_at:]), counts
    assert outcomes[killed_at:recovered_at].count(200) > 0, "nothing was answered while one replica was gone"
    assert {fake_cluster.node_type(n) for n in recovered.values()} == {"gpu_annotate"}
    if 500 in counts:  # the server should say "try again" (503), never 500: see docs/cluster.md "Known limits"
        pytest.xfail(
            "Ray Serve 2.60's proxy answers 500 for a request in flight on a replica that died (RayActorError)"
        )
