"""MLflow: log a trained ControlNet as a pyfunc model, register it, move aliases, resolve it back.

A registered zeroconv model is an MLflow pyfunc whose artifacts are

    controlnet/      the exported ControlNet (diffusers format)
    unet/            only when a policy unlocked the UNet
    zeroconv.json    base model reference, annotator spec, inference defaults, resolution

so anything that can resolve ``models:/NAME@ALIAS`` can rebuild the exact pipeline: the pyfunc's own
``predict`` (for MLflow users) and the Ray Serve deployment (which reads the same artifacts).
Stages are deprecated in MLflow 3: promotion is an alias move (``candidate`` -> ``champion``).
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

METADATA_FILE = "zeroconv.json"


# ---------------------------------------------------------------------------------------------
# The pyfunc model
# ---------------------------------------------------------------------------------------------


def _png_to_array(data: str | bytes) -> np.ndarray:
    from PIL import Image

    raw = base64.b64decode(data) if isinstance(data, str) else data
    with Image.open(io.BytesIO(raw)) as img:
        return np.asarray(img.convert("RGB"))


def _array_to_png_b64(image: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class ControlNetPyfunc(mlflow.pyfunc.PythonModel):
    """``predict`` takes a DataFrame with ``prompt`` and ``condition`` (base64 PNG) columns, and
    optionally ``seed``, ``steps``, ``guidance_scale``, ``conditioning_scale``, ``negative_prompt``;
    it returns a DataFrame with an ``image`` column (base64 PNG)."""

    def load_context(self, context) -> None:
        from model.inference import load_pipeline

        self.metadata = json.loads(Path(context.artifacts["metadata"]).read_text())
        self.pipe = load_pipeline(
            self.metadata["base_model"],
            [context.artifacts["controlnet"]],
            context.artifacts.get("unet"),
        )

    def predict(self, context, model_input, params: dict[str, Any] | None = None):
        import pandas as pd

        from model.inference import generate

        defaults = self.metadata.get("inference", {})
        images = []
        for row in model_input.to_dict("records"):
            image = generate(
                self.pipe,
                [row["prompt"]],
                _png_to_array(row["condition"])[None],
                seed=int(row.get("seed", 0)),
                steps=int(row.get("steps", defaults.get("steps", 20))),
                guidance_scale=float(row.get("guidance_scale", defaults.get("guidance_scale", 9.0))),
                conditioning_scale=float(row.get("conditioning_scale", 1.0)),
                negative_prompt=row.get("negative_prompt") or None,
            )[0]
            images.append(_array_to_png_b64(image))
        return pd.DataFrame({"image": images})


# What the pyfunc needs to load and predict. Listing it skips MLflow's requirement inference, which
# re-imports the model in a subprocess (8-30 s per logged model on a 2-core machine).
PYFUNC_PACKAGES = (
    "torch",
    "diffusers",
    "transformers",
    "accelerate",
    "safetensors",
    "numpy",
    "pillow",
    "pandas",
    "mlflow",
)


def pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in PYFUNC_PACKAGES:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pass
    return pins


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

    with tempfile.TemporaryDirectory() as tmp:
        meta_path = Path(tmp) / METADATA_FILE
        meta_path.write_text(json.dumps(metadata, indent=2, sort_keys=True))
        artifacts = {"controlnet": str(controlnet_dir), "metadata": str(meta_path)}
        if unet_dir:
            artifacts["unet"] = str(unet_dir)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=ControlNetPyfunc(),
            artifacts=artifacts,
            registered_model_name=registered_name,
            pip_requirements=pip_requirements(),
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
