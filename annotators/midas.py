"""MiDaS depth (DPT-Hybrid, as controlnet-aux's MidasDetector), batched. Near is bright."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from annotators.base import WeightsSpec, register
from annotators.network import NetworkAnnotator


@register
class Midas(NetworkAnnotator):
    name = "midas"
    version = "1"
    channels = 1
    size_multiple = 32  # the DPT decoder's feature pyramid
    weights = WeightsSpec(files=("dpt_hybrid-midas-501f0c75.pt",), licence="MIT")

    def load(self, directory: Path) -> None:
        from controlnet_aux import MidasDetector

        self.net = MidasDetector.from_pretrained(str(directory)).model.to(self.device)

    def annotate_batch(self, images: np.ndarray) -> np.ndarray:
        depth = self.net(self.to_device(images) / 127.5 - 1.0)  # (N, H, W)
        # Normalise each image to [0, 1] by its own range, as MidasDetector.__call__ does.
        depth = depth - depth.amin(dim=(1, 2), keepdim=True)
        top = depth.amax(dim=(1, 2), keepdim=True)
        depth = torch.where(top > 0, depth / top, 0.0)  # a flat map is 0, not NaN
        return (depth.cpu().numpy() * 255.0).clip(0, 255).astype(np.uint8)
