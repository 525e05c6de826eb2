"""The autoencoder stage of ``zeroconv pretrain-base``: a stock diffusers ``AutoencoderKL`` that
downsamples x4, trained from scratch on Fill50K-style images (pipelines/data/synthetic.py).

A plain single-process loop: the model is 0.68M parameters and the data is drawn fresh every step
from a seeded generator, so there is nothing to shard and no dataset to write. The loss is SD's
autoencoder objective without the GAN and perceptual terms: L1 + MSE reconstruction plus a tiny KL
term that keeps the posterior near N(0, 1) without blurring it. As in Stable Diffusion, the latents'
``scaling_factor`` is 1 / their std over a batch, so the UNet sees latents of unit variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.data.synthetic import fill50k_sample
from pipelines.data.tensors import image_tensor

# block_out_channels has 3 entries: 2 downsamplings, so a 32 px image becomes 8x8x4 latents.
VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 32, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "norm_num_groups": 8,
}
HELD_OUT_SEED_OFFSET = 10_000  # the PSNR set is drawn from another stream than the training batches


@dataclass
class VAEResult:
    vae: "object"  # diffusers.AutoencoderKL with scaling_factor set
    steps: int
    loss: float
    psnr_db: float
    scaling_factor: float
    seconds: float


def build_vae(resolution: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(sample_size=resolution, **VAE_CONFIG)


def image_batch(rng: np.random.Generator, n: int, resolution: int) -> torch.Tensor:
    """``n`` fresh Fill50K-style images, float NCHW in [-1, 1]."""
    return image_tensor(np.stack([fill50k_sample(rng, resolution).image for _ in range(n)]))


def vae_loss(vae, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> tuple[torch.Tensor, float]:
    """(loss, reconstruction MSE on the [-1, 1] scale) for one batch."""
    posterior = vae.encode(images).latent_dist
    latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
    recon = vae.decode(latents).sample
    mse = F.mse_loss(recon, images)
    loss = F.l1_loss(recon, images) + mse + kl_weight * posterior.kl().mean()
    return loss, float(mse.detach())


@torch.no_grad()
def psnr(vae, images: torch.Tensor) -> float:
    """PSNR (dB, images on the 0-1 scale) of the posterior mean's reconstruction."""
    recon = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((recon + 1) / 2, (images + 1) / 2).item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


@torch.no_grad()
def latent_scaling_factor(vae, images: torch.Tensor) -> float:
    """1 / std of the posterior-mean latents (SD 1.x's 0.18215 was found the same way)."""
    return 1.0 / vae.encode(images).latent_dist.mean.std().item()


def train_vae(
    resolution: int,
    steps: int,
    batch_size: int,
    lr: float,
    kl_weight: float,
    seed: int,
    held_out: int = 256,
    on_step: Callable[[int, float], None] = lambda step, loss: None,
) -> VAEResult:
    """Train from scratch for ``steps``; return the VAE with its ``scaling_factor`` set."""
    import time

    started = time.perf_counter()
    vae = build_vae(resolution, seed)
    rng, generator = np.random.default_rng(seed), torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    vae.train()
    loss = torch.zeros(())
    for step in range(1, steps + 1):
        loss, mse = vae_loss(vae, image_batch(rng, batch_size, resolution), kl_weight, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        on_step(step, loss.item())
    vae.eval()
    held = image_batch(np.random.default_rng(seed + HELD_OUT_SEED_OFFSET), held_out, resolution)
    scaling = latent_scaling_factor(vae, held)
    vae.register_to_config(scaling_factor=scaling)
    return VAEResult(vae, steps, loss.item(), psnr(vae, held), scaling, time.perf_counter() - started)
