"""Content shuffle (weightless): the image warped by a smooth random flow, as controlnet-aux's
ContentShuffleDetector, but reproducible.

controlnet-aux draws from NumPy's global random state. Here each image draws from its own
generator, seeded by the ``seed`` parameter and the image's own bytes: the same image gives the
same map in every run, whatever batch it lands in and in whatever order.
"""

from __future__ import annotations

import hashlib

import cv2
import numpy as np

from annotators.base import Annotator, register


def image_seed(seed: int, image: np.ndarray) -> int:
    """A 32-bit seed from the annotator's seed and the image's shape and pixels."""
    digest = hashlib.blake2b(digest_size=4)
    digest.update(f"{seed}:{image.shape}".encode())
    digest.update(np.ascontiguousarray(image).data)
    return int.from_bytes(digest.digest(), "little")


def noise_disk(rng: np.random.RandomState, h: int, w: int, period: int) -> np.ndarray:
    """controlnet_aux.util.make_noise_disk(h, w, 1, period), drawing from ``rng``: (h, w, 1) in [0, 1]."""
    noise = rng.uniform(low=0, high=1, size=((h // period) + 2, (w // period) + 2, 1))
    noise = cv2.resize(noise, (w + 2 * period, h + 2 * period), interpolation=cv2.INTER_CUBIC)
    noise = noise[period : period + h, period : period + w]
    noise -= np.min(noise)
    noise /= np.max(noise)
    return noise[:, :, None]


@register
class ContentShuffle(Annotator):
    name = "content_shuffle"
    version = "1"
    channels = 3

    def __init__(self, seed: int = 0, noise_period: int = 256):
        """seed: makes the shuffle reproducible; noise_period: px between flow control points (controlnet-aux's f)."""
        super().__init__(seed=seed, noise_period=noise_period)
        if not isinstance(noise_period, int) or noise_period < 1:
            raise ValueError(f"{self.name}: noise_period must be a positive integer, got {noise_period!r}")
        self.seed, self.period = seed, noise_period

    def annotate(self, images: np.ndarray) -> np.ndarray:
        return np.stack([self._shuffle(image) for image in images])

    def _shuffle(self, image: np.ndarray) -> np.ndarray:
        h, w, _ = image.shape
        rng = np.random.RandomState(image_seed(self.seed, image))
        x = noise_disk(rng, h, w, self.period) * float(w - 1)
        y = noise_disk(rng, h, w, self.period) * float(h - 1)
        flow = np.concatenate([x, y], axis=2).astype(np.float32)
        return cv2.remap(image, flow, None, cv2.INTER_LINEAR)
