"""What ``zeroconv serve`` is configured with: :class:`ServeConfig` and the model references it names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field, ValidationError

from deploy.schemas import LimitsConfig
from pipelines.common.config import ConfigError, JobConfig, MLflowConfig, Section, format_validation_error

DEFAULT_MODEL = "zeroconv-controlnet"  # the name pipelines/train.py registers under


class AutoscalingConfig(Section):
    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas autoscaling keeps.")
    max_replicas: int = Field(default=4, ge=1, description="Most replicas autoscaling starts.")
    target_ongoing_requests: float = Field(default=8.0, gt=0, description="Requests per replica autoscaling aims for.")


class ReplicasConfig(Section):
    num_replicas: int = Field(
        default=1, ge=1, description="Fixed number of replicas (ignored when autoscaling is set)."
    )
    autoscaling: AutoscalingConfig | None = Field(default=None, description="Autoscale between min and max replicas.")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per replica.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved per replica (0: CPU inference).")
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch intra-op threads per replica (None: Ray's default, one per reserved CPU).",
    )
    max_ongoing_requests: int = Field(
        default=32, ge=1, description="Requests a replica accepts at once (>= max_batch_size)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="Inference device; auto: cuda when the replica has a GPU."
    )
    dtype: Literal["fp32", "fp16", "bf16"] = Field(default="fp32", description="Weights dtype (fp16 needs cuda).")


class BatchingConfig(Section):
    max_batch_size: int = Field(
        default=8, ge=1, description="Most requests run as one pipeline call (1: no batching)."
    )
    batch_wait_timeout_s: float = Field(
        default=0.01,
        ge=0,
        description="Extra wait for more requests while the model is busy or right after a multi-request batch; "
        "a lone request on an idle server never waits.",
    )


class ServeConfig(JobConfig):
    """Serves registered ControlNets: POST /v1/generate, GET /v1/models, GET /healthz."""

    mlflow: MLflowConfig = MLflowConfig()
    models: list[str] = Field(
        default=[DEFAULT_MODEL],
        description="Registered models to serve: NAME, NAME@ALIAS or NAME/VERSION. The first is the default.",
    )
    alias: str = Field(default="champion", description="Alias served for models given as a bare NAME.")
    base_model: str | None = Field(
        default=None, description="Base model override ('tiny', dir, s3://); default: the one the models name."
    )
    annotators: list[str] | None = Field(
        default=None,
        description="Annotators requests may run on a source_image, loaded at start-up. Default: the ones the "
        "served models were trained with (with their recorded parameters and weights); []: none.",
    )
    annotator_weights: str | None = Field(
        default=None,
        description="Where this server finds annotator weights (local dir or s3:// prefix) instead of the source "
        "recorded at training; the recorded sha256 of every file must still match.",
    )
    host: str = Field(default="127.0.0.1", description="HTTP host; keep 127.0.0.1 unless a gateway fronts Serve.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field(default="zeroconv", description="Serve application name.")
    route_prefix: str = Field(default="/", description="URL prefix of the application.")
    replicas: ReplicasConfig = ReplicasConfig()
    gateway_replicas: int = Field(
        default=1,
        ge=1,
        description="Replicas of the HTTP gateway in front of the model replicas (no CPU each; it retries a request "
        "whose model replica was lost). On a cluster, 2+ keep serving when a gateway's node is lost.",
    )
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    auth_token_env: str | None = Field(
        default=None,
        description="Env var holding a bearer token; when set, requests need 'Authorization: Bearer ...'.",
    )
    request_timeout_s: float = Field(
        default=120.0, gt=0, description="A generate request taking longer answers 504 and its work is stopped."
    )
    reload_interval_s: float = Field(
        default=30.0, ge=0, description="Seconds between alias checks for hot reload (0: off)."
    )
    block: bool = Field(default=True, description="Serve until Ctrl-C; false: deploy, print the URL and return.")


def validate_config(args: dict | ServeConfig) -> ServeConfig:
    if isinstance(args, ServeConfig):
        return args
    try:
        return ServeConfig.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(ServeConfig, exc)) from None


@dataclass(frozen=True)
class ModelRef:
    """``NAME`` (served at the default alias), ``NAME@ALIAS`` or ``NAME/VERSION`` (pinned, never reloaded)."""

    name: str
    alias: str | None
    version: str | None

    @classmethod
    def parse(cls, text: str, default_alias: str) -> ModelRef:
        ref = text.strip().removeprefix("models:/")
        if "@" in ref:
            name, alias = ref.split("@", 1)
            return cls(name, alias, None) if name and alias else cls._bad(text)
        if "/" in ref:
            name, version = ref.rsplit("/", 1)
            return cls(name, None, version) if name and version.isdigit() else cls._bad(text)
        return cls(ref, default_alias, None) if ref else cls._bad(text)

    @staticmethod
    def _bad(text: str):
        raise ConfigError(f"models: {text!r} is not NAME, NAME@ALIAS or NAME/VERSION")

    def __str__(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"
