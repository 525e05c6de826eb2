"""``zeroconv train``: train a ControlNet on annotated Parquet with Ray Train + DeepSpeed.

The driver (this module) checks everything a user can get wrong before any worker starts (dataset,
condition column, image sizes, policy, precision, tracking server), opens or resumes the MLflow run,
then hands the dataset to a ``TorchTrainer`` whose workers run :func:`pipelines.train_loop.train_loop`.
When the workers finish, the exported ControlNet is logged as a pyfunc model and registered with the
alias ``candidate``.

Re-running with the same ``run_name`` and ``storage_path`` resumes from the latest checkpoint (and the
same MLflow run); a worker that dies mid-run is restarted from the latest checkpoint up to
``max_failures`` times.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.checkpoint import SUMMARY_FILE
from pipelines.common.config import ConfigError, flatten
from pipelines.common.storage import Location, download_dir, is_s3, resolve
from pipelines.data.dataset import DatasetInfo, inspect_dataset, read_rows
from pipelines.data.schema import TENSOR_COLUMNS
from pipelines.train_config import TrainConfig

IN_MEMORY_BYTES = 512 * 2**20  # decoded datasets up to this size are kept in the object store


@dataclass
class TrainResult:
    run_name: str
    steps: int
    metrics: dict
    checkpoint: str | None
    controlnet_dir: str
    unet_dir: str | None
    mlflow_run_id: str
    registered_model: str | None = None
    model_version: str | None = None
    unet_params_changed: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"trained {self.run_name!r} for {self.steps} steps "
            f"(loss {self.metrics.get('loss', float('nan')):.4f}, "
            f"{self.metrics.get('samples_per_s', 0):.1f} samples/s)",
            f"  controlnet: {self.controlnet_dir}",
        ]
        if self.unet_dir:
            lines.append(f"  unet:       {self.unet_dir}")
        lines.append(f"  checkpoint: {self.checkpoint}")
        lines.append(f"  mlflow run: {self.mlflow_run_id}")
        if self.registered_model:
            lines.append(f"  registered: models:/{self.registered_model}@candidate (version {self.model_version})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def resolve_config(config: TrainConfig, cluster_gpus: float) -> TrainConfig:
    """Fill in the automatic fields, so the workers and MLflow see exactly what runs."""
    from pipelines.common.tracking import resolve_tracking_uri

    use_gpu = cluster_gpus > 0 if config.use_gpu is None else config.use_gpu
    if use_gpu and cluster_gpus < config.num_workers:
        raise ConfigError(f"use_gpu needs {config.num_workers} GPU(s); the Ray cluster has {cluster_gpus:g}")
    precision = ("bf16" if use_gpu else "fp32") if config.precision == "auto" else config.precision
    if precision == "fp16" and not use_gpu:
        raise ConfigError("precision fp16 is not supported on CPU (DeepSpeed refuses it); use fp32 or bf16")
    tracking_uri = config.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if tracking_uri is None and is_s3(config.work_dir):
        raise ConfigError(
            "work_dir is on S3: set mlflow.tracking_uri (the default SQLite store needs a local work_dir)"
        )
    return config.model_copy(
        update={
            "use_gpu": use_gpu,
            "precision": precision,
            "storage_path": config.storage_path or f"{config.work_dir.rstrip('/')}/train",
            "mlflow": config.mlflow.model_copy(
                update={"tracking_uri": resolve_tracking_uri(tracking_uri, config.work_dir)}
            ),
        }
    )


def run_train(config: TrainConfig) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.common import tracking
    from pipelines.common.cluster import ensure_ray, storage_runtime_env
    from pipelines.common.tracking import check_tracking_server, resolve_tracking_uri
    from pipelines.train_loop import train_loop

    # Everything a user can get wrong fails here, before a worker starts.
    data = inspect_dataset(config)
    check_tracking_server(resolve_tracking_uri(config.mlflow.tracking_uri, config.work_dir))
    ensure_ray(config.ray)
    config = resolve_config(config, ray.cluster_resources().get("GPU", 0))
    storage = resolve(config.storage_path, config.storage)
    run_dir = storage.join(config.run_name)
    tracking_uri = config.mlflow.tracking_uri
    run_id = tracking.open_run(tracking_uri, config.mlflow.experiment, run_dir, config.run_name, flatten(config))

    try:
        dataset = training_dataset(data, config)
        resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {}), **config.ray.resources}
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={
                "config": config.model_dump(mode="json"),
                "tracking_uri": tracking_uri,
                "run_id": run_id,
                "validation": data.validation,
                "export_uri": run_dir.join("export").uri,
                "scaling_factor": data.scaling_factor,
                "failure_marker": failure_marker(config, run_dir),
            },
            scaling_config=ScalingConfig(
                num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=resources
            ),
            run_config=RunConfig(
                name=config.run_name,
                storage_path=storage.path if is_s3(storage.uri) else storage.uri,
                storage_filesystem=storage.fs if is_s3(storage.uri) else None,
                failure_config=FailureConfig(max_failures=config.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                worker_runtime_env=storage_runtime_env(),
            ),
            datasets={"train": dataset},
        )
        result = trainer.fit()
        export = run_dir.join("export")
        final = json.loads(export.join(SUMMARY_FILE).read_bytes())  # rank 0 wrote it with the export
        unet_dir = export.join("unet").uri if config.policy != "locked" else None
        version = register(config, data, final["step"], run_id, export.join("controlnet").uri, unet_dir)
    except BaseException:
        tracking.close_run(tracking_uri, run_id, ok=False)
        raise
    tracking.close_run(tracking_uri, run_id, ok=True)
    return TrainResult(
        run_name=config.run_name,
        steps=int(final.pop("step")),
        metrics=final,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        controlnet_dir=export.join("controlnet").uri,
        unet_dir=unet_dir,
        mlflow_run_id=run_id,
        registered_model=config.registered_model or None,
        model_version=version,
        unet_params_changed=final.pop("unet_params_changed"),
    )


def training_dataset(data: DatasetInfo, config: TrainConfig, max_in_memory: int = IN_MEMORY_BYTES):
    """Ray Data: read the Parquet files, decode images and conditions (uint8 arrays) in Ray tasks; or,
    for a precomputed dataset, read its tensor columns.

    A small dataset is decoded once, kept in the object store and chained for as many epochs as the
    run needs: restarting a streaming read per epoch costs about a second, which dominates when an
    epoch is a few batches. A large one streams; the train loop starts a new pass per epoch."""

    from pipelines.data.tensors import decode_batch

    if data.scaling_factor is not None:  # precomputed: tensors as stored; conditions are decoded per step
        dataset = read_rows(data, [*TENSOR_COLUMNS, "text", config.condition_column])
    else:
        dataset = read_rows(data, ["image", "text", config.condition_column]).map_batches(
            decode_batch, fn_kwargs={"condition_column": config.condition_column}, batch_size=64, batch_format="numpy"
        )
    if not data.row_bytes or data.rows * data.row_bytes > max_in_memory:
        return dataset
    epochs = math.ceil(config.max_steps * config.effective_batch / data.rows) + 1
    dataset = dataset.materialize()
    return dataset.union(*[dataset] * (epochs - 1)) if epochs > 1 else dataset


def failure_marker(config: TrainConfig, run_dir: Location) -> str | None:
    """Where the ``fail_at_step`` hook records that it fired (so it fires once per run)."""
    if config.fail_at_step is None:
        return None
    if is_s3(run_dir.uri):
        return str(
            Path(tempfile.gettempdir()) / f"zeroconv-failure-{hashlib.sha256(run_dir.uri.encode()).hexdigest()[:16]}"
        )
    return str(Path(run_dir.path) / "failure_injected")


def register(
    config: TrainConfig, data: DatasetInfo, steps: int, run_id: str, controlnet_uri: str, unet_uri: str | None
) -> str | None:
    """Log the export as a pyfunc model on the training run; register it with alias 'candidate'."""
    import mlflow

    from model.inference import InferenceDefaults
    from model.registry import log_controlnet_model

    source = config.base_model.source
    metadata = {
        "base_model": str(Path(source).resolve()) if Path(source).expanduser().exists() else source,
        "annotator": data.annotator,
        "condition_column": config.condition_column,
        "inference": vars(InferenceDefaults()),
        "resolution": list(data.resolution),
        "policy": config.policy,
        "training": {"run_name": config.run_name, "steps": steps, "mlflow_run_id": run_id},
    }
    with tempfile.TemporaryDirectory(prefix="zeroconv-register-") as tmp:

        def local(uri: str | None) -> str | None:  # MLflow logs artifacts from local files
            return str(download_dir(uri, Path(tmp) / Path(uri).name, config.storage)) if uri and is_s3(uri) else uri

        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = log_controlnet_model(
                local(controlnet_uri), metadata, config.registered_model or None, unet_dir=local(unet_uri)
            )
    return str(info.registered_model_version) if config.registered_model else None
