"""ray_cluster.yaml: a valid Ray cluster launcher config with one node type per stage."""

from __future__ import annotations

import copy
import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load((REPO / "ray_cluster.yaml").read_text())


@pytest.fixture(scope="module")
def schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def pinned(requirement_name: str) -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(d for d in deps if re.split(r"[=<>\[ ]", d)[0] == requirement_name)


def test_validates_against_rays_own_schema_and_checks(cluster, schema):
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    jsonschema.validate(cluster, schema)
    validate_config(prepare_config(copy.deepcopy(cluster)))  # defaults filled in as `ray up` does; no AWS call


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c["available_node_types"]["gpu_train"]["resources"].update(train_gpu=0.5),  # must be an integer
        lambda c: c["available_node_types"]["gpu_train"].update(max_replicas=4),  # a KubeRay word, not the launcher's
        lambda c: c["provider"].pop("type"),
    ],
)
def test_the_schema_check_has_teeth(cluster, schema, break_it):
    broken = copy.deepcopy(cluster)
    break_it(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_one_node_type_per_stage_with_autoscaling_bounds(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # drivers and the control plane only: no task lands on the head
    workers = {name: spec for name, spec in types.items() if name != cluster["head_node_type"]}
    offered = {}
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"], name
        for resource in spec["resources"]:
            offered.setdefault(resource, []).append(name)
    assert sum(spec["max_workers"] for spec in workers.values()) <= cluster["max_workers"]
    # Each stage's custom resource is offered by exactly one node type, of the right hardware.
    assert offered == {"decode": ["cpu_decode"], "annotate_gpu": ["gpu_annotate"], "train_gpu": ["gpu_train"]}
    assert workers["cpu_decode"]["node_config"]["InstanceType"].startswith(("m", "c", "r"))
    assert workers["gpu_annotate"]["node_config"]["InstanceType"].startswith(("g", "p"))
    assert workers["gpu_train"]["node_config"]["InstanceType"].startswith("p")


def test_setup_installs_the_pinned_project_torch_first(cluster):
    commands = cluster["setup_commands"]
    torch_at = next(i for i, c in enumerate(commands) if "pip install torch" in c)
    project_at = next(i for i, c in enumerate(commands) if c.rstrip().endswith("/home/ubuntu/zeroconv"))
    assert torch_at < project_at
    for name in ("torch", "torchvision"):
        assert pinned(name) in commands[torch_at].split()  # the same pins as pyproject.toml
    assert commands[project_at].startswith("DS_BUILD_OPS=0 ")
    assert cluster["file_mounts"] == {"/home/ubuntu/zeroconv": "."}
    assert {".venv", ".git", "runs", "demo-output"} <= set(cluster["rsync_exclude"])
    assert "python 3.11" in " ".join(commands)  # requires-python of the project


def test_head_exposes_the_jobs_api_on_loopback_only(cluster):
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # reached through `ray dashboard`'s SSH tunnel
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in start


def test_head_offers_no_cpu_and_workers_start_at_zero(cluster):
    """The head runs drivers and the control plane only; every worker node type scales from zero."""
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--num-cpus=0" in start.split()  # as its node type declares: tasks and actors never land there
    assert cluster["available_node_types"][cluster["head_node_type"]]["resources"]["CPU"] == 0
    workers = [t for name, t in cluster["available_node_types"].items() if name != cluster["head_node_type"]]
    assert all(t["min_workers"] == 0 for t in workers)


def test_the_simulated_cluster_is_derived_from_this_file(cluster):
    """tests/cluster runs on ray_cluster.yaml's node types and custom resources (scaled down), not on a copy."""
    from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
    from ray.autoscaler._private.providers import _get_node_provider_cls

    from tests.cluster.harness import HEAD_TYPE, PROVIDER, cluster_config

    fake = cluster_config(gcs_port=6379)
    assert fake["provider"]["module"] == PROVIDER and fake["provider"]["gcs_address"] == "127.0.0.1:6379"
    # Ray's own fake_multinode provider, loaded the way the head's autoscaler loads it.
    assert issubclass(_get_node_provider_cls(fake["provider"]), FakeMultiNodeProvider)
    assert fake["available_node_types"][HEAD_TYPE]["resources"] == {"CPU": 0}
    launcher_types = {name for name in cluster["available_node_types"] if name != cluster["head_node_type"]}
    assert set(fake["available_node_types"]) - {HEAD_TYPE} == launcher_types
    for name in launcher_types:
        custom = set(cluster["available_node_types"][name]["resources"]) - {"CPU", "GPU"}
        resources = fake["available_node_types"][name]["resources"]
        assert custom <= set(resources) and resources["CPU"] == 1, name
        assert fake["available_node_types"][name]["min_workers"] == 0
