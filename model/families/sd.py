"""Stable Diffusion 1.x / 2.x, and what SDXL shares with it: a UNet, ε / v-prediction on a DDPM schedule, and
ControlNets that read the condition as pixels through a small conv encoder and add residuals to the UNet's skips.

The ControlNet (``ControlNetModel.from_unet``) copies the UNet's encoder + middle block exactly and zero-initialises
every output projection and the condition encoder's last conv, so at initialisation the controlled UNet predicts
exactly what the plain UNet predicts. Several ControlNets compose by summing their residuals, each scaled by its
conditioning scale.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from model.families.base import Base, Family

# The condition encoder's widths for a VAE that downsamples x8 (SD's), one stride-2 stage per factor of 2.
CONDITION_EMBEDDING_CHANNELS = (16, 32, 96, 256)


def condition_embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The ControlNet condition encoder's block widths: it must downsample pixels exactly as the base's VAE does,
    so its output lands on the latent grid (x8 -> (16, 32, 96, 256), x4 -> (16, 32, 96))."""
    stages = vae_scale_factor.bit_length() - 1
    if vae_scale_factor != 2**stages or not 1 <= stages < len(CONDITION_EMBEDDING_CHANNELS):
        raise ValueError(f"a VAE that downsamples x{vae_scale_factor} is not supported (x2, x4 or x8)")
    return CONDITION_EMBEDDING_CHANNELS[: stages + 1]


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def check_conditions(noisy: torch.Tensor, images: Sequence[torch.Tensor], controlnets: Sequence[nn.Module]) -> None:
    """Pixel conditions: (N, C, H, W) with the ControlNet's channels, at the latents' size times the VAE's factor."""
    n, _, h, w = noisy.shape
    for i, (cond, net) in enumerate(zip(images, controlnets)):
        want_c = net.config.conditioning_channels
        if cond.dim() != 4 or cond.shape[1] != want_c:
            raise ValueError(
                f"condition {i} has shape {tuple(cond.shape)}; expected (N, {want_c}, H, W) with {want_c} channel(s)"
            )
        factor = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
        if cond.shape[0] != n or cond.shape[2:] != (h * factor, w * factor):
            raise ValueError(
                f"condition {i} has shape {tuple(cond.shape)}; expected ({n}, {want_c}, {h * factor}, {w * factor}) "
                f"to match latents {tuple(noisy.shape)}"
            )


