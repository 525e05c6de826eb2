"""``zeroconv serve``: registered ControlNets behind an HTTP endpoint (Ray Serve + FastAPI).

Two deployments make the application (Ray Serve model composition):

* :class:`Gateway`, the HTTP ingress: checks the bearer token and the request (a bad one gets its 4xx
  here, without touching a model replica) and hands it to a :class:`ControlNetServer` replica through a
  ``DeploymentHandle``. A request whose replica is lost while generating (its node gone: spot reclaim,
  scale-down) is sent again to another replica, and answered 503 with ``Retry-After`` only if that fails
  too: Serve's proxy would answer it 500 (it maps a dead replica's ``RayActorError`` to 500).
* :class:`ControlNetServer`, the model replicas. Each replica

  * loads what it serves at start-up (deploy/store.py): ``models:/NAME@ALIAS`` for every model, the
    base model once, and the annotators it offers, built exactly as the models were trained;
  * generates with the same :func:`model.inference.generate` the offline pipeline uses (DDIM, 20 steps,
    CFG 9.0 unless the model or request says otherwise);
  * batches concurrent requests (``@serve.batch``, deploy/batching.py); a request that times out or
    whose client goes away is dropped from its batch, or stops its pipeline call if it was alone;
  * polls the aliases in a background thread and swaps in a new version when an alias moves.

Entry points: :func:`build_app` (the import path ``serve run``/``serve deploy`` use, see
``deploy/serve_config.yaml``) and :func:`run_serve` (``zeroconv serve``). Both run the same
start-up checks, so a config that names an unknown model fails once with a clear error.
"""

# No `from __future__ import annotations` here: Serve ships the ingress class by value, where FastAPI
# cannot resolve string annotations, and `request: Request` would then read as a query parameter.
import asyncio
import base64
import hmac
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import SecretStr
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from deploy.batching import BatchWait, run_batch
from deploy.config import ModelRef, ServeConfig, validate_config
from deploy.jobs import Job, prepare_job
from deploy.schemas import GenerateRequest, GenerateResponse, RequestError, parse_request
from deploy.store import ModelStore
from pipelines.common.cluster import ensure_ray
from pipelines.common.config import ConfigError

logger = logging.getLogger("ray.serve")

REPLICA_ATTEMPTS = 2  # a request whose replica was lost is sent once more, to another replica; then 503
RETRY_AFTER_S = 5  # what a 503 tells the client: about the time Serve takes to notice and replace a lost replica
GATEWAY_MAX_ONGOING = 1024  # the gateway only awaits replicas; their max_ongoing_requests bounds the work


class ReplicaLost(RequestError):
    """The replicas a request was sent to were lost while generating it: 503, worth trying again shortly."""

    def __init__(self):
        super().__init__(None, "the model replica serving this request was lost; retry it", 503)

    def __reduce__(self):
        return type(self), ()


app = FastAPI(title="zeroconv", description="ControlNet image generation from registered models.")


@app.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    headers = None
    if exc.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif isinstance(exc, ReplicaLost):
        headers = {"Retry-After": str(RETRY_AFTER_S)}
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
class ControlNetServer:
    """A model replica: generates for requests the :class:`Gateway` checked."""

    def __init__(self, config: ServeConfig):
        import mlflow
        import torch

        self._stop = threading.Event()  # first: __del__ needs it even when loading below fails
        if config.replicas.torch_threads:
            torch.set_num_threads(config.replicas.torch_threads)
        device = config.replicas.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        mlflow.set_tracking_uri(config.mlflow.tracking_uri)  # build_app resolved it to an absolute URI
        self.config = config
        self.store = ModelStore(config, device)
        self.generate_batch.set_max_batch_size(config.batching.max_batch_size)
        self._batch_wait = BatchWait(config.batching.batch_wait_timeout_s)
        # One pipeline call at a time: torch already spreads each call over the replica's threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zc-pipeline")
        if config.reload_interval_s > 0 and any(r.alias for r in self.store.refs):
            threading.Thread(target=self._reload_loop, name="zc-reload", daemon=True).start()
        logger.info("serving %s on %s", {n: m.version for n, m in self.store.models.items()}, device)

    def _reload_loop(self) -> None:
        while not self._stop.wait(self.config.reload_interval_s):
            try:
                for change in self.store.refresh():
                    logger.info("hot reload: %s", change)
            except Exception:  # a bug in refresh must not end hot reload for good
                logger.exception("hot reload check failed; still serving the loaded versions")

    def health(self) -> dict:
        return self.store.health()

    def models(self) -> dict:
        return {"models": [m.info(n == self.store.default_model).model_dump() for n, m in self.store.models.items()]}

    async def generate(self, req: GenerateRequest, deadline: float) -> tuple[bytes, dict]:
        """One request, answered by ``deadline`` (``time.time()``): (PNG bytes, the response's other fields)."""
        if any(control.source_image for control in req.controls):
            # Annotators can take seconds: keep the event loop free for other requests meanwhile.
            job = await asyncio.to_thread(prepare_job, req, self.store, self.config.limits)
        else:
            # Decoding condition maps takes milliseconds; a thread hop would cost more than it saves.
            job = prepare_job(req, self.store, self.config.limits)
        self.generate_batch.set_batch_wait_timeout_s(self._batch_wait.wait_s(time.monotonic()))
        remaining = deadline - time.time()  # wall clock: the gateway that set it may run on another node
        try:
            result = await asyncio.wait_for(self.generate_batch(job), max(remaining, 0.001))
        except asyncio.TimeoutError:
            job.abandoned.set()  # frees the pipeline thread: the batch skips or stops this work
            raise RequestError(None, f"generation took longer than {self.config.request_timeout_s}s", 504) from None
        except asyncio.CancelledError:  # Serve cancelled the request: client gone or Serve's own timeout
            job.abandoned.set()
            raise
        if isinstance(result, Exception):
            raise result
        png, versions, batch_size = result
        fields = {
            "seed": job.seed,
            "width": job.width,
            "height": job.height,
            "steps": job.steps,
            "guidance_scale": job.guidance_scale,
            "models": versions,
            "batch_size": batch_size,
        }
        return png, fields

    @serve.batch(max_batch_size=8)  # size from the config (__init__), wait from BatchWait (per request)
    async def generate_batch(self, jobs: list[Job]) -> list:
        self._batch_wait.started(time.monotonic())
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, run_batch, self.store, jobs)
        finally:
            self._batch_wait.finished(time.monotonic(), len(jobs))

    def __del__(self):
        self._stop.set()


