"""Rows -> model tensors, in one place: training (raw or precomputed rows), precompute, generation.

Images cross stage boundaries as encoded bytes; inside a stage they are uint8 NHWC numpy arrays.
This module is where they become torch tensors:

* images      uint8 (N, H, W, 3)  -> float (N, 3, H, W) in [-1, 1]   (the VAE's input range)
* conditions  uint8 (N, H, W, C)  -> float (N, 3, H, W) in [0, 1]    (what ControlNet was trained on)
* precomputed rows (VAE posterior mean/std, prompt tensors) -> one latent sample per step
* union training: each row's condition picked from several columns (:func:`pick_conditions`)
* each image's size before annotate resized it (``original_width`` / ``original_height``, when the rows have them)
  -> the family's size conditioning (SDXL's micro-conditioning: ``fam.with_image_sizes``)
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.common.images import decode_condition, decode_rgb
from pipelines.data.schema import LATENT_MEAN, LATENT_STD, ORIGINAL_HEIGHT, ORIGINAL_WIDTH, prompt_column


def image_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def condition_tensor(condition: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) or (N, H, W, C) -> float (N, 3, H, W) in [0, 1], as the pipeline and training expect."""
    arr = condition if condition.ndim == 4 else condition[None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return torch.from_numpy(arr.astype(np.float32) / 255.0).permute(0, 3, 1, 2)


@torch.no_grad()
def latent_distribution(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior N(mean, std^2) of each image, unscaled: what ``encode_images`` samples from."""
    dist = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    return dist.mean, dist.std


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One posterior sample, unscaled (the family's ``scale_latents`` turns it into what training denoises).

    The noise is drawn on the CPU (from ``generator``, or torch's global RNG), exactly as the VAE's
    ``latent_dist.sample()`` in ``fam.encode_images`` draws it for a VAE on the CPU; so with the same RNG state
    both give the same latents. On a GPU the two differ in which RNG they use, not in distribution.
    """
    eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device="cpu").to(mean.device)
    return mean + std * eps


def _conditions(batch: dict[str, np.ndarray], condition_column: str, device) -> torch.Tensor:
    return condition_tensor(np.stack([decode_condition(b, channels=3) for b in batch[condition_column]])).to(device)


def _float_tensor(values: np.ndarray, device) -> torch.Tensor:
    # Arrays backed by Arrow buffers are read-only; torch wants writable memory (copies only if needed).
    return torch.from_numpy(np.require(values, np.float32, ["C", "W"])).to(device)


def precomputed_tensors(
    batch: dict[str, np.ndarray],
    base,
    condition_column: str,
    empty_prompt: dict[str, torch.Tensor],
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """A batch of precomputed rows (numpy columns, as Ray Data's ``iter_batches`` gives them) ->
    (latents, prompt tensors, conditions) for the family's ``loss``; ``base`` is a model.families.Base.

    Latents are sampled here, per step; the prompt's size-dependent tensors come from ``empty_prompt`` (the empty
    caption encoded at the dataset's size); prompt dropout is still the train loop's job.
    """
    fam = base.family
    mean, std = (_float_tensor(batch[name], device) for name in (LATENT_MEAN, LATENT_STD))
    latents = fam.scale_latents(base, sample_latents(mean, std, generator))
    text = {key: _float_tensor(batch[prompt_column(key)], device) for key in fam.text_keys}
    return latents, fam.complete_prompt(text, empty_prompt), _conditions(batch, condition_column, device)


def raw_tensors(
    base, batch: dict[str, np.ndarray], condition_column: str, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """The same triple from annotated rows (JPEG images, captions), encoding them now with the family's
    ``encode_images`` / ``encode_prompts``: the path that precomputing replaces."""
    images = image_tensor(np.stack([decode_rgb(b) for b in batch["image"]])).to(device)
    return encoded_tensors(base, images, [str(t) for t in batch["text"]], _conditions(batch, condition_column, device))


@torch.no_grad()
def encoded_tensors(base, images: torch.Tensor, prompts: list[str], conditions: torch.Tensor):
    """(latents, prompt tensors, conditions) through the frozen VAE and text encoders of ``base``."""
    fam = base.family
    prompt = fam.encode_prompts(base, prompts, tuple(images.shape[-2:]))
    return fam.encode_images(base, images).to(images.device), prompt, conditions


PICKED = "condition"  # pick_conditions' output: each row's chosen condition (encoded bytes)
PICKED_INDEX = "condition_index"  # ... and which of the columns it came from


def pick_conditions(batch: dict[str, np.ndarray], columns: list[str], seed: int) -> dict[str, np.ndarray]:
    """Union training: each row trains on one of its condition ``columns``, picked from (seed, the row's position
    in the training stream; ``positions``, as pipelines.train_data's stream gives them). So a resumed run, on any
    number of workers, picks as the first run did, while each epoch (other positions) draws afresh. The columns
    are replaced by PICKED (bytes) and PICKED_INDEX (index into ``columns``)."""
    picks = np.array([np.random.default_rng([seed, int(p)]).integers(len(columns)) for p in batch["positions"]])
    out = {k: v for k, v in batch.items() if k not in columns}
    out[PICKED] = np.array([batch[columns[k]][i] for i, k in enumerate(picks)], dtype=object)
    out[PICKED_INDEX] = picks
    return out


def decode_batch(batch: dict[str, np.ndarray], condition_column: str) -> dict[str, np.ndarray]:
    """Ray Data ``map_batches`` function: encoded bytes -> uint8 NHWC image and 3-channel condition (and the
    picked column's index, when :func:`pick_conditions` ran first)."""
    return {
        "image": np.stack([decode_rgb(b) for b in batch["image"]]),
        "condition": np.stack([decode_condition(b, channels=3) for b in batch[condition_column]]),
        "text": batch["text"],
        **{k: batch[k] for k in (PICKED_INDEX, ORIGINAL_WIDTH, ORIGINAL_HEIGHT) if k in batch},
    }


def to_tensors(batch: dict[str, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A decoded batch -> images float [-1, 1] NCHW, conditions float [0, 1] NCHW; plus the prompts."""
    images = image_tensor(batch["image"]).to(device)
    conditions = condition_tensor(batch["condition"]).to(device)
    return images, conditions, [str(t) for t in batch["text"]]


def batch_tensors(
    batch: dict[str, np.ndarray],
    base,
    condition_column: str,
    scaling_factor: float | None,
    device: torch.device,
    empty_prompt: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """(latents, prompt tensors, conditions): through the frozen VAE and text encoders from a decoded
    batch, or sampled from the stored posteriors of a precomputed one (``scaling_factor`` set). Rows that
    record their original size get the family's size conditioning for it."""
    if scaling_factor is not None:
        latents, prompt, conditions = precomputed_tensors(batch, base, condition_column, empty_prompt, device)
    else:
        images, conditions, prompts = to_tensors(batch, device)
        latents, prompt, conditions = encoded_tensors(base, images, prompts, conditions)
    if ORIGINAL_WIDTH in batch and ORIGINAL_HEIGHT in batch:
        original_sizes = torch.from_numpy(np.stack([batch[ORIGINAL_WIDTH], batch[ORIGINAL_HEIGHT]], axis=1))
        prompt = base.family.with_image_sizes(prompt, original_sizes, tuple(conditions.shape[-2:]))
    return latents, prompt, conditions
