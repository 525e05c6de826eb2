"""deploy/kuberay: the fields KubeRay requires, that the manifests agree with the code they run
(the pipeline config, the Serve application, the pinned versions, the cluster's custom resources),
and who can reach the clusters (network policy, Ray token auth, the serving bearer token)."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERAY = REPO / "deploy" / "kuberay"
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")


def manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def docs() -> dict[str, dict]:
    return manifests()


def project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def cluster_specs(docs: dict) -> dict[str, dict]:
    return {
        "RayJob": docs["RayJob"]["spec"]["rayClusterSpec"],
        "RayService": docs["RayService"]["spec"]["rayClusterConfig"],
    }


def offered_resources(cluster: dict) -> dict[str, str]:
    """Custom resource -> worker group offering it (rayStartParams.resources is a quoted JSON string)."""
    offered = {}
    for group in cluster["workerGroupSpecs"]:
        text = group["rayStartParams"].get("resources")
        if text:
            for name in json.loads(json.loads(text)):
                offered[name] = group["groupName"]
    return offered


def test_every_manifest_has_the_basics(docs):
    assert set(docs) == {"RayJob", "RayCronJob", "RayService", "ConfigMap", "ServiceAccount", "NetworkPolicy"}
    versions = {"ConfigMap": "v1", "ServiceAccount": "v1", "NetworkPolicy": "networking.k8s.io/v1"}
    for kind, doc in docs.items():
        assert doc["apiVersion"] == versions.get(kind, "ray.io/v1")
        assert doc["metadata"].get("name") or doc["metadata"].get("generateName")
    text = "".join(p.read_text() for p in KUBERAY.glob("*.yaml"))
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)|aws_secret", text)  # IRSA, no keys


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ray_cluster_specs_have_what_kuberay_requires(docs, kind):
    import ray

    cluster = cluster_specs(docs)[kind]
    assert cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]
    groups = [head, *cluster["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())  # KubeRay wants strings
        pod = group["template"]["spec"]
        assert pod["containers"] and all(c["name"] and c["image"] for c in pod["containers"])
        assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
        for container in pod["containers"]:
            assert container["image"].endswith(":" + project()["version"])  # the image of this release
            requests, limits = container["resources"]["requests"], container["resources"]["limits"]
            assert requests.get("nvidia.com/gpu") == limits.get("nvidia.com/gpu")
    assert head["rayStartParams"]["num-cpus"] == "0"  # no tasks on the head
    for group in cluster["workerGroupSpecs"]:
        assert group["groupName"]
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert cluster.get("enableInTreeAutoscaling") is True


def test_pipeline_rayjob_runs_the_mounted_config(docs, tmp_path):
    from pipelines.cli import main

    job = docs["RayJob"]["spec"]
    words = job["entrypoint"].split()
    assert words[:3] == ["zeroconv", "pipeline", "run"] and len(words) == 4
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    mount = next(m for m in head["containers"][0]["volumeMounts"] if words[3].startswith(m["mountPath"] + "/"))
    volume = next(v for v in head["volumes"] if v["name"] == mount["name"])
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    key = words[3][len(mount["mountPath"]) + 1 :]
    # The mounted file is a valid pipeline config, read through the very command the job runs.
    (tmp_path / key).write_text(configmap["data"][key])
    assert main(["pipeline", "run", str(tmp_path / key), "--print-config"]) == 0
    assert job["shutdownAfterJobFinishes"] is True


def test_schedule_creates_the_same_rayjob(docs):
    cron = docs["RayCronJob"]["spec"]
    assert cron["jobTemplate"] == docs["RayJob"]["spec"]  # one pipeline definition, run now or nightly
    fields = cron["schedule"].split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields)
    assert cron["jobTemplate"]["activeDeadlineSeconds"] < 24 * 3600  # a run ends before the next one starts


def test_stage_resources_are_offered_by_kuberay_groups_and_cluster_launcher_node_types(docs, tmp_path):
    from pipelines.common.config import load_config
    from pipelines.pipeline import PipelineConfig, resolved_stages

    (tmp_path / "pipeline.yaml").write_text(docs["ConfigMap"]["data"]["pipeline.yaml"])
    config = resolved_stages(load_config(PipelineConfig, tmp_path / "pipeline.yaml"))
    wanted = {name: getattr(config, name).ray.resources for name in ("annotate", "train", "evaluate", "promote")}
    assert wanted["train"] and wanted["annotate"]  # the stages do ask for their node types
    on_kuberay = offered_resources(docs["RayJob"]["spec"]["rayClusterSpec"])
    launcher = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())["available_node_types"]
    on_launcher = {r: t for t, spec in launcher.items() for r in spec["resources"] if r not in ("CPU", "GPU")}
    for stage, resources in wanted.items():
        for resource in resources:
            assert resource in on_kuberay, (stage, resource)
            assert resource in on_launcher, (stage, resource)
    gpu_groups = {
        g["groupName"]
        for g in docs["RayJob"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    }
    assert on_kuberay["train_gpu"] in gpu_groups and on_kuberay["annotate_gpu"] in gpu_groups
    assert on_kuberay["decode"] not in gpu_groups
    # A stage that uses GPUs asks for a GPU node type.
    assert config.train.use_gpu and on_kuberay[next(iter(wanted["train"]))] in gpu_groups
    assert config.evaluate.compute.use_gpu and on_kuberay[next(iter(wanted["evaluate"]))] in gpu_groups


def test_rayservice_serves_the_serve_config_application(docs):
    import importlib

    from deploy.config import DEFAULT_MODEL, validate_config

    serve = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "deploy" / "serve_config.yaml").read_text())
    (app,), (local_app,) = serve["applications"], local["applications"]
    assert app["import_path"] == local_app["import_path"] and app["name"] == local_app["name"]
    module, _, attr = app["import_path"].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    config = validate_config(app["args"])  # the args are ServeConfig fields
    assert config.models == [DEFAULT_MODEL] and config.alias == "champion"  # what training registers
    assert config.replicas.num_gpus >= 1 and config.replicas.device == "cuda"
    assert config.mlflow.tracking_uri.startswith("http")
    gpu_workers = [
        g
        for g in docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_workers  # replicas ask for a GPU: some group must have them


def test_image_recipe_pins_what_pyproject_pins():
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    pins = {re.split(r"[=\[]", d)[0]: d for d in project()["dependencies"] if "==" in d}
    assert f"rayproject/ray:{pins['ray'].split('==')[1]}-py311" in dockerfile
    torch_line = next(line for line in dockerfile.splitlines() if "pip install" in line and "torch" in line)
    assert pins["torch"] in torch_line.split() and pins["torchvision"] in torch_line.split()
    assert dockerfile.index(pins["torch"]) < dockerfile.index("DS_BUILD_OPS=0 pip install")
    ignored = (KUBERAY / "Dockerfile.dockerignore").read_text().split()
    assert {".venv", ".git", "runs"} <= set(ignored)


def pod_templates(docs: dict) -> dict[str, dict]:
    """Every Ray pod template of the pipeline and serving clusters, by a readable name."""
    templates = {}
    for kind, cluster in cluster_specs(docs).items():
        templates[f"{kind} head"] = cluster["headGroupSpec"]["template"]
        for group in cluster["workerGroupSpecs"]:
            templates[f"{kind} {group['groupName']}"] = group["template"]
    return templates


def test_network_policy_admits_only_the_cluster_the_operator_and_serve_clients(docs):
    policy = docs["NetworkPolicy"]["spec"]
    selected = policy["podSelector"]["matchLabels"]
    for name, template in pod_templates(docs).items():  # every Ray pod is behind the policy
        labels = template.get("metadata", {}).get("labels", {})
        assert selected.items() <= labels.items(), name
    assert policy["policyTypes"] == ["Ingress"]
    by_port: dict[int | None, list] = {}
    for rule in policy["ingress"]:
        assert rule.get("from"), rule  # no rule admits everyone
        for source in rule["from"]:
            assert "ipBlock" not in source
        for port in rule.get("ports") or [{"port": None}]:
            by_port.setdefault(port["port"], []).extend(rule["from"])
    # All ports: only the cluster's own pods (the same labels the policy selects, same namespace).
    assert by_port[None] == [{"podSelector": {"matchLabels": selected}}]
    # The dashboard (Jobs API: runs code with the pods' IAM role): only the KubeRay operator.
    (operator,) = by_port[8265]
    assert operator["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "kuberay-operator"}
    # Serve's HTTP port: only namespaces labelled as its clients (the gateway).
    assert by_port[8000] == [{"namespaceSelector": {"matchLabels": {"zeroconv.io/serve-clients": "true"}}}]
    assert set(by_port) == {None, 8265, 8000}


@pytest.mark.parametrize("kind", ["RayJob", "RayService"])
def test_ray_clusters_require_rays_token_and_only_the_operator_uses_the_dashboard(docs, kind):
    cluster = cluster_specs(docs)[kind]
    assert cluster["authOptions"] == {"mode": "token"}  # KubeRay >= 1.5.1 makes the Secret and uses it
    if kind == "RayJob":
        assert docs["RayJob"]["spec"]["submissionMode"] == "HTTPMode"  # no submitter pod calls the dashboard
        assert docs["RayCronJob"]["spec"]["jobTemplate"]["submissionMode"] == "HTTPMode"


def test_rayservice_reads_its_bearer_token_from_a_secret(docs):
    serve = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    variable = serve["applications"][0]["args"]["auth_token_env"]
    assert variable  # auth on: the app refuses to start without the token
    for name, template in pod_templates(docs).items():
        if not name.startswith("RayService"):
            continue
        for container in template["spec"]["containers"]:  # wherever the app builder runs, it finds the token
            (env,) = [e for e in container.get("env", []) if e["name"] == variable]
            assert "value" not in env and env["valueFrom"]["secretKeyRef"]["name"], (name, env)
    assert "Secret" not in docs  # the token is created in the cluster, never committed
