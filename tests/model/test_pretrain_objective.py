"""The pretraining options of the SD family's objective (Min-SNR-gamma, offset noise) and the ``pretrain`` policy:
the denoiser alone, every weight at ``lr``; families that do not implement them refuse them by name."""

import copy

import pytest
import torch
import torch.nn.functional as F

from model.families import FAMILIES, Controlled, param_groups


def test_min_snr_weights_cap_the_low_noise_steps(tiny_base):
    fam = tiny_base.family
    alphas_cumprod = fam.training_scheduler(tiny_base).alphas_cumprod
    t = torch.tensor([0, 100, 500, 999])
    snr = alphas_cumprod[t] / (1 - alphas_cumprod[t])
    weights = fam.loss_weights(tiny_base, t, snr_gamma=5.0)
    # Low noise (SNR > 5): weight 5 / SNR < 1; high noise (SNR < 5): weight exactly 1.
    assert snr[0] > 5 and weights[0] == pytest.approx(5.0 / snr[0].item())
    assert snr[3] < 5 and weights[3] == pytest.approx(1.0)
    assert torch.all(weights[:-1] <= weights[1:])


def test_snr_gamma_and_offset_noise_change_the_loss_as_defined(tiny_base):
    fam = tiny_base.family
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731 - the same draws for every call
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompt = fam.encode_prompts(tiny_base, ["red circle with blue background"] * 4, (64, 64))
    model = Controlled(fam, tiny_base.denoiser, [])  # the denoiser alone, as policy=pretrain trains it
    with torch.no_grad():
        plain = fam.loss(model, tiny_base, latents, prompt, [], generator=g())
        weighted = fam.loss(model, tiny_base, latents, prompt, [], generator=g(), snr_gamma=5.0)
        offset = fam.loss(model, tiny_base, latents, prompt, [], generator=g(), offset_noise=0.1)
        # By hand: the same noise and timesteps, each sample's MSE weighted by min(SNR, 5) / SNR.
        gen = g()
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (4,), generator=gen)
        noisy = fam.training_scheduler(tiny_base).add_noise(latents, noise, t)
        pred = tiny_base.denoiser(noisy, t, encoder_hidden_states=prompt["prompt_embeds"]).sample
        per_sample = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
        # Offset noise: the same Gaussian draw plus 0.1 x one more draw per (sample, channel), constant over pixels.
        gen = g()
        offset_noise = torch.randn(latents.shape, generator=gen)
        offset_noise += 0.1 * torch.randn((4, 4, 1, 1), generator=gen)
        t_offset = torch.randint(0, 1000, (4,), generator=gen)
        noisy = fam.training_scheduler(tiny_base).add_noise(latents, offset_noise, t_offset)
        pred = tiny_base.denoiser(noisy, t_offset, encoder_hidden_states=prompt["prompt_embeds"]).sample
    assert plain.item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    weights = fam.loss_weights(tiny_base, t, 5.0)
    assert weighted.item() == pytest.approx((per_sample * weights).mean().item(), rel=1e-5)
    assert offset.item() == pytest.approx(F.mse_loss(pred, offset_noise).item(), rel=1e-5)


def test_pretrain_policy_trains_every_denoiser_weight_at_lr(tiny_base):
    fam = tiny_base.family
    model = Controlled(fam, copy.deepcopy(tiny_base.denoiser), [])
    groups = param_groups(model, "pretrain", lr=1e-3, base_lr=1e-6)
    assert [(g["name"], g["lr"]) for g in groups] == [("unet", 1e-3)]
    assert len(groups[0]["params"]) == len(list(model.denoiser.parameters()))
    assert all(p.requires_grad for p in model.denoiser.parameters())
    # pretrain fits only the denoiser alone, and the denoiser alone fits only pretrain: a clear error, not a no-op.
    with pytest.raises(ValueError, match="pretrain"):
        param_groups(Controlled(fam, tiny_base.denoiser, [fam.new_controlnet(tiny_base)]), "pretrain", 1e-3, 1e-6)
    with pytest.raises(ValueError, match="pretrain"):
        param_groups(model, "locked", 1e-3, 1e-6)


@pytest.mark.parametrize("name", ["sdxl", "sd3", "flux"])
def test_families_without_pretraining_refuse_it_by_name(name):
    with pytest.raises(ValueError, match=f"policy=pretrain is not supported for {name}"):
        FAMILIES[name].check_training("pretrain")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_families_refuse_sd_objective_options(name):
    with pytest.raises(ValueError, match=f"snr_gamma is not supported for {name}"):
        FAMILIES[name].check_training("locked", snr_gamma=5.0)
    with pytest.raises(ValueError, match=f"offset_noise is not supported for {name}"):
        FAMILIES[name].check_training("locked", offset_noise=0.1)
    FAMILIES["sdxl"].check_training("locked", snr_gamma=5.0, offset_noise=0.1)  # SDXL shares SD's objective


def test_cubic_timestep_sampling_puts_most_draws_at_high_noise(tiny_base):
    fam = tiny_base.family
    latents = torch.zeros(4096, 4, 1, 1)
    _, uniform, _ = fam.noise(tiny_base, latents, torch.Generator().manual_seed(0))
    _, cubic, _ = fam.noise(tiny_base, latents, torch.Generator().manual_seed(0), timestep_sampling="cubic")
    assert 0 <= int(cubic.min()) and int(cubic.max()) <= 999 and cubic.dtype == torch.long
    # t = (1 - u^3) T: P(t >= T/2) = P(u^3 <= 1/2) = 0.794; uniform gives 0.5.
    assert float((uniform >= 500).float().mean()) == pytest.approx(0.5, abs=0.03)
    assert float((cubic >= 500).float().mean()) == pytest.approx(0.5 ** (1 / 3), abs=0.03)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_flow_families_refuse_cubic_timestep_sampling(name):
    with pytest.raises(ValueError, match=f"timestep_sampling=cubic is not supported for {name}"):
        FAMILIES[name].check_training("locked", timestep_sampling="cubic")
    FAMILIES["sdxl"].check_training("locked", timestep_sampling="cubic")
    with pytest.raises(ValueError, match="unknown timestep_sampling 'cubic2'"):
        FAMILIES["sd"].check_training("locked", timestep_sampling="cubic2")
