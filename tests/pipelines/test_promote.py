"""The promotion gate against a real MLflow server: no champion, beats the margin, falls short, missing
or incomparable scores, evaluation on the fly; and that every decision is recorded."""

from __future__ import annotations

import pytest
from test_evaluate import register_controlnet  # same folder: the one way tests register a tiny model


@pytest.fixture(scope="module")
def registry(mlflow_server, tiny_base, tiny_base_dir, tmp_path_factory):
    """``register(name, score=None, protocol="p1") -> version``: a new version of ``name``, alias candidate.

    The gate reads only registry metadata, so versions re-register one logged tiny ControlNet
    (``mlflow.register_model``, as a user re-registering a model would) instead of logging a model
    each time; ``register.distinct(name, seed)`` logs a model of its own, for tests that evaluate.
    """
    import mlflow

    from model.registry import set_alias
    from pipelines.common.tracking import connect
    from pipelines.fidelity_record import FidelityRecord, record_fidelity

    connect(mlflow_server, "promote-tests")
    root = tmp_path_factory.mktemp("exports")
    source_version = register_controlnet(tiny_base, tiny_base_dir, "gate-source", 0, root)
    source = mlflow.MlflowClient().get_model_version("gate-source", source_version).source

    def register(name: str, score: float | None = None, protocol: str = "p1") -> str:
        version = str(mlflow.register_model(source, name).version)
        set_alias(name, "candidate", version)
        if score is not None:  # the scores evaluate would record, set with evaluate's own function
            record_fidelity(name, version, FidelityRecord(score=score, metric="edge_f1", protocol=protocol, samples=4))
        return version

    register.distinct = lambda name, seed: register_controlnet(tiny_base, tiny_base_dir, name, seed, root)
    return register


def _promote(tracking_uri: str, name: str, **extra):
    from pipelines.common.config import load_config
    from pipelines.promote import PromoteConfig, run_promote

    overrides = {"mlflow.tracking_uri": tracking_uri, "mlflow.experiment": "promote-tests", "model": name, **extra}
    return run_promote(load_config(PromoteConfig, None, [f"{k}={v}" for k, v in overrides.items()]))


def _champion(name: str) -> str | None:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, "champion").version
    except MlflowException:
        return None


def _decision_run(run_id: str):
    import mlflow

    return mlflow.MlflowClient().get_run(run_id)


def test_first_candidate_becomes_champion(registry, mlflow_server):
    import mlflow

    v1 = registry("gate-first", score=0.30)
    result = _promote(mlflow_server, "gate-first")
    assert result.promoted and _champion("gate-first") == v1
    assert result.champion_version is None and "there was none" in str(result)
    tags = mlflow.MlflowClient().get_model_version("gate-first", v1).tags
    assert tags["promotion.decision"] == "promoted" and tags["promotion.champion_version"] == "none"
    run = _decision_run(result.run_id)
    assert run.data.tags["zeroconv.stage"] == "promote" and run.data.metrics["candidate_score"] == 0.30
    # Promoting again is a no-op.
    assert _promote(mlflow_server, "gate-first").decision == "already_champion"


def test_candidate_beating_the_margin_takes_over(registry, mlflow_server):
    import mlflow

    v1 = registry("gate-win", score=0.30)
    _promote(mlflow_server, "gate-win")
    v2 = registry("gate-win", score=0.35)
    result = _promote(mlflow_server, "gate-win", margin=0.02)
    assert result.promoted and _champion("gate-win") == v2
    assert (result.candidate_version, result.champion_version) == (v2, v1)
    assert "promoted gate-win v2 to champion: edge_f1 0.3500 vs 0.3000 (v1), gain +0.0500 >= margin 0.02" in str(
        result
    )
    run = _decision_run(result.run_id)
    assert run.data.params["champion_version"] == v1 and run.data.params["margin"] == "0.02"
    assert run.data.metrics["champion_score"] == 0.30 and run.data.metrics["candidate_score"] == 0.35
    tags = mlflow.MlflowClient().get_model_version("gate-win", v2).tags
    assert (tags["promotion.decision"], float(tags["promotion.champion_score"])) == ("promoted", 0.30)


def test_candidate_below_the_margin_is_not_promoted(registry, mlflow_server):
    import mlflow

    v1 = registry("gate-lose", score=0.30)
    _promote(mlflow_server, "gate-lose")
    v2 = registry("gate-lose", score=0.305)
    result = _promote(mlflow_server, "gate-lose", margin=0.01)
    assert not result.promoted and result.decision == "kept_champion"
    assert _champion("gate-lose") == v1
    assert "kept gate-lose v1 as champion: candidate v2 edge_f1 0.3050 vs 0.3000" in str(result)
    tags = mlflow.MlflowClient().get_model_version("gate-lose", v2).tags
    assert tags["promotion.decision"] == "kept_champion" and tags["promotion.run_id"] == result.run_id
    assert _decision_run(result.run_id).data.tags["decision"] == "kept_champion"


def test_missing_or_incomparable_scores_are_clear_errors(registry, mlflow_server):
    registry("gate-unscored")
    with pytest.raises(
        ValueError,
        match=r"v1 \(candidate\) has no fidelity score yet: run 'zeroconv evaluate "
        r"model=gate-unscored version=1",
    ):
        _promote(mlflow_server, "gate-unscored")
    assert _champion("gate-unscored") is None

    registry("gate-mismatch", score=0.3, protocol="p1")
    _promote(mlflow_server, "gate-mismatch")
    registry("gate-mismatch", score=0.9, protocol="p2")
    with pytest.raises(ValueError, match="different protocols"):
        _promote(mlflow_server, "gate-mismatch")
    assert _champion("gate-mismatch") == "1"

    with pytest.raises(ValueError, match="no version with alias 'candidate'"):
        _promote(mlflow_server, "gate-nobody")


def test_evaluate_missing_scores_on_the_fly(registry, ray_session, mlflow_server, fill50k_parquet):
    from pipelines.fidelity_record import read_fidelity

    v1 = registry.distinct("gate-auto", seed=0)
    settings = {
        "evaluate_missing": "true",
        "evaluation.data": str(fill50k_parquet),
        "evaluation.limit": 2,
        "evaluation.grid_samples": 1,
        "evaluation.baseline": "false",
    }
    first = _promote(mlflow_server, "gate-auto", **settings)
    assert first.promoted and _champion("gate-auto") == v1
    v2 = registry.distinct("gate-auto", seed=1)
    # Edge F1 lies in [0, 1]: no candidate can beat the champion by 2, whatever the two scores are.
    second = _promote(mlflow_server, "gate-auto", margin=2.0, **settings)
    one, two = read_fidelity("gate-auto", v1), read_fidelity("gate-auto", v2)
    assert one.protocol == two.protocol and one.metric == two.metric == "edge_f1"
    assert (second.candidate_score, second.champion_score) == (two.score, one.score)
    assert not second.promoted and _champion("gate-auto") == v1
