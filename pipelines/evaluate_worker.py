"""The worker side of ``zeroconv evaluate``: an actor that holds the model's pipeline (and the
baseline's) and the model's own annotator, and turns batches of held-out rows into scores.

The driver (:mod:`pipelines.evaluate`) streams the rows through a pool of these actors
(``pipelines.common.cluster.run_actor_pool``); an actor on a node without the model downloads it there.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pipelines import fidelity
from pipelines.common.cluster import actor_device
from pipelines.common.config import StorageConfig
from pipelines.common.images import decode_condition, encode_png


@dataclass(frozen=True)
class EvalJob:
    """Everything an actor needs; pickled once per actor."""

    model_name: str
    model_version: str
    controlnet_dir: str
    unet_dir: str | None
    base_model: str
    tracking_uri: str
    annotator: dict
    scoring: fidelity.Scoring
    steps: int
    guidance_scale: float
    baseline: bool
    storage: StorageConfig
    control_mode: int | None = None  # a union ControlNet: the type of the conditions scored


def generate_and_score(
    pipe,
    annotator,
    scoring: fidelity.Scoring,
    prompts: list[str],
    conditions: np.ndarray | list[np.ndarray],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    conditioning_scale: float | list[float] = 1.0,
    references: np.ndarray | None = None,
    control_mode: int | None = None,
) -> tuple[np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Generate one image per (prompt, condition, seed), re-annotate it, score it against its condition
    (or ``references``, e.g. when ``conditions`` is a list, one per composed ControlNet): (images,
    re-annotations, one score dict per sample); ``control_mode`` for a union ControlNet. Evaluation, training's
    fidelity curve and bench/bench_experiments.py use this."""
    from model.inference import generate

    images = generate(
        pipe,
        prompts,
        conditions,
        seed=seeds,
        steps=steps,
        guidance_scale=guidance_scale,
        conditioning_scale=conditioning_scale,
        control_mode=control_mode,
    )
    maps = annotator(images)
    references = conditions if references is None else references
    return images, maps, [scoring(i, m, c) for i, m, c in zip(images, maps, references)]


class FidelityScorer:
    """Ray Data actor: generate -> re-annotate -> score, for the model and (optionally) the baseline."""

    def __init__(self, job: EvalJob):
        from annotators import from_spec
        from model.inference import load_pipeline

        self.job = job
        if not Path(job.controlnet_dir).is_dir():  # an actor on another node: fetch the model there
            job = self._download(job)
        device = actor_device()
        self.pipe = load_pipeline(
            job.base_model, [job.controlnet_dir], job.unet_dir, device=str(device), storage=job.storage
        )
        # The baseline needs the base UNet; only a model that unlocked the UNet has another one.
        self.baseline_pipe = None
        if job.baseline:
            self.baseline_pipe = (
                self.pipe
                if job.unet_dir is None
                else load_pipeline(job.base_model, [job.controlnet_dir], None, device=str(device), storage=job.storage)
            )
        spec = job.annotator
        # Exactly the annotator (parameters, weights by sha256) that made the training conditions.
        self.annotator = from_spec(spec, storage=job.storage)
        self.channels = int(spec.get("channels", self.annotator.channels))

    @staticmethod
    def _download(job: EvalJob) -> EvalJob:
        import mlflow

        from model.registry import resolve_model

        mlflow.set_tracking_uri(job.tracking_uri)
        local = resolve_model(job.model_name, version=job.model_version, dest=tempfile.mkdtemp(prefix="zc-eval-"))
        return replace(
            job, controlnet_dir=str(local.controlnet_dir), unet_dir=str(local.unet_dir) if local.unet_dir else None
        )

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        job = self.job
        conditions = np.stack([decode_condition(b, channels=self.channels) for b in batch["condition"]])
        prompts = [str(t) for t in batch["text"]]
        seeds = [int(s) for s in batch["seed"]]
        out: dict[str, np.ndarray] = {"index": batch["index"]}
        runs = [("", self.pipe, 1.0)] + ([("baseline_", self.baseline_pipe, 0.0)] if self.baseline_pipe else [])
        for prefix, pipe, conditioning_scale in runs:
            images, maps, scores = generate_and_score(
                pipe,
                self.annotator,
                job.scoring,
                prompts,
                conditions,
                seeds,
                job.steps,
                job.guidance_scale,
                conditioning_scale,
                control_mode=job.control_mode,
            )
            for key in scores[0]:
                out[prefix + key] = np.array([s[key] for s in scores], dtype=np.float64)
            out[prefix + "generated"] = np.array([encode_png(i) for i in images], dtype=object)
            out[prefix + "reannotated"] = np.array([encode_png(m) for m in maps], dtype=object)
        return out
