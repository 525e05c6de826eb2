"""Generate images with a base model plus exported ControlNet(s): the one pipeline everyone uses.

Training's validation grids, the model registry's pyfunc, the serving endpoint and evaluation all
call :func:`build_pipeline` / :func:`generate`, so "the same seed and inputs give the same image"
holds across them. The pipeline is the base family's stock ControlNet pipeline (``fam.pipeline``).
Defaults follow the paper: DDIM (for SD), 20 steps, CFG 9.0.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from pipelines.data.tensors import condition_tensor

DEFAULT_STEPS = 20
DEFAULT_GUIDANCE = 9.0


class GenerationStopped(RuntimeError):
    """``generate`` stopped early because its ``should_stop`` hook said so (e.g. nobody waits for the images)."""


@dataclass(frozen=True)
class InferenceDefaults:
    """How a model generates when the caller does not say; training records them in the model's metadata."""

    steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    conditioning_scale: float = 1.0
    scheduler: str = "ddim"

    @classmethod
    def recorded(cls, metadata: dict) -> InferenceDefaults:
        """The defaults a registered model's metadata records (key ``inference``); these for any it lacks."""
        recorded, package = metadata.get("inference", {}), cls()
        return cls(
            steps=int(recorded.get("steps", package.steps)),
            guidance_scale=float(recorded.get("guidance_scale", package.guidance_scale)),
            conditioning_scale=float(recorded.get("conditioning_scale", package.conditioning_scale)),
            scheduler=str(recorded.get("scheduler", package.scheduler)),
        )


def build_pipeline(base, controlnets: Sequence[torch.nn.Module], denoiser: torch.nn.Module | None = None):
    """The family's stock ControlNet pipeline over ``base`` (a model.families.Base), with ``denoiser`` (a UNet or
    transformer a policy unlocked) in place of the base's when given."""
    pipe = base.family.pipeline(base, controlnets)
    if denoiser is not None:
        pipe.register_modules(**{base.family.denoiser_name: denoiser})
    return pipe


