"""``zeroconv evaluate``: does a registered ControlNet obey its conditions? Measured, logged to MLflow.

    zeroconv evaluate model=zeroconv-controlnet alias=candidate data=runs/heldout limit=64

For each of the first ``limit`` rows of a held-out annotated dataset, the model generates an image
from the row's condition and caption (seed ``seed + i`` for row i, fixed), the model's own annotator
(the spec stored with the model) re-annotates the image, and :mod:`pipelines.fidelity` scores the
re-annotation against the input condition. The same rows, prompts and seeds go through the base
model without control - the baseline, which shows how much of the score the ControlNet earns.

The baseline is the same pipeline with the base UNet and ``conditioning_scale=0``: zero residuals,
so it computes exactly what ``StableDiffusionPipeline`` computes from the same initial latents (a
test checks this), with no second copy of the sampling code.

This module is the driver. The rows come from :mod:`pipelines.evaluate_data`; generation runs on the
shared actor pool (``pipelines.common.cluster.run_actor_pool``): batches of rows stream through
:mod:`pipelines.evaluate_worker` actors that each hold the pipeline and the annotator (GPU actors with
``compute.use_gpu``). Results go to the model's own MLflow run: ``fidelity/*`` metrics, a grid image
(condition | generated | re-annotated | baseline | baseline re-annotated) and a per-sample table; and
the model version gets ``fidelity.*`` tags (:mod:`pipelines.fidelity_record`), which
``zeroconv promote`` reads. How to read the numbers: docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from pydantic import AliasChoices, Field

from pipelines import fidelity
from pipelines.common.cluster import ActorCompute
from pipelines.common.config import JobConfig, MLflowConfig, PathStr, Section
from pipelines.common.images import decode_condition, decode_rgb
from pipelines.common.storage import resolve
from pipelines.evaluate_data import read_heldout
from pipelines.evaluate_worker import EvalJob, FidelityScorer
from pipelines.fidelity_record import FidelityRecord, record_fidelity

GRID_ARTIFACT = "evaluation/grid.png"
TABLE_ARTIFACT = "evaluation/scores.json"
PROTOCOL_ARTIFACT = "evaluation/protocol.json"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class EvaluationSettings(Section):
    """What is measured and how: two scores are comparable only if these agree (see ``protocol``)."""

    data: PathStr = Field(
        default="runs/heldout", description="Held-out annotated Parquet (not trained on), local or s3://."
    )
    condition_column: str | None = Field(
        default=None,
        validation_alias=AliasChoices("condition_column", "conditioning_image_column"),
        description="Condition column. Default: conditioning_image, else cond_<the model's annotator>.",
    )
    caption_column: str = Field(default="text", description="Caption column (Hugging Face datasets: often 'text').")
    limit: int = Field(default=64, ge=1, description="Evaluate the dataset's first N rows.")
    seed: int = Field(default=0, description="Row i is generated with seed + i, for the model and the baseline alike.")
    steps: int | None = Field(default=None, ge=1, description="DDIM steps. Default: the model's inference default.")
    guidance_scale: float | None = Field(
        default=None, ge=0, description="CFG scale. Default: the model's inference default."
    )
    edge_tolerance: int = Field(
        default=2, ge=0, description="Edge annotators: pixels an edge may be off and still match."
    )
    edge_threshold: int = Field(
        default=128, ge=1, le=255, description="Edge annotators: a map value >= this is an edge."
    )
    pose_tolerance: float = Field(
        default=0.05, gt=0, description="Pose annotators: a keypoint matches within this fraction of the image size."
    )
    protocol: fidelity.Protocol = Field(
        default="zeroconv",
        description="Metrics: zeroconv (ours, per annotator family) or controlnet_pp (ControlNet++'s: canny F1, "
        "HED/lineart MS-SSIM, depth RMSE).",
    )
    mask_iou: bool = Field(
        default=False, description="Fill50K-style data: also score the filled circle's mask IoU (image vs condition)."
    )
    baseline: bool = Field(
        default=True, description="Also score the base model without control, same seeds and prompts."
    )
    grid_samples: int = Field(default=8, ge=0, description="Samples shown in the logged grid image.")
    compute: ActorCompute = ActorCompute()


class EvaluateConfig(EvaluationSettings, JobConfig):
    """Generate from held-out conditions, re-annotate, score the agreement; log it on the model's MLflow
    run and tag the model version (what 'zeroconv promote' compares)."""

    model: str = Field(default="zeroconv-controlnet", description="Registered model name.")
    alias: str = Field(
        default="candidate", description="Alias of the version to evaluate (ignored if version is set)."
    )
    version: str | None = Field(
        default=None, description="Model version to evaluate. Default: the one alias points to."
    )
    mlflow: MLflowConfig = MLflowConfig()


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


@dataclass
class EvaluateResult:
    model: str
    version: str
    run_id: str
    annotator: str
    metric: str
    score: float
    baseline_score: float | None
    metrics: dict[str, float]  # mean of every per-sample score; baseline ones prefixed baseline_
    samples: int
    protocol: str
    seconds: float

    def __str__(self) -> str:
        lines = [
            f"evaluated {self.model} v{self.version} on {self.samples} held-out samples "
            f"({self.annotator} conditions; protocol {self.protocol}) in {self.seconds:.1f} s",
            f"  {'metric':<16}{'model':>9}{'no control':>12}",
        ]
        for key, value in self.metrics.items():
            if key.startswith("baseline_"):
                continue
            base = self.metrics.get("baseline_" + key)
            mark = "  <- headline (promotion compares this)" if key == self.metric else ""
            lines.append(f"  {key:<16}{value:>9.4f}{'' if base is None else f'{base:>12.4f}'}{mark}")
        lines.append(f"  logged on MLflow run {self.run_id}: metrics fidelity/*, {GRID_ARTIFACT}, {TABLE_ARTIFACT}")
        return "\n".join(lines)


def protocol_of(settings: dict) -> str:
    """A short id of everything that decides a score's value; equal ids mean comparable scores."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def evaluation_grid(columns: list[list[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Rows of equally sized uint8 maps (1 or 3 channels) -> one RGB image with ``pad`` px gaps."""

    def rgb(cell: np.ndarray) -> np.ndarray:
        cell = cell if cell.ndim == 3 else cell[..., None]
        return np.repeat(cell, 3, axis=-1) if cell.shape[-1] == 1 else cell

    rows = [[rgb(c) for c in row] for row in columns]
    h, w = rows[0][0].shape[:2]
    n_rows, n_cols = len(rows), len(rows[0])
    grid = np.full((n_rows * (h + pad) + pad, n_cols * (w + pad) + pad, 3), 128, np.uint8)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            top, left = pad + r * (h + pad), pad + c * (w + pad)
            grid[top : top + h, left : left + w] = cell
    return grid


