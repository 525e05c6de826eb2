"""The fidelity score a model version carries: MLflow model-version tags ``fidelity.*``.

``zeroconv evaluate`` writes them (:func:`record_fidelity`); ``zeroconv promote`` reads them
(:func:`read_fidelity`) and compares two versions only if their metric and protocol agree.
"""

from __future__ import annotations

from dataclasses import dataclass

TAG_PREFIX = "fidelity."


@dataclass(frozen=True)
class FidelityRecord:
    """A version's headline fidelity: ``score`` of ``metric`` (higher is better) under ``protocol``."""

    score: float
    metric: str
    protocol: str
    samples: int
    baseline_score: float | None = None

    def tags(self) -> dict[str, str]:
        tags = {
            "score": repr(self.score),
            "metric": self.metric,
            "protocol": self.protocol,
            "samples": str(self.samples),
        }
        if self.baseline_score is not None:
            tags["baseline_score"] = repr(self.baseline_score)
        return {TAG_PREFIX + k: v for k, v in tags.items()}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> "FidelityRecord | None":
        if TAG_PREFIX + "score" not in tags:
            return None
        baseline = tags.get(TAG_PREFIX + "baseline_score")
        return cls(
            score=float(tags[TAG_PREFIX + "score"]),
            metric=tags[TAG_PREFIX + "metric"],
            protocol=tags[TAG_PREFIX + "protocol"],
            samples=int(tags[TAG_PREFIX + "samples"]),
            baseline_score=float(baseline) if baseline is not None else None,
        )


def record_fidelity(name: str, version: str, record: FidelityRecord) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for key, value in record.tags().items():
        client.set_model_version_tag(name, str(version), key, value)


def read_fidelity(name: str, version: str) -> FidelityRecord | None:
    import mlflow

    return FidelityRecord.from_tags(mlflow.MlflowClient().get_model_version(name, str(version)).tags)
