"""``zeroconv serve``: registered ControlNets behind an HTTP endpoint (Ray Serve + FastAPI).

One deployment, :class:`ControlNetServer`, is the whole application. Each replica

* resolves ``models:/NAME@ALIAS`` (default alias ``champion``) for every served model from the
  MLflow registry, loads the base model once and each ControlNet once;
* answers ``POST /v1/generate`` with the same :func:`model.inference.generate` the offline pipeline
  uses (DDIM, 20 steps, CFG 9.0 unless the model or request says otherwise), so the same seed and
  inputs give the same image as offline;
* batches concurrent requests (``@serve.batch``): requests with the same settings run as one
  pipeline call, each image with its own seed, so batching does not change what a request gets;
* polls the aliases in a background thread and swaps in a new version when an alias moves. A
  batch reads the model table once, so requests in flight finish on the version they started on.

Entry points: :func:`build_app` (the import path ``serve run``/``serve deploy`` use, see
``deploy/serve_config.yaml``) and :func:`run_serve` (``zeroconv serve``).
"""

# No `from __future__ import annotations` here: Serve ships the ingress class by value, where FastAPI
# cannot resolve string annotations, and `request: Request` would then read as a query parameter.
import asyncio
import base64
import hmac
import json
import logging
import os
import random
import tempfile
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, SecretStr, ValidationError
from ray import serve

from deploy.schemas import (
    MAX_SEED,
    SIZE_MULTIPLE,
    GenerateRequest,
    GenerateResponse,
    LimitsConfig,
    ModelInfo,
    ModelVersion,
    RequestError,
    check_range,
    check_size,
    decode_image,
    parse_request,
)
from pipelines.common.cluster import ensure_ray
from pipelines.common.config import ConfigError, JobConfig, MLflowConfig, Section, format_validation_error
from pipelines.common.dtypes import torch_dtype

logger = logging.getLogger("ray.serve")

DEFAULT_MODEL = "zeroconv-controlnet"  # the name pipelines/train.py registers under


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


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
    host: str = Field(default="127.0.0.1", description="HTTP host; keep 127.0.0.1 unless a gateway fronts Serve.")
    port: int = Field(default=8000, ge=1, le=65535, description="HTTP port.")
    app_name: str = Field(default="zeroconv", description="Serve application name.")
    route_prefix: str = Field(default="/", description="URL prefix of the application.")
    replicas: ReplicasConfig = ReplicasConfig()
    batching: BatchingConfig = BatchingConfig()
    limits: LimitsConfig = LimitsConfig()
    auth_token_env: str | None = Field(
        default=None,
        description="Env var holding a bearer token; when set, requests need 'Authorization: Bearer ...'.",
    )
    request_timeout_s: float = Field(default=120.0, gt=0, description="A generate request taking longer answers 504.")
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


# ---------------------------------------------------------------------------------------------
# Models: what a replica serves
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRef:
    """``NAME`` (served at the default alias), ``NAME@ALIAS`` or ``NAME/VERSION`` (pinned, never reloaded)."""

    name: str
    alias: str | None
    version: str | None

    @classmethod
    def parse(cls, text: str, default_alias: str) -> "ModelRef":
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


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    alias: str | None
    controlnet: Any  # diffusers.ControlNetModel
    unet: Any | None  # a UNet the training policy unlocked, else None (the base UNet is used)
    metadata: dict

    def info(self, default: bool) -> ModelInfo:
        return ModelInfo(
            name=self.name,
            version=self.version,
            alias=self.alias,
            default=default,
            base_model=self.metadata["base_model"],
            annotator=self.metadata.get("annotator"),
            inference=self.metadata.get("inference", {}),
            own_unet=self.unet is not None,
        )


