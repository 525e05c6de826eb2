"""What one replica serves: the base model, the registered ControlNets, their pipelines and annotators.

Everything a request needs is loaded here, at start-up or by the hot-reload thread, never on a
request path. ``ModelStore.models`` is an immutable snapshot (name -> :class:`ServedModel`) that a
reload replaces wholesale, so a reader that took the snapshot keeps one consistent set of versions.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

from deploy.config import ModelRef, ServeConfig
from deploy.schemas import ModelInfo, RequestError
from pipelines.common.dtypes import torch_dtype

logger = logging.getLogger("ray.serve")

MAX_RETRY_S = 600.0  # a version that keeps failing to load is retried at least this often


@dataclass(frozen=True)
class ServedModel:
    name: str
    version: str
    alias: str | None
    controlnet: Any  # the family's stock ControlNet class (diffusers.ControlNetModel, SD3ControlNetModel, ...)
    unet: Any | None  # a denoiser (UNet or transformer) the training policy unlocked, else None (the base's is used)
    metadata: dict

    @property
    def family(self) -> str | None:
        """The base model family it was trained for (recorded by training; None for older registrations)."""
        return self.metadata.get("family")

    @property
    def control_modes(self) -> list[int]:
        """A union ControlNet's trained control types (indexes), one per trained condition column; else []."""
        return [entry["control_mode"] for entry in self.metadata.get("union", [])]

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
            control_types=sorted({e["control_type"] for e in self.metadata["union"]}) if self.control_modes else None,
        )


def load_served_model(ref: ModelRef, device: str, dtype: str) -> ServedModel:
    """Download a registered version and load its ControlNet (and unlocked denoiser) onto ``device``."""
    from model.inference import load_diffusers_model
    from model.registry import resolve_model

    with tempfile.TemporaryDirectory(prefix="zc-serve-") as tmp:
        resolved = resolve_model(ref.name, ref.alias, ref.version, dest=tmp)
        # Weights are read into memory here, so the download can go when the block ends.
        net = load_diffusers_model(resolved.controlnet_dir, torch_dtype(dtype))
        unet = None
        if resolved.unet_dir:
            unet = load_diffusers_model(resolved.unet_dir, torch_dtype(dtype)).to(device)
    return ServedModel(ref.name, resolved.version, ref.alias, net.to(device).eval(), unet, resolved.metadata)


@dataclass(frozen=True)
class Unavailable:
    """An offered annotator that could not be built (weights missing or not the recorded ones)."""

    reason: str


@dataclass(frozen=True)
class ReloadFailure:
    version: str
    attempts: int
    next_try: float  # time.monotonic() of the next attempt
    error: str


def annotator_key(spec: dict) -> str:
    """Annotators with the same name, code version and parameters are one instance."""
    return json.dumps({k: spec.get(k) for k in ("name", "version", "params")}, sort_keys=True)


