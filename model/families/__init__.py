"""The registry of model families: which adapter drives a base model, read from the model's own files.

``load("tiny-sdxl")``, ``load("/models/sdxl")``, ``load("s3://bucket/sd3")`` -> a :class:`Base` whose
``family`` is picked by ``model_index.json``'s ``_class_name`` (:func:`family_of`), never by the name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from model.families import flux, sd, sd3, sdxl
from model.families.base import POLICIES, Base, Controlled, Family, param_groups, read_class_name

FAMILIES: dict[str, Family] = {f.name: f for f in (sd.SD(), sdxl.SDXL(), sd3.SD3(), flux.Flux())}
# Presets built in code (random weights, real tokenizers), cached like the tiny SD: name -> (builder, version).
TINY_PRESETS = {
    "tiny-sdxl": (sdxl.build_tiny, sdxl.TINY_VERSION),
    "tiny-sd3": (sd3.build_tiny, sd3.TINY_VERSION),
    "tiny-flux": (flux.build_tiny, flux.TINY_VERSION),
}

__all__ = ["FAMILIES", "POLICIES", "TINY_PRESETS", "Base", "Controlled", "Family", "family_of", "load", "param_groups"]


def family_of(base_dir: str | Path) -> Family:
    """The adapter for the diffusers directory ``base_dir``, from its ``model_index.json`` ``_class_name``."""
    class_name = read_class_name(Path(base_dir))
    for family in FAMILIES.values():
        if class_name in family.pipeline_names:
            return family
    known = ", ".join(n for f in FAMILIES.values() for n in f.pipeline_names)
    raise ValueError(f"base model {base_dir} is a {class_name or 'unnamed'} pipeline; zeroconv supports {known}")


def resolve(source: str, storage=None) -> Path:
    """Any accepted base-model source -> a local diffusers directory (tiny presets are built once)."""
    from model.base import ensure_tiny, resolve_base_dir
    from pipelines.common.storage import cache_dir

    if source in TINY_PRESETS:
        build, version = TINY_PRESETS[source]
        return ensure_tiny(cache_dir() / source, build, version)
    return resolve_base_dir(source, storage)


def load(source: str, storage=None, device="cpu", dtype: torch.dtype = torch.float32) -> Base:
    local = resolve(source, storage)
    return family_of(local).load(local, source, device=device, dtype=dtype)
