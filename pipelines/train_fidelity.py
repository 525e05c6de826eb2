"""Fidelity curves: how well the ControlNet obeys its conditions, measured while it trains.

The ControlNet paper reports "sudden convergence": the model ignores its condition for thousands of
steps, then follows it within a few hundred. The loss hardly shows it; a fidelity score does. With
``fidelity.every`` > 0, rank 0 scores the current weights every that many steps on the first
``fidelity.limit`` rows of a held-out dataset the way ``zeroconv evaluate`` does (generate with fixed
seeds -> re-annotate with the data's annotator -> :mod:`pipelines.fidelity`'s zeroconv scores) and logs
``fidelity_curve/<score>`` to MLflow next to the loss. The no-control baseline (the same pipeline at
conditioning scale 0: the base alone) is scored once when the loop starts, as
``fidelity_curve/baseline_<score>``.

The first scored step whose headline (edge F1 for edge annotators) exceeds twice the baseline's is the
run's convergence step: MLflow tag ``zeroconv.fidelity.converged_step`` and ``fidelity_converged_step``
in the run's summary. A resumed run reads the curve so far back from MLflow.

Every rank calls :meth:`FidelityCurve.after_step` (under ZeRO-3 the weights are gathered from all of
them); only rank 0 holds a :class:`FidelityProbe` and generates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.checkpoint import full_state_dict, master_weights, sub_state_dict
from pipelines.fidelity import Scoring
from pipelines.train_config import FidelityCurveConfig, TrainConfig

CONVERGED_TAG = "zeroconv.fidelity.converged_step"
CONVERGENCE_FACTOR = 2.0  # "converged": the headline score exceeds this many times the no-control baseline
PREFIX = "fidelity_curve/"  # not evaluate's fidelity/*: both are logged on the same (the model's) run


def converged_step(history: list[tuple[int, float]], baseline: float) -> int | None:
    """The first step of ``history`` ((step, headline) pairs) whose score exceeds CONVERGENCE_FACTOR x baseline."""
    return next((step for step, value in sorted(history) if value > CONVERGENCE_FACTOR * baseline), None)


def denoiser_from_weights(weights: dict, model):
    """A fresh copy of ``model``'s denoiser holding the ``denoiser.*`` weights of a full state dict of ``model``."""
    denoiser = type(model.denoiser).from_config(model.denoiser.config)
    denoiser.load_state_dict(sub_state_dict(weights, "denoiser."))
    return denoiser


def pipeline_from_weights(weights: dict, model, base):
    """A generation pipeline over ``base`` with the ControlNet and denoiser of a full state dict of ``model``."""
    from model.inference import build_pipeline

    controlnet = type(model.controlnets[0]).from_config(model.controlnets[0].config)
    controlnet.load_state_dict(sub_state_dict(weights, "controlnets.0."))
    return build_pipeline(base, [controlnet.to(base.device)], denoiser_from_weights(weights, model).to(base.device))


# ---------------------------------------------------------------------------------------------
# The held-out rows
# ---------------------------------------------------------------------------------------------


@dataclass
class HeldOutRows:
    annotator: dict  # the spec of the annotator that re-annotates generated images
    prompts: list[str]
    conditions: np.ndarray  # uint8 (N, H, W, C), C: the annotator's channels
    seeds: list[int]


def heldout_annotator(settings: FidelityCurveConfig, storage) -> dict:
    """``fidelity.annotator``'s spec, else the one recorded on the held-out dataset's condition column."""
    from annotators import create
    from pipelines.data.dataset import annotator_spec, open_dataset
    from pipelines.data.schema import SINGLE_CONDITION_COLUMN

    if settings.annotator:
        return create(settings.annotator).spec()
    _, _, dataset, _ = open_dataset(settings.data, storage, what="held-out dataset (fidelity.data)")
    column = settings.condition_column or SINGLE_CONDITION_COLUMN
    spec = annotator_spec(dataset.schema, column) if column in dataset.schema.names else None
    if spec is None:
        raise ValueError(
            f"held-out dataset {settings.data!r} records no annotator on a column {column!r}, so generated images "
            "cannot be re-annotated: set fidelity.annotator (e.g. canny) or fidelity.condition_column"
        )
    return spec


