"""Fixtures for serving tests: registered tiny ControlNets in a real MLflow server.

Models are registered here with the registry code itself (the training job is not needed): a
ControlNet copied from the tiny UNet, its weights perturbed with a fixed seed (a fresh ControlNet
is zero-initialised, i.e. the identity, so versions would otherwise give the same images),
exported in diffusers format and logged as a pyfunc model.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def register_controlnet(base, base_dir: Path, name: str, seed: int, export_root: Path, champion: bool = True) -> str:
    """Register a perturbed tiny ControlNet as a new version of ``name``; returns the version."""
    import mlflow
    import torch

    from annotators import create
    from model.controlnet import controlnet_from_unet
    from model.export import export_controlnet
    from model.registry import log_controlnet_model, set_alias

    net = controlnet_from_unet(base.unet)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = export_controlnet(net, export_root / f"{name}-seed{seed}")
    metadata = {
        "base_model": str(base_dir),
        "annotator": create("canny").spec(),
        "inference": {"steps": 20, "guidance_scale": 9.0},
    }
    with mlflow.start_run():
        info = log_controlnet_model(out, metadata=metadata, registered_name=name, alias="candidate")
    version = str(info.registered_model_version)
    if champion:
        set_alias(name, "champion", version)
    return version


@pytest.fixture(scope="module")
def registry(mlflow_server, tiny_base, tiny_base_dir, tmp_path_factory):
    """The tracking URI plus a ``register(name, seed, champion=True) -> version`` function."""
    from pipelines.common.tracking import connect

    connect(mlflow_server, "serve-tests")
    export_root = tmp_path_factory.mktemp("exports")

    def register(name: str, seed: int, champion: bool = True) -> str:
        return register_controlnet(tiny_base, tiny_base_dir, name, seed, export_root, champion)

    register.tracking_uri = mlflow_server
    return register
