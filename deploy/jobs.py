"""A validated request becomes a :class:`Job`: limits checked, images decoded, source images annotated."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import numpy as np

from deploy.schemas import (
    MAX_SEED,
    SIZE_MULTIPLE,
    GenerateRequest,
    LimitsConfig,
    RequestError,
    check_range,
    check_size,
    decode_image,
)
from deploy.store import ModelStore


@dataclass
class Job:
    """One validated request, images decoded and annotated, ready for the pipeline."""

    prompt: str
    negative_prompt: str | None
    models: tuple[str, ...]
    conditions: list[np.ndarray]  # one uint8 (H, W, 3) per control
    scales: tuple[float, ...]
    control_modes: tuple[int | None, ...]  # per control: a union ControlNet's condition type, else None
    steps: int
    guidance_scale: float
    seed: int
    width: int
    height: int
    guess_mode: bool
    # Set when nobody waits for the answer any more (timed out, client gone): the work is skipped or stopped.
    abandoned: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)

    def batch_key(self) -> tuple:
        """Jobs with equal keys run in one pipeline call; prompts and seeds may differ."""
        return (
            self.models,
            self.scales,
            self.control_modes,
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
    from model.inference import InferenceDefaults

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
    defaults = InferenceDefaults.recorded(served[0].metadata)  # the first model's recorded steps / CFG
    steps = req.steps if req.steps is not None else defaults.steps
    guidance = req.guidance_scale if req.guidance_scale is not None else defaults.guidance_scale
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
            annotator = store.annotator_for(control.annotator, model, f"{where}.annotator")
            image = decode_image(control.source_image, f"{where}.source_image", limits)
            inputs.append((f"{where}.source_image", image, annotator))

    width, height = output_size(req, inputs[0][0], inputs[0][1], limits)
    for _, _, annotator in inputs:
        if annotator is not None and (width % annotator.size_multiple or height % annotator.size_multiple):
            dim = "width" if width % annotator.size_multiple else "height"
            raise RequestError(
                dim,
                f"annotator {annotator.name!r} needs width and height multiples of {annotator.size_multiple} "
                f"(its network's stride), got {width}x{height}",
            )
    modes = tuple(
        control_mode(c, m, a, store, f"controls[{i}]")
        for i, (c, m, (_, _, a)) in enumerate(zip(req.controls, served, inputs))
    )
    if len(served) > 1 and any(mode is not None for mode in modes):
        raise RequestError("controls", "a union ControlNet serves alone: send it as the only control")
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
        control_modes=modes,
        steps=steps,
        guidance_scale=guidance,
        seed=seed,
        width=width,
        height=height,
        guess_mode=req.guess_mode,
    )


def control_mode(control, model, annotator, store: ModelStore, where: str) -> int | None:
    """A union ControlNet's condition type for this control: as named (``control_type``), else the type of the
    annotator that made it on the server, else the model's only trained type; one it was not trained on is a
    422. None for other ControlNets (which refuse a control_type)."""
    field, trained = f"{where}.control_type", sorted(set(model.control_modes))
    if not trained:
        if control.control_type is not None:
            raise RequestError(field, f"{field} applies to union ControlNets; model {model.name!r} is not one")
        return None
    types = store.base.family.union_types
    names = ", ".join(types[m] for m in trained)
    if control.control_type is not None:
        if control.control_type not in types:
            raise RequestError(field, f"{field}: unknown type {control.control_type!r}; {model.name!r} takes {names}")
        mode = types.index(control.control_type)
    elif annotator is not None:
        try:
            mode = store.base.family.union_mode(annotator.name)
        except ValueError as exc:
            raise RequestError(f"{where}.annotator", str(exc)) from None
    elif len(trained) == 1:
        mode = trained[0]
    else:
        raise RequestError(field, f"{field} is required for union model {model.name!r}: one of {names}")
    if mode not in trained:
        raise RequestError(
            field, f"model {model.name!r} was not trained on {types[mode]!r} conditions; it takes {names}"
        )
    return mode


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