def load_diffusers_model(directory: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A diffusers model directory (an exported ControlNet, UNet or transformer) loaded with the class its
    config.json names: the family's stock class, as any diffusers user would load it."""
    import json

    import diffusers

    class_name = json.loads((Path(directory) / "config.json").read_text()).get("_class_name", "")
    cls = getattr(diffusers, class_name, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.ModelMixin):
        raise ValueError(f"{directory} holds a {class_name or 'unnamed'} model, which diffusers cannot load")
    return cls.from_pretrained(directory, torch_dtype=dtype)


def check_controlnet_family(family, controlnet: torch.nn.Module, where: str) -> None:
    """An exported ControlNet must be of the base family's ControlNet class (SD's and SDXL's share one)."""
    allowed = {family.controlnet_class} | ({"ControlNetUnionModel"} if family.name == "sdxl" else set())
    if type(controlnet).__name__ not in allowed:
        raise ValueError(
            f"{where} is a {type(controlnet).__name__}, not a ControlNet for a {family.name} base model "
            f"({' or '.join(sorted(allowed))})"
        )


@torch.no_grad()
def text_to_image(
    base,
    prompts: Sequence[str],
    denoiser: torch.nn.Module | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
) -> np.ndarray:
    """The base alone (or with ``denoiser`` in place of its own): its family's stock text-to-image pipeline with
    DDIM, image i from a CPU generator seeded ``seed + i``, at the base's native resolution -> uint8 (N, H, W, 3).
    For families that support policy=pretrain (SD), whose validation grids and samples this draws."""
    from diffusers import DDIMScheduler

    components = dict(base.pipe.components, scheduler=DDIMScheduler.from_config(base.pipe.scheduler.config))
    if denoiser is not None:
        components[base.family.denoiser_name] = denoiser
    pipe = type(base.pipe)(**components)
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(
        prompt=list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=generators,
        height=base.resolution,
        width=base.resolution,
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def load_pipeline(
    base_source: str,
    controlnet_dirs: Sequence[str | Path],
    denoiser_dir: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    storage=None,
):
    from model.families import load

    base = load(base_source, storage=storage, device=device, dtype=dtype)
    nets = []
    for directory in controlnet_dirs:
        net = load_diffusers_model(directory, dtype).to(device)
        check_controlnet_family(base.family, net, str(directory))
        nets.append(net)
    denoiser = load_diffusers_model(denoiser_dir, dtype).to(device) if denoiser_dir else None
    return build_pipeline(base, nets, denoiser).to(device)


@torch.no_grad()
def generate(
    pipe,
    prompts: Sequence[str],
    conditions: Sequence[np.ndarray] | np.ndarray,
    seed: int | Sequence[int] = 0,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
    conditioning_scale: float | Sequence[float] = 1.0,
    negative_prompt: str | None = None,
    guess_mode: bool = False,
    should_stop: Callable[[], bool] | None = None,
    control_mode: int | None = None,
) -> np.ndarray:
    """Images for ``prompts`` under ``conditions`` -> uint8 (N, H, W, 3).

    ``conditions``: for one ControlNet, uint8 (N, H, W, C); for several, a list with one such array
    per ControlNet. Each image i is generated with its own generator seeded ``seed + i`` (or
    ``seed[i]`` when ``seed`` is a sequence, e.g. a served batch of independent requests) and its
    initial latents are drawn on the CPU, so a batch gives the same images as one-by-one calls, up to
    float summation order (on CPU a few pixels may differ by one level between batch sizes).
    ``should_stop`` is asked after every denoising step; when it answers True, GenerationStopped is
    raised instead of finishing (a served request that timed out frees the model at once).
    ``control_mode``: a union ControlNet's condition type (an index into the family's ``union_types``), which
    the union pipeline needs and other pipelines refuse.
    """
    multi = isinstance(conditions, (list, tuple))
    per_net = list(conditions) if multi else [conditions]
    tensors = [condition_tensor(np.asarray(c)) for c in per_net]
    n = len(prompts)
    h, w = tensors[0].shape[-2:]
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    device, dtype = denoiser.device, denoiser.dtype
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    # One CPU generator per image: the pipeline draws each image's initial latents from its own generator, so a
    # batch gives the same images as one-by-one calls, on any device.
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]

    def after_step(pipe, step: int, timestep, tensors: dict) -> dict:
        if should_stop():
            raise GenerationStopped(f"stopped after step {step + 1} of {steps}")
        return tensors

    accepted = inspect.signature(pipe.__call__).parameters
    # Not from the signature: Flux's pipeline takes control_mode too (for Flux union models), plain ones refuse it.
    union = type(getattr(pipe, "controlnet", None)).__name__ == "ControlNetUnionModel"
    if union != (control_mode is not None):
        raise ValueError(
            "a union ControlNet needs control_mode (the condition's type)"
            if control_mode is None
            else f"control_mode={control_mode} applies to union ControlNets only"
        )
    if control_mode is not None and n > 1:
        # The union ControlNet's fusion transformer attends across the batch axis (diffusers' MultiheadAttention
        # without batch_first): several images in one call would mix their conditions. One call per image.
        one = dict(steps=steps, guidance_scale=guidance_scale, conditioning_scale=conditioning_scale)
        one |= dict(negative_prompt=negative_prompt, guess_mode=guess_mode, should_stop=should_stop)
        return np.concatenate(
            [
                generate(pipe, [p], np.asarray(conditions)[i : i + 1], [s], control_mode=control_mode, **one)
                for i, (p, s) in enumerate(zip(prompts, seeds))
            ]
        )
    images = [t.to(device, dtype) for t in tensors] if multi else tensors[0].to(device, dtype)
    options = dict(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * n if negative_prompt else None,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        controlnet_conditioning_scale=conditioning_scale,
        generator=generators,
        height=h,
        width=w,
        output_type="np",
        callback_on_step_end=after_step if should_stop else None,
        # SD3's and Flux's pipelines name the condition control_image (and VAE-encode it); SD's and SDXL's image.
        **{"control_image" if "control_image" in accepted else "image": images},
    )
    if guess_mode:
        options["guess_mode"] = True
    if control_mode is not None:
        options["control_mode"] = [control_mode]
    # The SD3 and Flux pipelines sample the condition's VAE posterior from torch's global RNG: seed it too.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds[0])
        out = pipe(**options).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
