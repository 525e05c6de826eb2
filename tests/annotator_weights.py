"""Random weights for the network annotators, in the exact file formats controlnet-aux loads (built with each
network's own constructor, saved under the file name its detector expects), written once per session into a
temp directory and only when a test asks. ``tests/conftest.py`` offers the fixture to every test."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch


def _hed():
    from controlnet_aux.hed import ControlNetHED_Apache2

    return ControlNetHED_Apache2().state_dict()


def _midas():
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    # As controlnet_aux.midas.api.load_model("dpt_hybrid"); timm builds the backbone with pretrained=False.
    return DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True).state_dict()


def _openpose_body():
    from controlnet_aux.open_pose.model import bodypose_model

    # Purely random weights give flat heatmaps (no peaks above Body's 0.1 threshold): every map would be
    # blank and the test would prove nothing. So: every conv passes the 3 input colours straight through
    # (centre tap 1 on channels 0..2, the rest 0), and only the last stage mixes them at random into
    # heatmaps and limb fields; people are then found and drawn.
    model = bodypose_model()
    with torch.no_grad():
        for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d)):
            conv.weight.zero_()
            conv.bias.zero_()
            centre = conv.kernel_size[0] // 2
            for c in range(3):
                conv.weight[c, c, centre, centre] = 1.0
        model.model0.conv1_1.bias[:3] = 0.5  # the input is in [-0.5, 0.5); keep it positive through the ReLUs
        for last in (model.model6_1.Mconv7_stage6_L1, model.model6_2.Mconv7_stage6_L2):
            last.weight[:, :3, 0, 0] = 2.0 * torch.randn(last.out_channels, 3)
            last.bias[:] = 0.3 * torch.randn(last.out_channels)
    # The CMU checkpoint names parameters without the block prefix ("conv1_1.weight"); Body maps them back.
    return {".".join(k.split(".")[1:]): v for k, v in model.state_dict().items()}


def _mlsd():
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    return MobileV2_MLSD_Large().state_dict()


def _lineart():
    from controlnet_aux.lineart import Generator

    return Generator(3, 1, 3).state_dict()


def _normalbae():
    from controlnet_aux.normalbae.nets.NNET import NNET

    args = types.SimpleNamespace(
        mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4, importance_ratio=0.7
    )  # as NormalBaeDetector.from_pretrained
    return {"model": NNET(args).state_dict()}


RANDOM_WEIGHTS = {
    "ControlNetHED.pth": _hed,
    "dpt_hybrid-midas-501f0c75.pt": _midas,
    "body_pose_model.pth": _openpose_body,
    "mlsd_large_512_fp32.pth": _mlsd,
    "sk_model.pth": _lineart,
    "sk_model2.pth": _lineart,
    "scannet.pt": _normalbae,
}


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory):
    """``random_weights(*files) -> Path``: a directory holding those files (each written once, seeded)."""
    directory = tmp_path_factory.mktemp("annotator-weights")

    def write(*files: str) -> Path:
        for file in files:
            path = directory / file
            if not path.exists():
                torch.manual_seed(list(RANDOM_WEIGHTS).index(file))  # distinct per file
                torch.save(RANDOM_WEIGHTS[file](), path)
        return directory

    return write
