"""`zeroconv serve` with 2 model replicas on 2 nodes: a node is lost under steady traffic; requests keep being
answered (none hangs; the requests in flight on the lost replica are sent again by the gateway, at worst
answered 503) and the replica count recovers."""

from __future__ import annotations

import base64
import threading
from collections import Counter

import pytest
import requests

from pipelines.common.images import encode_png
from pipelines.data.synthetic import fill50k
from tests.cluster.harness import wait_for
from tests.deploy.conftest import register_controlnet
from tests.helpers import free_port

pytestmark = pytest.mark.cluster

MODEL = "cluster-serve"
APP = "zeroconv-cluster"
REQUEST_TIMEOUT_S = 60  # a request that takes longer counts as hung
MAX_FAILED = 2  # requests in flight on the lost replica (2 client threads), if even their retry failed


def replicas(deployment: str = "ControlNetServer") -> list:
    """Alive replica actors of one deployment of the application (the model's, or the HTTP gateway's)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("state", "=", "ALIVE")], limit=1000, detail=True)
    return [a for a in actors if a.class_name.startswith(f"ServeReplica:{APP}:{deployment}")]


def replica_nodes() -> dict[str, str]:
    """Alive model replicas: actor id -> node id."""
    return {a.actor_id: a.node_id for a in replicas()}


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
    model_replicas = wait_for(lambda: two_replicas(), 300, "2 replicas")
    assert all(r.required_resources.get("annotate_gpu") == 1 for r in replicas())  # ray.resources reached them
    nodes = set(model_replicas.values())
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
    wait_for(lambda: outcomes.count(200) >= 5, 300, "5 answers before the node loss")
    # A node with a model replica and no gateway replica: the gateway is no CPU, it may share either node (or
    # the head); losing the gateway's own node would lose the requests it holds, as losing a proxy would.
    (gateway,) = replicas("Gateway")
    victim = next(n for n in model_replicas.values() if n != gateway.node_id)
    fake_cluster.kill_node(victim)
    killed_at = len(outcomes)
    recovered = wait_for(lambda: two_replicas(avoiding=victim), 600, "2 replicas again, none on the lost node")
    recovered_at = len(outcomes)
    wait_for(lambda: outcomes[recovered_at:].count(200) >= 5, 300, "5 answers after recovery")
    stop.set()
    for c in clients:
        c.join(timeout=REQUEST_TIMEOUT_S + 10)

    counts = Counter(outcomes)
    assert "hung" not in counts and "refused" not in counts, counts
    failed = [o for o in outcomes if o != 200]
    assert len(failed) <= MAX_FAILED, counts
    assert set(failed) <= {503}, counts  # never 500: the gateway retried them or said "try again"
    assert all(o == 200 for o in outcomes[recovered_at:]), counts
    assert outcomes[killed_at:recovered_at].count(200) > 0, "nothing was answered while one replica was gone"
    assert {fake_cluster.node_type(n) for n in recovered.values()} == {"gpu_annotate"}