class UNetFamily(Family):
    """What SD and SDXL share: a UNet, ε / v-prediction on a DDPM schedule, pixel conditions."""

    denoiser_name = "unet"
    objective_options = ("snr_gamma", "offset_noise", "timestep_sampling")
    # The UNet's decoder side in diffusers naming (the original code's output_blocks + out): "unlock SD".
    decoder_prefixes = ("up_blocks.", "conv_norm_out.", "conv_out.")

    def new_controlnet(self, base: Base, conditioning_channels: int = 3) -> nn.Module:
        from diffusers import ControlNetModel

        return ControlNetModel.from_unet(
            base.denoiser,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=condition_embedding_channels(base.pipe.vae_scale_factor),
        )

    def scale_latents(self, base: Base, latents: torch.Tensor) -> torch.Tensor:
        return latents * base.vae.config.scaling_factor

    def training_scheduler(self, base: Base):
        from diffusers import DDPMScheduler

        # The pipeline's scheduler may be any sampler; training noises with DDPM on the same betas.
        return DDPMScheduler.from_config(base.pipe.scheduler.config)

    def noise(
        self,
        base: Base,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        offset_noise: float = 0.0,
        timestep_sampling: str = "uniform",
    ):
        """``offset_noise`` > 0 adds that much noise constant over each latent channel, so the model learns to
        change an image's mean colour too (plain Gaussian noise leaves the lowest frequency almost untouched).
        ``timestep_sampling``: see :data:`model.families.base.TIMESTEP_SAMPLINGS`."""
        scheduler = self.training_scheduler(base)
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype)
        if offset_noise > 0:
            noise += offset_noise * torch.randn((n, latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype)
        noise = noise.to(latents.device)
        steps = scheduler.config.num_train_timesteps
        if timestep_sampling == "cubic":
            u = torch.rand(n, generator=generator)
            timesteps = ((1 - u**3) * steps).long().clamp(max=steps - 1)
        else:
            timesteps = torch.randint(0, steps, (n,), generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        return noisy, timesteps, diffusion_target(scheduler, latents, noise, timesteps)

    def loss_weights(self, base: Base, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
        """Min-SNR-gamma weights (Hang et al. 2023): min(SNR(t), gamma) / SNR(t) for an ε target, / (SNR(t) + 1) for
        a v target. Caps the weight of the easy, low-noise steps that otherwise dominate the gradient of a model
        trained from scratch."""
        scheduler = self.training_scheduler(base)
        alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        snr = alphas_cumprod / (1 - alphas_cumprod)
        capped = snr.clamp(max=snr_gamma)
        return capped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else capped / snr

    def added_conditions(self, prompt: dict[str, torch.Tensor]) -> dict | None:
        """The UNet's ``added_cond_kwargs`` (SDXL: pooled text and size ids); SD has none."""
        return None

    def control_residuals(self, net: nn.Module, noisy, timesteps, control: Any, scale: float, **kwargs):
        """One ControlNet's (down residuals, mid residual)."""
        return net(noisy, timesteps, controlnet_cond=control.to(noisy.dtype), conditioning_scale=scale, **kwargs)

    def condition_pixels(self, control: Any) -> torch.Tensor:
        return control

    def predict(self, denoiser, controlnets, noisy, timesteps, prompt, controls, scales) -> torch.Tensor:
        embeds, added = prompt["prompt_embeds"], self.added_conditions(prompt)
        check_conditions(noisy, [self.condition_pixels(c) for c in controls], controlnets)
        down_sum, mid_sum = None, None
        for net, control, scale in zip(controlnets, controls, scales):
            down, mid = self.control_residuals(
                net,
                noisy,
                timesteps,
                control,
                scale,
                encoder_hidden_states=embeds,
                added_cond_kwargs=added,
                return_dict=False,
            )
            down_sum = list(down) if down_sum is None else [a + b for a, b in zip(down_sum, down)]
            mid_sum = mid if mid_sum is None else mid_sum + mid
        return denoiser(
            noisy,
            timesteps,
            encoder_hidden_states=embeds,
            added_cond_kwargs=added,
            down_block_additional_residuals=down_sum,
            mid_block_additional_residual=mid_sum,
        ).sample

    def multi_controlnet(self, controlnets: Sequence[nn.Module]) -> nn.Module:
        from diffusers import MultiControlNetModel

        return MultiControlNetModel(list(controlnets))


class SD(UNetFamily):
    name = "sd"
    supports_pretrain = True  # the shapes base (zeroconv pretrain-base) is an SD
    pipeline_names = ("StableDiffusionPipeline",)
    controlnet_class = "ControlNetModel"
    control_pipeline_class = "StableDiffusionControlNetPipeline"

    def encode_prompts(self, base: Base, prompts: Sequence[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        embeds, _ = base.pipe.encode_prompt(list(prompts), base.device, 1, do_classifier_free_guidance=False)
        return {"prompt_embeds": embeds}

    def pipeline(self, base: Base, controlnets: Sequence[nn.Module]):
        from diffusers import DDIMScheduler, StableDiffusionControlNetPipeline

        controlnet = controlnets[0] if len(controlnets) == 1 else self.multi_controlnet(controlnets)
        components = {k: v for k, v in base.pipe.components.items() if k != "scheduler"}
        # DDIM: the paper's sampler.
        scheduler = DDIMScheduler.from_config(base.pipe.scheduler.config)
        pipe = StableDiffusionControlNetPipeline(**components, scheduler=scheduler, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe
