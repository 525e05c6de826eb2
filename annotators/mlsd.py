"""M-LSD straight line segments (controlnet-aux's MLSDdetector, large model), batched."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from annotators.base import WeightsSpec, register
from annotators.network import NetworkAnnotator, Replay

_TOP_K = 200  # pred_lines keeps the 200 strongest line centres (at half resolution)


@register
class MLSD(NetworkAnnotator):
    name = "mlsd"
    version = "1"
    channels = 1
    size_multiple = 16  # the MobileNetV2 encoder's stride
    weights = WeightsSpec(files=("mlsd_large_512_fp32.pth",), licence="Apache-2.0")

    def __init__(self, value_threshold: float = 0.1, distance_threshold: float = 0.1, **runtime):
        """value_threshold: min line-centre score (controlnet-aux thr_v); distance_threshold: min length (thr_d)."""
        self.value_threshold, self.distance_threshold = value_threshold, distance_threshold
        super().__init__(value_threshold=value_threshold, distance_threshold=distance_threshold, **runtime)

    def load(self, directory: Path) -> None:
        from controlnet_aux import MLSDdetector

        self.net = MLSDdetector.from_pretrained(str(directory)).model.to(self.device)

    def annotate_batch(self, images: np.ndarray) -> np.ndarray:
        from controlnet_aux.mlsd.utils import pred_lines

        n, h, w, _ = images.shape
        if (h // 2) * (w // 2) < _TOP_K:
            raise ValueError(f"{self.name}: {h}x{w} is too small (its decoder needs {_TOP_K} pixels at half size)")
        # pred_lines' network input: RGB plus a channel of ones, scaled to [-1, 1], built on the CPU
        # because Replay compares it with what pred_lines builds.
        rgb = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float()
        inputs = torch.cat([rgb, torch.ones(n, 1, h, w)], dim=1) / 127.5 - 1.0
        outputs = self.net(inputs.to(self.device)).cpu()
        maps = np.zeros((n, h, w), np.uint8)
        for i, image in enumerate(images):
            replay = Replay(inputs[i : i + 1], outputs[i : i + 1])
            try:
                lines = pred_lines(image, replay, [h, w], self.value_threshold, self.distance_threshold)
            except IndexError:
                continue  # no segment passed the thresholds (pred_lines indexes an empty array): blank map
            for line in lines:  # as MLSDdetector.__call__
                x_start, y_start, x_end, y_end = [int(v) for v in line]
                cv2.line(maps[i], (x_start, y_start), (x_end, y_end), 255, 1)
        return maps
