"""Save trained weights in the format stock diffusers loads.

The family's stock ControlNet class (``ControlNetModel``, ``ControlNetUnionModel``, ``SD3ControlNetModel``,
``FluxControlNetModel``) ``from_pretrained(dir)`` and its stock pipeline read what :func:`export_model` writes
(config.json + diffusion_pytorch_model.safetensors); an unlocked UNet or transformer is written the same way so
a pipeline can swap it in.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn


def export_model(module: nn.Module, out_dir: str | Path, state_dict: dict | None = None) -> Path:
    """Write a diffusers ``module`` (optionally with gathered full weights ``state_dict``) with save_pretrained."""
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
