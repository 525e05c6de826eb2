"""MLflow: log a trained ControlNet as a pyfunc model, register it, move aliases, resolve it back.

A registered zeroconv model is an MLflow pyfunc that carries everything ``predict`` needs, so
``mlflow.pyfunc.load_model("models:/NAME@ALIAS")`` works in any environment that has the pinned
libraries, with or without zeroconv:

    artifacts/controlnet/     the exported ControlNet (diffusers format)
    artifacts/unet/           only when a policy unlocked the denoiser (a UNet, or a transformer for SD3/Flux)
    artifacts/base_model/     a built-in base model (``tiny``, ``shapes``, ``tiny-sdxl``...): nothing to rebuild
    artifacts/zeroconv.json   base model reference and family, annotator spec, inference defaults, resolution
    code/model, code/pipelines  the zeroconv modules ``predict`` imports, and only those
    requirements.txt          the exact installed versions of the libraries they import
    MLmodel                   + a signature (the request columns and their types)

The Ray Serve deployment and the evaluation job read the same artifacts through :func:`resolve_model`.
Stages are deprecated in MLflow 3: promotion is an alias move (``candidate`` -> ``champion``).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException

METADATA_FILE = "zeroconv.json"
BASE_MODEL_ARTIFACT = "base_model"

# The request format: required columns, then optional ones with their MLflow types.
REQUIRED_INPUTS = ("prompt", "condition")
OPTIONAL_INPUTS = {
    "seed": "long",
    "steps": "long",
    "guidance_scale": "double",
    "conditioning_scale": "double",
    "negative_prompt": "string",
    "control_mode": "long",  # union ControlNets: the condition's type (default: the first trained column's)
}


# ---------------------------------------------------------------------------------------------
# The pyfunc model
# ---------------------------------------------------------------------------------------------


def _png_to_array(data: str | bytes, row: int) -> np.ndarray:
    from PIL import Image

    try:
        raw = base64.b64decode(data, validate=True) if isinstance(data, str) else data
        with Image.open(io.BytesIO(raw)) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as exc:  # binascii.Error, PIL.UnidentifiedImageError, TypeError, ...
        raise MlflowException.invalid_parameter_value(
            f"row {row}: 'condition' is not a base64-encoded image ({type(exc).__name__})"
        ) from None


def _array_to_png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _control_mode(row: dict, metadata: dict) -> int | None:
    """A union ControlNet's condition type for this row (default: its first trained column's); None otherwise."""
    union = metadata.get("union")
    mode = _optional(row, "control_mode", union[0]["control_mode"] if union else None)
    return None if mode is None else int(mode)


def _optional(row: dict, column: str, default):
    """The row's value, or ``default`` when the column is absent or empty (NaN in a mixed batch)."""
    value = row.get(column)
    return default if value is None or (isinstance(value, float) and np.isnan(value)) else value


class ControlNetPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes a DataFrame with ``prompt`` and ``condition`` (base64 PNG) columns, and
    optionally ``seed``, ``steps``, ``guidance_scale``, ``conditioning_scale``, ``negative_prompt``;
    it returns a DataFrame with an ``image`` column (base64 PNG)."""

    def load_context(self, context) -> None:
        from model.inference import load_pipeline

        self.metadata = json.loads(Path(context.artifacts["metadata"]).read_text())
        self.pipe = load_pipeline(
            # A base built in code travels with the model; any other is named (a hub id, s3://, a path).
            context.artifacts.get(BASE_MODEL_ARTIFACT, self.metadata["base_model"]),
            [context.artifacts["controlnet"]],
            context.artifacts.get("unet"),
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from model.inference import InferenceDefaults, generate

        model_input = pd.DataFrame(model_input)
        missing = [c for c in REQUIRED_INPUTS if c not in model_input.columns]
        if missing:
            raise MlflowException.invalid_parameter_value(
                f"model input is missing column {', '.join(map(repr, missing))}: expected 'prompt' (text) and "
                f"'condition' (base64 PNG), optionally {', '.join(map(repr, OPTIONAL_INPUTS))}"
            )
        defaults = InferenceDefaults.recorded(self.metadata)
        images = []
        for i, row in enumerate(model_input.to_dict("records")):
            image = generate(
                self.pipe,
                [row["prompt"]],
                _png_to_array(row["condition"], i)[None],
                seed=int(_optional(row, "seed", 0)),
                steps=int(_optional(row, "steps", defaults.steps)),
                guidance_scale=float(_optional(row, "guidance_scale", defaults.guidance_scale)),
                conditioning_scale=float(_optional(row, "conditioning_scale", defaults.conditioning_scale)),
                negative_prompt=_optional(row, "negative_prompt", None) or None,
                control_mode=_control_mode(row, self.metadata),
            )[0]
            images.append(_array_to_png_b64(image))
        return pd.DataFrame({"image": images})


# ---------------------------------------------------------------------------------------------
# What travels with the model: code, requirements, signature
# ---------------------------------------------------------------------------------------------

# The distributions the logged code imports (directly, or through diffusers/transformers at load
# time), pinned to the installed versions. Listing them skips MLflow's requirement inference, which
# re-imports the model in a subprocess (8-30 s per logged model on a 2-core machine).
PYFUNC_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "tokenizers",
    "safetensors",
    "accelerate",
    "huggingface-hub",
    "numpy",
    "pillow",
    "pandas",
    "opencv-python-headless",
    "pyarrow",
    "pydantic",
    "pyyaml",
    "mlflow",
    "cloudpickle",
    "filelock",  # model/base.py: one S3 download per node
)
_PROJECT_PACKAGES = ("model", "pipelines")


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in PYFUNC_PACKAGES:
        try:
            # Drop a local version label (torch 2.x+cu128): pip can only resolve the public version.
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pass
    return pins


def predict_sources(root_module: str = __name__) -> list[Path]:
    """The project files ``root_module`` imports, transitively, plus their packages' ``__init__``s.

    Read from the source (function-level imports included), so the logged code follows the code:
    a new import in ``model.inference`` is logged with the next model, nothing else is.
    """
    root = Path(__file__).resolve().parents[1]
    todo, found = [root_module], set()
    while todo:
        parts = todo.pop().split(".")
        if parts[0] not in _PROJECT_PACKAGES:
            continue
        package = root.joinpath(*parts)
        path = package / "__init__.py" if package.is_dir() else package.with_suffix(".py")
        if path in found or not path.exists():  # a name imported from a module, not a module
            continue
        found.add(path)
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return sorted(path.relative_to(root) for path in found)


def copy_predict_code(dest: Path) -> list[str]:
    """Copy :func:`predict_sources` under ``dest``; returns the top-level package dirs (MLflow ``code_paths``)."""
    root = Path(__file__).resolve().parents[1]
    for relative in predict_sources():
        (dest / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, dest / relative)
    return sorted(str(path) for path in dest.iterdir())


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    inputs = [ColSpec("string", name) for name in REQUIRED_INPUTS]
    inputs += [ColSpec(kind, name, required=False) for name, kind in OPTIONAL_INPUTS.items()]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("string", "image")]))


def log_controlnet_model(
    controlnet_dir: str | Path,
    metadata: dict,
    registered_name: str | None = None,
    unet_dir: str | Path | None = None,
    alias: str | None = "candidate",
    name: str = "model",
):
    """Log the export as a pyfunc model on the active run; register it and set ``alias`` if a name is given.

    ``metadata`` must name ``base_model``; it should carry ``annotator`` and ``inference`` defaults.
    Returns the ModelInfo (``.registered_model_version`` is set when registered).
    """
    if "base_model" not in metadata:
        raise ValueError("model metadata must include 'base_model'")
    import tempfile

    from model.base import SHAPES, TINY
    from model.families import TINY_PRESETS, resolve

    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / METADATA_FILE
        meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
        artifacts = {"controlnet": str(controlnet_dir), "metadata": str(meta_path)}
        if unet_dir:
            artifacts["unet"] = str(unet_dir)
        if metadata["base_model"] in (TINY, SHAPES, *TINY_PRESETS):
            artifacts[BASE_MODEL_ARTIFACT] = str(resolve(metadata["base_model"]))
        with warnings.catch_warnings():
            # A signature and no input example: given an example, MLflow loads the whole pipeline in this
            # process (the training driver) and runs predict on it, to check the model serves. Its
            # warning that no example was given is that choice, not a problem to report.
            warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
            info = mlflow.pyfunc.log_model(
                name=name,
                python_model=ControlNetPyfunc(),
                artifacts=artifacts,
                code_paths=copy_predict_code(Path(tmp) / "code"),
                registered_model_name=registered_name,
                pip_requirements=pip_requirements(),
                signature=pyfunc_signature(),
            )
    if registered_name and alias:
        mlflow.MlflowClient().set_registered_model_alias(registered_name, alias, str(info.registered_model_version))
    return info


def set_alias(name: str, alias: str, version: int | str) -> None:
    mlflow.MlflowClient().set_registered_model_alias(name, alias, str(version))


# ---------------------------------------------------------------------------------------------
# Resolving a registered model back to files
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: str
    alias: str | None
    run_id: str | None
    controlnet_dir: Path
    unet_dir: Path | None
    metadata: dict

    @property
    def base_model(self) -> str:
        return self.metadata["base_model"]


def resolve_model(
    name: str, alias: str | None = "champion", version: str | int | None = None, dest: str | Path | None = None
) -> ResolvedModel:
    """Download ``models:/name@alias`` (or a version) and describe it. Unknown names/aliases: ValueError."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        mv = (
            client.get_model_version(name, str(version))
            if version is not None
            else client.get_model_version_by_alias(name, alias)
        )
    except MlflowException as exc:
        ref = f"version {version}" if version is not None else f"alias {alias!r}"
        raise ValueError(f"registered model {name!r} has no {ref} ({exc.error_code})") from None
    local = Path(
        mlflow.artifacts.download_artifacts(f"models:/{name}/{mv.version}", dst_path=str(dest) if dest else None)
    )
    paths = _artifact_paths(local)
    metadata = json.loads(paths["metadata"].read_text())
    return ResolvedModel(
        name,
        str(mv.version),
        alias if version is None else None,
        mv.run_id,
        paths["controlnet"],
        paths.get("unet"),
        metadata,
    )


def _artifact_paths(local: Path) -> dict[str, Path]:
    """Artifact name -> downloaded path. MLflow stores each artifact under its source's basename
    (``artifacts/<export dir name>``), not under its key, so read the mapping from the MLmodel file."""
    import yaml

    spec = yaml.safe_load((local / "MLmodel").read_text())
    return {key: local / entry["path"] for key, entry in spec["flavors"]["python_function"]["artifacts"].items()}