def _mean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


@dataclass
class Target:
    """One condition type to score: a plain ControlNet has one; a union ControlNet one per trained column, each
    with its own annotator (re-annotating generated images) and control mode (what the pipeline is told)."""

    prefix: str  # of its metric names: "" or "<annotator>/"
    annotator: dict
    condition_column: str | None
    control_mode: int | None = None


def targets_of(config: EvaluateConfig, metadata: dict, name: str) -> list[Target]:
    union = metadata.get("union")
    if union:
        if config.condition_column:
            raise ValueError(f"{name} is a union ControlNet: each of its columns is scored; unset condition_column")
        return [Target(f"{e['annotator']['name']}/", e["annotator"], e["column"], e["control_mode"]) for e in union]
    spec = metadata.get("annotator")
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(
            f"{name} does not say which annotator made its conditions "
            "(no 'annotator' in its metadata), so its outputs cannot be re-annotated and scored"
        )
    return [Target("", spec, config.condition_column)]


@dataclass
class Scored:
    """One target's outcome: the protocol settings, the rows, and every per-sample output column."""

    target: Target
    scoring: fidelity.Scoring
    settings: dict
    rows: object  # pyarrow Table of the held-out rows
    results: dict[str, list]

    @property
    def score_keys(self) -> list[str]:
        return [k for k in self.results if k != "index" and not k.endswith(("generated", "reannotated"))]


