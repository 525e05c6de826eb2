"""Stable Diffusion ControlNet through the ``sd`` adapter: identity at init, composition, policies, objective,
condition encoder sized to the VAE, export."""

import copy

import numpy as np
import pytest
import torch

from model.families import Controlled, param_groups
from model.families.sd import condition_embedding_channels, diffusion_target


@pytest.fixture
def inputs(tiny_base):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 700])
    prompt = tiny_base.family.encode_prompts(tiny_base, ["a red circle", "a blue square"], (64, 64))
    cond = torch.rand(2, 3, 64, 64, generator=g)
    return latents, timesteps, prompt, cond


def controlled(base, nets, unet=None) -> Controlled:
    return Controlled(base.family, unet if unet is not None else base.denoiser, nets)


def test_identity_at_init(tiny_base, inputs):
    latents, t, prompt, cond = inputs
    model = controlled(tiny_base, [tiny_base.family.new_controlnet(tiny_base)])
    with torch.no_grad():
        plain = tiny_base.denoiser(latents, t, encoder_hidden_states=prompt["prompt_embeds"]).sample
        assert torch.equal(model(latents, t, prompt, [cond]), plain)


def test_condition_encoder_downsamples_like_the_vae(tiny_base):
    """The condition enters at image size and must land on the latent grid: the encoder's stride-2 stages follow
    the base's VAE (x8: SD's four widths; x4: three), else a x4-VAE base gets a condition grid of the wrong size."""
    assert condition_embedding_channels(8) == (16, 32, 96, 256)
    assert condition_embedding_channels(4) == (16, 32, 96)
    with pytest.raises(ValueError, match="x16 is not supported"):
        condition_embedding_channels(16)
    net = tiny_base.family.new_controlnet(tiny_base)
    assert tuple(net.config.conditioning_embedding_out_channels) == (16, 32, 96, 256)


def _perturbed_controlnet(base, seed):
    net = base.family.new_controlnet(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def test_multi_controlnet_residuals_sum_and_scale(tiny_base, inputs):
    latents, t, prompt, cond = inputs
    text = prompt["prompt_embeds"]
    a, b = _perturbed_controlnet(tiny_base, 1), _perturbed_controlnet(tiny_base, 2)
    with torch.no_grad():
        da, ma = a(
            latents, t, encoder_hidden_states=text, controlnet_cond=cond, conditioning_scale=0.5, return_dict=False
        )
        db, mb = b(
            latents, t, encoder_hidden_states=text, controlnet_cond=cond, conditioning_scale=2.0, return_dict=False
        )
        expected = tiny_base.denoiser(
            latents,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=[x + y for x, y in zip(da, db)],
            mid_block_additional_residual=ma + mb,
        ).sample
        got = controlled(tiny_base, [a, b])(latents, t, prompt, [cond, cond], [0.5, 2.0])
        single = controlled(tiny_base, [a])(latents, t, prompt, [cond])
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(got, single)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 1, 64, 64), "3 channel"),
        (torch.rand(2, 3, 32, 32), r"expected \(2, 3, 64, 64\)"),
        (torch.rand(2, 3, 64), "expected"),
    ],
)
def test_bad_condition_is_a_clear_error(tiny_base, inputs, bad, match):
    latents, t, prompt, _ = inputs
    model = controlled(tiny_base, [tiny_base.family.new_controlnet(tiny_base)])
    with pytest.raises(ValueError, match=match):
        model(latents, t, prompt, [bad])


@pytest.mark.parametrize("policy", ["locked", "unlock_decoder", "unlock_full"])
def test_policy_trains_exactly_what_it_names(tiny_base, inputs, policy):
    fam, unet = tiny_base.family, copy.deepcopy(tiny_base.denoiser)
    model = controlled(tiny_base, [fam.new_controlnet(tiny_base)], unet)
    groups = param_groups(model, policy, lr=1e-3, base_lr=1e-4)
    assert groups[0]["lr"] == 1e-3 and (len(groups) == 1) == (policy == "locked")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    before_cn = {k: v.clone() for k, v in model.controlnets.state_dict().items()}
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    latents, _, prompt, cond = inputs
    for _ in range(3):
        loss = fam.loss(model, tiny_base, latents, prompt, [cond])
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    if policy == "locked":
        assert moved == set()
    elif policy == "unlock_decoder":
        assert moved and all(k.startswith(fam.decoder_prefixes) for k in moved)
        assert not any(k.startswith(("down_blocks.", "mid_block.", "conv_in.", "time_embedding.")) for k in moved)
    else:
        assert any(k.startswith("down_blocks.") for k in moved) and any(k.startswith("up_blocks.") for k in moved)
    assert all(
        not torch.equal(v, before_cn[k])
        for k, v in model.controlnets.state_dict().items()
        if k.startswith("controlnet_down_blocks")
    )


def test_unknown_policy(tiny_base):
    model = controlled(tiny_base, [tiny_base.family.new_controlnet(tiny_base)], copy.deepcopy(tiny_base.denoiser))
    with pytest.raises(ValueError, match="unknown trainability policy 'frozen'.*locked, unlock_decoder, unlock_full"):
        param_groups(model, "frozen", lr=1e-3, base_lr=1e-4)


def test_prompt_dropout_uses_empty_embedding(tiny_base):
    fam = tiny_base.family
    text = fam.encode_prompts(tiny_base, ["red"] * 400, (64, 64))
    empty = fam.encode_prompts(tiny_base, [""], (64, 64))
    out = fam.drop_prompts(text, empty, 0.5, torch.Generator().manual_seed(0))["prompt_embeds"]
    dropped = torch.tensor([torch.equal(row, empty["prompt_embeds"][0]) for row in out])
    kept = torch.tensor([torch.equal(row, text["prompt_embeds"][0]) for row in out])
    assert torch.all(dropped ^ kept)
    assert 0.4 < dropped.float().mean() < 0.6
    assert fam.drop_prompts(text, empty, 0.0) is text


def test_v_prediction_target(tiny_base):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(tiny_base.pipe.scheduler.config)
    v_sched = DDPMScheduler.from_config(scheduler.config, prediction_type="v_prediction")
    x, n, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([5, 900])
    assert torch.equal(diffusion_target(scheduler, x, n, t), n)
    a = v_sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v_sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(diffusion_target(v_sched, x, n, t), a * n - s * x, atol=1e-5)


def test_export_loads_in_stock_diffusers_and_generates(tiny_base, tmp_path):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    from model.export import export_model

    net = _perturbed_controlnet(tiny_base, 4)
    export_model(net, tmp_path / "cn")
    assert (tmp_path / "cn" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ControlNetModel.from_pretrained(tmp_path / "cn")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    components = {k: v for k, v in tiny_base.pipe.components.items() if k != "scheduler"}
    scheduler = DDIMScheduler.from_config(tiny_base.pipe.scheduler.config)
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=loaded, scheduler=scheduler)
    from PIL import Image

    cond = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    image = pipe(
        "a red circle",
        image=cond,
        num_inference_steps=2,
        guidance_scale=9.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
