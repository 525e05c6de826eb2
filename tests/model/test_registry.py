"""A registered model works where zeroconv is not installed: loaded with ``mlflow.pyfunc.load_model``
and served with ``mlflow models serve``, from ``models:/NAME@alias`` on a real MLflow server."""

from __future__ import annotations

import ast
import base64
import io
import json
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import free_port, running_server

NAME = "handoff"
MODEL_URI = f"models:/{NAME}@champion"
REQUEST = {"seed": 3, "steps": 3}

LOAD_AND_PREDICT = """
import importlib.util, json, sys
import mlflow, pandas as pd
assert importlib.util.find_spec("pipelines") is None and importlib.util.find_spec("model") is None
loaded = mlflow.pyfunc.load_model(sys.argv[1])
image = loaded.predict(pd.DataFrame([json.loads(sys.argv[2])]))["image"][0]
try:
    loaded.predict(pd.DataFrame({"prompt": ["no condition"]}))
    error = None
except Exception as exc:
    error = str(exc)
print(json.dumps({"image": image, "error": error, "model_module": sys.modules["model"].__file__}))
"""


def _canonical(distribution: str) -> str:
    return distribution.lower().replace("_", "-")


def _third_party_imports(code_dir: Path) -> set[str]:
    """Top-level names imported anywhere in the files under ``code_dir``, less the stdlib and zeroconv."""
    names = set()
    for path in code_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"model", "pipelines"}


