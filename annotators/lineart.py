"""Line art: ``lineart_standard`` (weightless, image processing) and ``lineart`` (a network).

Both match controlnet-aux's LineartStandardDetector / LineartDetector. Both draw white lines on black:
the lineart network draws dark lines on white and, as controlnet-aux does, its map is inverted
(ControlNet 1.1 inverted it at the model input instead, so its raw lineart maps are dark on white).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from annotators.base import Annotator, WeightsSpec, register
from annotators.network import NetworkAnnotator


@register
class LineartStandard(Annotator):
    name = "lineart_standard"
    version = "1"
    channels = 1

    def __init__(self, gaussian_sigma: float = 6.0, intensity_threshold: int = 8):
        """gaussian_sigma: blur that defines "darker than the surroundings"; intensity_threshold: floor
        for the pixels whose median sets the contrast."""
        super().__init__(gaussian_sigma=gaussian_sigma, intensity_threshold=intensity_threshold)
        self.sigma, self.threshold = gaussian_sigma, intensity_threshold

    def annotate(self, images: np.ndarray) -> np.ndarray:
        # One Gaussian blur and a median per image: a few ms at 512 px, so a loop is fine.
        return np.stack([self._lines(image) for image in images])

    def _lines(self, image: np.ndarray) -> np.ndarray:
        x = image.astype(np.float32)
        g = cv2.GaussianBlur(x, (0, 0), self.sigma)
        intensity = np.min(g - x, axis=2).clip(0, 255)
        strong = intensity[intensity > self.threshold]
        # controlnet-aux divides by max(16, median); the median of nothing is NaN there, which max() skips.
        intensity /= max(16, np.median(strong)) if strong.size else 16
        intensity *= 127
        return intensity.clip(0, 255).astype(np.uint8)


@register
class Lineart(NetworkAnnotator):
    name = "lineart"
    version = "1"
    channels = 1
    size_multiple = 4  # two stride-2 downsamplings, mirrored by two upsamplings
    weights = WeightsSpec(files=("sk_model.pth", "sk_model2.pth"), licence="MIT")

    def __init__(self, coarse: bool = False, **runtime):
        """coarse: use the coarse model (sk_model2.pth) instead of the fine one (sk_model.pth)."""
        self.coarse = coarse
        super().__init__(coarse=coarse, **runtime)

    def weight_files(self) -> tuple[str, ...]:
        fine, coarse = self.weights.files
        return (coarse if self.coarse else fine,)

    def load(self, directory: Path) -> None:
        from controlnet_aux.lineart import Generator

        # As LineartDetector.from_pretrained, which would also insist on the file we do not use.
        self.net = Generator(3, 1, 3)
        self.net.load_state_dict(torch.load(directory / self.weight_files()[0], map_location="cpu"))
        self.net.eval().to(self.device)

    def annotate_batch(self, images: np.ndarray) -> np.ndarray:
        line = self.net(self.to_device(images) / 255.0)[:, 0]
        line = (line * 255.0).clamp(0, 255).to(torch.uint8).cpu().numpy()
        return 255 - line