def load_served_model(ref: ModelRef, device: str, dtype: str) -> ServedModel:
    """Download a registered version and load its ControlNet (and unlocked UNet) onto ``device``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    from model.registry import resolve_model

    with tempfile.TemporaryDirectory(prefix="zc-serve-") as tmp:
        resolved = resolve_model(ref.name, ref.alias, ref.version, dest=tmp)
        # Weights are read into memory here, so the download can go when the block ends.
        net = ControlNetModel.from_pretrained(resolved.controlnet_dir, torch_dtype=torch_dtype(dtype))
        unet = None
        if resolved.unet_dir:
            unet = UNet2DConditionModel.from_pretrained(resolved.unet_dir, torch_dtype=torch_dtype(dtype)).to(device)
    return ServedModel(ref.name, resolved.version, ref.alias, net.to(device).eval(), unet, resolved.metadata)


class ModelStore:
    """The base model, the served ControlNets and their pipelines, inside one replica.

    ``models`` is an immutable snapshot (name -> ServedModel) replaced wholesale on reload, so a
    reader that took the snapshot keeps a consistent set of versions for as long as it needs.
    """

    def __init__(self, refs: list[ModelRef], base_override: str | None, device: str, dtype: str, storage=None):
        from model.base import load_base

        if dtype == "fp16" and device == "cpu":
            raise ValueError("dtype fp16 needs a GPU; use fp32 or bf16 on CPU")
        self.refs = refs
        self.device, self.dtype = device, dtype
        first = load_served_model(refs[0], device, dtype)
        # Every served model must share one base: the override, else the one the first model names.
        self.base_source = base_override or first.metadata["base_model"]
        self.check_base = base_override is None
        self.base = load_base(self.base_source, storage=storage, device=device, dtype=torch_dtype(dtype))
        self.models: dict[str, ServedModel] = {first.name: first}
        for ref in refs[1:]:
            self.models[ref.name] = self._load(ref)
        self.default_model = first.name
        self._pipes: dict[tuple, Any] = {}
        self._annotators: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self._failed: set[tuple[str, str]] = set()

    def _load(self, ref: ModelRef) -> ServedModel:
        model = load_served_model(ref, self.device, self.dtype)
        if self.check_base and model.metadata["base_model"] != self.base_source:
            raise ValueError(
                f"{ref} (version {model.version}) was trained on base model {model.metadata['base_model']!r}, but "
                f"this server runs {self.base_source!r}: serve models of one base together, or set base_model"
            )
        return model

    def pipeline(self, models: list[ServedModel]):
        """The pipeline for this combination of model versions (built on first use, then cached)."""
        from model.inference import build_pipeline

        key = tuple((m.name, m.version) for m in models)
        with self._lock:
            pipe = self._pipes.get(key)
        if pipe is None:
            unets = [m for m in models if m.unet is not None]
            if unets and len(models) > 1:
                raise RequestError(
                    "controls", f"model {unets[0].name!r} has its own UNet and cannot be composed with others"
                )
            pipe = build_pipeline(self.base, [m.controlnet for m in models], unets[0].unet if unets else None)
            if all(self.models.get(m.name) is m for m in models):  # a batch still on replaced versions: don't keep
                with self._lock:
                    self._pipes[key] = pipe
        return pipe

    def annotator(self, name: str, params: dict):
        import annotators

        key = (name, json.dumps(params, sort_keys=True))
        with self._lock:
            found = self._annotators.get(key)
        if found is None:
            found = annotators.create(name, **params)
            with self._lock:
                self._annotators[key] = found
        return found

    def refresh(self) -> list[str]:
        """Load the version each alias points at now, if it moved; returns what changed."""
        import mlflow

        changed = []
        for ref in self.refs:
            if ref.alias is None:
                continue  # pinned version
            current = self.models[ref.name]
            version = mlflow.MlflowClient().get_model_version_by_alias(ref.name, ref.alias).version
            if version == current.version or (ref.name, version) in self._failed:
                continue
            try:
                loaded = self._load(ref)
            except Exception:
                self._failed.add((ref.name, version))
                logger.exception(
                    "could not load %s version %s; still serving version %s", ref, version, current.version
                )
                continue
            self.models = {**self.models, ref.name: loaded}  # one reference swap: readers see old or new
            live = {(m.name, m.version) for m in self.models.values()}
            with self._lock:
                self._pipes = {k: p for k, p in self._pipes.items() if set(k) <= live}
            changed.append(f"{ref}: version {current.version} -> {loaded.version}")
        return changed


# ---------------------------------------------------------------------------------------------
# Requests -> jobs -> batched pipeline calls
# ---------------------------------------------------------------------------------------------


@dataclass
class Job:
    """One validated request, images decoded and annotated, ready for the pipeline."""

    prompt: str
    negative_prompt: str | None
    models: tuple[str, ...]
    conditions: list[np.ndarray]  # one uint8 (H, W, 3) per control
    scales: tuple[float, ...]
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    guess_mode: bool

    def batch_key(self) -> tuple:
        """Jobs with equal keys run in one pipeline call; prompts and seeds may differ."""
        return (
            self.models,
            self.scales,
            self.steps,
            self.guidance_scale,
            self.width,
            self.height,
            self.negative_prompt,
            self.guess_mode,
        )


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


def prepare_job(req: GenerateRequest, store: ModelStore, limits: LimitsConfig) -> Job:
    """Check ``req`` against the limits and served models, decode and annotate its images."""
    from model.inference import DEFAULT_GUIDANCE, DEFAULT_STEPS

    for name in ("prompt", "negative_prompt"):
        text = getattr(req, name) or ""
        if len(text) > limits.max_prompt_chars:
            raise RequestError(name, f"{name} is {len(text)} characters; the limit is {limits.max_prompt_chars}")
    if not 1 <= len(req.controls) <= limits.max_controls:
        raise RequestError(
            "controls", f"controls must hold 1 to {limits.max_controls} entries, got {len(req.controls)}"
        )

    models = store.models  # one snapshot for the checks
    served = []
    for i, control in enumerate(req.controls):
        name = control.model or store.default_model
        if name not in models:
            raise RequestError(
                f"controls[{i}].model", f"model {name!r} is not served here; served: {', '.join(models)}"
            )
        served.append(models[name])
        check_range(f"controls[{i}].scale", control.scale, 0.0, limits.max_conditioning_scale)

    # Scalar checks before any image is decoded: cheap mistakes get cheap answers.
    defaults = served[0].metadata.get("inference", {})
    steps = req.steps if req.steps is not None else int(defaults.get("steps", DEFAULT_STEPS))
    guidance = (
        req.guidance_scale
        if req.guidance_scale is not None
        else float(defaults.get("guidance_scale", DEFAULT_GUIDANCE))
    )
    check_range("steps", steps, 1, limits.max_steps)
    check_range("guidance_scale", guidance, 0.0, limits.max_guidance_scale)
    seed = req.seed if req.seed is not None else random.randrange(2**31)
    check_range("seed", seed, 0, MAX_SEED)
    for dim in ("width", "height"):
        if getattr(req, dim) is not None:
            check_size(dim, getattr(req, dim), limits)

    inputs = []  # (field, image, annotator or None) per control
    for i, (control, model) in enumerate(zip(req.controls, served)):
        where = f"controls[{i}]"
        if (control.image is None) == (control.source_image is None):
            raise RequestError(
                f"{where}.image", f"{where} needs exactly one of image (a condition map) or source_image"
            )
        if control.image is not None:
            if control.annotator:
                raise RequestError(f"{where}.annotator", f"{where}.annotator applies to source_image, not image")
            inputs.append((f"{where}.image", decode_image(control.image, f"{where}.image", limits), None))
        else:
            annotator = annotator_for(control.annotator, model, f"{where}.annotator", store)
            image = decode_image(control.source_image, f"{where}.source_image", limits)
            inputs.append((f"{where}.source_image", image, annotator))

    width, height = output_size(req, inputs[0][0], inputs[0][1], limits)
    conditions = []
    for _, image, annotator in inputs:
        image = resize(image, width, height)
        if annotator is not None:
            image = annotator(image[None])[0]
        conditions.append(np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image)
    return Job(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt or None,
        models=tuple(m.name for m in served),
        conditions=conditions,
        scales=tuple(c.scale for c in req.controls),
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        width=width,
        height=height,
        guess_mode=req.guess_mode,
    )


def output_size(
    req: GenerateRequest, first_field: str, first_image: np.ndarray, limits: LimitsConfig
) -> tuple[int, int]:
    """Requested width/height; a missing one is the first control image's, rounded down to a multiple of 8."""
    sizes = []
    for dim, axis in (("width", 1), ("height", 0)):
        value = getattr(req, dim)
        if value is None:
            value = first_image.shape[axis] // SIZE_MULTIPLE * SIZE_MULTIPLE
            check_size(dim, value, limits, origin=first_field)
        sizes.append(value)
    return sizes[0], sizes[1]


