"""`zeroconv train` resumes: a worker killed mid-run, and a run continued on fewer workers (tiny model,
real MLflow server, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.train import run_train
from tests.pipelines.test_train import metric_steps, train_config


def trained_samples(record_dir: Path) -> dict[int, list[str]]:
    """Sample ids per step over all ranks, from the debug recorder (one micro-batch per step); a step
    replayed after a restart counts once, with what it trained on the last time."""
    per_step: dict[int, list[str]] = {}
    for file in sorted(record_dir.glob("samples_rank*.jsonl")):
        last = {entry["step"]: entry["ids"] for entry in map(json.loads, file.read_text().splitlines())}
        for step, ids in last.items():
            per_step.setdefault(step, []).extend(ids)
    return per_step


@pytest.mark.slow
def test_worker_killed_mid_run_resumes_where_it_stopped_and_rerun_continues(
    tmp_path, ray_session, mlflow_server, fill50k_parquet
):
    """Rank 1 dies (os._exit) right before step 6, once; the checkpoint at step 4 is the latest committed.
    32 rows, 2 workers x batch 2 = 4 samples a step: an epoch is 8 steps. The resumed run continues the
    epoch where the checkpoint left it: over steps 1-8 every sample is trained on exactly once."""
    import pyarrow.parquet as pq

    config = train_config(
        tmp_path,
        fill50k_parquet,
        mlflow_server,
        max_steps=8,
        checkpoint_every=2,
        shuffle_buffer=8,
        max_failures=1,
        validate_every=0,
        num_validation=0,
        ema=True,
        registered_model=None,
        debug={"fail_at_step": 6, "record_samples": str(tmp_path / "samples")},
    )
    first = run_train(config)

    assert (tmp_path / "work" / "train" / "test-run" / "failure_injected").exists(), "the failure never happened"
    assert first.steps == 8
    # Every step logged once per attempt: 1-5 by the first worker group, 5-8 again by the restarted one
    # (step 5 trained after the step-4 checkpoint and before the crash is trained again).
    assert metric_steps(mlflow_server, first.mlflow_run_id) == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    samples = trained_samples(tmp_path / "samples")
    assert sorted(samples) == list(range(1, 9)) and all(len(ids) == 4 for ids in samples.values())
    epoch = [i for step in range(1, 9) for i in samples[step]]
    assert sorted(epoch) == sorted(pq.read_table(fill50k_parquet, columns=["id"]).column("id").to_pylist())
    assert first.model_version is None

    # Re-running the same run name continues it (same checkpoints, same MLflow run) into the next epoch.
    second = run_train(config.model_copy(update={"max_steps": 10}))
    assert second.steps == 10
    assert second.mlflow_run_id == first.mlflow_run_id
    assert metric_steps(mlflow_server, second.mlflow_run_id)[-2:] == [9, 10]


@pytest.mark.slow
def test_resumes_on_fewer_workers_with_weights_and_schedule_intact(
    tmp_path, ray_session, mlflow_server, fill50k_parquet
):
    """2 workers train 4 steps (ZeRO-2, 10 warmup steps); the same run continues on 1 worker. The
    checkpoint is world-size-free: at step 4 the 1-worker group holds exactly the weights the 2 workers
    saved, and steps 5-6 continue the step history, the lr warmup and the loss."""
    import mlflow
    from safetensors.torch import load_file

    config = train_config(
        tmp_path,
        fill50k_parquet,
        mlflow_server,
        max_steps=4,
        checkpoint_every=4,
        warmup_steps=10,
        validate_every=0,
        num_validation=0,
        registered_model=None,
    )
    two = run_train(config)
    saved = load_file(Path(two.controlnet_dir) / "diffusion_pytorch_model.safetensors")

    one = run_train(config.model_copy(update={"num_workers": 1, "cpus_per_worker": 1}))  # nothing left to train
    assert one.steps == 4 and one.mlflow_run_id == two.mlflow_run_id
    restored = load_file(Path(one.controlnet_dir) / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)

    longer = run_train(config.model_copy(update={"num_workers": 1, "cpus_per_worker": 1, "max_steps": 6}))
    assert longer.steps == 6
    client = mlflow.MlflowClient(mlflow_server)
    assert metric_steps(mlflow_server, longer.mlflow_run_id) == [1, 2, 3, 4, 5, 6]
    lrs = {m.step: m.value for m in client.get_metric_history(longer.mlflow_run_id, "lr_controlnet")}
    # After step k the warmup is at k/10 of lr 1e-4: it continues at 5/10, 6/10 (a restart would give 1/10).
    assert [lrs[k] for k in (4, 5, 6)] == pytest.approx([4e-5, 5e-5, 6e-5])
    losses = {m.step: m.value for m in client.get_metric_history(longer.mlflow_run_id, "loss")}
    before = np.mean([losses[s] for s in (1, 2, 3, 4)])
    assert all(np.isfinite(losses[s]) and losses[s] < 3 * before for s in (5, 6)), losses
