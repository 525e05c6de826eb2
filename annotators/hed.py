"""HED soft edges (controlnet-aux's ControlNetHED, "HED 1.1"), batched; optionally as scribbles."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from annotators.base import WeightsSpec, register
from annotators.network import NetworkAnnotator


@register
class HED(NetworkAnnotator):
    name = "hed"
    version = "1"
    channels = 1
    weights = WeightsSpec(files=("ControlNetHED.pth",), licence="Apache-2.0")

    def __init__(self, safe: bool = False, scribble: bool = False, **runtime):
        """safe: quantise edges to a few levels (controlnet-aux's safe_step); scribble: thin, binary strokes."""
        self.safe, self.scribble = safe, scribble
        super().__init__(safe=safe, scribble=scribble, **runtime)

    def load(self, directory: Path) -> None:
        from controlnet_aux import HEDdetector

        self.net = HEDdetector.from_pretrained(str(directory)).netNetwork.to(self.device)

    def annotate_batch(self, images: np.ndarray) -> np.ndarray:
        from controlnet_aux.util import nms, safe_step

        _, h, w, _ = images.shape
        sides = [side[:, 0].cpu().numpy() for side in self.net(self.to_device(images))]  # 5 x (N, h/2^k, w/2^k)
        maps = []
        for i in range(len(images)):
            # From here on, per image, exactly HEDdetector.__call__ after its forward.
            edges = np.stack([cv2.resize(side[i], (w, h), interpolation=cv2.INTER_LINEAR) for side in sides], axis=2)
            edge = 1 / (1 + np.exp(-np.mean(edges, axis=2).astype(np.float64)))
            if self.safe:
                edge = safe_step(edge)
            edge = (edge * 255.0).clip(0, 255).astype(np.uint8)
            if self.scribble:
                edge = nms(edge, 127, 3.0)
                edge = cv2.GaussianBlur(edge, (0, 0), 3.0)
                edge[edge > 4] = 255
                edge[edge < 255] = 0
            maps.append(edge)
        return np.stack(maps)
