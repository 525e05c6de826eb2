"""The no-control baseline and an end-to-end evaluate of a registered tiny model against a real MLflow
server (the scores themselves: test_fidelity.py)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipelines.fidelity_metrics import edge_scores

# ---------------------------------------------------------------------------------------------
# The baseline: the ControlNet pipeline at conditioning scale 0 is the plain base model
# ---------------------------------------------------------------------------------------------


def test_baseline_is_the_base_model_without_control(tiny_base):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from model.inference import build_pipeline, generate

    controlnet = _perturbed_controlnet(tiny_base, seed=3)
    prompts, seeds = ["red circle with blue background", "a green circle"], [5, 6]
    conditions = np.zeros((2, 64, 64, 1), np.uint8)
    conditions[:, 20:40, 20:40] = 255
    pipe = build_pipeline(tiny_base, [controlnet])
    with_control = generate(pipe, prompts, conditions, seed=seeds, steps=3)
    baseline = generate(pipe, prompts, conditions, seed=seeds, steps=3, conditioning_scale=0.0)

    components = {k: v for k, v in tiny_base.pipe.components.items() if k != "scheduler"}
    plain = StableDiffusionPipeline(**components, scheduler=DDIMScheduler.from_config(tiny_base.pipe.scheduler.config))
    latents = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in seeds])
    expected = plain(
        prompts, num_inference_steps=3, guidance_scale=9.0, latents=latents, height=64, width=64, output_type="np"
    ).images
    expected = (np.clip(expected, 0, 1) * 255).round().astype(np.uint8)
    assert np.abs(baseline.astype(int) - expected.astype(int)).max() <= 1
    assert np.abs(with_control.astype(int) - expected.astype(int)).max() > 5  # the control does change the image


# ---------------------------------------------------------------------------------------------
# End to end: a registered tiny model, a real MLflow server, Ray Data actors
# ---------------------------------------------------------------------------------------------


def _perturbed_controlnet(base, seed: int, scale: float = 0.05):
    """A fresh ControlNet is the identity (zero convs); perturbed weights make versions differ."""
    net = base.family.new_controlnet(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return net


def register_controlnet(base, base_dir: Path, name: str, seed: int, export_root: Path, steps: int = 2) -> str:
    """Register a perturbed tiny ControlNet (canny conditions) as a new version of ``name``, alias candidate."""
    import mlflow

    from annotators import create
    from model.export import export_model
    from model.registry import log_controlnet_model

    out = export_model(_perturbed_controlnet(base, seed), export_root / f"{name}-seed{seed}")
    metadata = {
        "base_model": str(base_dir),
        "annotator": create("canny").spec(),
        "inference": {"steps": steps, "guidance_scale": 9.0},
    }
    with mlflow.start_run():
        info = log_controlnet_model(out, metadata=metadata, registered_name=name, alias="candidate")
    return str(info.registered_model_version)


def evaluate_config(tracking_uri: str, data: Path, model: str, **extra):
    from pipelines.common.config import load_config
    from pipelines.evaluate import EvaluateConfig

    overrides = {
        "mlflow.tracking_uri": tracking_uri,
        "mlflow.experiment": "evaluate-tests",
        "data": str(data),
        "model": model,
        "limit": 4,
        "grid_samples": 3,
        "compute.batch_size": 2,
        **extra,
    }
    return load_config(EvaluateConfig, None, [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def evaluated(ray_session, mlflow_server, tiny_base, tiny_base_dir, fill50k_parquet, tmp_path_factory):
    from pipelines.common.tracking import connect
    from pipelines.evaluate import run_evaluate

    connect(mlflow_server, "evaluate-tests")
    version = register_controlnet(
        tiny_base, tiny_base_dir, "eval-model", seed=0, export_root=tmp_path_factory.mktemp("x")
    )
    return version, run_evaluate(evaluate_config(mlflow_server, fill50k_parquet, "eval-model"))


def test_evaluate_logs_scores_grid_and_table_on_the_model_run(evaluated, mlflow_server, tmp_path):
    import mlflow

    version, result = evaluated
    client = mlflow.MlflowClient(mlflow_server)
    mv = client.get_model_version("eval-model", version)
    assert (result.version, result.run_id, result.samples, result.metric) == (version, mv.run_id, 4, "edge_f1")
    assert 0.0 <= result.score <= 1.0 and 0.0 <= result.baseline_score <= 1.0
    assert "edge_f1" in str(result) and "headline" in str(result)

    metrics = client.get_run(mv.run_id).data.metrics
    for key in (
        "fidelity/edge_f1",
        "fidelity/baseline_edge_f1",
        "fidelity/edge_precision",
        "fidelity/ssim",
        "fidelity/score",
        "fidelity/baseline_score",
    ):
        assert key in metrics, key
    assert metrics["fidelity/score"] == pytest.approx(result.score)
    assert metrics["fidelity/samples"] == 4

    files = {a.path for a in client.list_artifacts(mv.run_id, "evaluation")}
    assert files == {"evaluation/grid.png", "evaluation/scores.json", "evaluation/protocol.json"}
    grid_path = client.download_artifacts(mv.run_id, "evaluation/grid.png", str(tmp_path))
    grid = cv2.imread(grid_path)
    # 3 samples x (condition | generated | re-annotated | baseline | baseline re-annotated), 64 px + 2 px gaps.
    assert grid.shape == (3 * 66 + 2, 5 * 66 + 2, 3)

    table = json.loads(Path(client.download_artifacts(mv.run_id, "evaluation/scores.json", str(tmp_path))).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and [r["seed"] for r in rows] == [0, 1, 2, 3]
    assert np.mean([r["edge_f1"] for r in rows]) == pytest.approx(result.score)
    assert np.mean([r["baseline_edge_f1"] for r in rows]) == pytest.approx(result.baseline_score)

    tags = mv.tags
    assert float(tags["fidelity.score"]) == pytest.approx(result.score)
    assert tags["fidelity.metric"] == "edge_f1" and tags["fidelity.protocol"] == result.protocol


def test_evaluate_scores_are_reproducible_outside_ray(evaluated, mlflow_server, fill50k_parquet, tmp_path):
    """Sample 2 again by hand: same pipeline, seed 0 + 2, canny, edge F1 -> the logged per-sample score."""
    import mlflow
    import pyarrow.parquet as pq

    from annotators import create
    from model.inference import generate, load_pipeline
    from model.registry import resolve_model
    from pipelines.common.images import decode_condition

    version, result = evaluated
    mlflow.set_tracking_uri(mlflow_server)
    resolved = resolve_model("eval-model", version=version, dest=tmp_path / "m")
    pipe = load_pipeline(resolved.base_model, [resolved.controlnet_dir])
    row = pq.read_table(fill50k_parquet).slice(2, 1).to_pylist()[0]
    condition = decode_condition(row["conditioning_image"], channels=1)[None]
    image = generate(pipe, [row["text"]], condition, seed=2, steps=2, guidance_scale=9.0)
    expected = edge_scores(create("canny")(image)[0], condition[0], tolerance=2)["edge_f1"]

    client = mlflow.MlflowClient(mlflow_server)
    table = json.loads(
        Path(client.download_artifacts(result.run_id, "evaluation/scores.json", str(tmp_path))).read_text()
    )
    logged = dict(zip(table["columns"], table["data"][2]))
    # The actor generated this row inside a batch (and with its own thread count): on CPU a few pixels
    # can differ by one level from a single call, which can flip a few canny edge pixels.
    assert logged["edge_f1"] == pytest.approx(expected, abs=0.05)


def test_evaluate_controlnet_pp_protocol(
    evaluated, mlflow_server, tiny_base, tiny_base_dir, fill50k_parquet, tmp_path
):
    """protocol=controlnet_pp: ControlNet++'s canny F1 (x 100) is the headline; the Fill50K mask IoU rides along;
    the protocol id differs from the zeroconv evaluation of the same data, so promotion never mixes them."""
    import mlflow

    from pipelines.evaluate import run_evaluate

    version = register_controlnet(tiny_base, tiny_base_dir, "eval-model-pp", seed=0, export_root=tmp_path)
    config = evaluate_config(
        mlflow_server, fill50k_parquet, "eval-model-pp", protocol="controlnet_pp", mask_iou="true"
    )
    result = run_evaluate(config)
    assert set(result.metrics) == {"canny_f1", "mask_iou", "baseline_canny_f1", "baseline_mask_iou"}
    assert result.metric == "canny_f1" and result.score == result.metrics["canny_f1"]
    assert 0.0 <= result.score <= 100.0 and 0.0 <= result.metrics["mask_iou"] <= 1.0
    assert result.protocol != evaluated[1].protocol
    tags = mlflow.MlflowClient(mlflow_server).get_model_version("eval-model-pp", version).tags
    assert tags["fidelity.metric"] == "canny_f1" and tags["fidelity.protocol"] == result.protocol


def test_evaluate_user_mistakes(evaluated, mlflow_server, fill50k_parquet, tmp_path):
    from pipelines.evaluate import run_evaluate

    with pytest.raises(ValueError, match="has no alias 'candidate'"):
        run_evaluate(evaluate_config(mlflow_server, fill50k_parquet, "no-such-model"))
    with pytest.raises(FileNotFoundError, match="held-out dataset .* does not exist"):
        run_evaluate(evaluate_config(mlflow_server, tmp_path / "missing", "eval-model"))
    with pytest.raises(ValueError, match="has no column 'cond_depth'"):
        run_evaluate(evaluate_config(mlflow_server, fill50k_parquet, "eval-model", condition_column="cond_depth"))


def test_heldout_rows_from_annotate_output(fill50k_parquet, tmp_path):
    """Annotate's layout (shards under data/, conditions as {bytes, path}, rejects beside) gives the scorer
    the same condition bytes as plain binary columns do."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.common.config import StorageConfig
    from pipelines.data.schema import DATA_DIR, REJECTS_DIR, image_column_from_bytes, shard_file_name
    from pipelines.evaluate import EvaluationSettings
    from pipelines.evaluate_data import read_heldout

    table = pq.read_table(fill50k_parquet).slice(0, 3)
    plain = table.column("conditioning_image").to_pylist()
    index = table.schema.get_field_index("conditioning_image")
    (tmp_path / DATA_DIR).mkdir()
    (tmp_path / REJECTS_DIR).mkdir()
    pq.write_table(
        table.set_column(index, "conditioning_image", image_column_from_bytes(plain)),
        tmp_path / DATA_DIR / shard_file_name(0, 1),
    )
    pq.write_table(pa.table({"id": ["x"], "reason": ["too_small"]}), tmp_path / REJECTS_DIR / "r.parquet")

    column, rows = read_heldout(EvaluationSettings(data=str(tmp_path), limit=8), "canny", StorageConfig())
    assert column == "conditioning_image" and rows.num_rows == 3
    assert rows.column("condition").to_pylist() == plain


def test_heldout_condition_column_must_hold_images(fill50k_parquet):
    from pipelines.common.config import StorageConfig
    from pipelines.evaluate import EvaluationSettings
    from pipelines.evaluate_data import read_heldout

    settings = EvaluationSettings(data=str(fill50k_parquet), condition_column="text", limit=2)
    with pytest.raises(ValueError, match="column 'text' is string, not encoded images"):
        read_heldout(settings, "canny", StorageConfig())
