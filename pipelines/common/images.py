"""Image bytes <-> uint8 arrays, and resizing to the training resolution. Shared by every stage.

Images cross stage boundaries as encoded bytes (JPEG for photos, PNG for condition maps, which must
stay lossless); inside a stage they are uint8 HWC / NHWC numpy arrays.

Real-world inputs are messy, so decoding normalises everything to 8-bit RGB the way a viewer would
show it: EXIF orientation applied, transparency composited on white, CMYK / palette / grayscale /
16-bit converted. An input that cannot become a training image raises :class:`ImageRejected` with a
short ``reason`` code (the annotate job writes it to its rejects table and goes on).
"""

from __future__ import annotations

import hashlib
import io
import warnings
import zlib

import cv2
import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

# Reasons an input image is rejected (the `reason` column of the rejects table; see docs/data-schema.md).
EMPTY = "empty"  # zero bytes
NOT_AN_IMAGE = "not_an_image"  # no image format recognised
TRUNCATED = "truncated"  # the file ends before the image data does
DECODE_ERROR = "decode_error"  # recognised but undecodable (corrupt data, unsupported variant)
TOO_SMALL = "too_small"  # short side below the configured minimum
TOO_LARGE = "too_large"  # more pixels than Pillow's decompression-bomb limit

_WHITE = (255, 255, 255, 255)
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageRejected(ValueError):
    """These bytes cannot become a training image; ``reason`` is one of the codes above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def content_id(data: bytes) -> str:
    """A row's stable id: the first 32 hex digits of the SHA-256 of the source image bytes."""
    return hashlib.sha256(data).hexdigest()[:32]


def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(image: np.ndarray) -> bytes:
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    buf = io.BytesIO()
    # Level 1 with zlib's run-length strategy: zlib documents it as made for PNG image data; on
    # condition maps (edges, depth) it is both faster and smaller than the default strategy.
    Image.fromarray(image).save(buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE)
    return buf.getvalue()


def encoded_bytes(value: bytes | dict) -> bytes:
    """An image cell's bytes: plain binary, or Hugging Face's ``{"bytes": ..., "path": ...}`` (annotated data)."""
    return value["bytes"] if isinstance(value, dict) else value


def decode_rgb(data: bytes | dict) -> np.ndarray:
    """Decode any PIL-readable image to uint8 (H, W, 3), upright and without transparency."""
    with open_image(encoded_bytes(data)) as img:
        return np.asarray(_to_rgb(_load_upright(img)))


def decode_condition(data: bytes | dict, channels: int = 3) -> np.ndarray:
    """Decode a condition PNG to uint8 (H, W, channels); 1-channel maps are repeated to 3 if asked."""
    with Image.open(io.BytesIO(encoded_bytes(data))) as img:
        arr = np.asarray(img.convert("L" if channels == 1 else "RGB"))
    return arr[..., None] if channels == 1 else arr


def decode_training_image(data: bytes, size: int, min_side: int = 1) -> tuple[np.ndarray, tuple[int, int]]:
    """Bytes -> uint8 (size, size, 3) ready to annotate, and the upright original (width, height).

    Rejects (ImageRejected) inputs that are not images, are broken, or whose short side is below
    ``min_side``. The size check reads only the header, so tiny images are never fully decoded.
    """
    with open_image(data) as img:
        width, height = upright_size(img)
        if min(width, height) < min_side:
            raise ImageRejected(TOO_SMALL, f"{width}x{height}, short side below {min_side}")
        if img.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale when the result still covers `size`:
            # big photos decode several times faster and the resize below has less to do.
            img.draft("RGB", (size, size))
        rgb = np.asarray(_to_rgb(_load_upright(img)))
    return resize_center_crop(rgb, size), (width, height)


def open_image(data: bytes) -> Image.Image:
    """Identify the format and read the header; raises ImageRejected for empty or unknown bytes."""
    if not data:
        raise ImageRejected(EMPTY, "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Exception as exc:  # Pillow raises many types for bad headers (OSError, SyntaxError, ...)
        raise _rejection(exc) from None


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 rotate by 90 degrees."""
    width, height = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a corrupt EXIF block is no reason to drop a good image
        orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Scale the short side to ``size`` and crop the centre: uint8 (H, W[, C]) -> (size, size[, C]).

    Crops the centred square first, then resizes only that (same result, fewer pixels touched).
    Shrinking by up to 1.5x uses bilinear: measured against an anti-aliased Lanczos reference it is
    as close as INTER_AREA there (PSNR ~48 dB on noisy photos) and 5-10x faster; beyond 1.5x
    bilinear starts to alias, so INTER_AREA. Enlarging uses bicubic.
    """
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = image[top : top + side, left : left + side]
    if side == size:
        return np.ascontiguousarray(square)
    if side < size:
        interpolation = cv2.INTER_CUBIC
    elif side <= 1.5 * size:
        interpolation = cv2.INTER_LINEAR
    else:
        interpolation = cv2.INTER_AREA
    return cv2.resize(square, (size, size), interpolation=interpolation)


def crop_top_left(original_size: tuple[int, int], size: int) -> tuple[int, int]:
    """Where :func:`resize_center_crop`'s square begins, as (top, left) pixels of the image scaled to ``size``
    on its short side, for an original of (width, height): SDXL's ``crops_coords_top_left``."""
    width, height = original_size
    side = min(width, height)
    return round((height - side) // 2 * size / side), round((width - side) // 2 * size / side)


def _load_upright(img: Image.Image) -> Image.Image:
    """Decode the pixels (this is where truncation shows) and apply the EXIF orientation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except Exception as exc:
        raise _rejection(exc) from None
    try:
        ImageOps.exif_transpose(img, in_place=True)  # in place: no copy when there is nothing to do
    except Exception:  # a corrupt EXIF block is no reason to drop a good image
        pass
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB, as a viewer would show it."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _SIXTEEN_BIT_MODES:  # 16-bit grayscale (PNG/TIFF): scale 0..65535 to 0..255
        gray = np.asarray(img).astype(np.float32) / 257.0
        return Image.fromarray(np.clip(gray + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":  # float TIFF: 0..1 if it fits there, else already 0..255
        gray = np.asarray(img, dtype=np.float32)
        if np.nanmax(gray, initial=0.0) <= 1.0:
            gray = gray * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(gray) + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        # Transparent pixels become white, not whatever colour happens to be stored under alpha 0.
        background = Image.new("RGBA", img.size, _WHITE)
        background.alpha_composite(img.convert("RGBA"))
        return background.convert("RGB")
    if mode == "CMYK" and img.info.get("icc_profile"):
        try:  # print files: the embedded profile gives the right colours, the naive formula does not
            source = ImageCms.ImageCmsProfile(io.BytesIO(img.info["icc_profile"]))
            return ImageCms.profileToProfile(img, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass
    try:
        return img.convert("RGB")
    except ValueError as exc:  # e.g. LAB / HSV variants Pillow cannot convert
        raise ImageRejected(DECODE_ERROR, f"cannot convert mode {mode} to RGB: {exc}") from None


def _rejection(exc: Exception) -> ImageRejected:
    message = str(exc) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return ImageRejected(TOO_LARGE, message)
    if isinstance(exc, UnidentifiedImageError):
        return ImageRejected(NOT_AN_IMAGE, "no known image format")
    if isinstance(exc, ImageRejected):
        return exc
    lowered = message.lower()
    if "truncated" in lowered or "broken data stream" in lowered or isinstance(exc, EOFError):
        return ImageRejected(TRUNCATED, message)
    return ImageRejected(DECODE_ERROR, f"{type(exc).__name__}: {message}")
