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


def diffusion_loss(
    model,
    scheduler,
    latents: torch.Tensor,
    text_embeddings: torch.Tensor,
    conditions: Sequence[torch.Tensor],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One denoising-loss evaluation: random timestep per sample, MSE against noise (or v)."""
    n = latents.shape[0]
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype, device="cpu").to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=generator, device="cpu")
    timesteps = timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = model(noisy, timesteps, text_embeddings, conditions)
    target = diffusion_target(scheduler, latents, noise, timesteps)
    return F.mse_loss(prediction.float(), target.float())
