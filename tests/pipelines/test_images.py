"""Decoding messy real-world images to upright 8-bit RGB, resizing/cropping, and rejection reasons."""

from __future__ import annotations

import hashlib
import io

import cv2
import numpy as np
import pytest
from PIL import Image

from pipelines.common import images
from pipelines.common.images import (
    ImageRejected,
    content_id,
    decode_condition,
    decode_rgb,
    decode_training_image,
    encode_jpeg,
    encode_png,
    resize_center_crop,
)

RED, BLUE = (230, 20, 20), (20, 20, 230)


def save(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def halves(width: int, height: int) -> np.ndarray:
    """Left half red, right half blue."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[:, : width // 2] = RED
    arr[:, width // 2 :] = BLUE
    return arr


def close(pixel, colour, tol=25) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, int) - np.asarray(colour, int)) <= tol))


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    data = save(Image.fromarray(halves(40, 20)), "JPEG", quality=95, exif=exif.tobytes())
    rgb = decode_rgb(data)
    assert rgb.shape == (40, 20, 3)  # now portrait
    assert close(rgb[2, 10], RED) and close(rgb[-3, 10], BLUE)  # the stored left side is now on top
    pixels, original = decode_training_image(data, size=16)
    assert original == (20, 40)  # upright (width, height)
    assert pixels.shape == (16, 16, 3)


def test_cmyk_jpeg_and_tiff_become_rgb():
    rgb = halves(32, 32)
    for fmt in ("JPEG", "TIFF"):
        data = save(Image.fromarray(rgb).convert("CMYK"), fmt)
        assert Image.open(io.BytesIO(data)).mode == "CMYK"
        out = decode_rgb(data)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8
        assert np.abs(out.astype(int) - rgb).mean() < 12, fmt


def test_transparency_is_composited_on_white():
    rgba = np.zeros((8, 8, 4), np.uint8)  # fully transparent black...
    rgba[:, 4:] = (255, 0, 0, 128)  # ...and half-transparent red
    out = decode_rgb(save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert close(out[0, 0], (255, 255, 255), tol=0)  # not black
    assert close(out[0, 7], (255, 127, 127), tol=2)

    palette = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    out = decode_rgb(save(palette, "PNG", transparency=0))  # index 0 is transparent
    assert close(out[0, 0], (255, 255, 255), tol=0) and close(out[0, 1], (0, 200, 0), tol=0)

    gray_alpha = Image.fromarray(np.dstack([np.full((4, 4), 50, np.uint8), np.zeros((4, 4), np.uint8)]), "LA")
    assert close(decode_rgb(save(gray_alpha, "PNG"))[0, 0], (255, 255, 255), tol=0)


def test_sixteen_bit_and_grayscale_inputs():
    gray16 = np.array([[0, 128 * 257], [65535, 255 * 257]], np.uint16)
    ok, png16 = cv2.imencode(".png", gray16)
    assert Image.open(io.BytesIO(png16.tobytes())).mode.startswith("I")
    out = decode_rgb(png16.tobytes())
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[..., 0].tolist() == [[0, 128], [255, 255]] and np.all(out[..., 0] == out[..., 2])

    rgb16 = (halves(8, 8).astype(np.uint16) * 257)[..., ::-1]  # cv2 writes BGR
    ok, png = cv2.imencode(".png", rgb16)
    assert close(decode_rgb(png.tobytes())[0, 0], RED, tol=1)

    gray = decode_rgb(save(Image.fromarray(np.full((6, 6), 77, np.uint8), "L"), "JPEG"))
    assert gray.shape == (6, 6, 3) and np.all(np.abs(gray.astype(int) - 77) <= 2)
    binary = decode_rgb(save(Image.new("1", (5, 5), 1), "PNG"))
    assert binary.shape == (5, 5, 3) and binary.min() == 255


def test_other_formats_decode():
    rgb = halves(16, 16)
    for fmt in ("WEBP", "BMP", "TIFF", "GIF"):
        out = decode_rgb(save(Image.fromarray(rgb), fmt, **({"lossless": True} if fmt == "WEBP" else {})))
        assert close(out[0, 0], RED, tol=30) and close(out[0, -1], BLUE, tol=30), fmt


@pytest.mark.parametrize("shape", [(100, 200), (200, 100), (30, 50), (64, 64), (64, 80), (1, 300)])
def test_resize_center_crop_sizes(shape):
    out = resize_center_crop(np.zeros((*shape, 3), np.uint8), 64)
    assert out.shape == (64, 64, 3) and out.flags["C_CONTIGUOUS"]
    assert resize_center_crop(np.zeros(shape, np.uint8), 64).shape == (64, 64)  # 2-D maps too


def test_resize_center_crop_keeps_the_centre():
    columns = np.tile(np.arange(80, dtype=np.uint8), (64, 1))  # pixel value = x coordinate
    out = resize_center_crop(columns, 64)
    assert out[0, 0] == 8 and out[0, -1] == 71  # the centred 64 columns, untouched (no resize needed)
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 100:200] = 255  # the centre third is white
    assert resize_center_crop(wide, 50).min() == 255


def test_large_jpeg_decodes_reduced_and_matches_a_full_decode():
    yy, xx = np.mgrid[0:1100, 0:2100]
    photo = np.dstack([(xx / 9) % 255, (yy / 5) % 255, (xx + yy) / 13 % 255]).astype(np.uint8)
    data = encode_jpeg(photo)
    pixels, original = decode_training_image(data, size=256)
    assert pixels.shape == (256, 256, 3) and original == (2100, 1100)
    reference = resize_center_crop(decode_rgb(data), 256)  # full-size decode, then resize
    assert np.abs(pixels.astype(int) - reference).mean() < 4


def broken_inputs() -> dict[str, bytes]:
    good = encode_jpeg(halves(64, 64))
    return {
        images.EMPTY: b"",
        images.TRUNCATED: good[: len(good) // 2],
        images.NOT_AN_IMAGE: b"this is not an image",
        images.TOO_SMALL: encode_png(np.zeros((4, 4, 3), np.uint8)),
    }


@pytest.mark.parametrize("reason", [images.EMPTY, images.TRUNCATED, images.NOT_AN_IMAGE, images.TOO_SMALL])
def test_each_broken_kind_has_its_reason(reason):
    with pytest.raises(ImageRejected) as info:
        decode_training_image(broken_inputs()[reason], size=64, min_side=32)
    assert info.value.reason == reason
    assert isinstance(info.value, ValueError)


def test_truncated_header_and_corrupt_data():
    good = encode_jpeg(halves(64, 64))
    with pytest.raises(ImageRejected) as info:
        decode_rgb(good[:100])  # cut inside the header
    assert info.value.reason == images.TRUNCATED
    corrupt = good[:200] + bytes(len(good) - 200)  # zeros where the entropy-coded data was
    try:
        decode_rgb(corrupt)  # libjpeg may recover with grey blocks; if not, the reason must be a known one
    except ImageRejected as exc:
        assert exc.reason in (images.TRUNCATED, images.DECODE_ERROR)


def test_decompression_bomb_is_too_large(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageRejected) as info:
        decode_rgb(encode_png(np.zeros((64, 64, 3), np.uint8)))
    assert info.value.reason == images.TOO_LARGE


def test_min_side_counts_the_upright_short_side():
    data = encode_jpeg(halves(80, 40))
    with pytest.raises(ImageRejected):
        decode_training_image(data, size=32, min_side=41)
    assert decode_training_image(data, size=32, min_side=40)[0].shape == (32, 32, 3)


def test_encoders_roundtrip_and_content_id():
    edges = (np.arange(64 * 64).reshape(64, 64, 1) % 2 * 255).astype(np.uint8)
    png = encode_png(edges)
    assert Image.open(io.BytesIO(png)).mode == "L"  # 1-channel maps stay grayscale
    assert np.array_equal(decode_condition(png, channels=1), edges)
    assert decode_condition(png, channels=3).shape == (64, 64, 3)
    assert content_id(png) == hashlib.sha256(png).hexdigest()[:32]
    assert len(content_id(b"")) == 32


@pytest.mark.parametrize("side", [300, 380, 600, 1000])  # shrink 1.2x, 1.5x (bilinear), 2.3x, 3.9x (area)
def test_shrinking_stays_close_to_an_antialiased_reference(side):
    import skimage.data

    photo = cv2.resize(skimage.data.astronaut(), (side, side), interpolation=cv2.INTER_CUBIC).astype(float)
    noisy = np.clip(photo + np.random.default_rng(0).normal(0, 6, photo.shape), 0, 255).astype(np.uint8)
    reference = np.asarray(Image.fromarray(noisy).resize((256, 256), Image.LANCZOS)).astype(float)
    mse = np.mean((resize_center_crop(noisy, 256) - reference) ** 2)
    assert 10 * np.log10(255**2 / mse) > 36  # nearest-neighbour (~23 dB), or bilinear at 2x and beyond, fall below


def test_crop_top_left_is_where_resize_center_crop_begins_in_the_scaled_image():
    """SDXL's crops_coords_top_left for annotate's scale-then-centre-crop: checked against a marker column."""
    import numpy as np

    from pipelines.common.images import crop_top_left, resize_center_crop

    assert crop_top_left((120, 80), 40) == (0, 10)  # 120x80 -> 60x40; the 40x40 square starts 10 px in
    assert crop_top_left((80, 120), 40) == (10, 0)
    assert crop_top_left((64, 64), 32) == (0, 0)
    # The scaled image's columns 10.. are what the crop keeps: a bright column at scaled x = 10 lands at crop x 0.
    image = np.zeros((80, 120), np.uint8)
    image[:, 20:22] = 255  # original x 20-21 -> scaled x 10
    assert resize_center_crop(image, 40)[:, 0].mean() > 100 and resize_center_crop(image, 40)[:, 5].mean() < 10
