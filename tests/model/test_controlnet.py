"""Stable Diffusion ControlNet: identity at init, composition, policies, objective, export."""

import numpy as np
import pytest
import torch

from model.controlnet import DECODER_PREFIXES, ControlledUNet, apply_policy, controlnet_from_unet, param_groups
from model.objective import diffusion_loss, diffusion_target, drop_prompts


@pytest.fixture
def inputs(tiny_base):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    timesteps = torch.tensor([10, 700])
    text = tiny_base.encode_prompts(["a red circle", "a blue square"])
    cond = torch.rand(2, 3, 64, 64, generator=g)
    return latents, timesteps, text, cond


def test_identity_at_init(tiny_base, inputs):
    latents, t, text, cond = inputs
    controlled = ControlledUNet(tiny_base.unet, [controlnet_from_unet(tiny_base.unet)])
    with torch.no_grad():
        plain = tiny_base.unet(latents, t, encoder_hidden_states=text).sample
        assert torch.equal(controlled(latents, t, text, [cond]), plain)


def _perturbed_controlnet(unet, seed):
    net = controlnet_from_unet(unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return net


def test_multi_controlnet_residuals_sum_and_scale(tiny_base, inputs):
    latents, t, text, cond = inputs
    a, b = _perturbed_controlnet(tiny_base.unet, 1), _perturbed_controlnet(tiny_base.unet, 2)
    with torch.no_grad():
        da, ma = a(
            latents, t, encoder_hidden_states=text, controlnet_cond=cond, conditioning_scale=0.5, return_dict=False
        )
        db, mb = b(
            latents, t, encoder_hidden_states=text, controlnet_cond=cond, conditioning_scale=2.0, return_dict=False
        )
        expected = tiny_base.unet(
            latents,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=[x + y for x, y in zip(da, db)],
            mid_block_additional_residual=ma + mb,
        ).sample
        got = ControlledUNet(tiny_base.unet, [a, b])(latents, t, text, [cond, cond], [0.5, 2.0])
    assert torch.allclose(got, expected, atol=1e-6)
    single = ControlledUNet(tiny_base.unet, [a])(latents, t, text, [cond])
    assert not torch.allclose(got, single)


def test_only_mid_control_ignores_skip_residuals(tiny_base, inputs):
    latents, t, text, cond = inputs
    net = _perturbed_controlnet(tiny_base.unet, 3)
    with torch.no_grad():
        down, mid = net(latents, t, encoder_hidden_states=text, controlnet_cond=cond, return_dict=False)
        expected = tiny_base.unet(
            latents,
            t,
            encoder_hidden_states=text,
            down_block_additional_residuals=[torch.zeros_like(d) for d in down],
            mid_block_additional_residual=mid,
        ).sample
        got = ControlledUNet(tiny_base.unet, [net], only_mid_control=True)(latents, t, text, [cond])
        full = ControlledUNet(tiny_base.unet, [net])(latents, t, text, [cond])
    assert torch.allclose(got, expected, atol=1e-6) and not torch.allclose(got, full)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.rand(2, 1, 64, 64), "3 channel"),
        (torch.rand(2, 3, 32, 32), r"expected \(2, 3, 64, 64\)"),
        (torch.rand(2, 3, 64), "expected"),
    ],
)
def test_bad_condition_is_a_clear_error(tiny_base, inputs, bad, match):
    latents, t, text, _ = inputs
    controlled = ControlledUNet(tiny_base.unet, [controlnet_from_unet(tiny_base.unet)])
    with pytest.raises(ValueError, match=match):
        controlled(latents, t, text, [bad])


@pytest.mark.parametrize("policy", ["locked", "unlock_decoder", "unlock_full"])
def test_policy_trains_exactly_what_it_names(tiny_base, inputs, policy):
    import copy

    unet = copy.deepcopy(tiny_base.unet)
    controlled = ControlledUNet(unet, [controlnet_from_unet(unet)])
    groups = param_groups(controlled, policy, lr=1e-3, unet_lr=1e-4)
    assert groups[0]["lr"] == 1e-3 and (len(groups) == 1) == (policy == "locked")
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    before_cn = {k: v.clone() for k, v in controlled.controlnets.state_dict().items()}
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    latents, t, text, cond = inputs
    for _ in range(3):
        loss = diffusion_loss(controlled, tiny_base.noise_scheduler, latents, text, [cond])
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = {k for k, v in unet.state_dict().items() if not torch.equal(v, before[k])}
    if policy == "locked":
        assert moved == set()
    elif policy == "unlock_decoder":
        assert moved and all(k.startswith(DECODER_PREFIXES) for k in moved)
        assert not any(k.startswith(("down_blocks.", "mid_block.", "conv_in.", "time_embedding.")) for k in moved)
    else:
        assert any(k.startswith("down_blocks.") for k in moved) and any(k.startswith("up_blocks.") for k in moved)
    assert all(
        not torch.equal(v, before_cn[k])
        for k, v in controlled.controlnets.state_dict().items()
        if k.startswith("controlnet_down_blocks")
    )


def test_unknown_policy(tiny_base):
    controlled = ControlledUNet(tiny_base.unet, [controlnet_from_unet(tiny_base.unet)])
    with pytest.raises(ValueError, match="unknown trainability policy 'frozen'.*locked, unlock_decoder, unlock_full"):
        apply_policy(controlled, "frozen")


def test_prompt_dropout_uses_empty_embedding(tiny_base):
    text = tiny_base.encode_prompts(["red"] * 400)
    empty = tiny_base.encode_prompts([""])
    out = drop_prompts(text, empty, 0.5, torch.Generator().manual_seed(0))
    dropped = torch.tensor([torch.equal(row, empty[0]) for row in out])
    kept = torch.tensor([torch.equal(row, text[0]) for row in out])
    assert torch.all(dropped ^ kept)
    assert 0.4 < dropped.float().mean() < 0.6
    assert torch.equal(drop_prompts(text, empty, 0.0), text)


def test_v_prediction_target(tiny_base):
    from diffusers import DDPMScheduler

    v_sched = DDPMScheduler.from_config(tiny_base.noise_scheduler.config, prediction_type="v_prediction")
    x, n, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([5, 900])
    assert torch.equal(diffusion_target(tiny_base.noise_scheduler, x, n, t), n)
    a = v_sched.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - v_sched.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    assert torch.allclose(diffusion_target(v_sched, x, n, t), a * n - s * x, atol=1e-5)


def test_export_loads_in_stock_diffusers_and_generates(tiny_base, tmp_path):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline

    from model.export import export_controlnet

    net = _perturbed_controlnet(tiny_base.unet, 4)
    export_controlnet(net, tmp_path / "cn")
    assert (tmp_path / "cn" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ControlNetModel.from_pretrained(tmp_path / "cn")
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), loaded.state_dict().values()))
    pipe = StableDiffusionControlNetPipeline(
        vae=tiny_base.vae,
        text_encoder=tiny_base.text_encoder,
        tokenizer=tiny_base.tokenizer,
        unet=tiny_base.unet,
        controlnet=loaded,
        scheduler=DDIMScheduler.from_config(tiny_base.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
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