def score_target(config: EvaluateConfig, resolved, target: Target, tracking_uri: str) -> Scored:
    """Generate, re-annotate and score the held-out rows of one target's condition column."""
    from model.inference import InferenceDefaults

    spec = target.annotator
    column, rows = read_heldout(
        config.model_copy(update={"condition_column": target.condition_column}), spec["name"], config.storage
    )
    defaults = InferenceDefaults.recorded(resolved.metadata)
    steps = config.steps or defaults.steps
    guidance = config.guidance_scale if config.guidance_scale is not None else defaults.guidance_scale
    scoring = fidelity.Scoring(
        annotator=spec["name"],
        protocol=config.protocol,
        edge_tolerance=config.edge_tolerance,
        edge_threshold=config.edge_threshold,
        pose_tolerance=config.pose_tolerance,
        mask_iou=config.mask_iou,
    )
    settings = {
        "data": resolve(config.data, config.storage).uri,
        "condition_column": column,
        "samples": rows.num_rows,
        "ids_sha256": hashlib.sha256("\n".join(rows.column("id").to_pylist()).encode()).hexdigest(),
        "seed": config.seed,
        "steps": steps,
        "guidance_scale": guidance,
        "annotator": {k: spec.get(k) for k in ("name", "version", "params")},
        **({"control_mode": target.control_mode} if target.control_mode is not None else {}),
        **scoring.settings(),
    }
    job = EvalJob(
        model_name=config.model,
        model_version=resolved.version,
        controlnet_dir=str(resolved.controlnet_dir),
        unet_dir=str(resolved.unet_dir) if resolved.unet_dir else None,
        base_model=resolved.base_model,
        tracking_uri=tracking_uri,
        annotator=spec,
        scoring=scoring,
        steps=steps,
        guidance_scale=guidance,
        baseline=config.baseline,
        storage=config.storage,
        control_mode=target.control_mode,
    )
    return Scored(target, scoring, settings, rows, _score_on_ray(config, job, rows))


def log_target(client, run_id: str, scored: Scored, config: EvaluateConfig) -> None:
    """The per-sample table and the grid of one target (under evaluation/<annotator>/ for a union model)."""
    rows, results, folder = scored.rows, scored.results, scored.target.prefix
    table = {
        "index": results["index"],
        "id": rows.column("id").to_pylist(),
        "text": rows.column("text").to_pylist(),
        "seed": rows.column("seed").to_pylist(),
        **{k: results[k] for k in scored.score_keys},
    }
    client.log_table(run_id, table, artifact_file=TABLE_ARTIFACT.replace("evaluation/", f"evaluation/{folder}"))
    conditions = rows.column("condition").to_pylist()
    image_columns = ["generated", "reannotated"] + (
        ["baseline_generated", "baseline_reannotated"] if config.baseline else []
    )
    channels = int(scored.target.annotator.get("channels", 3))
    grid_rows = [
        [decode_condition(conditions[i], channels=channels)] + [decode_rgb(results[c][i]) for c in image_columns]
        for i in range(min(config.grid_samples, rows.num_rows))
    ]
    if grid_rows:
        grid = GRID_ARTIFACT.replace("evaluation/", f"evaluation/{folder}")
        client.log_image(run_id, evaluation_grid(grid_rows), artifact_file=grid)


