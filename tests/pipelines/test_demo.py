"""`zeroconv demo`, reduced: the whole chain on a few images and steps. Checks what it writes (the summary's
resolution and fidelity numbers, the condition | base | ControlNet grid, on disk and on MLflow), not how good
the numbers are: the full demo's numbers are measured in the README."""

from __future__ import annotations

import json

import numpy as np
import pytest


@pytest.mark.slow
def test_reduced_demo_writes_grid_and_fidelity_summary(tmp_path, ray_session, tiny_base_dir):
    import mlflow
    from PIL import Image

    from pipelines.demo import GRID_ARTIFACT, MODEL_NAME, DemoConfig, run_demo

    config = DemoConfig(
        work_dir=str(tmp_path / "demo"),
        base_model={"source": "tiny"},
        images=16,
        heldout=4,
        train_steps=4,
        batch_size=4,
        fidelity_every=2,
        sampling_steps=2,
        grid_rows=3,
        serve=False,
    )
    run_demo(config)

    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["resolution"] == 64  # the tiny base's native size: UNet sample 8 x VAE factor 8
    fidelity = summary["fidelity"]
    assert fidelity["metric"] == "edge_f1" and fidelity["samples"] == 4
    for key in ("controlnet", "no_control", "mask_iou", "mask_iou_no_control"):
        assert 0.0 <= fidelity[key] <= 1.0, (key, fidelity)
    # The grid: 3 rows of condition | base alone | with ControlNet, 64 px cells, 2 px gaps, shown at 4x.
    grid = np.asarray(Image.open(summary["grid"]))
    assert grid.shape == ((3 * 66 + 2) * 4, (3 * 66 + 2) * 4, 3)
    # Column 1 (base alone) and column 2 (with ControlNet) come from different generations.
    cell = 66 * 4
    assert not np.array_equal(grid[8:cell, cell + 8 : 2 * cell], grid[8:cell, 2 * cell + 8 : 3 * cell])

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'demo' / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    version = client.get_model_version_by_alias(MODEL_NAME, "candidate")
    assert str(version.version) == fidelity["model_version"]
    # The demo's recipe reached the training run (cubic sampling brought control sooner: docs/experiments.md).
    params = client.get_run(version.run_id).data.params
    assert params["timestep_sampling"] == "cubic"
    # It trained on the precomputed latents (the VAE and text encoder ran once, not in every step).
    assert params["data"] == str(tmp_path / "demo" / "precomputed")
    assert summary["pipeline"]["precompute"].startswith("16 rows encoded in 1 batches")
    artifacts = [a.path for a in client.list_artifacts(version.run_id, "demo")]
    assert GRID_ARTIFACT in artifacts
    # The training run's fidelity curve, scored at steps 2 and 4, and evaluate's own score (step 0) live on the
    # same run under different names: a curve read back on resume must not take evaluate's score for its own.
    curve = client.get_metric_history(version.run_id, "fidelity_curve/edge_f1")
    assert sorted(m.step for m in curve) == [2, 4]
    assert [m.step for m in client.get_metric_history(version.run_id, "fidelity/edge_f1")] == [0]
