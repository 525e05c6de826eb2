"""`zeroconv submit pipeline`: the whole pipeline (annotate -> train -> evaluate -> promote) as a Ray Job
through the head's Jobs API on 127.0.0.1, each stage on its own node type of the autoscaling cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipelines.annotate import AnnotateConfig, run_annotate
from pipelines.data.synthetic import write_image_folder
from pipelines.pipeline import PipelineConfig
from tests.cluster.harness import train_worker_nodes

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
RES = 64  # the tiny base model's resolution
MODEL = "cluster-pipeline"


def pipeline_yaml(work: Path, incoming: Path, heldout: Path, mlflow_uri: str) -> dict:
    """The shape of deploy/kuberay/pipeline-config.yaml: each stage asks for its node type's resource."""
    return {
        "work_dir": str(work),
        "mlflow": {"tracking_uri": mlflow_uri, "experiment": "cluster-pipeline"},
        "annotate": {
            "input": str(incoming),
            "resolution": RES,
            "min_side": 32,
            "shard_size": 4,
            "ray": {"resources": {"decode": 1}},
            "compute": {"max_actors": 2},
        },
        "train": {
            "base_model": {"source": "tiny"},
            "run_name": "ctrl",
            "registered_model": MODEL,
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "ray": {"resources": {"train_gpu": 1}},
            "batch_size": 2,
            "max_steps": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "validate_every": 0,
            "num_validation": 0,
        },
        "evaluate": {
            "data": str(heldout),
            "limit": 2,
            "steps": 2,
            "baseline": False,
            "grid_samples": 1,
            "ray": {"resources": {"annotate_gpu": 1}},
            "compute": {"batch_size": 2},
        },
        "promote": {"margin": 0.0},
    }


def test_submit_pipeline_runs_every_stage_on_the_cluster(fake_cluster, mlflow_server, tmp_path):
    import mlflow

    incoming, heldout, work = tmp_path / "incoming", tmp_path / "heldout", tmp_path / "work"
    tree = pipeline_yaml(work, incoming, heldout, mlflow_server)
    PipelineConfig.model_validate(tree)  # what `zeroconv submit` checks before submitting, with the exception type
    write_image_folder(incoming / "2026-11-01", n=12, size=RES, seed=0)  # + 4 broken inputs (rejected)
    heldout_images = write_image_folder(tmp_path / "heldout-images", n=2, size=RES, seed=99, broken=False)
    run_annotate(AnnotateConfig(input=str(heldout_images), output=str(heldout), resolution=RES, min_side=32))
    project = tmp_path / "project"  # the job's working_dir: the config travels with it
    (project / "configs").mkdir(parents=True)
    (project / "configs" / "pipeline.yaml").write_text(yaml.safe_dump(tree))
    workers_before = set(train_worker_nodes())

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.cli",
            "submit",
            "pipeline",
            "--config",
            str(project / "configs" / "pipeline.yaml"),
            f"submit.address={fake_cluster.dashboard}",
            f"submit.working_dir={project}",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=REPO,
    )

    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    assert "SUCCEEDED" in done.stdout
    # Scaling from zero is visible in the job's output, not a silent wait (docs/cluster.md).
    assert "Adding" in done.stdout and "cpu_decode" in done.stdout, done.stdout[-5000:]
    ledger = json.loads((work / "pipeline" / "state.json").read_text())
    assert ledger["train"]["version"] == "1" and ledger["trained_steps"] == 2
    client = mlflow.MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias(MODEL, "champion").version == "1"  # evaluated and promoted
    # Each stage ran on its node type: annotate shards on cpu_decode, the train worker on gpu_train.
    shards = list((work / "annotated" / "2026-11-01" / "data").glob("train-*.parquet"))
    nodes = {json.loads(pq.read_schema(p).metadata[b"zeroconv.shard"])["node"] for p in shards}
    assert {fake_cluster.node_type(n) for n in nodes} == {"cpu_decode"}
    new_workers = {a: n for a, n in train_worker_nodes().items() if a not in workers_before}
    assert new_workers and {fake_cluster.node_type(n) for n in new_workers.values()} == {"gpu_train"}
