"""Image bytes <-> uint8 arrays, and resizing to the training resolution. Shared by every stage.

Images cross stage boundaries as encoded bytes (JPEG for photos, PNG for condition maps, which must
stay lossless); inside a stage they are uint8 HWC / NHWC numpy arrays.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)  # speed over a few % of size
    return buf.getvalue()


def decode_rgb(data: bytes) -> np.ndarray:
    """Decode any PIL-readable image to uint8 (H, W, 3)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def decode_condition(data: bytes, channels: int = 3) -> np.ndarray:
    """Decode a condition PNG to uint8 (H, W, channels); 1-channel maps are repeated to 3 if asked."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return arr[..., None] if channels == 1 else arr
