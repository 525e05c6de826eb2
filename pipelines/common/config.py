"""Typed job configuration: one pydantic model per job, loaded from YAML plus CLI overrides.

Every job (annotate, train, serve, ...) declares its config class next to its code, built from the
shared pieces below. Defaults live on the fields, nowhere else. Loading goes:

    YAML file (optional)  ->  dotted CLI overrides (``train.lr=2e-5``)  ->  validation

An override's value is read as YAML (lists and mappings work: ``'annotators=[{name: canny}]'``), but
the field's type decides what a bare word means: ``run_name=2024`` is the string "2024", ``steps=3``
the integer 3, ``version=0123`` the string "0123".
and any mistake raises :class:`ConfigError` whose message names the field, the bad value and, where
the field is a choice, the allowed values.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

C = TypeVar("C", bound="JobConfig")


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message says what and where."""


def expand_user(path: str) -> str:
    """``~/sd15`` -> ``/home/me/sd15``. The shell leaves ``key=~/x`` and YAML values alone, so the config does it."""
    return os.path.expanduser(path) if path.startswith("~") else path


PathStr = Annotated[str, AfterValidator(expand_user)]
"""A local path or URI field: a leading ``~`` means the user's home, as in a shell."""


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
    source: PathStr = Field(
        default="tiny",
        description="Base Stable Diffusion model: 'tiny' (built in, random weights), 'shapes' (built in, pretrained "
        "on Fill50K-style circles, 32 px), a local diffusers dir, s3://..., or a hub id.",
    )

    @field_validator("source")
    @classmethod
    def _local_dir_absolute(cls, source: str) -> str:
        """A local diffusers directory given relative to where the job starts becomes absolute here: Ray workers
        run in other directories, where ``./my-base`` is not there."""
        path = Path(source)
        if "://" not in source and not path.is_absolute() and (path / "model_index.json").is_file():
            return str(path.resolve())
        return source


class JobConfig(Section):
    """Fields every job shares."""

    work_dir: PathStr = Field(default="runs", description="Local or s3:// root for this job's outputs.")
    storage: StorageConfig = StorageConfig()
    ray: RayConfig = RayConfig()


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

_NULLS = ("null", "Null", "NULL", "~")


def parse_override(text: str) -> tuple[list[str], Any, Any]:
    """``a.b=value`` -> (["a", "b"], text, typed): the value twice, as YAML reads it.

    ``text`` keeps every scalar as the string the user typed (quotes removed), ``typed`` is YAML's
    reading (3, 1e-5, true, null). Which one a field gets is decided by its type (:func:`coerce`), so
    ``run_name=2024`` stays the string "2024" while ``steps=3`` is the integer 3.
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. train.lr=1e-5)")
    key, raw = text.split("=", 1)
    key = key.strip().replace("-", "_")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    if not raw.strip():
        return key.split("."), "", ""
    try:
        return key.split("."), yaml.load(raw, Loader=yaml.BaseLoader), yaml.safe_load(raw)
    except yaml.YAMLError:
        return key.split("."), raw, raw


def field_type(cls: type[BaseModel], path: list[str]) -> Any:
    """The annotation a dotted path leads to in ``cls`` (through sections and dict fields); None if unknown."""
    annotation: Any = cls
    for part in path:
        model = _member(annotation, lambda t: isinstance(t, type) and issubclass(t, BaseModel))
        mapping = _member(annotation, lambda t: get_origin(t) is dict)
        if model is not None and part in model.model_fields:
            annotation = model.model_fields[part].annotation
        elif mapping is not None:
            annotation = (get_args(mapping) or (Any, Any))[1]
        else:
            return None
    return annotation


def coerce(annotation: Any, text: Any, typed: Any) -> Any:
    """The override value ``annotation`` wants: the typed text where the field takes strings, YAML's reading
    where it takes Any or a literal of numbers, else the text for pydantic to convert (so 0123 -> 123, not
    YAML's octal 83). Lists and mappings are walked element by element."""
    if annotation is None or annotation is Any:
        return typed
    if isinstance(text, dict) and isinstance(typed, dict):
        model = _member(annotation, lambda t: isinstance(t, type) and issubclass(t, BaseModel))
        if model is not None:
            return {k: coerce(field_type(model, [k]), v, tv) for (k, v), tv in zip(text.items(), typed.values())}
        mapping = _member(annotation, lambda t: get_origin(t) is dict)
        value_type = (get_args(mapping) or (Any, Any))[1] if mapping is not None else None
        return {k: coerce(value_type, v, tv) for (k, v), tv in zip(text.items(), typed.values())}
    if isinstance(text, list) and isinstance(typed, list):
        sequence = _member(annotation, lambda t: get_origin(t) in (list, tuple, set, frozenset, Sequence))
        args = [a for a in get_args(sequence) if a is not Ellipsis] if sequence is not None else []
        item_type = args[0] if len(args) == 1 else None
        return [coerce(item_type, v, tv) for v, tv in zip(text, typed)]
    if not isinstance(text, str):
        return typed
    if text in _NULLS and _member(annotation, lambda t: t is type(None)) is not None:
        return None
    if _member(annotation, _takes_text) is not None:
        return text
    if _member(annotation, lambda t: get_origin(t) is Literal) is not None:
        return typed  # a literal of numbers (zero_stage=2): pydantic will not convert "2"
    return text


def _members(annotation: Any) -> tuple:
    """The alternatives of a union (``str | None`` -> str, None), each without its Annotated[...] wrapper."""
    members = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    return tuple(get_args(t)[0] if get_origin(t) is Annotated else t for t in members)


def _member(annotation: Any, test) -> Any:
    return next((t for t in _members(annotation) if test(t)), None)


def _takes_text(t: Any) -> bool:
    if t is str:
        return True
    return get_origin(t) is Literal and any(isinstance(v, str) for v in get_args(t))


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
        keys, text, typed = parse_override(override)
        _set_dotted(tree, keys, coerce(field_type(cls, keys), text, typed))
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