def run_evaluate(config: EvaluateConfig) -> EvaluateResult:
    """Score a registered ControlNet; a union ControlNet on each of its condition types, one after the other
    (metrics ``fidelity/<annotator>/...``; its headline is the mean of the types' headlines, ``union_mean``)."""
    import mlflow
    from mlflow.entities import Metric

    from model.registry import resolve_model
    from pipelines.common.tracking import connect, resolve_tracking_uri

    started = time.perf_counter()
    tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri, config.work_dir, must_exist=True)
    connect(tracking_uri, config.mlflow.experiment)
    download = tempfile.mkdtemp(prefix="zc-evaluate-")
    try:
        resolved = resolve_model(config.model, alias=config.alias, version=config.version, dest=download)
        targets = targets_of(config, resolved.metadata, f"{config.model} v{resolved.version}")
        scored = [score_target(config, resolved, target, tracking_uri) for target in targets]
    finally:
        shutil.rmtree(download, ignore_errors=True)

    metrics: dict[str, float] = {}
    for one in scored:  # baseline ones keep their prefix first: baseline_canny/edge_f1
        metrics.update({_prefixed(one.target.prefix, k): _mean(one.results[k]) for k in one.score_keys})
    if len(scored) == 1:
        headline, settings = scored[0].scoring.headline, scored[0].settings
    else:
        headline, settings = "union_mean", {"union": [one.settings for one in scored]}
        for prefix in ("", "baseline_"):
            values = [metrics.get(prefix + one.target.prefix + one.scoring.headline) for one in scored]
            if all(v is not None for v in values):
                metrics[prefix + headline] = _mean(values)
    protocol = protocol_of(settings)
    samples = sum(one.rows.num_rows for one in scored)
    record = FidelityRecord(
        score=metrics[headline],
        metric=headline,
        protocol=protocol,
        samples=samples,
        baseline_score=metrics.get("baseline_" + headline),
    )

    mlflow_metrics = {f"fidelity/{k}": v for k, v in metrics.items()}
    mlflow_metrics.update({"fidelity/score": record.score, "fidelity/samples": float(record.samples)})
    if record.baseline_score is not None:
        mlflow_metrics["fidelity/baseline_score"] = record.baseline_score
    # On the model's own run, by id (not the fluent active run): the model and its scores stay together.
    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(resolved.run_id, metrics=[Metric(k, v, now, 0) for k, v in mlflow_metrics.items()])
    client.log_dict(resolved.run_id, {"protocol": protocol, "headline": headline, **settings}, PROTOCOL_ARTIFACT)
    for one in scored:
        log_target(client, resolved.run_id, one, config)
    record_fidelity(config.model, resolved.version, record)
    return EvaluateResult(
        model=config.model,
        version=resolved.version,
        run_id=resolved.run_id,
        annotator=", ".join(one.scoring.annotator for one in scored),
        metric=headline,
        score=record.score,
        baseline_score=record.baseline_score,
        metrics=metrics,
        samples=samples,
        protocol=protocol,
        seconds=time.perf_counter() - started,
    )


def _prefixed(prefix: str, key: str) -> str:
    """canny/ + baseline_edge_f1 -> baseline_canny/edge_f1: baseline metrics keep one leading marker."""
    return f"baseline_{prefix}{key[len('baseline_') :]}" if key.startswith("baseline_") else prefix + key


def _score_on_ray(config: EvaluateConfig, job: EvalJob, rows) -> dict[str, list]:
    """Stream the rows through the scorer actors; collect every output column, in row order."""
    from pipelines.common.cluster import run_actor_pool, storage_runtime_env

    # An actor on another node downloads the model itself: it needs the S3 and MLflow settings too.
    batches = run_actor_pool(
        FidelityScorer,
        rows.to_pylist(),
        compute=config.compute,
        ray_config=config.ray,
        constructor_kwargs={"job": job},
        rows_per_call=config.compute.batch_size,
        runtime_env=storage_runtime_env() or None,
        progress=lambda batch: len(batch["index"]),
        total=rows.num_rows,
        desc="evaluate",
        unit="sample",
    )
    collected: dict[str, list] = {}
    for batch in batches:
        for key, values in batch.items():
            collected.setdefault(key, []).extend(values.tolist())
    order = np.argsort(collected["index"])
    return {k: [v[i] for i in order] for k, v in collected.items()}
