"""``zeroconv demo``: the whole product, end to end, on this machine, with the built-in tiny model.

Every step calls the same ``run_<stage>`` function a user or a scheduler would; nothing here is
demo-only logic except making the synthetic input.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from pipelines.config import BaseModelConfig, JobConfig


class DemoConfig(JobConfig):
    """Runs: build base model -> zero-conv identity check -> a few training steps in-process."""

    work_dir: str = Field(default="demo-output", description="where the demo writes everything")
    base_model: BaseModelConfig = BaseModelConfig()
    train_steps: int = Field(default=5, ge=1, description="in-process training steps for the identity demo")
    seed: int = Field(default=0, description="random seed")


def _say(step: str, text: str) -> None:
    print(f"[demo] {step:<10} {text}", flush=True)


def demo_zero_conv_identity(config: DemoConfig) -> dict:
    """Build the base model and a ControlNet from it; show y_c == y at step 0 and that training moves it."""
    from model.base import load_base
    from model.controlnet import ControlledUNet, controlnet_from_unet, param_groups
    from model.objective import diffusion_loss
    from model.inference import condition_tensor
    from pipelines.synthetic import fill50k

    base = load_base(config.base_model.source)
    n_params = {name: sum(p.numel() for p in getattr(base, name).parameters()) for name in ("unet", "vae", "text_encoder")}
    _say("base", f"{config.base_model.source} -> {base.local_dir} ({base.resolution}px; params {n_params})")

    controlled = ControlledUNet(base.unet, [controlnet_from_unet(base.unet)])
    samples = fill50k(4, base.resolution, config.seed)
    g = torch.Generator().manual_seed(config.seed)
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1).float() / 127.5 - 1 for s in samples])
    conditions = [condition_tensor(np.stack([s.condition for s in samples]))]
    text = base.encode_prompts([s.text for s in samples])
    latents = base.encode_images(images)
    noisy, t = torch.randn(latents.shape, generator=g), torch.full((len(samples),), 500)
    with torch.no_grad():
        plain = base.unet(noisy, t, encoder_hidden_states=text).sample
        controlled_out = controlled(noisy, t, text, conditions)
    identity_diff = float((plain - controlled_out).abs().max())
    _say("identity", f"max |UNet+ControlNet - UNet| at step 0 = {identity_diff} (zero convolutions)")

    optimizer = torch.optim.AdamW(param_groups(controlled, "locked", lr=1e-4, unet_lr=0.0))
    losses = []
    for _ in range(config.train_steps):
        loss = diffusion_loss(controlled, base.noise_scheduler, latents, text, conditions, generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(round(loss.item(), 5))
    with torch.no_grad():
        after = float((plain - controlled(noisy, t, text, conditions)).abs().max())
    _say("train", f"{config.train_steps} steps, loss {losses}; ControlNet residual now {after:.3g} (was 0)")
    return {"identity_max_abs_diff": identity_diff, "losses": losses, "residual_after_training": after}


def run_demo(config: DemoConfig) -> str:
    started = time.time()
    out = Path(config.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"identity": demo_zero_conv_identity(config)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    return f"demo finished in {time.time() - started:.0f}s; summary in {out / 'demo_summary.json'}"