def read_heldout_rows(settings: FidelityCurveConfig, storage) -> HeldOutRows:
    """The rows every scoring uses (the driver reads them once to fail early; rank 0 again to score)."""
    from pipelines.common.images import decode_condition
    from pipelines.evaluate_data import read_heldout

    spec = heldout_annotator(settings, storage)
    _, rows = read_heldout(settings, spec["name"], storage)
    channels = int(spec.get("channels", 3))
    return HeldOutRows(
        annotator=spec,
        prompts=rows.column("text").to_pylist(),
        conditions=np.stack([decode_condition(b, channels=channels) for b in rows.column("condition").to_pylist()]),
        seeds=rows.column("seed").to_pylist(),
    )


# ---------------------------------------------------------------------------------------------
# Rank 0: score, log, find the convergence step
# ---------------------------------------------------------------------------------------------


class FidelityProbe:
    """Rank 0's scorer: the held-out rows, the annotator, the curve so far."""

    def __init__(self, settings: FidelityCurveConfig, rows: HeldOutRows, model, base, tracker, step: int):
        from annotators import from_spec

        self.settings, self.rows, self.model, self.base, self.tracker = settings, rows, model, base, tracker
        self.annotator = from_spec(rows.annotator)
        self.scoring = Scoring(annotator=rows.annotator["name"], mask_iou=settings.mask_iou)
        self.metric = self.scoring.headline
        # A resumed run continues its curve: the scores logged before the checkpoint it resumed from.
        self.history = [(s, v) for s, v in tracker.metric_history(PREFIX + self.metric) if s <= step]
        self.baseline: float | None = None
        self.converged: int | None = None

    def scores(self, weights: dict, conditioning_scale: float) -> dict[str, float]:
        """Mean of each score over the held-out rows for the model in ``weights``."""
        from pipelines.evaluate_worker import generate_and_score

        pipe = pipeline_from_weights(weights, self.model, self.base)
        _, _, per_sample = generate_and_score(
            pipe,
            self.annotator,
            self.scoring,
            self.rows.prompts,
            self.rows.conditions,
            self.rows.seeds,
            self.settings.steps,
            self.settings.guidance_scale,
            conditioning_scale,
        )
        return {key: float(np.nanmean([s[key] for s in per_sample])) for key in per_sample[0]}

    def score_baseline(self, weights: dict, step: int) -> None:
        scores = self.scores(weights, conditioning_scale=0.0)
        self.baseline = scores[self.metric]
        self.tracker.log_metrics({f"{PREFIX}baseline_{k}": v for k, v in scores.items()}, step)
        self.converged = converged_step(self.history, self.baseline)

    def score(self, weights: dict, step: int) -> None:
        scores = self.scores(weights, conditioning_scale=1.0)
        self.tracker.log_metrics({PREFIX + k: v for k, v in scores.items()}, step)
        self.history.append((step, scores[self.metric]))
        if self.converged is None and (found := converged_step(self.history, self.baseline)) is not None:
            self.converged = found
            self.tracker.set_tags({CONVERGED_TAG: str(found)})

    def summary(self) -> dict:
        last = max(self.history)[1] if self.history else None
        return {
            "fidelity_metric": self.metric,
            "fidelity_baseline": self.baseline,
            "fidelity_last": last,
            "fidelity_converged_step": self.converged,
        }


# ---------------------------------------------------------------------------------------------
# Every rank: the loop's one call
# ---------------------------------------------------------------------------------------------


class FidelityCurve:
    """What the loop holds. Off (``every`` 0) it does nothing; on, every rank joins the weight gather at
    scored steps and rank 0's probe scores them."""

    def __init__(self, every: int = 0, probe: FidelityProbe | None = None):
        self.every, self.probe = every, probe

    @classmethod
    def start(cls, config: TrainConfig, model, base, engine, tracker, rank: int, step: int) -> FidelityCurve:
        """Off, or on with the no-control baseline scored (all ranks call: the weights are gathered)."""
        if not config.fidelity.every:
            return cls()
        probe = None
        if rank == 0:
            rows = read_heldout_rows(config.fidelity, config.storage)
            probe = FidelityProbe(config.fidelity, rows, model, base, tracker, step)
        curve = cls(config.fidelity.every, probe)
        curve._with_weights(engine, lambda weights: probe.score_baseline(weights, step))
        return curve

    def after_step(self, step: int, engine) -> None:
        if self.every and step % self.every == 0:
            self._with_weights(engine, lambda weights: self.probe.score(weights, step))

    def _with_weights(self, engine, use) -> None:
        weights = full_state_dict(engine, master_weights(engine))  # collective; None except on rank 0
        if weights is not None:
            use(weights)

    def summary(self) -> dict:
        """For the run's summary (rank 0; empty when off)."""
        return self.probe.summary() if self.probe else {}