@serve.deployment(name="Gateway", max_ongoing_requests=GATEWAY_MAX_ONGOING)
@serve.ingress(app)
class Gateway:
    """The HTTP ingress: authorizes and parses requests, forwards them to the model replicas."""

    def __init__(self, server: DeploymentHandle, config: ServeConfig, token: SecretStr | None = None):
        self.server = server
        self.config = config
        self._token = token.get_secret_value().encode() if token else None

    async def _on_a_replica(self, method: str, *args):
        """``server.method(*args)`` on a model replica; again on another one if that replica is lost meanwhile."""
        for attempt in range(1, REPLICA_ATTEMPTS + 1):
            try:
                return await getattr(self.server, method).remote(*args)
            except RayActorError as exc:  # the replica died (ActorDiedError) or is unreachable: not the request
                logger.warning("%s: model replica lost (attempt %d of %d): %s", method, attempt, REPLICA_ATTEMPTS, exc)
        raise ReplicaLost()

    def _authorize(self, request: Request) -> None:
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise RequestError("Authorization", "missing or wrong bearer token", 401)

    @app.get("/healthz")
    async def healthz(self) -> dict:
        return await self._on_a_replica("health")

    @app.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._authorize(request)
        return await self._on_a_replica("models")

    @app.post("/v1/generate")
    async def generate(self, request: Request):
        self._authorize(request)
        started, deadline = time.perf_counter(), time.time() + self.config.request_timeout_s
        req = parse_request(await read_body(request, self.config.limits.max_request_bytes))
        png, fields = await self._on_a_replica("generate", req, deadline)  # a retry gets what is left
        if req.response_format == "png" or (
            req.response_format is None and "image/png" in request.headers.get("accept", "")
        ):
            return Response(
                png,
                media_type="image/png",
                headers={
                    "X-Seed": str(fields["seed"]),
                    "X-Models": ",".join(f"{v.name}/{v.version}" for v in fields["models"]),
                },
            )
        return GenerateResponse(
            image=base64.b64encode(png).decode(),
            **fields,
            elapsed_ms=round((time.perf_counter() - started) * 1e3, 2),
        ).model_dump()


# ---------------------------------------------------------------------------------------------
# Building and running the application
# ---------------------------------------------------------------------------------------------


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


def check_replica_dtype(config: ServeConfig) -> None:
    """fp16 weights need a GPU (torch has no fp16 kernels for much of the CPU path): refuse a config whose
    replicas get none here, once, instead of in every replica that Serve then restarts."""
    replicas = config.replicas
    if replicas.dtype == "fp16" and (replicas.device == "cpu" or replicas.num_gpus == 0):
        why = "replicas.device=cpu" if replicas.device == "cpu" else "replicas.num_gpus=0"
        raise ConfigError(
            f"replicas.dtype=fp16 needs a GPU but the replicas get none ({why}): use fp32 or bf16 on CPU, "
            "or give each replica a GPU (replicas.num_gpus=1, replicas.device=auto or cuda)"
        )


