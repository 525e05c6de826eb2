"""Surface normals (NormalBAE, as controlnet-aux's NormalBaeDetector), batched; RGB = normal xyz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from annotators.base import WeightsSpec, register
from annotators.network import NetworkAnnotator


@register
class NormalBae(NetworkAnnotator):
    name = "normalbae"
    version = "1"
    channels = 3
    size_multiple = 8  # the decoder concatenates upsampled features with the encoder's skips
    weights = WeightsSpec(files=("scannet.pt",), licence="MIT")

    def load(self, directory: Path) -> None:
        from controlnet_aux import NormalBaeDetector

        detector = NormalBaeDetector.from_pretrained(str(directory))
        self.net, self.normalize = detector.model.to(self.device), detector.norm

    def annotate_batch(self, images: np.ndarray) -> np.ndarray:
        normal = self.net(self.normalize(self.to_device(images) / 255.0))[0][-1][:, :3]  # finest prediction
        normal = ((normal + 1) * 0.5).clip(0, 1).permute(0, 2, 3, 1)
        return (normal * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()
