"""Generate images with a base model plus exported ControlNet(s): the one pipeline everyone uses.

Training's validation grids, the model registry's pyfunc, the serving endpoint and evaluation all
call :func:`build_pipeline` / :func:`generate`, so "the same seed and inputs give the same image"
holds across them. Defaults follow the paper: DDIM, 20 steps, CFG 9.0.
"""

from __future__ import annotations

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


def build_pipeline(base, controlnets: Sequence[torch.nn.Module], unet: torch.nn.Module | None = None):
    """A StableDiffusionControlNetPipeline over ``base`` (a model.base.BaseModel) with DDIM sampling."""
    from diffusers import DDIMScheduler, MultiControlNetModel, StableDiffusionControlNetPipeline

    controlnet = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(list(controlnets))
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet if unet is not None else base.unet,
        controlnet=controlnet,
        scheduler=DDIMScheduler.from_config(base.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def text_to_image(
    base,
    prompts: Sequence[str],
    unet: torch.nn.Module | None = None,
    seed: int = 0,
    steps: int = DEFAULT_STEPS,
    guidance_scale: float = DEFAULT_GUIDANCE,
) -> np.ndarray:
    """The base alone (or with ``unet`` in place of its own): stock StableDiffusionPipeline, DDIM, image i
    from a CPU generator seeded ``seed + i``, at the base's native resolution -> uint8 (N, H, W, 3)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet = unet if unet is not None else base.unet
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(base.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    size = unet.config.sample_size
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(len(prompts))]
    latents = torch.stack([torch.randn((unet.config.in_channels, size, size), generator=g) for g in generators])
    out = pipe(
        prompt=list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        latents=latents.to(unet.device, unet.dtype),
        height=size * pipe.vae_scale_factor,
        width=size * pipe.vae_scale_factor,
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def load_pipeline(
    base_source: str,
    controlnet_dirs: Sequence[str | Path],
    unet_dir: str | Path | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    storage=None,
):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from model.base import load_base

    base = load_base(base_source, storage=storage, device=device, dtype=dtype)
    nets = [ControlNetModel.from_pretrained(d, torch_dtype=dtype).to(device) for d in controlnet_dirs]
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype).to(device) if unet_dir else None
    return build_pipeline(base, nets, unet).to(device)


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
) -> np.ndarray:
    """Images for ``prompts`` under ``conditions`` -> uint8 (N, H, W, 3).

    ``conditions``: for one ControlNet, uint8 (N, H, W, C); for several, a list with one such array
    per ControlNet. Each image i is generated with its own generator seeded ``seed + i`` (or
    ``seed[i]`` when ``seed`` is a sequence, e.g. a served batch of independent requests) and its
    initial latents are drawn on the CPU, so a batch gives the same images as one-by-one calls, up to
    float summation order (on CPU a few pixels may differ by one level between batch sizes).
    ``should_stop`` is asked after every denoising step; when it answers True, GenerationStopped is
    raised instead of finishing (a served request that timed out frees the model at once).
    """
    multi = isinstance(conditions, (list, tuple))
    per_net = list(conditions) if multi else [conditions]
    tensors = [condition_tensor(np.asarray(c)) for c in per_net]
    n = len(prompts)
    h, w = tensors[0].shape[-2:]
    device = pipe.unet.device
    seeds = [seed + i for i in range(n)] if isinstance(seed, int) else [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"got {len(seeds)} seeds for {n} prompts")
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    # Draw initial latents per image on the CPU: identical on any device and any batch size.
    shape = (pipe.unet.config.in_channels, h // pipe.vae_scale_factor, w // pipe.vae_scale_factor)
    latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, pipe.unet.dtype)

    def after_step(pipe, step: int, timestep, tensors: dict) -> dict:
        if should_stop():
            raise GenerationStopped(f"stopped after step {step + 1} of {steps}")
        return tensors

    out = pipe(
        prompt=list(prompts),
        negative_prompt=[negative_prompt] * n if negative_prompt else None,
        image=[t.to(device, pipe.unet.dtype) for t in tensors] if multi else tensors[0].to(device, pipe.unet.dtype),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        controlnet_conditioning_scale=conditioning_scale,
        guess_mode=guess_mode,
        latents=latents,
        height=h,
        width=w,
        output_type="np",
        callback_on_step_end=after_step if should_stop else None,
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)
