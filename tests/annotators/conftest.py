"""Fixtures for annotator tests: small real photos. (``random_weights``, the networks' weights in
controlnet-aux's file formats, is in tests/annotator_weights.py: pipeline tests use it too.)"""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="session")
def photos():
    """``photos(h, w, n=3)``: n real photos (scikit-image's astronaut, coffee, chelsea) as (n, h, w, 3) uint8."""
    import cv2
    from skimage import data

    sources = [data.astronaut(), data.coffee(), data.chelsea()]

    def make(h: int, w: int, n: int = 3) -> np.ndarray:
        return np.stack([cv2.resize(sources[i % 3], (w, h), interpolation=cv2.INTER_AREA) for i in range(n)])

    return make
