"""Training on the simulated cluster: 2 workers pinned to the `gpu_train` node type by its custom
resource; a train node lost mid-run; the same run resumed on a different worker count."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from pipelines.common.config import BaseModelConfig, MLflowConfig
from pipelines.train import TrainConfig, run_train
from tests.cluster.harness import train_worker_nodes, wait_for

pytestmark = pytest.mark.cluster

RUN = "cluster-run"
CHECKPOINT_EVERY = 2


def train_config(work: Path, data: Path, mlflow_uri: str, **overrides) -> TrainConfig:
    values = dict(
        data=str(data),
        work_dir=str(work),  # the fake nodes share this machine's disk; on AWS it is s3://
        base_model=BaseModelConfig(source="tiny"),
        run_name=RUN,
        num_workers=2,
        cpus_per_worker=0.5,  # the other half of a train node's CPU decodes the dataset
        ray={"resources": {"train_gpu": 1}},  # one worker per gpu_train node
        batch_size=2,
        max_steps=10,
        lr=1e-3,
        checkpoint_every=CHECKPOINT_EVERY,
        keep_checkpoints=2,
        max_failures=3,
        log_every=1,
        validate_every=0,
        num_validation=0,
        registered_model=None,
        mlflow=MLflowConfig(tracking_uri=mlflow_uri, experiment="cluster-train"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def loss_history(mlflow_uri: str, run_id: str) -> list[tuple[int, float]]:
    import mlflow

    return [(m.step, m.value) for m in mlflow.MlflowClient(mlflow_uri).get_metric_history(run_id, "loss")]


def committed_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train has registered (not merely a directory being uploaded)."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    text = snapshot.read_text()
    return sorted({p.name for p in run_dir.glob("checkpoint_*") if p.name in text})


def zero_conv_weights(controlnet_dir: str) -> torch.Tensor:
    """The ControlNet's output convolutions: zero at initialisation, grown by every optimizer step."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(controlnet_dir)
    blocks = [*net.controlnet_down_blocks, net.controlnet_mid_block]
    return torch.cat([p.detach().flatten() for b in blocks for p in b.parameters()])


@pytest.fixture(scope="module")
def trained_through_a_node_loss(fake_cluster, mlflow_server, fill50k_parquet, tmp_path_factory):
    """A 2-worker run on gpu_train nodes that loses one of them after its second checkpoint."""
    work = tmp_path_factory.mktemp("train")
    config = train_config(work, fill50k_parquet, mlflow_server)
    run_dir = work / "train" / RUN
    outcome: dict = {}
    earlier = set(train_worker_nodes())  # workers of other runs on this cluster (the submitted pipeline's)

    def workers() -> dict[str, str]:
        return {actor: node for actor, node in train_worker_nodes().items() if actor not in earlier}

    def train() -> None:
        try:
            outcome["result"] = run_train(config)
        except BaseException as exc:
            outcome["error"] = exc

    job = threading.Thread(target=train, daemon=True)
    job.start()
    wait_for(lambda: len(committed_checkpoints(run_dir)) >= 2 or "error" in outcome, 900, "two checkpoints")
    if "error" in outcome:
        raise outcome["error"]
    committed = committed_checkpoints(run_dir)
    before = workers()
    victim = next(iter(before.values()))
    fake_cluster.kill_node(victim)
    job.join(timeout=900)
    assert not job.is_alive(), "training did not finish after the node loss"
    if "error" in outcome:
        raise outcome["error"]
    return {
        "config": config,
        "result": outcome["result"],
        "committed_at_kill": int(committed[-1].rsplit("_", 1)[1]),
        "victim": victim,
        "nodes_before": set(before.values()),
        "nodes_after": set(workers().values()),
        "export": zero_conv_weights(outcome["result"].controlnet_dir),
    }


def test_train_on_pinned_nodes_recovers_from_a_lost_node(fake_cluster, mlflow_server, trained_through_a_node_loss):
    run = trained_through_a_node_loss
    result = run["result"]
    assert result.steps == 10
    # Workers ran on gpu_train nodes only: the custom resource pinned them.
    assert {fake_cluster.node_type(n) for n in run["nodes_after"]} == {"gpu_train"}
    assert len(run["nodes_before"]) == 2 and run["victim"] in run["nodes_before"]
    assert run["nodes_after"] - run["nodes_before"], "no worker was restarted on a new node"
    # Step history: every step present; the steps up to the checkpoint committed before the loss ran once
    # (the group restored from it, not from step 0); only steps after it may have run twice.
    steps = [s for s, _ in loss_history(mlflow_server, result.mlflow_run_id)]
    assert sorted(set(steps)) == list(range(1, 11)), steps
    committed = run["committed_at_kill"]
    assert all(steps.count(s) == 1 for s in range(1, committed + 1)), steps
    assert all(steps.count(s) <= 2 for s in steps), steps
    # The export is a stock diffusers ControlNet that has trained.
    assert run["export"].abs().max() > 0


def test_resume_on_fewer_workers_continues_the_run(fake_cluster, mlflow_server, trained_through_a_node_loss):
    """The same run (same run_name, storage) continued on 1 worker from the 2-worker checkpoint."""
    run = trained_through_a_node_loss
    first = run["result"]
    second = run_train(run["config"].model_copy(update={"num_workers": 1, "max_steps": 14}))

    assert second.steps == 14 and second.mlflow_run_id == first.mlflow_run_id
    history = loss_history(mlflow_server, second.mlflow_run_id)
    resumed = [s for s, _ in history if s > 10]
    assert resumed == [11, 12, 13, 14], history  # continued at step 11, not restarted at 1
    # Continued from the trained weights: the zero convolutions kept (roughly) their size after 4 more
    # steps; a restart from the initial (zero) weights would have a fraction of it.
    before, after = run["export"], zero_conv_weights(second.controlnet_dir)
    assert after.norm() > 0.8 * before.norm(), (float(after.norm()), float(before.norm()))
    losses = [v for s, v in history if s > 10]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert json.loads((Path(second.controlnet_dir) / "config.json").read_text())["_class_name"] == "ControlNetModel"