def annotator_for(name: str | None, model: ServedModel, field: str, store: ModelStore):
    """The named annotator, or the model's own (with the parameters it was trained with)."""
    spec = model.metadata.get("annotator") or {}
    if name is None:
        if not spec.get("name"):
            raise RequestError(field, f"{field} is required: model {model.name!r} does not record its annotator")
        name = spec["name"]
    params = spec.get("params", {}) if name == spec.get("name") else {}
    try:
        return store.annotator(name, params)
    except ValueError as exc:
        raise RequestError(field, str(exc)) from None


def run_batch(store: ModelStore, jobs: list[Job]) -> list:
    """Run ``jobs`` as few pipeline calls as their settings allow; per job (PNG bytes, versions) or an error."""
    from model.inference import generate
    from pipelines.common.images import encode_png

    models = store.models  # one snapshot for the whole batch: a reload mid-batch cannot mix versions
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.batch_key()].append(i)
    results: list = [None] * len(jobs)
    for indices in groups.values():
        group = [jobs[i] for i in indices]
        first = group[0]
        try:
            served = [models[name] for name in first.models]
            pipe = store.pipeline(served)
            per_net = [np.stack([job.conditions[k] for job in group]) for k in range(len(served))]
            multi = len(served) > 1
            images = generate(
                pipe,
                [job.prompt for job in group],
                per_net if multi else per_net[0],
                seed=[job.seed for job in group],
                steps=first.steps,
                guidance_scale=first.guidance_scale,
                conditioning_scale=list(first.scales) if multi else first.scales[0],
                negative_prompt=first.negative_prompt,
                guess_mode=first.guess_mode,
            )
            versions = [ModelVersion(name=m.name, version=m.version) for m in served]
            for i, image in zip(indices, images):
                results[i] = (encode_png(image), versions)
        except Exception as exc:  # one group's failure must not fail the other requests in the batch
            logger.exception("generation failed for a group of %d request(s)", len(group))
            for i in indices:
                results[i] = exc
    return results


