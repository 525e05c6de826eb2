"""A replica's ModelStore in-process, on the default registry (SQLite, no server): hot reload, its
retries, and the annotators it offers, built from what training recorded."""

from __future__ import annotations

import os
import shutil

import mlflow
import numpy as np
import pytest

from deploy.config import ServeConfig
from deploy.schemas import RequestError
from deploy.store import ModelStore, Unavailable
from tests.deploy.conftest import missing_weights_spec, register_controlnet

NAME = "store-cn"


@pytest.fixture(scope="module")
def sqlite_registry(tmp_path_factory, tiny_base, tiny_base_dir):
    """An SQLite registry (what `zeroconv serve` uses by default) with a register function."""
    from pipelines.common.tracking import connect

    root = tmp_path_factory.mktemp("sqlite-registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    connect(uri, "store-tests", artifact_root=str(root / "artifacts"))
    exports = root / "exports"

    def register(name: str, seed: int, champion: bool = True, **metadata) -> str:
        return register_controlnet(tiny_base, tiny_base_dir, name, seed, exports, champion, **metadata)

    register.tracking_uri, register.artifacts = uri, root / "artifacts"
    yield register
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def store_for(registry, models: list[str], **fields) -> ModelStore:
    mlflow.set_tracking_uri(registry.tracking_uri)
    config = ServeConfig(models=models, mlflow={"tracking_uri": registry.tracking_uri}, **fields)
    return ModelStore(config, "cpu")


def test_hot_reload_loads_only_when_the_alias_moves(sqlite_registry):
    sqlite_registry(NAME, seed=1)
    store = store_for(sqlite_registry, [NAME], reload_interval_s=30)
    loaded = store.models[NAME]
    # SQLite answers the alias's version as an int; the store holds "1": that is no move.
    assert store.refresh() == [] and store.models[NAME] is loaded
    assert store.health() == {"status": "ok", "models": {NAME: "1"}}

    new = sqlite_registry(NAME, seed=2)
    assert store.refresh() == [f"models:/{NAME}@champion: version 1 -> {new}"]
    assert store.models[NAME].version == new and store.refresh() == []


def test_a_failed_reload_is_retried_with_backoff_and_reported(sqlite_registry):
    name = "store-retry"
    sqlite_registry(name, seed=1)
    store = store_for(sqlite_registry, [name], reload_interval_s=10)
    new = sqlite_registry(name, seed=2)
    hidden = sqlite_registry.artifacts.with_name("artifacts-hidden")
    sqlite_registry.artifacts.rename(hidden)  # the new version cannot be downloaded for now
    try:
        assert store.refresh(now=0.0) == []
        assert store.failures[name].attempts == 1 and store.models[name].version == "1"
        health = store.health()
        assert health["status"] == "degraded" and health["models"] == {name: "1"}
        assert f"version {new} failed to load" in health["problems"][name]
        assert store.refresh(now=5.0) == [] and store.failures[name].attempts == 1  # backing off: not yet
        assert store.refresh(now=10.0) == [] and store.failures[name].attempts == 2  # retried after 10 s
        assert store.failures[name].next_try == 30.0  # then 20 s later
    finally:
        hidden.rename(sqlite_registry.artifacts)
    assert store.refresh(now=30.0) == [f"models:/{name}@champion: version 1 -> {new}"]
    assert store.health() == {"status": "ok", "models": {name: new}}


def test_annotators_are_rebuilt_from_the_recorded_spec(sqlite_registry, mlsd_weights, tmp_path):
    from annotators import create

    recorded = create("mlsd", weights_source=str(mlsd_weights)).spec()
    sqlite_registry("store-mlsd", seed=3, annotator=recorded)
    sqlite_registry("store-hed", seed=4, annotator=missing_weights_spec(tmp_path))
    store = store_for(sqlite_registry, ["store-mlsd", "store-hed"], reload_interval_s=0)
    mlsd_model, hed_model = store.models["store-mlsd"], store.models["store-hed"]

    # Exactly the recorded weights (by sha256) from the recorded source: the same maps as at training.
    served = store.annotator_for(None, mlsd_model, "f")
    assert served.weight_hashes == recorded["weights"]["sha256"]
    image = np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_array_equal(served(image), create("mlsd", weights_source=str(mlsd_weights))(image))

    # Weights that are not where the record says: offered but unavailable, a 503 naming it.
    with pytest.raises(RequestError) as err:
        store.annotator_for(None, hed_model, "controls[0].annotator")
    assert err.value.status == 503 and "'hed'" in err.value.message
    assert "annotator hed" in store.health()["problems"]
    # Not on the allow-list (default: the served models' own annotators): refused, never built on request.
    with pytest.raises(RequestError) as err:
        store.annotator_for("canny", mlsd_model, "controls[0].annotator")
    assert err.value.status == 422 and "not offered" in err.value.message


def test_recorded_hashes_are_enforced_and_a_mirror_can_serve_them(sqlite_registry, mlsd_weights, tmp_path):
    from annotators import create

    recorded = create("mlsd", weights_source=str(mlsd_weights)).spec()
    sqlite_registry("store-mlsd-pins", seed=5, annotator=recorded)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    shutil.copy(mlsd_weights / "mlsd_large_512_fp32.pth", mirror)
    store = store_for(sqlite_registry, ["store-mlsd-pins"], annotator_weights=str(mirror), annotators=["mlsd"])
    assert store.annotator_for("mlsd", store.models["store-mlsd-pins"], "f").weights_source == str(mirror)

    with open(mirror / "mlsd_large_512_fp32.pth", "ab") as f:
        f.write(b"not the recorded weights")
    store = store_for(sqlite_registry, ["store-mlsd-pins"], annotator_weights=str(mirror))
    (problem,) = [a for a in store.annotators.values() if isinstance(a, Unavailable)]
    assert "sha256" in problem.reason


def test_from_spec_refuses_what_it_cannot_reproduce():
    from annotators import create, from_spec

    canny = create("canny", low_threshold=50)
    assert from_spec(canny.spec()).params == {"low_threshold": 50, "high_threshold": 200}
    with pytest.raises(ValueError, match="recorded at version 0"):
        from_spec({**canny.spec(), "version": "0"})
    with pytest.raises(ValueError, match="does not say which"):
        from_spec({"name": "hed", "version": "1", "params": {}})  # weights not recorded: never guess
