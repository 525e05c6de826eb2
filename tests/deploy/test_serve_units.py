"""The serving app's pieces that need no server: request parsing, image checks, model references,
the batch-wait policy and config validation."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from deploy.app import build_app
from deploy.batching import BatchWait
from deploy.config import ModelRef, ServeConfig, validate_config
from deploy.schemas import LimitsConfig, RequestError, decode_image, parse_request
from pipelines.common.config import ConfigError
from pipelines.common.images import encode_png


def test_parse_request_names_the_field():
    with pytest.raises(RequestError) as err:
        parse_request(b'{"prompt": "x", "controls": [{"image": "a", "scale": "big"}]}')
    assert (err.value.field, err.value.status) == ("controls[0].scale", 422)
    with pytest.raises(RequestError) as err:
        parse_request(b"[1, 2")
    assert err.value.status == 400 and err.value.field is None
    with pytest.raises(RequestError) as err:
        parse_request(b'{"controls": []}')
    assert err.value.field == "prompt" and "required" in err.value.message


def test_decode_image_accepts_data_urls_and_wrapped_base64_and_refuses_the_rest():
    image = np.arange(32 * 16 * 3, dtype=np.uint8).reshape(32, 16, 3)
    text = base64.b64encode(encode_png(image)).decode()
    limits = LimitsConfig()
    np.testing.assert_array_equal(decode_image(text, "f", limits), image)
    np.testing.assert_array_equal(decode_image("data:image/png;base64," + text, "f", limits), image)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # what `base64` prints
    np.testing.assert_array_equal(decode_image(wrapped, "f", limits), image)

    cases = [("@@@", 400), (base64.b64encode(b"GIF89a nope").decode(), 400)]
    for data, status in cases:
        with pytest.raises(RequestError) as err:
            decode_image(data, "controls[0].image", limits)
        assert (err.value.status, err.value.field) == (status, "controls[0].image")
    with pytest.raises(RequestError) as err:
        decode_image(text, "f", LimitsConfig(max_image_pixels=32 * 16 - 1))
    assert err.value.status == 413 and "pixels" in err.value.message
    with pytest.raises(RequestError) as err:
        decode_image(text, "f", LimitsConfig(max_image_bytes=10))
    assert err.value.status == 413


def test_model_refs():
    assert ModelRef.parse("cn", "champion") == ModelRef("cn", "champion", None)
    assert ModelRef.parse("models:/cn@candidate", "champion") == ModelRef("cn", "candidate", None)
    assert ModelRef.parse("cn/3", "champion") == ModelRef("cn", None, "3")
    assert str(ModelRef("cn", None, "3")) == "models:/cn/3"
    for bad in ("", "cn@", "@a", "cn/latest"):
        with pytest.raises(ConfigError):
            ModelRef.parse(bad, "champion")


def test_batch_wait_policy():
    wait = BatchWait(window=0.01)
    assert wait.wait_s(now=0.0) == 0.0  # idle, nothing before: a lone request runs at once
    wait.started(now=1.0)
    wait.finished(now=1.2, size=1)
    assert wait.wait_s(now=1.21) == 0.0  # after single requests: still no wait
    wait.started(now=2.0)
    # While a batch runs: wait until it should end (it took 0.2 s last time), plus the window.
    assert wait.wait_s(now=2.05) == pytest.approx(0.15 + 0.01)
    assert wait.wait_s(now=2.5) == pytest.approx(0.01)
    wait.finished(now=2.2, size=6)
    assert wait.wait_s(now=2.21) == 0.01  # after a group: its members are about to re-send


def empty_registry(folder: Path) -> str:
    """A real SQLite MLflow registry holding no model; its tracking URI."""
    import mlflow

    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mlflow.MlflowClient(tracking_uri=uri).search_registered_models()  # creates the database and its tables
    return uri


def test_config_validation_and_auth_env(monkeypatch, tmp_path):
    uri = empty_registry(tmp_path)  # a registry that exists: what is refused below is the config, not the store
    with pytest.raises(ConfigError, match="batching.max_batch_size"):
        validate_config({"batching": {"max_batch_size": 0}})
    with pytest.raises(ConfigError, match="replicas.device"):
        validate_config({"replicas": {"device": "tpu"}})
    with pytest.raises(ConfigError, match="is not NAME"):
        build_app({"models": ["a@"], "mlflow": {"tracking_uri": uri}})
    monkeypatch.delenv("ZC_UNSET_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="ZC_UNSET_TOKEN"):
        build_app({"auth_token_env": "ZC_UNSET_TOKEN", "mlflow": {"tracking_uri": uri}})
    assert ServeConfig().host == "127.0.0.1" and ServeConfig().alias == "champion"


def test_build_app_runs_the_start_up_checks_of_zeroconv_serve(tmp_path):
    # The same check as `zeroconv serve`: an unknown model fails once here, not in every replica.
    uri = empty_registry(tmp_path)
    with pytest.raises(ValueError, match="models:/no-such-model@champion is not in the registry"):
        build_app({"models": ["no-such-model"], "mlflow": {"tracking_uri": uri}})


def test_a_missing_sqlite_registry_is_refused_and_not_created(tmp_path, monkeypatch):
    # Before: MLflow created an empty registry there and the error said only that the model was missing.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(FileNotFoundError) as refused:
        build_app({"work_dir": str(tmp_path / "runs")})
    message = str(refused.value)
    assert message.startswith(f"no MLflow registry at {tmp_path}/runs/mlflow.db (default for work_dir=")
    assert "\n" not in message
    elsewhere = tmp_path / "other" / "mlflow.db"
    with pytest.raises(FileNotFoundError, match=f"no MLflow registry at {elsewhere} \\(mlflow.tracking_uri\\)"):
        build_app({"mlflow": {"tracking_uri": f"sqlite:///{elsewhere}"}})
    assert list(tmp_path.iterdir()) == []  # nothing created


@pytest.mark.parametrize("replicas", [{"device": "cpu", "num_gpus": 1}, {"device": "auto", "num_gpus": 0}])
def test_fp16_without_a_gpu_is_refused_at_start_up(replicas, tmp_path):
    # Before: every replica failed in turn, and `zeroconv serve` said only "Deploying application failed".
    config = {"replicas": {**replicas, "dtype": "fp16"}, "mlflow": {"tracking_uri": empty_registry(tmp_path)}}
    with pytest.raises(ConfigError, match="replicas.dtype=fp16 needs a GPU but the replicas get none"):
        build_app(config)
    bf16 = {**config, "replicas": {**replicas, "dtype": "bf16"}, "models": ["no-such-model"]}
    with pytest.raises(ValueError, match="no-such-model"):  # bf16 passes this check and goes on to the registry
        build_app(bf16)


def test_replicas_ask_for_the_ray_resources_that_pin_them_to_a_node_type():
    from deploy.app import CheckedConfig

    def actor_options(**fields) -> dict:
        gateway = CheckedConfig(ServeConfig(**fields), {}, None).application()._bound_deployment
        assert gateway.ray_actor_options == {"num_cpus": 0}  # the gateway fits anywhere, pinned by nothing
        server = gateway.init_args[0]._bound_deployment  # the model replicas, behind the gateway
        return server.ray_actor_options

    pinned = actor_options(ray={"resources": {"annotate_gpu": 1}}, replicas={"num_cpus": 0.5})
    assert pinned == {"num_cpus": 0.5, "num_gpus": 0.0, "resources": {"annotate_gpu": 1.0}}
    assert "resources" not in actor_options()  # anywhere by default


def test_a_replica_that_fails_to_load_reports_only_that_error(tmp_path):
    from deploy.app import ControlNetServer

    replica_class = ControlNetServer.func_or_class
    replica = replica_class.__new__(replica_class)
    config = ServeConfig(models=["no-such-model"], mlflow={"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    with pytest.raises(ValueError, match="no-such-model"):
        replica.__init__(config)
    replica.__del__()  # what Serve calls on the failed replica: no second error


def test_the_serve_run_config_serves_the_demo_registry():
    import yaml

    from pipelines.demo import MODEL_NAME, DemoConfig

    spec = yaml.safe_load((Path(__file__).resolve().parents[2] / "deploy" / "serve_config.yaml").read_text())
    config = validate_config(spec["applications"][0]["args"])
    # `make demo` then `serve run deploy/serve_config.yaml` from the repo root, as docs/serving.md says.
    assert config.models == [MODEL_NAME] and config.work_dir == DemoConfig().work_dir
    assert config.mlflow.tracking_uri is None  # -> sqlite <work_dir>/mlflow.db, where the demo registers
    assert spec["http_options"]["request_timeout_s"] > config.request_timeout_s  # the app's 504 answers first


def test_a_request_error_crosses_from_a_replica_to_the_gateway_whole():
    """A 4xx raised in a model replica reaches the gateway pickled: it must keep its field and status."""
    import pickle

    error = pickle.loads(pickle.dumps(RequestError("controls[0].image", "not valid base64", 400)))
    assert (error.field, error.message, error.status) == ("controls[0].image", "not valid base64", 400)


def test_union_control_type_comes_from_the_request_the_annotator_or_the_models_only_type():
    from types import SimpleNamespace

    from deploy.jobs import control_mode
    from deploy.schemas import Control
    from deploy.store import ServedModel
    from model.families import FAMILIES

    store = SimpleNamespace(base=SimpleNamespace(family=FAMILIES["sdxl"]))  # what control_mode reads of a store
    union = [{"control_mode": 3, "control_type": "canny"}, {"control_mode": 1, "control_type": "depth"}]
    both = ServedModel("u", "1", None, None, None, {"union": union})
    plain = ServedModel("p", "1", None, None, None, {})
    midas, shuffle = SimpleNamespace(name="midas"), SimpleNamespace(name="content_shuffle")

    assert control_mode(Control(control_type="depth"), both, None, store, "controls[0]") == 1
    assert control_mode(Control(), both, midas, store, "controls[0]") == 1  # source_image's annotator
    only_canny = ServedModel("c", "1", None, None, None, {"union": union[:1]})
    assert control_mode(Control(), only_canny, None, store, "controls[0]") == 3
    assert control_mode(Control(), plain, None, store, "controls[0]") is None
    refused = [
        (Control(), both, None, "controls[0].control_type", "is required for union model 'u': one of depth, canny"),
        (Control(control_type="canny"), plain, None, "controls[0].control_type", "applies to union ControlNets"),
        (Control(), both, shuffle, "controls[0].annotator", "'content_shuffle' has no ControlNet-Union type"),
        (Control(control_type="hed"), both, None, "controls[0].control_type", "was not trained on 'hed'"),
    ]
    for control, model, annotator, field, message in refused:
        with pytest.raises(RequestError, match=message) as caught:
            control_mode(control, model, annotator, store, "controls[0]")
        assert (caught.value.field, caught.value.status) == (field, 422)