def _png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _decode(data: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


@pytest.fixture(scope="module")
def registered(mlflow_server, tiny_base, tmp_path_factory):
    """A perturbed tiny ControlNet (a fresh one is the identity) on base ``tiny``, alias champion.
    Returns the request row and the image zeroconv itself generates for it."""
    import mlflow
    import torch

    from model.export import export_model
    from model.inference import generate, load_pipeline
    from model.registry import log_controlnet_model
    from pipelines.common.tracking import connect
    from pipelines.data.synthetic import fill50k

    connect(mlflow_server, "registry-tests")
    net = tiny_base.family.new_controlnet(tiny_base)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    export = export_model(net, tmp_path_factory.mktemp("export") / "controlnet")
    metadata = {"base_model": "tiny", "inference": {"steps": 20, "guidance_scale": 9.0}}
    loads = []  # models loaded while logging: MLflow loads one to run predict on an input example
    load_model = mlflow.pyfunc.load_model
    mlflow.pyfunc.load_model = lambda *args, **kwargs: (loads.append(args), load_model(*args, **kwargs))[1]
    try:
        with mlflow.start_run():
            log_controlnet_model(export, metadata, registered_name=NAME, alias="champion")
    finally:
        mlflow.pyfunc.load_model = load_model

    sample = fill50k(1, size=64, seed=7)[0]
    row = {"prompt": sample.text, "condition": _png_b64(sample.condition), **REQUEST}
    pipe = load_pipeline("tiny", [export])
    expected = generate(pipe, [sample.text], sample.condition[None], guidance_scale=9.0, **REQUEST)[0]
    return row, expected, len(loads)


def test_registering_does_not_load_the_model_in_the_driver(registered):
    import mlflow

    # Before: an input example made MLflow load the whole pipeline in the training driver and run predict.
    assert registered[2] == 0
    assert mlflow.models.get_model_info(MODEL_URI).saved_input_example_info is None


def test_registered_model_carries_code_requirements_signature_and_base(registered, tmp_path):
    import mlflow

    info = mlflow.models.get_model_info(MODEL_URI)
    inputs = {spec.name: spec.required for spec in info.signature.inputs.inputs}
    assert inputs == {
        "prompt": True,
        "condition": True,
        "seed": False,
        "steps": False,
        "guidance_scale": False,
        "conditioning_scale": False,
        "negative_prompt": False,
        "control_mode": False,
    }
    assert info.signature.outputs.input_names() == ["image"]

    local = Path(mlflow.artifacts.download_artifacts(MODEL_URI, dst_path=str(tmp_path)))
    pins = dict(line.split("==") for line in (local / "requirements.txt").read_text().split())
    pins = {_canonical(name): pin for name, pin in pins.items()}
    for package in ("torch", "diffusers", "transformers", "safetensors", "mlflow", "numpy", "pillow", "pyarrow"):
        assert pins[package] == version(package).split("+")[0], package
    code = {str(p.relative_to(local / "code")) for p in (local / "code").rglob("*.py")}
    assert {"model/registry.py", "model/inference.py", "model/base.py", "pipelines/data/tensors.py"} <= code
    assert not code & {"pipelines/train.py", "pipelines/annotate.py", "pipelines/train_loop.py", "deploy/serve_app.py"}
    # every library the logged code imports is pinned (open_clip only builds the tiny base, which is logged)
    imported = _third_party_imports(local / "code") - {"open_clip"}
    distributions = packages_distributions()
    for module in imported:
        assert any(_canonical(d) in pins for d in distributions[module]), f"{module} is not in requirements.txt"
    # the tiny base travels with the model, in diffusers format
    assert (local / "artifacts" / "tiny-sd" / "model_index.json").exists()


def test_loads_and_predicts_where_zeroconv_is_not_installed(registered, without_zeroconv, mlflow_server, tmp_path):
    row, expected, _ = registered
    cache = tmp_path / "cache"
    result = without_zeroconv.run_json(
        LOAD_AND_PREDICT,
        MODEL_URI,
        json.dumps(row),
        cwd=tmp_path,
        MLFLOW_TRACKING_URI=mlflow_server,
        ZEROCONV_CACHE=str(cache),
    )
    # zeroconv's code came from the model, not from the repository or an install
    assert "/code/model/" in result["model_module"] and not result["model_module"].startswith(str(Path.cwd()))
    image = _decode(result["image"])
    assert image.shape == expected.shape
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    assert "condition" in result["error"]
    assert not (cache / "tiny-sd").exists()  # the base came with the model: nothing was rebuilt


@pytest.mark.slow
def test_mlflow_models_serve_answers_invocations(registered, without_zeroconv, mlflow_server, tmp_path):
    import urllib.error
    import urllib.request

    row, expected, _ = registered
    port = free_port()
    command = [str(without_zeroconv.python), "-I", "-m", "mlflow", "models", "serve", "-m", MODEL_URI]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"]
    env = dict(without_zeroconv.env, MLFLOW_TRACKING_URI=mlflow_server, ZEROCONV_CACHE=str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{port}"

    def invoke(records: list[dict]) -> tuple[int, str]:
        request = urllib.request.Request(
            f"{url}/invocations",
            data=json.dumps({"dataframe_records": records}).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=300) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with running_server(command, env, tmp_path / "serve.log", f"{url}/ping", timeout=400):
        status, body = invoke([row])
        assert status == 200, body
        image = _decode(json.loads(body)["predictions"][0]["image"])
        assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1

        status, body = invoke([{"prompt": "no condition"}])
        assert status == 400 and "condition" in body


def test_predict_names_a_missing_column_and_a_bad_condition():
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from model.registry import ControlNetPyfunc

    model = ControlNetPyfunc()
    with pytest.raises(MlflowException, match="missing column 'condition'"):
        model.predict(None, pd.DataFrame({"prompt": ["a red circle"]}))
    model.metadata, model.pipe = {}, None
    with pytest.raises(MlflowException, match="row 0: 'condition' is not a base64-encoded image"):
        model.predict(None, pd.DataFrame({"prompt": ["a red circle"], "condition": ["not an image"]}))


def test_inference_defaults_recorded_with_a_model_fill_in_what_it_lacks():
    from model.inference import DEFAULT_GUIDANCE, DEFAULT_STEPS, InferenceDefaults

    recorded = InferenceDefaults.recorded({"inference": {"steps": "7", "scheduler": "ddim"}})
    assert (recorded.steps, recorded.guidance_scale, recorded.conditioning_scale) == (7, DEFAULT_GUIDANCE, 1.0)
    assert InferenceDefaults.recorded({}) == InferenceDefaults() == InferenceDefaults(DEFAULT_STEPS, DEFAULT_GUIDANCE)
