"""The training objective: noise the latents, predict, take the MSE; drop prompts like the paper.

Kept apart from the train loop so the plain-PyTorch benchmark, the Ray Train loop and the tests all
compute exactly the same loss.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def drop_prompts(
    text_embeddings: torch.Tensor,
    empty_embedding: torch.Tensor,
    probability: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace each row's prompt embedding by the empty prompt's with ``probability`` (paper: 0.5).

    Without a prompt the ControlNet must read the scene from the condition alone, which is what makes
    it learn semantics from edges/depth rather than leaning on the caption.
    """
    if probability <= 0:
        return text_embeddings
    n = text_embeddings.shape[0]
    drop = torch.rand(n, generator=generator, device="cpu") < probability
    drop = drop.to(text_embeddings.device).view(n, 1, 1)
    return torch.where(drop, empty_embedding.to(text_embeddings.dtype).expand_as(text_embeddings), text_embeddings)


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected 'epsilon' or 'v_prediction'")


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR(t), gamma) / SNR(t) for an epsilon target,
    / (SNR(t) + 1) for a v target. Caps the weight of the easy, low-noise steps that otherwise dominate
    the gradient of a model trained from scratch."""
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alphas_cumprod / (1 - alphas_cumprod)
    capped = snr.clamp(max=gamma)
    return capped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else capped / snr


def diffusion_loss(
    model,
    scheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    conditions: Sequence[torch.Tensor],
    generator: torch.Generator | None = None,
    snr_gamma: float = 0.0,
    offset_noise: float = 0.0,
) -> torch.Tensor:
    """One denoising-loss evaluation: random timestep per sample, MSE against noise (or v).

    ``snr_gamma`` > 0 weights each sample by :func:`min_snr_weights`; ``offset_noise`` > 0 adds that much
    noise constant over each latent channel, so the model learns to change an image's mean colour too
    (plain Gaussian noise leaves the lowest frequency almost untouched at every timestep)."""
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device="cpu")
    if offset_noise > 0:
        noise += offset_noise * torch.randn((n, latents.shape[1], 1, 1), generator=generator, dtype=latents.dtype)
    noise = noise.to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device="cpu")
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, text_embeddings, conditions)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    if snr_gamma <= 0:
        return F.mse_loss(prediction.float(), target.float())
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * min_snr_weights(scheduler, timesteps, snr_gamma)).mean()
