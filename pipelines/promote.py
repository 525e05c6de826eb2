"""``zeroconv promote``: the promotion gate. The ``champion`` alias (what serving loads) moves to the
``candidate`` version only if the candidate's fidelity beats the champion's by ``margin``.

    zeroconv promote model=zeroconv-controlnet margin=0.01

Scores are the ``fidelity.*`` tags ``zeroconv evaluate`` puts on each model version: the headline
score of the annotator's family (edge F1, depth correlation, pose PCK, SSIM; higher is better) and
the id of the protocol it was measured under (data rows, seeds, steps, annotator, tolerances). Two
scores are compared only if metric and protocol agree; a version without a score is an error that
says which ``zeroconv evaluate`` to run, unless ``evaluate_missing=true`` evaluates it here.

Every decision is recorded: ``promotion.*`` tags on the candidate version, and a small MLflow run
(tag ``zeroconv.stage=promote``) holding both versions, both scores, the margin and the decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from pydantic import Field

from pipelines.common.config import ConfigError, JobConfig, MLflowConfig
from pipelines.evaluate import EvaluateConfig, EvaluationSettings, run_evaluate
from pipelines.fidelity_record import FidelityRecord, read_fidelity

PROMOTED, KEPT, ALREADY_CHAMPION = "promoted", "kept_champion", "already_champion"


class PromoteConfig(JobConfig):
    """Move the champion alias to the candidate version if its fidelity score beats the champion's
    by at least `margin` (or there is no champion). Example: zeroconv promote model=NAME"""

    model: str = Field(default="zeroconv-controlnet", description="Registered model name.")
    candidate_alias: str = Field(default="candidate", description="Alias of the version that asks for promotion.")
    champion_alias: str = Field(default="champion", description="Alias of the version in service.")
    margin: float = Field(
        default=0.01,
        ge=0,
        description="The candidate's score must exceed the champion's by at least this much "
        "(metric units, e.g. 0.01 F1).",
    )
    evaluate_missing: bool = Field(
        default=False,
        description="Evaluate a version that has no fidelity score yet (with `evaluation`) instead of failing.",
    )
    evaluation: EvaluationSettings = EvaluationSettings()
    mlflow: MLflowConfig = MLflowConfig()


@dataclass
class PromoteResult:
    model: str
    decision: str  # promoted | kept_champion | already_champion
    candidate_version: str
    champion_version: str | None  # the champion before this decision
    metric: str | None = None
    candidate_score: float | None = None
    champion_score: float | None = None
    margin: float = 0.0
    run_id: str | None = None  # the MLflow run recording the decision

    @property
    def promoted(self) -> bool:
        return self.decision == PROMOTED

    def __str__(self) -> str:
        m, c = self.model, self.candidate_version
        if self.decision == ALREADY_CHAMPION:
            return f"{m} v{c} is already the champion; nothing to do"
        if self.champion_score is None:
            head = f"promoted {m} v{c} to champion (there was none): {self.metric} {self.candidate_score:.4f}"
        else:
            gain = self.candidate_score - self.champion_score
            versus = (
                f"{self.metric} {self.candidate_score:.4f} vs {self.champion_score:.4f} (v{self.champion_version}), "
                f"gain {gain:+.4f}"
            )
            head = (
                f"promoted {m} v{c} to champion: {versus} >= margin {self.margin:g}"
                if self.promoted
                else f"kept {m} v{self.champion_version} as champion: candidate v{c} {versus} < margin {self.margin:g}"
            )
        return f"{head}\n  decision recorded: MLflow run {self.run_id}, tags promotion.* on v{c}"


def run_promote(config: PromoteConfig) -> PromoteResult:
    import mlflow

    from model.registry import set_alias
    from pipelines.common.tracking import connect, redact_uri, resolve_tracking_uri

    tracking_uri = resolve_tracking_uri(config.mlflow.tracking_uri, config.work_dir, must_exist=True)
    experiment_id = connect(tracking_uri, config.mlflow.experiment)
    client = mlflow.MlflowClient()
    if config.candidate_alias == config.champion_alias:
        raise ConfigError(f"candidate_alias and champion_alias are both {config.champion_alias!r}")
    candidate = _version(client, config.model, config.candidate_alias)
    if candidate is None:
        raise ValueError(
            f"registered model {config.model!r} has no version with alias {config.candidate_alias!r} in the "
            f"registry at {redact_uri(tracking_uri)} (train one with 'zeroconv train', or set candidate_alias, "
            "work_dir or mlflow.tracking_uri)"
        )
    champion = _version(client, config.model, config.champion_alias)
    if champion is not None and champion == candidate:
        return PromoteResult(config.model, ALREADY_CHAMPION, candidate, champion)

    candidate_record = _fidelity(config, candidate, tracking_uri, config.candidate_alias)
    champion_record = _fidelity(config, champion, tracking_uri, config.champion_alias) if champion else None
    if champion_record is not None:
        _check_comparable(config.model, candidate, candidate_record, champion, champion_record)
    promote = champion_record is None or candidate_record.score - champion_record.score >= config.margin
    if promote:
        set_alias(config.model, config.champion_alias, candidate)

    result = PromoteResult(
        model=config.model,
        decision=PROMOTED if promote else KEPT,
        candidate_version=candidate,
        champion_version=champion,
        metric=candidate_record.metric,
        candidate_score=candidate_record.score,
        champion_score=champion_record.score if champion_record else None,
        margin=config.margin,
    )
    result.run_id = _record(client, experiment_id, result, candidate_record.protocol)
    return result


def _version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _fidelity(config: PromoteConfig, version: str, tracking_uri: str, alias: str) -> FidelityRecord:
    record = read_fidelity(config.model, version)
    if record is not None:
        return record
    if not config.evaluate_missing:
        raise ValueError(
            f"{config.model} v{version} ({alias}) has no fidelity score yet: run "
            f"'zeroconv evaluate model={config.model} version={version} data=<held-out Parquet>' first "
            f"(use the same settings for every version you compare), or promote with evaluate_missing=true"
        )
    evaluate = EvaluateConfig(
        **config.evaluation.model_dump(),
        model=config.model,
        version=version,
        mlflow=config.mlflow.model_copy(update={"tracking_uri": tracking_uri}),
        work_dir=config.work_dir,
        storage=config.storage,
        ray=config.ray,
    )
    run_evaluate(evaluate)
    return read_fidelity(config.model, version)


def _check_comparable(name: str, candidate: str, cand: FidelityRecord, champion: str, champ: FidelityRecord) -> None:
    if cand.metric != champ.metric:
        raise ValueError(
            f"{name} v{candidate} is scored by {cand.metric} but champion v{champion} by {champ.metric} "
            "(different annotator families): their scores cannot be compared"
        )
    if cand.protocol != champ.protocol:
        raise ValueError(
            f"{name} v{candidate} and champion v{champion} were evaluated under different protocols "
            f"({cand.protocol} vs {champ.protocol}: data rows, seed, steps, annotator or tolerances differ). "
            f"Re-run 'zeroconv evaluate' on both with the same settings before promoting"
        )


def _record(client, experiment_id: str, result: PromoteResult, protocol: str) -> str:
    """The decision as tags on the candidate version and as a small run of its own; returns the run id."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    run = client.create_run(
        experiment_id,
        run_name=f"promote {result.model} v{result.candidate_version}",
        tags={"zeroconv.stage": "promote", "zeroconv.model": result.model, "decision": result.decision},
    )
    params = {
        "model": result.model,
        "candidate_version": result.candidate_version,
        "champion_version": result.champion_version or "none",
        "metric": result.metric,
        "margin": result.margin,
        "protocol": protocol,
    }
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    client.log_metric(run.info.run_id, "candidate_score", result.candidate_score)
    if result.champion_score is not None:
        client.log_metric(run.info.run_id, "champion_score", result.champion_score)
        client.log_metric(run.info.run_id, "gain", result.candidate_score - result.champion_score)
    client.set_terminated(run.info.run_id)
    tags = {
        "decision": result.decision,
        "champion_version": result.champion_version or "none",
        "champion_score": "none" if result.champion_score is None else repr(result.champion_score),
        "candidate_score": repr(result.candidate_score),
        "margin": repr(result.margin),
        "run_id": run.info.run_id,
        "time": now,
    }
    for key, value in tags.items():
        client.set_model_version_tag(result.model, result.candidate_version, f"promotion.{key}", value)
    return run.info.run_id
