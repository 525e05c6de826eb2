"""`zeroconv pipeline run`: the stages in order, shared settings inherited, scheduled re-runs doing only
what is new, a failed run resuming at the step that failed - on real Ray, DeepSpeed and MLflow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from pipelines.common.config import ConfigError, load_config
from pipelines.data.synthetic import write_image_folder
from pipelines.pipeline import PipelineConfig, input_batches, resolved_stages, run_pipeline

RES = 64  # the tiny base model's resolution
REPO = Path(__file__).resolve().parents[2]


def pipeline_config(tmp_path: Path, incoming: Path, heldout: str, **overrides) -> PipelineConfig:
    """Everything tiny: 2 train steps per generation, 2 held-out samples at 2 DDIM steps."""
    tree = {
        "work_dir": str(tmp_path / "work"),
        "mlflow": {"experiment": "test-pipeline"},  # default store: SQLite under work_dir
        "annotate": {"input": str(incoming), "resolution": RES, "min_side": 32, "shard_size": 4},
        "train": {
            "base_model": {"source": "tiny"},
            "run_name": "ctrl",
            "registered_model": "pipeline-test",
            "num_workers": 1,
            "cpus_per_worker": 0.5,
            "batch_size": 2,
            "max_steps": 2,
            "checkpoint_every": 2,
            "log_every": 1,
            "validate_every": 0,
            "num_validation": 0,
        },
        "evaluate": {
            "data": heldout,
            "limit": 2,
            "steps": 2,
            "baseline": False,
            "grid_samples": 1,
            "compute": {"batch_size": 2},
        },
        "promote": {"margin": 0.0},
    }
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return PipelineConfig.model_validate(tree)


def annotated_files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("data/train-*.parquet"))}


def encoded_files(batch: Path) -> dict[str, float]:
    """A precomputed batch's shards -> their modification times."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(batch.glob("data/train-*.parquet"))}


# ---------------------------------------------------------------------------------------------
# Config: one place for shared settings, stages wired to each other
# ---------------------------------------------------------------------------------------------


# docs/huggingface.md's call for the pipeline's annotated batches, in a Python without zeroconv.
# (`load_dataset("parquet", data_dir=<annotated>)` also takes every batch's _rejects/ for data and fails.)
LOAD_ANNOTATED_BATCHES = """
import importlib.util, json, sys
import datasets
assert importlib.util.find_spec("pipelines") is None
annotated, cache = sys.argv[1:]
train = datasets.load_dataset("parquet", data_files=f"{annotated}/*/data/*.parquet", cache_dir=cache)["train"]
print(json.dumps({"ids": sorted(train["id"]), "size": list(train[0]["image"].size),
                  "features": {k: type(train.features[k]).__name__ for k in ("image", "conditioning_image")}}))
"""


def test_shared_settings_are_inherited_unless_a_stage_sets_its_own(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "work_dir": "s3://bucket/zc",
                "storage": {"s3_endpoint_url": "http://127.0.0.1:9"},
                "ray": {"address": "auto"},
                "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "experiment": "nightly"},
                "annotate": {"input": "s3://bucket/incoming", "ray": {"resources": {"decode": 1}}},
                "train": {
                    "registered_model": "cn",
                    "ray": {"resources": {"train_gpu": 1}},
                    "mlflow": {"experiment": "own"},
                },
                "evaluate": {"work_dir": "s3://bucket/eval", "model": "ignored"},
            }
        )
    )
    config = resolved_stages(load_config(PipelineConfig, path))
    for stage in (config.annotate, config.train, config.promote):
        assert stage.work_dir == "s3://bucket/zc"
        assert stage.storage.s3_endpoint_url == "http://127.0.0.1:9"
        assert stage.ray.address == "auto"  # inherited field by field, next to the stage's own resources
    assert config.evaluate.work_dir == "s3://bucket/eval"  # set by the stage itself: kept
    assert config.annotate.ray.resources == {"decode": 1} and config.train.ray.resources == {"train_gpu": 1}
    assert config.evaluate.ray.resources == {}
    assert (config.train.mlflow.tracking_uri, config.train.mlflow.experiment) == ("http://127.0.0.1:5000", "own")
    assert config.promote.mlflow.experiment == "nightly"
    assert config.evaluate.model == config.promote.model == "cn"  # what train registers is what is judged
    assert config.annotate.output_uri() == "s3://bucket/zc/annotated"


def test_cli_form_and_config_mistakes(tmp_path):
    from pipelines.cli import main

    path = tmp_path / "p.yaml"
    path.write_text("annotate: {input: /data/incoming}\ntrain: {max_steps: 7}\n")
    assert main(["pipeline", "run", str(path), "train.lr=2e-5", "--print-config"]) == 0
    with pytest.raises(ConfigError, match="train.registered_model is empty"):
        load_config(PipelineConfig, None, ["train.registered_model="])
    with pytest.raises(ConfigError, match="annotate.resolutoin: unknown field"):
        load_config(PipelineConfig, None, ["annotate.resolutoin=64"])


