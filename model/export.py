"""Save trained weights in the format stock diffusers loads.

``ControlNetModel.from_pretrained(dir)`` and ``StableDiffusionControlNetPipeline`` read what
:func:`export_controlnet` writes (config.json + diffusion_pytorch_model.safetensors); an unlocked
UNet is written the same way so a pipeline can swap it in.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def _save(module: nn.Module, out_dir: str | Path, state_dict: dict | None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        # diffusers' save_pretrained has no state_dict argument (**kwargs swallows it and the module's own,
        # e.g. ZeRO-3-partitioned, weights get written): save a fresh copy that holds the given weights.
        fresh = type(module).from_config(module.config)
        fresh.load_state_dict(state_dict)
        module = fresh
    module.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def export_controlnet(controlnet: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write ``controlnet`` (optionally with gathered full weights ``state_dict``) in diffusers format."""
    return _save(controlnet, out_dir, state_dict)


def export_unet(unet: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    return _save(unet, out_dir, state_dict)