class BatchWait:
    """How long a forming batch waits for company; Serve reads it when a batch's first request arrives.

    A fixed wait either adds its full length to every lone request or, when short, splits a group
    of concurrent requests into several batches. Instead:

    * idle after single requests: no wait; nobody else is coming, so waiting only adds latency;
    * a batch is running: wait until it should end, plus ``window``; arrivals could not run before
      then anyway, and gathering them all makes one batch instead of several;
    * idle right after a batch of several: ``window``; the rest of that group is about to re-send.
    """

    def __init__(self, window: float):
        self.window = window
        self.running_since: float | None = None
        self.last_duration = 0.0
        self.last_size = 0

    def wait_s(self, now: float) -> float:
        if self.running_since is not None:
            return max(self.last_duration - (now - self.running_since), 0.0) + self.window
        return self.window if self.last_size > 1 else 0.0

    def started(self, now: float) -> None:
        self.running_since = now

    def finished(self, now: float, size: int) -> None:
        self.last_duration, self.running_since, self.last_size = now - self.running_since, None, size


# ---------------------------------------------------------------------------------------------
# The deployment
# ---------------------------------------------------------------------------------------------

app = FastAPI(title="zeroconv", description="ControlNet image generation from registered models.")


@app.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


@app.exception_handler(Exception)
async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error on %s", request.url.path, exc_info=exc)
    return JSONResponse(
        {"error": f"internal error ({type(exc).__name__}); see the server log", "field": None}, status_code=500
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` before reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise RequestError(None, f"request body is {declared} bytes; the limit is {limit}", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(None, f"request body is over the {limit}-byte limit", 413)
    return bytes(body)


@serve.deployment(name="ControlNetServer")
@serve.ingress(app)
class ControlNetServer:
    def __init__(self, config: ServeConfig, token: SecretStr | None = None):
        import mlflow
        import torch

        if config.replicas.torch_threads:
            torch.set_num_threads(config.replicas.torch_threads)
        device = config.replicas.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        mlflow.set_tracking_uri(config.mlflow.tracking_uri)  # build_app resolved it to an absolute URI
        self.config = config
        self._token = token.get_secret_value().encode() if token else None
        refs = [ModelRef.parse(m, config.alias) for m in config.models]
        self.store = ModelStore(refs, config.base_model, device, config.replicas.dtype, config.storage)
        self.generate_batch.set_max_batch_size(config.batching.max_batch_size)
        self._batch_wait = BatchWait(config.batching.batch_wait_timeout_s)
        # One pipeline call at a time: torch already spreads each call over the replica's threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zc-pipeline")
        self._stop = threading.Event()
        if config.reload_interval_s > 0 and any(r.alias for r in refs):
            threading.Thread(target=self._reload_loop, name="zc-reload", daemon=True).start()
        logger.info("serving %s on %s", {n: m.version for n, m in self.store.models.items()}, device)

    def _reload_loop(self) -> None:
        while not self._stop.wait(self.config.reload_interval_s):
            try:
                for change in self.store.refresh():
                    logger.info("hot reload: %s", change)
            except Exception:  # registry unreachable etc.: keep serving what is loaded, try again later
                logger.exception("alias check failed; still serving the loaded versions")

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise RequestError("Authorization", "missing or wrong bearer token", 401)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok", "models": {n: m.version for n, m in self.store.models.items()}}

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return {"models": [m.info(n == self.store.default_model).model_dump() for n, m in self.store.models.items()]}

    @app.post("/v1/generate")
    async def generate(self, request: Request):
        self._authorize(request)
        started = time.perf_counter()
        req = parse_request(await read_body(request, self.config.limits.max_request_bytes))
        if any(control.source_image for control in req.controls):
            # Annotators can take seconds: keep the event loop free for other requests meanwhile.
            job = await asyncio.to_thread(prepare_job, req, self.store, self.config.limits)
        else:
            # Decoding condition maps takes milliseconds; a thread hop would cost more than it saves.
            job = prepare_job(req, self.store, self.config.limits)
        self.generate_batch.set_batch_wait_timeout_s(self._batch_wait.wait_s(time.monotonic()))
        try:
            result = await asyncio.wait_for(self.generate_batch(job), self.config.request_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(None, f"generation took longer than {self.config.request_timeout_s}s", 504) from None
        if isinstance(result, Exception):
            raise result
        png, versions = result
        if req.response_format == "png" or (
            req.response_format is None and "image/png" in request.headers.get("accept", "")
        ):
            return Response(
                png,
                media_type="image/png",
                headers={
                    "X-Seed": str(job.seed),
                    "X-Models": ",".join(f"{v.name}/{v.version}" for v in versions),
                },
            )
        return GenerateResponse(
            image=base64.b64encode(png).decode(),
            seed=job.seed,
            width=job.width,
            height=job.height,
            steps=job.steps,
            guidance_scale=job.guidance_scale,
            models=versions,
            elapsed_ms=round((time.perf_counter() - started) * 1e3, 2),
        ).model_dump()

    @serve.batch(max_batch_size=8)  # size from the config (__init__), wait from BatchWait (per request)
    async def generate_batch(self, jobs: list[Job]) -> list:
        self._batch_wait.started(time.monotonic())
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run_batch, self.store, jobs)
        finally:
            self._batch_wait.finished(time.monotonic(), len(jobs))

    def __del__(self):
        self._stop.set()


# ---------------------------------------------------------------------------------------------
# Building and running the application
# ---------------------------------------------------------------------------------------------


def resolve_config(config: ServeConfig) -> ServeConfig:
    """The config with the tracking URI made absolute here, where relative paths mean what the user meant."""
    from pipelines.common.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(config.mlflow.tracking_uri, config.work_dir)
    for text in config.models:
        ModelRef.parse(text, config.alias)  # a bad reference fails here, not in every replica
    return config.model_copy(update={"mlflow": config.mlflow.model_copy(update={"tracking_uri": uri})})


def build_app(args: dict):
    """Application builder for ``serve run``/``serve deploy``: ``args`` are ServeConfig fields."""
    config = resolve_config(validate_config(args))
    token = None
    if config.auth_token_env:
        value = os.environ.get(config.auth_token_env, "")
        if not value:
            raise ConfigError(
                f"auth_token_env is {config.auth_token_env!r} but that environment variable is empty or unset"
            )
        token = SecretStr(value)  # prints as '**********'
    replicas = config.replicas
    options: dict[str, Any] = {
        "max_ongoing_requests": max(replicas.max_ongoing_requests, config.batching.max_batch_size),
        "ray_actor_options": {"num_cpus": replicas.num_cpus, "num_gpus": replicas.num_gpus},
        # Scale-down and redeploys let in-flight requests finish.
        "graceful_shutdown_timeout_s": config.request_timeout_s,
    }
    if replicas.autoscaling:
        options["autoscaling_config"] = replicas.autoscaling.model_dump()
    else:
        options["num_replicas"] = replicas.num_replicas
    return ControlNetServer.options(**options).bind(config, token)


def served_versions(config: ServeConfig) -> dict[str, str]:
    """Check every served model resolves in the registry; name -> version. Fails fast with a clear error."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from pipelines.common.tracking import check_tracking_server

    check_tracking_server(config.mlflow.tracking_uri)
    client = mlflow.MlflowClient(tracking_uri=config.mlflow.tracking_uri)
    versions = {}
    for text in config.models:
        ref = ModelRef.parse(text, config.alias)
        try:
            mv = (
                client.get_model_version(ref.name, ref.version)
                if ref.version
                else client.get_model_version_by_alias(ref.name, ref.alias)
            )
        except MlflowException:
            raise ValueError(f"{ref} is not in the registry at {config.mlflow.tracking_uri}") from None
        versions[ref.name] = str(mv.version)
    return versions


@dataclass
class ServeResult:
    url: str
    app_name: str
    models: dict[str, str]
    handle: Any = None
    stopped: bool = False

    def __str__(self) -> str:
        served = ", ".join(f"{n} v{v}" for n, v in self.models.items())
        state = "stopped serving" if self.stopped else "serving"
        return f"{state} {self.app_name} at {self.url} ({served})"


def run_serve(config: ServeConfig) -> ServeResult:
    """Start Serve on host:port, deploy the app and, unless ``block`` is false, serve until Ctrl-C."""
    import ray

    config = resolve_config(config)
    versions = served_versions(config)
    application = build_app(config)
    started_ray = ensure_ray(config.ray)  # the test's/pipeline's Ray, config.ray.address, or a local one
    serve.start(http_options={"host": config.host, "port": config.port})
    handle = serve.run(application, name=config.app_name, route_prefix=config.route_prefix)
    url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    result = ServeResult(url, config.app_name, versions, handle)
    print(f"{result}\n  POST {url}/v1/generate   GET {url}/v1/models   GET {url}/healthz", flush=True)
    if not config.block:
        return result
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
        if started_ray:
            ray.shutdown()
    result.stopped, result.handle = True, None
    return result
