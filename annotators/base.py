"""The annotator protocol and registry.

An annotator turns a batch of RGB images into a batch of condition maps of the same size:

    uint8 (N, H, W, 3)  ->  uint8 (N, H, W, C)      C = annotator.channels (1 or 3)

It declares what it is (name, version, parameters) and what it needs (weights, licence), so every
condition column in the dataset can say exactly how it was made. Create annotators by name:

    canny = create("canny", low_threshold=100, high_threshold=200)
    edges = canny(images)

Annotators are built once (per Ray actor) and called on many batches; networks load their weights
in ``__init__``. Pickling ships only the construction arguments: the copy rebuilds itself.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class WeightsSpec:
    """Weights an annotator loads: files under a source (local dir, s3:// prefix or hub repo)."""

    files: tuple[str, ...]
    default_source: str = "lllyasviel/Annotators"
    sha256: dict[str, str] = field(default_factory=dict)  # file -> hash, when pinned
    licence: str = ""  # the licence the weights' authors state


class Annotator:
    """Base class: subclasses set the class attributes and implement :meth:`annotate`."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    channels: ClassVar[int] = 3
    weights: ClassVar[WeightsSpec | None] = None
    commercial_use: ClassVar[bool] = True  # False for e.g. OpenPose (CMU, non-commercial)
    size_multiple: ClassVar[int] = 1  # H and W must be multiples of this (network strides)
    # Construction arguments that change how it runs, not what it outputs: left out of spec().
    runtime_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **params: Any):
        self.params = params  # every construction argument: enough to rebuild this annotator

    def annotate(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{self.name}: expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        n, h, w, _ = images.shape
        if h % self.size_multiple or w % self.size_multiple:
            raise ValueError(
                f"{self.name}: image height and width must be multiples of {self.size_multiple} "
                f"(its network's stride), got {h}x{w}; choose a resolution that is a multiple of 64"
            )
        if n == 0:
            return np.zeros((0, h, w, self.channels), np.uint8)
        out = self.annotate(images)
        if out.ndim == 3:
            out = out[..., None]
        if out.dtype != np.uint8 or out.shape != (n, h, w, self.channels):  # a bug in the annotator, not the input
            raise RuntimeError(
                f"{self.name}: produced {out.dtype} {out.shape}, expected uint8 {(n, h, w, self.channels)}"
            )
        return out

    def spec(self) -> dict[str, Any]:
        """What goes into the dataset's column metadata and the model registry (JSON-serialisable)."""
        params = {k: v for k, v in self.params.items() if k not in self.runtime_params}
        return {
            "name": self.name,
            "version": self.version,
            "params": params,
            "channels": self.channels,
            "commercial_use": self.commercial_use,
        }

    def __reduce__(self):
        # Pickle by construction arguments, never by loaded weights: the copy rebuilds itself.
        return (_construct, (type(self), self.params))


def _construct(cls: type[Annotator], params: dict[str, Any]) -> Annotator:
    return cls(**params)


_REGISTRY: dict[str, type[Annotator]] = {}


def register(cls: type[Annotator]) -> type[Annotator]:
    _REGISTRY[cls.name] = cls
    return cls


# Built-in annotators by module, imported on first use: a job that only needs canny never imports
# torch or a network (that costs seconds and ~0.5 GiB per Ray actor).
BUILTIN: dict[str, str] = {
    "canny": "annotators.canny",
    "content_shuffle": "annotators.shuffle",
    "lineart_standard": "annotators.lineart",
    "lineart": "annotators.lineart",
    "hed": "annotators.hed",
    "midas": "annotators.midas",
    "mlsd": "annotators.mlsd",
    "normalbae": "annotators.normalbae",
    "openpose": "annotators.openpose",
}


def available() -> list[str]:
    return sorted(set(_REGISTRY) | set(BUILTIN))


def annotator_class(name: str) -> type[Annotator]:
    """The registered annotator class; unknown names are a clear error listing what exists."""
    if name not in _REGISTRY and name in BUILTIN:
        importlib.import_module(BUILTIN[name])  # registers it
    if name not in _REGISTRY:
        raise ValueError(f"unknown annotator {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def create(name: str, **params: Any) -> Annotator:
    """Build a registered annotator by name."""
    cls = annotator_class(name)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"annotator {name!r}: bad parameters {params}: {exc}") from None


def from_spec(spec: dict[str, Any], weights_source: str | None = None, **runtime: Any) -> Annotator:
    """Rebuild the annotator a recorded :meth:`Annotator.spec` describes: same code version, parameters and weights.

    Serving and evaluation must re-annotate exactly as the training data was annotated. The weights
    come from the recorded source, or ``weights_source`` (a mirror: a local dir or ``s3://`` prefix),
    and every file must match its recorded sha256; anything else is a clear error, never a silent
    fallback to other weights. ``runtime`` (device, batch_size, storage) only applies to annotators
    with weights.
    """
    name = spec.get("name")
    if not name:
        raise ValueError(f"annotator spec {spec!r} does not name its annotator")
    cls = annotator_class(name)
    if spec.get("version") and spec["version"] != cls.version:
        raise ValueError(
            f"annotator {name!r} was recorded at version {spec['version']}, but this code has version "
            f"{cls.version}: its outputs would differ from the training data's"
        )
    params = dict(spec.get("params") or {})
    recorded = spec.get("weights")
    if cls.weights is not None:
        if not (recorded and recorded.get("sha256")):
            raise ValueError(f"annotator {name!r} loads weights, but the recorded spec does not say which (no sha256)")
        params.update(runtime, weights_source=weights_source or recorded["source"], weights_sha256=recorded["sha256"])
    return create(name, **params)
