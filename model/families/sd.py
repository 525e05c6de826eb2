"""Stable Diffusion 1.x / 2.x: today's ControlNet code (model/controlnet.py, model/objective.py) as an adapter."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from model.controlnet import DECODER_PREFIXES, ControlledUNet, controlnet_from_unet
from model.families.base import Base, Family


class UNetFamily(Family):
    """What SD and SDXL share: a UNet, ε / v-prediction on a DDPM schedule, pixel conditions."""

    denoiser_name = "unet"
    decoder_prefixes = DECODER_PREFIXES  # up blocks + output layers: the original "unlock SD"

    def encode_images(self, base: Base, images: torch.Tensor) -> torch.Tensor:
        vae = base.vae
        latents = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.sample()
        return latents * vae.config.scaling_factor

    def noise(self, base: Base, latents: torch.Tensor, generator: torch.Generator | None = None):
        from diffusers import DDPMScheduler

        from model.objective import diffusion_target

        # The pipeline's scheduler may be any sampler; training noises with DDPM on the same betas.
        scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        return noisy, timesteps, diffusion_target(scheduler, latents, noise, timesteps)

    def multi_controlnet(self, controlnets: Sequence[nn.Module]) -> nn.Module:
        from diffusers import MultiControlNetModel

        return MultiControlNetModel(list(controlnets))


class SD(UNetFamily):
    name = "sd"
    pipeline_names = ("StableDiffusionPipeline",)
    controlnet_class = "ControlNetModel"
    control_pipeline_class = "StableDiffusionControlNetPipeline"

    def new_controlnet(self, base: Base, conditioning_channels: int = 3) -> nn.Module:
        return controlnet_from_unet(
            base.denoiser, base.pipe.vae_scale_factor, conditioning_channels=conditioning_channels
        )

    def encode_prompts(self, base: Base, prompts: Sequence[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        embeds, _ = base.pipe.encode_prompt(list(prompts), base.device, 1, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds}

    def predict(self, denoiser, controlnets, noisy, timesteps, prompt, controls, scales) -> torch.Tensor:
        embeds = prompt["prompt_embeds"]
        if not controlnets:
            return denoiser(noisy, timesteps, encoder_hidden_states=embeds).sample
        # ControlledUNet holds the residual summing and condition checks; it owns no weights of its own.
        return ControlledUNet(denoiser, controlnets)(noisy, timesteps, embeds, controls, scales)

    def pipeline(self, base: Base, controlnets: Sequence[nn.Module]):
        from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

        controlnet = controlnets[0] if len(controlnets) == 1 else self.multi_controlnet(controlnets)
        components = {k: v for k, v in base.pipe.components.items() if k != "scheduler"}
        # DDIM: the paper's sampler, as model/inference.py uses.
        scheduler = DDIMScheduler.from_config(base.pipe.scheduler.config)
        pipe = StableDiffusionControlNetPipeline(**components, scheduler=scheduler, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe
