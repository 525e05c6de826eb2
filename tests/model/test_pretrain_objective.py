"""The pretraining options of the objective (Min-SNR-gamma, offset noise) and the ``pretrain`` policy."""

import copy

import pytest
import torch

from model.controlnet import ControlledUNet, UNetOnly, apply_policy, controlnet_from_unet, param_groups
from model.objective import diffusion_loss, min_snr_weights


def test_min_snr_weights_cap_the_low_noise_steps(tiny_base):
    scheduler = tiny_base.noise_scheduler
    t = torch.tensor([0, 100, 500, 999])
    alpha = scheduler.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    weights = min_snr_weights(scheduler, t, gamma=5.0)
    # Low noise (SNR > 5): weight 5 / SNR < 1; high noise (SNR < 5): weight exactly 1.
    assert snr[0] > 5 and weights[0] == pytest.approx(5.0 / snr[0].item())
    assert snr[3] < 5 and weights[3] == pytest.approx(1.0)
    assert torch.all(weights[:-1] <= weights[1:])


def test_snr_gamma_and_offset_noise_change_the_loss_as_defined(tiny_base):
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same draws for every call
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = tiny_base.encode_prompts(["red circle with blue background"] * 4)
    model = UNetOnly(tiny_base.unet)
    with torch.no_grad():
        plain = diffusion_loss(model, tiny_base.noise_scheduler, latents, text, [], generator=g())
        weighted = diffusion_loss(model, tiny_base.noise_scheduler, latents, text, [], generator=g(), snr_gamma=5.0)
        offset = diffusion_loss(model, tiny_base.noise_scheduler, latents, text, [], generator=g(), offset_noise=0.1)
        # By hand: the same noise and timesteps, each sample's MSE weighted by min(SNR, 5) / SNR.
        gen = g()
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (4,), generator=gen)
        pred = model(tiny_base.noise_scheduler.add_noise(latents, noise, t), t, text)
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    assert plain == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert weighted == pytest.approx((per_sample * min_snr_weights(tiny_base.noise_scheduler, t, 5.0)).mean().item())
    assert offset != plain


def test_pretrain_policy_trains_every_unet_weight_at_lr(tiny_base):
    model = UNetOnly(copy.deepcopy(tiny_base.unet))
    groups = param_groups(model, "pretrain", lr=1e-3, unet_lr=1e-6)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-3)]
    assert len(groups[0]["params"]) == len(list(model.unet.parameters()))
    # pretrain fits only a UNetOnly, and a UNetOnly fits only pretrain: a clear error, not a silent no-op.
    with pytest.raises(ValueError, match="pretrain"):
        apply_policy(ControlledUNet(tiny_base.unet, [controlnet_from_unet(tiny_base.unet)]), "pretrain")
    with pytest.raises(ValueError, match="pretrain"):
        apply_policy(model, "locked")
