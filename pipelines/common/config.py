"""Typed job configuration: one pydantic model per job, loaded from YAML plus CLI overrides.

Every job (annotate, train, serve, ...) declares its config class next to its code, built from the
shared pieces below. Defaults live on the fields, nowhere else. Loading goes:

    YAML file (optional)  ->  dotted CLI overrides (``train.lr=2e-5``)  ->  validation

and any mistake raises :class:`ConfigError` whose message names the field, the bad value and, where
the field is a choice, the allowed values.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

C = TypeVar("C", bound="JobConfig")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says what and where."""


class Section(BaseModel):
    """Base for every config block: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    """Where S3 lives. Credentials always come from the standard AWS chain, never from here."""

    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint, e.g. http://127.0.0.1:9000. Default: AWS_ENDPOINT_URL or AWS.",
    )
    s3_region: str = Field(default="us-east-1", description="Region for S3 requests.")


class MLflowConfig(Section):
    tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI. Default: MLFLOW_TRACKING_URI, else sqlite under the work dir.",
    )
    experiment: str = Field(default="zeroconv", description="MLflow experiment name.")


class RayConfig(Section):
    address: str | None = Field(
        default=None, description="Ray cluster address; None starts a local Ray on this machine."
    )
    num_cpus: int | None = Field(default=None, description="CPUs for a local Ray (None: all).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each of this stage's workers requests (annotator actors, train workers, "
        "serve replicas), e.g. {train_gpu: 1}: pins the stage to the node type that offers them "
        "(see ray_cluster.yaml). Empty: anywhere.",
    )


class BaseModelConfig(Section):
    source: str = Field(
        default="tiny",
        description="Base Stable Diffusion model: 'tiny' (built in), a local diffusers dir, s3://..., or a hub id.",
    )


class JobConfig(Section):
    """Fields every job shares."""

    work_dir: str = Field(default="runs", description="Local or s3:// root for this job's outputs.")
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value). The value is parsed as YAML, so 3, 1e-5, true, [1,2] work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-5 as a string (it wants 1.0e-5): be friendly about numbers.
    if isinstance(value, str):
        try:
            value = float(value) if any(ch in value for ch in ".eE") else int(value)
        except ValueError:
            pass
    return key.split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def read_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load_config(
    cls: type[C], path: str | os.PathLike | None = None, overrides: list[str] | None = None, **values: Any
) -> C:
    """Build a validated ``cls`` from an optional YAML file, dotted overrides and keyword values."""
    tree: dict = read_yaml(path) if path else {}
    for override in overrides or []:
        keys, value = parse_override(override)
        _set_dotted(tree, keys, value)
    for key, value in values.items():
        if value is not None:
            _set_dotted(tree, key.split("."), value)
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(cls, exc)) from None


def format_validation_error(cls: type[BaseModel], exc: ValidationError) -> str:
    lines = [f"invalid {cls.__name__}:"]
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"]) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            lines.append(f"  {field}: unknown field")
        elif kind == "literal_error":
            expected = err.get("ctx", {}).get("expected", "")
            lines.append(f"  {field}: {err['input']!r} is not allowed; choose one of {expected}")
        else:
            lines.append(f"  {field}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def flatten(config: BaseModel) -> dict[str, Any]:
    """{'train.lr': 1e-5, ...}: the shape MLflow params want."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = node

    walk("", config.model_dump(mode="json"))
    return out
