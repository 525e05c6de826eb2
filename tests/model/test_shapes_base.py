"""The shipped ``shapes`` base: loads in stock diffusers, draws circles of the prompted colours, and a
ControlNet made from it takes conditions at its 32 px image size (its VAE downsamples x4, not x8)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from model.base import SHAPES, SHAPES_DIR
from model.families import Controlled, family_of, load
from pipelines.data.synthetic import colour_prompts, fill50k, prompted_colour_accuracy, read_colours


@pytest.fixture(scope="module")
def shapes_base():
    return load(SHAPES)


def test_shapes_base_is_the_shipped_fp16_files_loaded_as_fp32(shapes_base):
    assert shapes_base.local_dir == SHAPES_DIR
    # Through the families path: its model_index.json names a StableDiffusionPipeline, so the sd adapter drives it.
    assert family_of(SHAPES_DIR).name == shapes_base.family.name == "sd"
    assert shapes_base.pipe.vae_scale_factor == 4 and shapes_base.resolution == 32
    assert {p.dtype for p in shapes_base.denoiser.parameters()} == {torch.float32}
    record = json.loads((SHAPES_DIR / "base.json").read_text())
    assert record["command"].startswith("zeroconv pretrain-base") and record["seed"] == 0
    assert shapes_base.vae.config.scaling_factor == pytest.approx(record["vae"]["scaling_factor"])


def test_controlnet_from_shapes_base_takes_32px_conditions_and_is_identity_at_init(shapes_base):
    fam = shapes_base.family
    net = fam.new_controlnet(shapes_base)
    assert net.config.conditioning_embedding_out_channels == (16, 32, 96)  # x4, like the VAE
    controlled = Controlled(fam, shapes_base.denoiser, [net])
    g = torch.Generator().manual_seed(0)
    latents, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700])
    prompt = fam.encode_prompts(shapes_base, ["red circle with blue background"] * 2, (32, 32))
    with torch.no_grad():
        plain = shapes_base.denoiser(latents, t, encoder_hidden_states=prompt["prompt_embeds"]).sample
        assert torch.equal(controlled(latents, t, prompt, [torch.rand(2, 3, 32, 32, generator=g)]), plain)
        with pytest.raises(ValueError, match=r"expected \(2, 3, 32, 32\)"):
            controlled(latents, t, prompt, [torch.rand(2, 3, 64, 64)])  # x8 conditions do not fit this base


def test_stock_controlnet_pipeline_generates_at_32px_over_the_shapes_base(shapes_base):
    from model.inference import build_pipeline, generate

    net = shapes_base.family.new_controlnet(shapes_base)
    pipe = build_pipeline(shapes_base, [net])  # a stock StableDiffusionControlNetPipeline
    condition = fill50k(1, 32, seed=3)[0].condition
    images = generate(pipe, ["red circle with blue background"], condition[None], steps=2)
    assert images.shape == (1, 32, 32, 3)


def test_stock_pipeline_loads_the_shipped_base_and_generates_32px():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SHAPES_DIR, torch_dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("green circle with white background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_colour_reader_is_exact_on_the_training_data():
    samples = fill50k(64, 32, seed=5)
    accuracy = prompted_colour_accuracy(np.stack([s.image for s in samples]), [s.text for s in samples])
    assert accuracy == {"background": 1.0, "circle": 1.0, "both": 1.0}
    assert read_colours(np.full((32, 32, 3), 240, np.uint8)) == ("white", None)  # no circle: none read


def test_shipped_weights_draw_circles_of_the_prompted_colours(shapes_base):
    """Every caption the data can have, one seed each: the images are circles on flat backgrounds, and their
    colours are the ones asked for more often than chance (1/8 per colour). Deterministic: fixed seeds, CPU.
    The bar is what base v1 reaches (model/assets/shapes/README.md); raise it with a better base."""
    from model.inference import text_to_image

    prompts = colour_prompts()
    images = text_to_image(shapes_base, prompts, seed=0)
    circles = [read_colours(image)[1] is not None for image in images]
    assert np.mean(circles) >= 0.8  # a second colour inside: a circle, not a flat or noisy picture
    accuracy = prompted_colour_accuracy(images, prompts)
    assert accuracy["background"] > 1 / 8 and accuracy["circle"] > 1 / 8, accuracy
