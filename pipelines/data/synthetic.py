"""Fill50K-style synthetic data (the ControlNet paper's toy task), made in code.

Condition: a circle's outline (white on black). Target: the same circle filled with a colour on a
coloured background. Prompt: "<colour> circle with <colour> background". A second, segmentation-like
condition is the filled disc itself (white on black): ``fill50k_table(..., mask=True)`` adds it as
column ``cond_mask`` (two ControlNets composed: bench/bench_experiments.py). A model that learns the
task must put the circle where the condition says - which makes "is control being learned?" a
question a test can answer in minutes on a CPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipelines.common.images import encode_jpeg, encode_png

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}


@dataclass
class Sample:
    image: np.ndarray  # uint8 (H, W, 3): the filled circle
    condition: np.ndarray  # uint8 (H, W, 3): the outline
    text: str
    mask: np.ndarray  # uint8 (H, W, 3): the filled disc, white on black


def fill50k_sample(rng: np.random.Generator, size: int) -> Sample:
    names = list(COLOURS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    cy, cx = rng.uniform(0.25, 0.75, size=2) * size
    radius = rng.uniform(0.12, 0.3) * size
    yy, xx = np.mgrid[0:size, 0:size]
    dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = COLOURS[names[bg]]
    image[dist <= radius] = COLOURS[names[fg]]
    outline = np.abs(dist - radius) <= max(1.0, size / 64)
    condition = np.zeros((size, size, 3), np.uint8)
    condition[outline] = 255
    mask = np.zeros((size, size, 3), np.uint8)
    mask[dist <= radius] = 255
    return Sample(image, condition, f"{names[fg]} circle with {names[bg]} background", mask)


def fill50k(n: int, size: int = 64, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return [fill50k_sample(rng, size) for _ in range(n)]


def write_image_folder(out_dir: str | Path, n: int, size: int = 64, seed: int = 0, broken: bool = True) -> Path:
    """JPEGs with sidecar .txt captions, plus (``broken``) the inputs a real crawl contains:
    a zero-byte file, a truncated JPEG, a text file named .jpg and an image too small to train on."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(fill50k(n, size, seed)):
        (out / f"{i:06d}.jpg").write_bytes(encode_jpeg(s.image))
        (out / f"{i:06d}.txt").write_text(s.text)
    if broken:
        good = encode_jpeg(fill50k(1, size, seed + 1)[0].image)
        (out / "broken_empty.jpg").write_bytes(b"")
        (out / "broken_truncated.jpg").write_bytes(good[: len(good) // 3])
        (out / "broken_not_an_image.jpg").write_text("this is not an image")
        (out / "broken_too_small.png").write_bytes(encode_png(np.zeros((4, 4, 3), np.uint8)))
    return out


MASK_COLUMN = "cond_mask"


def fill50k_table(n: int, size: int = 64, seed: int = 0, mask: bool = False):
    """The annotated-dataset schema (see docs/data-schema.md) with the true outline as the condition
    (and, with ``mask``, the filled disc as column MASK_COLUMN)."""
    import pyarrow as pa

    rows = {"id": [], "image": [], "conditioning_image": [], "text": [], "width": [], "height": [], "source": []}
    if mask:
        rows[MASK_COLUMN] = []
    for i, s in enumerate(fill50k(n, size, seed)):
        if mask:
            rows[MASK_COLUMN].append(encode_png(s.mask[..., :1]))
        image = encode_jpeg(s.image)
        rows["id"].append(hashlib.sha256(image).hexdigest()[:32])
        rows["image"].append(image)
        rows["conditioning_image"].append(encode_png(s.condition[..., :1]))
        rows["text"].append(s.text)
        rows["width"].append(size)
        rows["height"].append(size)
        rows["source"].append(f"synthetic://fill50k/{seed}/{i}")
    return pa.table(rows)


def write_fill50k_parquet(
    out_dir: str | Path, n: int, size: int = 64, seed: int = 0, shards: int = 2, mask: bool = False
) -> Path:
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = fill50k_table(n, size, seed, mask)
    step = -(-n // shards)
    for k in range(shards):
        pq.write_table(table.slice(k * step, step), out / f"part-{k:05d}.parquet")
    return out


def colour_names(image: np.ndarray) -> np.ndarray:
    """The nearest named colour (index into ``COLOURS``) of every pixel of a uint8 (H, W, 3) image."""
    palette = np.array(list(COLOURS.values()), np.float32)
    distance = ((image[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
    return distance.argmin(-1)


def read_colours(image: np.ndarray, min_circle: float = 0.02) -> tuple[str, str | None]:
    """(background, circle) colour names of a Fill50K-style image, e.g. a generated one: the background is
    the commonest colour along the border, the circle the commonest other colour inside (None when under
    ``min_circle`` of the pixels have one). The inverse of what :func:`fill50k_sample` draws."""
    names, labels = list(COLOURS), colour_names(image)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = int(np.bincount(border, minlength=len(names)).argmax())
    others = labels[labels != background]
    if others.size < min_circle * labels.size:
        return names[background], None
    return names[background], names[int(np.bincount(others, minlength=len(names)).argmax())]


def prompted_colour_accuracy(images: np.ndarray, prompts: list[str]) -> dict[str, float]:
    """How often images show the colours their "<circle> circle with <background> background" prompts name:
    the fraction with the right background, the right circle colour, and both."""
    right_bg = right_circle = both = 0
    for image, prompt in zip(images, prompts):
        words = prompt.split()
        background, circle = read_colours(image)
        right_bg += background == words[3]
        right_circle += circle == words[0]
        both += background == words[3] and circle == words[0]
    n = max(len(prompts), 1)
    return {"background": right_bg / n, "circle": right_circle / n, "both": both / n}


def colour_prompts() -> list[str]:
    """Every caption Fill50K-style data can have: each ordered pair of distinct colours (56)."""
    return [f"{fg} circle with {bg} background" for fg in COLOURS for bg in COLOURS if fg != bg]
