"""Fidelity curves during training (``fidelity.*``): scored at the right steps, logged to MLflow, and the
convergence step computed from the logged values."""

from __future__ import annotations

import pytest

from pipelines.common.config import ConfigError
from pipelines.train_config import FidelityCurveConfig
from pipelines.train_fidelity import CONVERGED_TAG, converged_step, read_heldout_rows


def test_converged_step_is_the_first_score_above_twice_the_baseline():
    history = [(30, 0.9), (10, 0.3), (20, 0.41), (40, 0.2)]  # out of order, as a resumed curve may come back
    assert converged_step(history, baseline=0.2) == 20  # 0.41 > 0.4; step 10's 0.3 is not
    assert converged_step(history, baseline=0.4) == 30  # 0.9 > 0.8
    assert converged_step(history, baseline=0.5) is None  # 0.9 is not above 1.0
    assert converged_step([(10, 0.4)], baseline=0.2) is None  # exactly 2x is not "exceeded"
    assert converged_step([], baseline=0.1) is None


def test_fidelity_every_without_held_out_data_is_a_config_error():
    with pytest.raises((ConfigError, ValueError), match="fidelity.data"):
        FidelityCurveConfig(every=10)


def test_fidelity_curve_with_pretraining_is_a_config_error():
    from pipelines.train_config import TrainConfig

    with pytest.raises((ConfigError, ValueError), match="policy=pretrain"):
        TrainConfig(policy="pretrain", fidelity={"every": 10, "data": "runs/heldout"})
    TrainConfig(policy="pretrain")  # the curve off: fine


def test_held_out_rows_without_an_annotator_name_the_fix(fill50k_parquet):
    # fill50k_table's conditions are the true outlines: no annotator recorded on the column.
    with pytest.raises(ValueError, match="fidelity.annotator"):
        read_heldout_rows(FidelityCurveConfig(every=1, data=str(fill50k_parquet)), None)
    rows = read_heldout_rows(FidelityCurveConfig(every=1, data=str(fill50k_parquet), annotator="canny", limit=3), None)
    assert rows.annotator["name"] == "canny" and rows.seeds == [0, 1, 2]
    assert rows.conditions.shape == (3, 64, 64, 1) and rows.conditions.max() == 255  # canny: 1-channel maps


@pytest.mark.slow
def test_short_run_logs_the_curve_at_its_steps_and_the_convergence_step_from_them(
    tmp_path, ray_session, mlflow_server, fill50k_parquet
):
    import mlflow

    from pipelines.data.synthetic import write_fill50k_parquet
    from pipelines.train import run_train
    from tests.pipelines.test_train import train_config

    heldout = write_fill50k_parquet(tmp_path / "heldout", n=4, size=64, seed=99, shards=1)
    config = train_config(
        tmp_path,
        fill50k_parquet,
        mlflow_server,
        num_workers=1,
        cpus_per_worker=1,
        zero_stage=0,
        max_steps=5,
        lr=1e-3,
        checkpoint_every=5,
        num_validation=0,
        registered_model=None,
        fidelity={"every": 2, "data": str(heldout), "annotator": "canny", "limit": 4, "steps": 2, "mask_iou": True},
    )
    result = run_train(config)

    client = mlflow.MlflowClient(mlflow_server)
    history = {
        key: sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, key))
        for key in ("fidelity_curve/edge_f1", "fidelity_curve/mask_iou", "fidelity_curve/baseline_edge_f1", "loss")
    }
    assert [s for s, _ in history["fidelity_curve/edge_f1"]] == [2, 4]  # every 2 steps of 5
    assert [s for s, _ in history["fidelity_curve/mask_iou"]] == [2, 4]
    assert [s for s, _ in history["fidelity_curve/baseline_edge_f1"]] == [0]  # once, when the loop starts
    assert [s for s, _ in history["loss"]] == [1, 2, 3, 4, 5]  # next to the loss
    # fp32 at ZeRO stage 0: DeepSpeed clips without reporting the norm, so none is logged (not a false 0).
    assert client.get_metric_history(result.mlflow_run_id, "grad_norm") == []
    assert all(0.0 <= v <= 1.0 for _, v in history["fidelity_curve/edge_f1"] + history["fidelity_curve/mask_iou"])
    baseline = history["fidelity_curve/baseline_edge_f1"][0][1]
    expected = converged_step(history["fidelity_curve/edge_f1"], baseline)
    assert result.metrics["fidelity_metric"] == "edge_f1"
    assert result.metrics["fidelity_baseline"] == pytest.approx(baseline)
    assert result.metrics["fidelity_last"] == pytest.approx(history["fidelity_curve/edge_f1"][-1][1])
    assert result.metrics["fidelity_converged_step"] == expected
    tags = client.get_run(result.mlflow_run_id).data.tags
    assert tags.get(CONVERGED_TAG) == (None if expected is None else str(expected))