class ModelStore:
    def __init__(self, config: ServeConfig, device: str):
        from model.families import load

        if config.replicas.dtype == "fp16" and device == "cpu":
            raise ValueError("dtype fp16 needs a GPU; use fp32 or bf16 on CPU")
        self.config, self.device, self.dtype = config, device, config.replicas.dtype
        self.refs = [ModelRef.parse(m, config.alias) for m in config.models]
        first = load_served_model(self.refs[0], device, self.dtype)
        # Every served model must share one base: the override, else the one the first model names.
        self.base_source = config.base_model or first.metadata["base_model"]
        self.check_base = config.base_model is None
        self.base = load(self.base_source, storage=config.storage, device=device, dtype=torch_dtype(self.dtype))
        self.models: dict[str, ServedModel] = {first.name: first}
        for ref in self.refs[1:]:
            self.models[ref.name] = self._load(ref)
        self.default_model = first.name
        self._pipes: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        self.annotators: dict[str, Any] = {}  # annotator_key -> Annotator | Unavailable
        self.offered: dict[str, str] = {}  # annotator name a request may give -> annotator_key
        self._offer_annotators(list(self.models.values()))
        self.failures: dict[str, ReloadFailure] = {}  # model name -> the version that failed to load
        self.registry_error: str | None = None

    def _load(self, ref: ModelRef) -> ServedModel:
        model = load_served_model(ref, self.device, self.dtype)
        if self.check_base and model.metadata["base_model"] != self.base_source:
            raise ValueError(
                f"{ref} (version {model.version}) was trained on base model {model.metadata['base_model']!r}, but "
                f"this server runs {self.base_source!r}: serve models of one base together, or set base_model"
            )
        return model

    # -- annotators ----------------------------------------------------------------------------

    def _offer_annotators(self, models: list[ServedModel]) -> None:
        """Build the allowed annotators: a served model's own from its record, others by name with defaults."""
        allowed = self.config.annotators
        specs = [m.metadata.get("annotator") or {} for m in models]
        specs = [s for s in specs if s.get("name") and (allowed is None or s["name"] in allowed)]
        recorded = {s["name"] for s in specs} | set(self.offered)
        specs += [{"name": name, "params": {}} for name in allowed or [] if name not in recorded]
        built = dict(self.annotators)
        for spec in specs:
            key = annotator_key(spec)
            if key not in built:
                built[key] = self._build_annotator(spec)
            self.offered.setdefault(spec["name"], key)
        self.annotators = built  # one reference swap, like the model table

    def _build_annotator(self, spec: dict):
        from annotators import annotator_class, create, from_spec

        name = spec["name"]
        try:
            if "version" in spec:  # recorded at training: exactly those parameters and weights
                return from_spec(spec, self.config.annotator_weights, device=self.device, storage=self.config.storage)
            network = annotator_class(name).weights is not None
            runtime = {"device": self.device, "storage": self.config.storage} if network else {}
            if network and self.config.annotator_weights:
                runtime["weights_source"] = self.config.annotator_weights
            return create(name, **runtime)
        except (OSError, ValueError) as exc:  # missing weights, wrong hashes, unknown name
            reason = str(exc).splitlines()[0]
            logger.warning("annotator %r is unavailable on this server: %s", name, reason)
            return Unavailable(reason)

    def annotator_for(self, name: str | None, model: ServedModel, field: str):
        """The annotator a request asked for (default: the model's own); a RequestError if it cannot run."""
        spec = model.metadata.get("annotator") or {}
        if name is None:
            if not spec.get("name"):
                raise RequestError(field, f"{field} is required: model {model.name!r} does not record its annotator")
            name = spec["name"]
        key = annotator_key(spec) if name == spec.get("name") else self.offered.get(name)
        found = self.annotators.get(key) if key else None
        if found is None:
            offered = ", ".join(sorted(self.offered)) or "none"
            raise RequestError(field, f"annotator {name!r} is not offered by this server; offered: {offered}")
        if isinstance(found, Unavailable):
            raise RequestError(field, f"annotator {name!r} is unavailable on this server: {found.reason}", 503)
        return found

    # -- pipelines -----------------------------------------------------------------------------

    def pipeline(self, models: list[ServedModel]):
        """The pipeline for this combination of model versions (built on first use, then cached)."""
        from model.inference import build_pipeline

        key = tuple((m.name, m.version) for m in models)
        with self._lock:
            pipe = self._pipes.get(key)
        if pipe is None:
            self.check_families(models)
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

    def check_families(self, models: list[ServedModel]) -> None:
        """ControlNets compose only within one family: the base's (SD, SDXL, SD3 and Flux ones do not mix)."""
        base = self.base.family.name
        others = [m for m in models if m.family not in (None, base)]
        if others:
            m = others[0]
            raise RequestError(
                "controls",
                f"model {m.name!r} is a {m.family} ControlNet and cannot be composed with this server's {base} base "
                f"model ({self.base_source}) or its {base} ControlNets",
            )

    # -- hot reload ----------------------------------------------------------------------------

    def refresh(self, now: float | None = None) -> list[str]:
        """Load the version each alias points at now, if it moved; returns what changed.

        A version that fails to load is retried after one reload interval, then two, four... (at
        most MAX_RETRY_S apart); meanwhile the loaded version keeps serving and :meth:`health` says so.
        """
        import mlflow

        now = time.monotonic() if now is None else now
        client = mlflow.MlflowClient()
        changed = []
        for ref in self.refs:
            if ref.alias is None:
                continue  # pinned version
            try:
                # str(): the SQLite store answers an int, the REST store a str.
                version = str(client.get_model_version_by_alias(ref.name, ref.alias).version)
            except Exception as exc:  # registry unreachable etc.: keep serving what is loaded
                self.registry_error = f"alias lookup of {ref} failed: {type(exc).__name__}: {exc}"
                logger.warning("%s; still serving the loaded versions", self.registry_error)
                return changed
            self.registry_error = None
            current = self.models[ref.name]
            failed = self.failures.get(ref.name)
            if version == current.version:
                self.failures.pop(ref.name, None)  # e.g. the alias moved back
                continue
            if failed and failed.version == version and now < failed.next_try:
                continue
            try:
                loaded = self._load(ref)
            except Exception as exc:
                attempts = failed.attempts + 1 if failed and failed.version == version else 1
                delay = min(max(self.config.reload_interval_s, 1.0) * 2 ** (attempts - 1), MAX_RETRY_S)
                self.failures[ref.name] = ReloadFailure(version, attempts, now + delay, f"{type(exc).__name__}: {exc}")
                logger.exception(
                    "could not load %s version %s (attempt %d, next in %.0f s); still serving version %s",
                    ref,
                    version,
                    attempts,
                    delay,
                    current.version,
                )
                continue
            self.failures.pop(ref.name, None)
            self._offer_annotators([loaded])
            self.models = {**self.models, ref.name: loaded}  # one reference swap: readers see old or new
            live = {(m.name, m.version) for m in self.models.values()}
            with self._lock:
                self._pipes = {k: p for k, p in self._pipes.items() if set(k) <= live}
            changed.append(f"{ref}: version {current.version} -> {loaded.version}")
        return changed

    def health(self) -> dict:
        """``ok``, or ``degraded`` with what is wrong: the loaded versions still serve either way."""
        problems = {
            name: f"version {f.version} failed to load ({f.attempts} attempt(s), retrying): {f.error}"
            for name, f in self.failures.items()
        }
        if self.registry_error:
            problems["registry"] = self.registry_error
        unavailable = {n: self.annotators[k] for n, k in self.offered.items()}
        problems.update({f"annotator {n}": a.reason for n, a in unavailable.items() if isinstance(a, Unavailable)})
        body = {"status": "degraded" if problems else "ok", "models": {n: m.version for n, m in self.models.items()}}
        if problems:
            body["problems"] = problems
        return body
