"""The annotator protocol and registry.

An annotator turns a batch of RGB images into a batch of condition maps:

    uint8 (N, H, W, 3)  ->  uint8 (N, H, W, C)      C = annotator.channels (1 or 3)

It declares what it is (name, version, parameters) and what it needs (weights, licence), so every
condition column in the dataset can say exactly how it was made. Create annotators by name:

    canny = create("canny", low_threshold=100, high_threshold=200)
    edges = canny(images)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np


@dataclass(frozen=True)
class WeightsSpec:
    """Weights an annotator loads: files under a source (local dir, s3:// prefix or hub repo)."""

    files: tuple[str, ...]
    default_source: str = "lllyasviel/Annotators"
    sha256: dict[str, str] = field(default_factory=dict)  # file -> hash, when pinned


class Annotator:
    """Base class: subclasses set the class attributes and implement :meth:`annotate`."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    channels: ClassVar[int] = 3
    weights: ClassVar[WeightsSpec | None] = None
    commercial_use: ClassVar[bool] = True  # False for e.g. OpenPose (CMU, non-commercial)

    def __init__(self, **params: Any):
        self.params = params

    def annotate(self, images: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"{self.name}: expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}"
            )
        out = self.annotate(images)
        if out.ndim == 3:
            out = out[..., None]
        assert out.shape[:3] == images.shape[:3] and out.shape[-1] == self.channels, out.shape
        return out

    def spec(self) -> dict[str, Any]:
        """What goes into the dataset's column metadata and the model registry."""
        return {"name": self.name, "version": self.version, "params": self.params,
                "channels": self.channels, "commercial_use": self.commercial_use}


_REGISTRY: dict[str, Callable[..., Annotator]] = {}


def register(cls: type[Annotator]) -> type[Annotator]:
    _REGISTRY[cls.name] = cls
    return cls


def available() -> list[str]:
    _import_builtin()
    return sorted(_REGISTRY)


def create(name: str, **params: Any) -> Annotator:
    """Build a registered annotator; unknown names are a clear error listing what exists."""
    _import_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"unknown annotator {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as exc:
        raise ValueError(f"annotator {name!r}: bad parameters {params}: {exc}") from None


def _import_builtin() -> None:
    # Importing the package registers every built-in annotator.
    import annotators  # noqa: F401
