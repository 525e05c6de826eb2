"""Fixtures for serving tests: registered tiny ControlNets in a real MLflow server.

Models are registered here with the registry code itself (the training job is not needed): a
ControlNet copied from the tiny UNet, its weights perturbed with a fixed seed (a fresh ControlNet
is zero-initialised, i.e. the identity, so versions would otherwise give the same images),
exported in diffusers format and logged as a pyfunc model.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def register_controlnet(
    base,
    base_dir: Path,
    name: str,
    seed: int,
    export_root: Path,
    champion: bool = True,
    annotator: dict | None = None,
    inference: dict | None = None,
) -> str:
    """Register a perturbed tiny ControlNet as a new version of ``name``; returns the version.

    ``annotator``: the recorded annotator spec (default canny's); ``inference``: recorded generation
    defaults (default none, so the code's own defaults apply)."""
    import mlflow
    import torch

    from annotators import create
    from model.export import export_model
    from model.registry import log_controlnet_model, set_alias

    net = base.family.new_controlnet(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    out = export_model(net, export_root / f"{name}-seed{seed}")
    metadata = {"base_model": str(base_dir), "annotator": annotator or create("canny").spec()}
    if inference:
        metadata["inference"] = inference
    with mlflow.start_run():
        info = log_controlnet_model(out, metadata=metadata, registered_name=name, alias="candidate")
    version = str(info.registered_model_version)
    if champion:
        set_alias(name, "champion", version)
    return version


@pytest.fixture(scope="module")
def registry(mlflow_server, tiny_base, tiny_base_dir, tmp_path_factory):
    """The tracking URI plus a ``register(name, seed, champion=True, **metadata) -> version`` function."""
    from pipelines.common.tracking import connect

    connect(mlflow_server, "serve-tests")
    export_root = tmp_path_factory.mktemp("exports")

    def register(name: str, seed: int, champion: bool = True, **metadata) -> str:
        return register_controlnet(tiny_base, tiny_base_dir, name, seed, export_root, champion, **metadata)

    register.tracking_uri = mlflow_server
    return register


@pytest.fixture(scope="session")
def mlsd_weights(tmp_path_factory) -> Path:
    """A directory with random MLSD weights in the format controlnet-aux loads (MLSD's stride is 16)."""
    import torch
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    directory = tmp_path_factory.mktemp("mlsd-weights")
    torch.manual_seed(0)
    torch.save(MobileV2_MLSD_Large().state_dict(), directory / "mlsd_large_512_fp32.pth")
    return directory


def missing_weights_spec(directory: Path) -> dict:
    """A HED spec as training records it, whose weights are not where the record says."""
    return {
        "name": "hed",
        "version": "1",
        "params": {"safe": False, "scribble": False},
        "channels": 1,
        "commercial_use": True,
        "weights": {"source": str(directory / "gone"), "sha256": {"ControlNetHED.pth": "0" * 64}},
    }