@dataclass
class CheckedConfig:
    """A config that passed the start-up checks: absolute tracking URI, token read, every model resolved."""

    config: ServeConfig
    versions: dict[str, str]
    token: SecretStr | None

    @classmethod
    def check(cls, args: dict | ServeConfig) -> "CheckedConfig":
        from pipelines.common.tracking import resolve_tracking_uri

        config = validate_config(args)
        for text in config.models:
            ModelRef.parse(text, config.alias)  # a bad reference fails here, not in every replica
        check_replica_dtype(config)
        token = None
        if config.auth_token_env:
            value = os.environ.get(config.auth_token_env, "")
            if not value:
                raise ConfigError(
                    f"auth_token_env is {config.auth_token_env!r} but that environment variable is empty or unset"
                )
            token = SecretStr(value)  # prints as '**********'
        # The tracking URI made absolute here, where relative paths mean what the user meant. A SQLite
        # registry that is not there is refused: MLflow would create an empty one and find no model.
        uri = resolve_tracking_uri(config.mlflow.tracking_uri, config.work_dir, must_exist=True)
        config = config.model_copy(update={"mlflow": config.mlflow.model_copy(update={"tracking_uri": uri})})
        return cls(config, served_versions(config), token)

    def application(self):
        replicas, config = self.config.replicas, self.config
        options: dict[str, Any] = {
            "max_ongoing_requests": max(replicas.max_ongoing_requests, config.batching.max_batch_size),
            # ray.resources pins replicas to the node type that offers them (e.g. {annotate_gpu: 1}).
            "ray_actor_options": {
                "num_cpus": replicas.num_cpus,
                "num_gpus": replicas.num_gpus,
                **({"resources": dict(config.ray.resources)} if config.ray.resources else {}),
            },
            # Scale-down and redeploys let in-flight requests finish.
            "graceful_shutdown_timeout_s": config.request_timeout_s,
            # The start-up checks passed, so a replica that still cannot start (a model that will not
            # load, no CUDA where the config expects it) fails the same way every time: give up after
            # a few tries, not 20.
            "max_constructor_retry_count": 3,
        }
        if replicas.autoscaling:
            options["autoscaling_config"] = replicas.autoscaling.model_dump()
        else:
            options["num_replicas"] = replicas.num_replicas
        server = ControlNetServer.options(**options).bind(config)
        # The gateway only forwards: no CPU of its own, so it fits anywhere, even on a head with num-cpus 0.
        gateway = {"num_replicas": config.gateway_replicas, "ray_actor_options": {"num_cpus": 0}}
        return Gateway.options(**gateway).bind(server, config, self.token)


def build_app(args: dict):
    """Application builder for ``serve run``/``serve deploy``: ``args`` are ServeConfig fields."""
    return CheckedConfig.check(args).application()


@dataclass
class ServeResult:
    url: str
    app_name: str
    models: dict[str, str]
    handle: Any = None
    stopped: bool = False
    _cleanup: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def stop(self) -> None:
        """Remove this application, and Serve and Ray if this run started them; other applications stay."""
        while self._cleanup:
            self._cleanup.pop()()
        self.stopped, self.handle = True, None

    def __str__(self) -> str:
        served = ", ".join(f"{n} v{v}" for n, v in self.models.items())
        state = "stopped serving" if self.stopped else "serving"
        return f"{state} {self.app_name} at {self.url} ({served})"


def run_serve(config: ServeConfig) -> ServeResult:
    """Start Serve on host:port, deploy the app and, unless ``block`` is false, serve until Ctrl-C.

    Only what this call started is stopped at the end (or when deploying fails): its application,
    Serve if it was not running, Ray if it was not connected. On a shared cluster other Serve
    applications keep running.
    """
    import ray
    from ray.serve.context import _get_global_client

    checked = CheckedConfig.check(config)
    config = checked.config
    application = checked.application()
    url = f"http://{config.host}:{config.port}{config.route_prefix.rstrip('/')}"
    result = ServeResult(url, config.app_name, checked.versions)
    try:
        if ensure_ray(config.ray):  # the test's/pipeline's Ray, config.ray.address, or a local one
            result._cleanup.append(ray.shutdown)
        if _get_global_client(raise_if_no_controller_running=False) is None:
            # Serve's own timeout is a backstop for time spent before the app's (queued at the proxy).
            http = {"host": config.host, "port": config.port, "request_timeout_s": config.request_timeout_s + 10}
            serve.start(http_options=http)
            result._cleanup.append(serve.shutdown)
        result._cleanup.append(lambda: serve.delete(config.app_name))
        result.handle = serve.run(application, name=config.app_name, route_prefix=config.route_prefix)
    except BaseException:
        result.stop()
        raise
    print(f"{result}\n  POST {url}/v1/generate   GET {url}/v1/models   GET {url}/healthz", flush=True)
    if not config.block:
        return result
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        result.stop()
    return result