def test_input_batches(tmp_path):
    from pipelines.annotate import AnnotateConfig

    with pytest.raises(FileNotFoundError, match="not a folder"):
        input_batches(AnnotateConfig(input=str(tmp_path / "missing")))
    (tmp_path / "in").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no batches"):
        input_batches(AnnotateConfig(input=str(tmp_path / "in")))
    (tmp_path / "in" / "b").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"")
    (tmp_path / "in" / "_tmp").mkdir()  # hidden: not a batch
    assert [b.uri.rsplit("/", 1)[1] for b in input_batches(AnnotateConfig(input=str(tmp_path / "in")))] == [
        "a.parquet",
        "b",
    ]
    (tmp_path / "in" / "stray.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="put new images in a new sub-folder"):
        input_batches(AnnotateConfig(input=str(tmp_path / "in")))


# ---------------------------------------------------------------------------------------------
# The whole pipeline, scheduled twice over a growing input
# ---------------------------------------------------------------------------------------------


def annotate_heldout(tmp_path: Path) -> str:
    from pipelines.annotate import AnnotateConfig, run_annotate

    images = write_image_folder(tmp_path / "heldout-images", n=2, size=RES, seed=99, broken=False)
    out = tmp_path / "heldout"
    run_annotate(AnnotateConfig(input=str(images), output=str(out), resolution=RES, min_side=32))
    return str(out)


@pytest.mark.slow
def test_scheduled_runs_do_only_new_work_and_resume_after_a_failure(
    tmp_path, ray_session, tiny_base_dir, without_zeroconv
):
    import mlflow
    import pyarrow.dataset as ds

    incoming = tmp_path / "incoming"
    write_image_folder(incoming / "2026-11-01", n=6, size=RES, seed=0)  # + 4 broken inputs (rejected)
    # Precompute on: training reads each batch's latents, and a new batch is the only one encoded.
    config = pipeline_config(tmp_path, incoming, annotate_heldout(tmp_path), **{"precompute.enabled": True})

    first = run_pipeline(config)
    assert first.batches == {"2026-11-01": 10}
    assert first.ran == ["annotate", "precompute", "train", "evaluate", "promote"]
    assert first.steps["precompute"].startswith("6 rows encoded in 1 batches")
    ledger = json.loads((tmp_path / "work" / "pipeline" / "state.json").read_text())
    assert ledger["train"]["version"] == "1" and ledger["trained_steps"] == 2
    assert "promoted pipeline-test v1 to champion" in str(first)
    annotated, precomputed = tmp_path / "work" / "annotated", tmp_path / "work" / "precomputed"
    before = annotated_files(annotated)
    encoded_before = encoded_files(precomputed / "2026-11-01")
    assert encoded_before

    # The next scheduled run with nothing new: no image read, nothing trained, evaluated or promoted.
    idle = run_pipeline(config)
    assert idle.batches == {"2026-11-01": 0} and idle.generation == first.generation
    assert idle.ran == ["annotate", "precompute"] and idle.steps["precompute"].startswith("0 rows encoded")

    # New images arrive as a new batch. This run fails at evaluation (its held-out set is missing) ...
    write_image_folder(incoming / "2026-11-02", n=4, size=RES, seed=1, broken=False)
    broken = pipeline_config(tmp_path, incoming, str(tmp_path / "no-heldout"), **{"precompute.enabled": True})
    with pytest.raises(FileNotFoundError):
        run_pipeline(broken)
    # ... and the re-run resumes there: the batch and the training of that run are not done again.
    second = run_pipeline(config)
    assert second.batches == {"2026-11-01": 0, "2026-11-02": 0}  # annotated by the failed run, once
    assert second.ran == ["annotate", "precompute", "evaluate", "promote"]
    assert second.steps["precompute"].startswith("0 rows encoded in 2 batches")  # the failed run encoded it
    assert second.generation != first.generation
    after = annotated_files(annotated)
    assert {k: v for k, v in after.items() if k in before} == before  # old shards never rewritten
    new_files = set(after) - set(before)
    assert new_files and {f.split("/")[0] for f in new_files} == {"2026-11-02"}
    assert encoded_files(precomputed / "2026-11-01") == encoded_before  # the old batch was not encoded again
    assert encoded_files(precomputed / "2026-11-02")

    ledger = json.loads((tmp_path / "work" / "pipeline" / "state.json").read_text())
    assert ledger["train"]["version"] == "2" and ledger["trained_steps"] == 4  # continued: 2 more steps
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    v2 = client.get_model_version("pipeline-test", "2")
    assert client.get_run(v2.run_id).data.params["data"] == str(precomputed)  # trained on both encoded batches
    assert "fidelity.score" in v2.tags and "promotion.decision" in v2.tags
    assert len(client.search_model_versions("name='pipeline-test'")) == 2  # one version per generation

    # Both batches load in stock `datasets`, rows only (no rejects), images as Image features.
    loaded = without_zeroconv.run_json(LOAD_ANNOTATED_BATCHES, annotated, tmp_path / "hf", cwd=tmp_path)
    rows = ds.dataset([str(p) for p in sorted(annotated.glob("*/data/*.parquet"))]).to_table(columns=["id"])
    assert loaded["ids"] == sorted(rows.column("id").to_pylist()) and len(loaded["ids"]) == 10  # 6 + 4 accepted
    assert loaded["features"] == {"image": "Image", "conditioning_image": "Image"} and loaded["size"] == [RES, RES]


# ---------------------------------------------------------------------------------------------
# S3 end to end: every byte the pipeline keeps lives in the bucket
# ---------------------------------------------------------------------------------------------

SECRET = "zc-secret-4f1c9e"  # a distinctive secret key: moto accepts any, and a leak is easy to find


@pytest.fixture
def s3_mlflow_server(s3_server, s3_bucket, tmp_path, monkeypatch):
    """Our own MLflow server on 127.0.0.1 whose artifacts go to s3://bucket/mlflow (proxied uploads)."""
    from tests.helpers import running_mlflow_server

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    with running_mlflow_server(tmp_path / "mlflow-server", f"s3://{s3_bucket}/mlflow") as uri:
        yield uri


def zeroconv(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipelines.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow
def test_whole_pipeline_on_s3(tmp_path, tiny_base_dir, s3_server, s3_bucket, s3_mlflow_server):
    """`zeroconv pipeline run CONFIG` with input, annotated Parquet, the ledger, Ray Train checkpoints and
    MLflow artifacts all on s3://. Credentials come only from the environment (the AWS chain): not in the
    config, not in any output, not in MLflow, not in Ray's logs.

    Runs as the CLI in a fresh process, as a scheduler would: its own Ray starts with the environment that
    holds the credentials (the session's Ray started before this test's bucket existed)."""
    import boto3
    import mlflow

    from pipelines.common.storage import upload_dir

    bucket = f"s3://{s3_bucket}"
    upload_dir(write_image_folder(tmp_path / "images", n=6, size=RES, seed=0), f"{bucket}/incoming/2026-11-01")
    upload_dir(
        write_image_folder(tmp_path / "heldout-images", n=2, size=RES, seed=99, broken=False),
        f"{bucket}/heldout-images",
    )
    ray_tmp = Path(tempfile.mkdtemp(prefix="zc-s3-", dir="/tmp"))  # short: Unix socket paths are limited
    env = dict(os.environ, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    try:
        heldout = zeroconv(
            "annotate",
            f"input={bucket}/heldout-images",
            f"output={bucket}/heldout",
            f"resolution={RES}",
            "min_side=32",
            "ray.num_cpus=2",
            env=env,
            cwd=tmp_path,
        )
        assert heldout.returncode == 0, heldout.stdout + heldout.stderr

        config = pipeline_config(
            tmp_path,
            tmp_path / "unused",
            f"{bucket}/heldout",
            **{
                "work_dir": f"{bucket}/zc",
                "storage.s3_endpoint_url": s3_server,
                "annotate.input": f"{bucket}/incoming",
                "mlflow.tracking_uri": s3_mlflow_server,
                "train.registered_model": "s3-pipeline",
                "ray.num_cpus": 2,
            },
        )
        (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_unset=True)))
        run = zeroconv("pipeline", "run", "pipeline.yaml", env=env, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
        assert "promoted s3-pipeline v1 to champion" in run.stdout
        ray_logs = "".join(
            p.read_text(errors="replace")
            for p in ray_tmp.rglob("*")
            if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json")
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)

    keys = [
        o["Key"]
        for page in boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=s3_bucket)
        for o in page.get("Contents", [])
    ]

    def under(prefix: str) -> list[str]:
        return [k for k in keys if k.startswith(prefix)]

    assert any(k.endswith(".parquet") for k in under("zc/annotated/2026-11-01/"))
    assert under("zc/annotated/2026-11-01/_rejects/")  # the 4 broken inputs, as rows
    ledger = json.loads(boto3.client("s3").get_object(Bucket=s3_bucket, Key="zc/pipeline/state.json")["Body"].read())
    assert any("checkpoint" in k for k in under("zc/train/ctrl/"))  # Ray Train storage_path on S3
    assert under("zc/train/ctrl/export/")
    assert any(k.endswith("MLmodel") for k in under("mlflow/"))  # the registered model's artifacts
    assert any("evaluation/" in k for k in under("mlflow/"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heldout-images", "images", "mlflow-server", "pipeline.yaml"]

    client = mlflow.MlflowClient(s3_mlflow_server)
    assert client.get_model_version_by_alias("s3-pipeline", "champion").version == ledger["train"]["version"] == "1"
    training = client.get_run(ledger["train"]["run_id"])
    for text in (
        run.stdout,
        run.stderr,
        heldout.stdout,
        heldout.stderr,
        json.dumps(ledger),
        json.dumps(training.data.params),
        json.dumps(training.data.tags),
    ):
        assert SECRET not in text
    assert SECRET not in ray_logs  # runtime_env is logged verbatim: credentials must never travel in it
