"""``zeroconv train``: train a ControlNet on annotated Parquet with Ray Train + DeepSpeed.

The driver (this module) checks everything a user can get wrong before any worker starts (dataset,
condition column, image sizes, policy, precision, tracking server), opens or resumes the MLflow run,
then starts a ``TorchTrainer`` whose workers run :func:`pipelines.train_loop.train_loop`, each reading
its share of the Parquet files in a resumable order (:mod:`pipelines.train_data`).
When the workers finish, the exported ControlNet is logged as a pyfunc model and registered with the
alias ``candidate``.

Re-running with the same ``run_name`` and ``storage_path`` resumes from the latest checkpoint (and the
same MLflow run); a worker that dies mid-run is restarted from the latest checkpoint up to
``max_failures`` times.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from model.families import FAMILIES
from pipelines.checkpoint import SUMMARY_FILE
from pipelines.common.config import ConfigError, flatten
from pipelines.common.storage import download_dir, is_s3, resolve
from pipelines.data.dataset import DatasetInfo, annotator_spec, dataset_manifests, inspect_dataset, open_dataset
from pipelines.data.schema import (
    ANNOTATED_FORMAT,
    CONDITION_PREFIX,
    ORIGINAL_HEIGHT,
    ORIGINAL_WIDTH,
    PROMPT_PREFIX,
    TENSOR_COLUMNS,
)
from pipelines.train_config import TrainConfig


@dataclass
class TrainResult:
    run_name: str
    steps: int
    metrics: dict
    checkpoint: str | None
    controlnet_dir: str | None  # None for policy=pretrain: the UNet alone trains
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
        ]
        if self.controlnet_dir:
            lines.append(f"  controlnet: {self.controlnet_dir}")
        if self.unet_dir:
            lines.append(f"  unet:       {self.unet_dir}")
        if self.metrics.get("fidelity_last") is not None:
            converged = self.metrics.get("fidelity_converged_step")
            lines.append(
                f"  fidelity:   {self.metrics['fidelity_metric']} {self.metrics['fidelity_last']:.3f} "
                f"(no control {self.metrics['fidelity_baseline']:.3f}); "
                + (f"above 2x no control from step {converged}" if converged else "not yet above 2x no control")
            )
        lines.append(f"  checkpoint: {self.checkpoint}")
        lines.append(f"  mlflow run: {self.mlflow_run_id}")
        if self.registered_model:
            lines.append(f"  registered: models:/{self.registered_model}@candidate (version {self.model_version})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def check_annotation_finished(config: TrainConfig) -> None:
    """An annotated dataset (or batch folder of one) whose ``zeroconv annotate`` run stopped part-way is
    refused (it would silently train on a part of the data), unless ``allow_incomplete_data``."""
    if config.allow_incomplete_data:
        return
    for folder, manifest in dataset_manifests(config.data, config.storage).items():
        if manifest.get("format") == ANNOTATED_FORMAT and manifest.get("status") != "complete":
            shards = manifest.get("shards", {})
            raise ValueError(
                f"dataset {folder!r} is not finished: its annotate manifest says {manifest.get('status')!r} "
                f"({shards.get('done', '?')} of {shards.get('total', '?')} shards); re-run 'zeroconv annotate' "
                "to finish it, or set allow_incomplete_data=true"
            )


def resolve_config(config: TrainConfig, has_gpu_nodes: bool) -> TrainConfig:
    """Fill in the automatic fields, so the workers and MLflow see exactly what runs. Nothing here sizes
    the run from the cluster as it is now: on an autoscaling cluster the workers do not exist yet."""
    from pipelines.common.tracking import resolve_tracking_uri

    use_gpu = has_gpu_nodes if config.use_gpu is None else config.use_gpu
    precision = ("bf16" if use_gpu else "fp32") if config.precision == "auto" else config.precision
    if precision == "fp16" and not use_gpu:
        raise ConfigError("precision fp16 is not supported on CPU (DeepSpeed refuses it); use fp32 or bf16")
    tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri, config.work_dir)
    return config.model_copy(
        update={
            "use_gpu": use_gpu,
            "precision": precision,
            "storage_path": config.storage_path or f"{config.work_dir.rstrip('/')}/train",
            "mlflow": config.mlflow.model_copy(update={"tracking_uri": tracking_uri}),
        }
    )


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """What each worker reserves: its CPUs, a GPU if used, and the custom resources of ``ray.resources``
    (e.g. {train_gpu: 1} to land on a node type of an autoscaling cluster)."""
    return {"CPU": config.cpus_per_worker, **({"GPU": 1.0} if config.use_gpu else {}), **config.ray.resources}


def check_fits_fixed_cluster(resources: dict[str, float], num_workers: int, nodes: list[dict]) -> None:
    """On a cluster that cannot grow (a local Ray), a request no node can hold would wait forever: refuse it,
    naming what is missing. ``nodes``: the alive nodes' total resources."""
    fits = [min(int(node.get(k, 0) // v) for k, v in resources.items() if v > 0) for node in nodes]
    if sum(fits) >= num_workers:
        return
    if not any(fits):
        missing = sorted(k for k, v in resources.items() if not any(node.get(k, 0) >= v for node in nodes))
        offered = ", ".join(f"{k}={max(node.get(k, 0) for node in nodes):g}" for k in missing)
        raise ConfigError(
            f"no node of this Ray cluster can hold one training worker: it needs "
            f"{', '.join(f'{k}={resources[k]:g}' for k in missing)} (the largest node has {offered}); "
            "lower cpus_per_worker / ray.resources, or use a cluster that offers them"
        )
    raise ConfigError(
        f"this Ray cluster can hold {sum(fits)} training worker(s) of {resources}, not num_workers={num_workers}"
    )


def scaling_config(config: TrainConfig, resources: dict[str, float]):
    """Ray Train's ScalingConfig: a fixed worker count, or with ``min_workers`` an elastic one (Ray Train V2
    starts with what fits, at least min_workers, and restarts the group from the latest checkpoint at another
    size as nodes join or go; the data order and checkpoints do not depend on the worker count)."""
    from ray.train import ScalingConfig

    workers = config.num_workers if config.min_workers is None else (config.min_workers, config.num_workers)
    return ScalingConfig(num_workers=workers, use_gpu=config.use_gpu, resources_per_worker=resources)


def check_base_supports(config: TrainConfig) -> None:
    """policy=pretrain and the objective's options exist only for some families (Family.check_training): fail here,
    in one line, not in every worker. Only when one is asked for: naming the family resolves the base's files."""
    if config.policy == "pretrain" or config.snr_gamma or config.offset_noise or config.timestep_sampling != "uniform":
        from model.families import family_of, resolve

        base_dir = resolve(config.base_model.source, config.storage)
        family_of(base_dir).check_training(
            config.policy, config.snr_gamma, config.offset_noise, config.timestep_sampling
        )


def resolve_union(config: TrainConfig) -> tuple[TrainConfig, list[dict]]:
    """union=true: the condition columns (as named, or every cond_<annotator> column of the dataset), each with
    the annotator spec its field records and that annotator's union control mode (the family's one map); and
    the config with them filled in, condition_column being the first (validation rows, the recorded annotator)."""
    from model.families import family_of
    from model.families import resolve as resolve_base

    family = family_of(resolve_base(config.base_model.source, config.storage))
    if not family.union_types:
        raise ValueError(f"union=true: {family.name} base models have no ControlNet-Union (only sdxl)")
    schema = open_dataset(config.data, config.storage)[2].schema
    columns = config.condition_columns or [c for c in schema.names if c.startswith(CONDITION_PREFIX)]
    if not columns:
        raise ValueError(
            f"union=true: dataset {config.data!r} has no {CONDITION_PREFIX}<annotator> columns (annotate with several "
            f"annotators, or name the columns in condition_columns); its columns are {', '.join(schema.names)}"
        )
    missing = [c for c in columns if c not in schema.names]
    if missing or len(set(columns)) < len(columns):
        what = f"has no column {', '.join(map(repr, missing))}" if missing else "names a column twice"
        raise ValueError(
            f"condition_columns: dataset {config.data!r} {what}; its columns are {', '.join(schema.names)}"
        )
    union = []
    for column in columns:
        spec = annotator_spec(schema, column)
        if not spec or not spec.get("name"):
            raise ValueError(
                f"union=true: column {column!r} of {config.data!r} does not record the annotator that made it "
                "(zeroconv annotate records it), so its union type is unknown"
            )
        mode = family.union_mode(spec["name"])
        union.append(
            {"column": column, "annotator": spec, "control_mode": mode, "control_type": family.union_types[mode]}
        )
    return config.model_copy(update={"condition_column": columns[0], "condition_columns": columns}), union


def run_train(config: TrainConfig) -> TrainResult:
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from pipelines.common import console, tracking
    from pipelines.common.cluster import ensure_ray, storage_runtime_env
    from pipelines.common.tracking import check_tracking_server, resolve_tracking_uri
    from pipelines.train_data import TrainFiles
    from pipelines.train_fidelity import read_heldout_rows
    from pipelines.train_loop import LoopInputs, train_loop

    # Everything a user can get wrong fails here, before a worker starts.
    config, union = resolve_union(config) if config.union else (config, [])
    data = inspect_dataset(config)
    check_annotation_finished(config)
    check_base_supports(config)
    if config.fidelity.every:  # the held-out rows and their annotator, read as rank 0 will read them
        read_heldout_rows(config.fidelity, config.storage)
    check_tracking_server(resolve_tracking_uri(config.mlflow.tracking_uri, config.work_dir))
    ensure_ray(config.ray)
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    config = resolve_config(config, has_gpu_nodes=any(node.get("GPU", 0) > 0 for node in nodes))
    resources = worker_resources(config)
    if not (config.ray.address or os.environ.get("RAY_ADDRESS")):  # a local Ray: these nodes are all there is
        check_fits_fixed_cluster(resources, config.min_workers or config.num_workers, nodes)
    storage = resolve(config.storage_path, config.storage)
    run_dir = storage.join(config.run_name)
    tracking_uri = config.mlflow.tracking_uri
    run_id = tracking.open_run(tracking_uri, config.mlflow.experiment, run_dir, config.run_name, flatten(config))

    try:
        precomputed = data.scaling_factor is not None
        # Names as the files have them; the workers read rows as image / text (pipelines.data.dataset.canonical).
        # A precomputed dataset's prompt tensors: text_embedding plus the family's others (prompt_*).
        prompts = [c for c in data.columns if c.startswith(PROMPT_PREFIX)] if precomputed else []
        columns = [*(TENSOR_COLUMNS if precomputed else (data.image_column,)), *prompts, data.caption_column]
        columns += config.condition_columns or [config.condition_column]
        # Optional: ids (the debug hooks' sample log) and the original image sizes (SDXL's size conditioning).
        columns += [c for c in ("id", ORIGINAL_WIDTH, ORIGINAL_HEIGHT) if c in data.columns]
        inputs = LoopInputs(
            config=config,
            files=TrainFiles.open(
                data.files, data.location.fs, columns, data.image_column, data.caption_column, data.format
            ),
            tracking_uri=tracking_uri,
            run_id=run_id,
            run_dir=run_dir.uri,
            validation={**data.validation, "control_mode": union[0]["control_mode"] if union else None},
            union_modes=[entry["control_mode"] for entry in union],
            scaling_factor=data.scaling_factor,
            resolution=data.resolution[::-1],  # (width, height) -> (height, width)
        )
        # Ray Train requests the workers' resources and waits for them: on an autoscaling cluster the
        # autoscaler adds the nodes (a request no node type can satisfy shows as infeasible in `ray status`).
        trainer = TorchTrainer(
            partial(train_loop, inputs),
            scaling_config=scaling_config(config, resources),
            run_config=RunConfig(
                name=config.run_name,
                storage_path=storage.path if is_s3(storage.uri) else storage.uri,
                storage_filesystem=storage.fs if is_s3(storage.uri) else None,
                failure_config=FailureConfig(max_failures=config.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=config.keep_checkpoints),
                worker_runtime_env=storage_runtime_env(),
            ),
        )
        # The workers log the loss to MLflow by step; the driver reads it back for the terminal.
        with (
            console.progress(config.max_steps, "train", "step") as bar,
            tracking.follow_metric(tracking_uri, run_id, bar),
        ):
            with sigint_restored():
                result = trainer.fit()
        export = run_dir.join("export")
        final = json.loads(export.join(SUMMARY_FILE).read_bytes())  # rank 0 wrote it with the export
        family = FAMILIES[final.pop("family")]
        unet_dir = export.join(family.denoiser_name).uri if config.policy != "locked" else None
        controlnet_dir = export.join("controlnet").uri if config.policy != "pretrain" else None
        # A pretrained denoiser is a base model, not a ControlNet: nothing to register as one.
        version = (
            register(config, data, final["step"], run_id, controlnet_dir, unet_dir, family.name, union)
            if controlnet_dir
            else None
        )
    except BaseException:
        tracking.close_run(tracking_uri, run_id, ok=False)
        raise
    tracking.close_run(tracking_uri, run_id, ok=True)
    return TrainResult(
        run_name=config.run_name,
        steps=int(final.pop("step")),
        metrics=final,
        checkpoint=result.checkpoint.path if result.checkpoint else None,
        controlnet_dir=controlnet_dir,
        unet_dir=unet_dir,
        mlflow_run_id=run_id,
        registered_model=(config.registered_model or None) if controlnet_dir else None,
        model_version=version,
        unet_params_changed=final.pop("unet_params_changed"),
    )


@contextmanager
def sigint_restored():
    """Ray Train's ``fit`` installs its own Ctrl-C handler in the driver (abort the run) and leaves it there: a
    process that goes on after training (the pipeline, the demo, a notebook) would then never see a
    KeyboardInterrupt again. Put back what was there before."""
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread() and previous is not None:
            signal.signal(signal.SIGINT, previous)


def recorded_base_model(source: str) -> str:
    """How the registered model names its base: a local directory as its absolute path (``~`` expanded),
    anything else (``tiny``, ``s3://``, a hub id) as given."""
    local = Path(source).expanduser()
    return str(local.resolve()) if local.exists() else source


STEPS_TAG = "zeroconv.steps"  # on a registered version: the training step it was exported at


def registered_version(name: str, run_id: str, steps: int) -> str | None:
    """The version this run already registered at ``steps`` (a re-run of a finished training), if any."""
    import mlflow

    versions = mlflow.MlflowClient().search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    return next((v.version for v in versions if v.tags.get(STEPS_TAG) == str(steps)), None)


def register(
    config: TrainConfig,
    data: DatasetInfo,
    steps: int,
    run_id: str,
    controlnet_uri: str,
    unet_uri: str | None,
    family: str,
    union: list[dict],
) -> str | None:
    """Log the export as a pyfunc model on the training run; register it with alias 'candidate' - once:
    re-running a finished training returns the version it registered. A union model records each condition
    column with its annotator and control mode (``union``); ``annotator`` is then the first column's."""
    import mlflow

    from model.inference import InferenceDefaults
    from model.registry import log_controlnet_model

    name = config.registered_model or None
    if name and (existing := registered_version(name, run_id, steps)):
        return str(existing)
    metadata = {
        "base_model": recorded_base_model(config.base_model.source),
        "family": family,
        "annotator": data.annotator,
        "condition_column": config.condition_column,
        "inference": vars(InferenceDefaults()),
        "resolution": list(data.resolution),
        "policy": config.policy,
        **({"union": union} if union else {}),
        "training": {"run_name": config.run_name, "steps": steps, "mlflow_run_id": run_id},
    }
    with tempfile.TemporaryDirectory(prefix="zeroconv-register-") as tmp:

        def local(uri: str | None) -> str | None:  # MLflow logs artifacts from local files
            return str(download_dir(uri, Path(tmp) / Path(uri).name, config.storage)) if uri and is_s3(uri) else uri

        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = log_controlnet_model(local(controlnet_uri), metadata, name, unet_dir=local(unet_uri))
    if not name:
        return None
    version = str(info.registered_model_version)
    mlflow.MlflowClient().set_model_version_tag(name, version, STEPS_TAG, str(steps))
    return version
