"""Per family: export the ControlNet, load it with stock diffusers, generate with the stock pipeline."""

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from model.export import export_model
from model.families import resolve
from model.families.sdxl import UNION_TYPES, Union
from tests.model.test_families import PRESETS, base_of, batch

# The stock classes each family must hand over to, and the pipeline argument that takes the condition.
STOCK = {
    "sd": ("ControlNetModel", "StableDiffusionControlNetPipeline", "image"),
    "sdxl": ("ControlNetModel", "StableDiffusionXLControlNetPipeline", "image"),
    "sd3": ("SD3ControlNetModel", "StableDiffusion3ControlNetPipeline", "control_image"),
    "flux": ("FluxControlNetModel", "FluxControlNetPipeline", "control_image"),
}
EXTRA = {"sd3": {"max_sequence_length": 32}, "flux": {"max_sequence_length": 32}}


def condition_image() -> Image.Image:
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[16:48, 16:48] = 255
    return Image.fromarray(pixels)


def nudged(net: torch.nn.Module) -> torch.nn.Module:
    """A ControlNet with non-zero outputs, as after training: so the export must carry real weights."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return net


def generate(pipe, family: str, control_arg: str, **control) -> np.ndarray:
    kwargs = {control_arg: condition_image(), **control, **EXTRA.get(family, {})}
    # The stock SD3 and Flux ControlNet pipelines sample the condition's VAE posterior with the global RNG.
    torch.manual_seed(0)
    out = pipe(
        prompt="a red circle",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
        **kwargs,
    )
    return out.images


@pytest.mark.parametrize("family", PRESETS)
def test_exported_controlnet_generates_with_the_stock_pipeline(family, tmp_path):
    base = base_of(family)
    net_class, pipe_class, control_arg = STOCK[family]
    assert (base.family.controlnet_class, base.family.control_pipeline_class) == (net_class, pipe_class)
    net = nudged(base.family.new_controlnet(base))
    export_model(net, tmp_path / "controlnet")

    loaded = getattr(diffusers, net_class).from_pretrained(tmp_path / "controlnet")
    saved, reloaded = net.state_dict(), loaded.state_dict()
    assert saved.keys() == reloaded.keys() and all(torch.equal(saved[k], reloaded[k]) for k in saved)

    overrides = {}
    if family == "sd":  # the adapter samples with DDIM, the paper's sampler; the directory names DDPM
        overrides = {"scheduler": diffusers.DDIMScheduler.from_pretrained(resolve("tiny"), subfolder="scheduler")}
    stock = getattr(diffusers, pipe_class).from_pretrained(resolve(PRESETS[family]), controlnet=loaded, **overrides)
    stock.set_progress_bar_config(disable=True)
    images = generate(stock, family, control_arg)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    # The adapter's own pipeline is the same stock class over the loaded base: same seed, same image.
    ours = base.family.pipeline(base, [loaded])
    assert type(ours) is type(stock)
    np.testing.assert_array_equal(generate(ours, family, control_arg), images)


def test_union_controlnet_identity_with_a_type_per_sample():
    base = base_of("sdxl")
    net = base.family.new_controlnet(base, union=True)
    assert type(net).__name__ == "ControlNetUnionModel"
    copied, unet = net.down_blocks.state_dict(), base.denoiser.down_blocks.state_dict()
    assert copied.keys() == unet.keys() and all(torch.equal(copied[k], unet[k]) for k in copied)
    latents, prompt, controls = batch(base)
    model = base.family.controlled(base, [net])
    types = torch.tensor([UNION_TYPES.index("canny"), UNION_TYPES.index("depth")])
    noisy, timesteps, _ = base.family.noise(base, latents, torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(
            model(noisy, timesteps, prompt, [Union(controls, types)]), model.base_prediction(noisy, timesteps, prompt)
        )
        # Once trained (here: nudged), the type index changes what the ControlNet adds.
        nudged(net)
        canny = model(noisy, timesteps, prompt, [Union(controls, torch.tensor([3, 3]))])
        depth = model(noisy, timesteps, prompt, [Union(controls, torch.tensor([1, 1]))])
        mixed = model(noisy, timesteps, prompt, [Union(controls, types)])
        # A batch of mixed types: each sample gets exactly what it gets alone, with its own type (diffusers' fusion
        # transformer attends across the batch axis; unmasked, the two samples would mix).
        alone = [
            model(noisy[i : i + 1], timesteps[i : i + 1], {k: v[i : i + 1] for k, v in prompt.items()}, [one])
            for i, one in enumerate([Union(controls[:1], types[:1]), Union(controls[1:], types[1:])])
        ]
    assert not torch.equal(canny, depth)
    torch.testing.assert_close(mixed, torch.cat(alone), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="one condition-type index per sample"):
        Union(controls, torch.tensor([3]))


def test_union_controlnet_generates_with_the_stock_union_pipeline(tmp_path):
    base = base_of("sdxl")
    export_model(nudged(base.family.new_controlnet(base, union=True)), tmp_path / "union")
    loaded = diffusers.ControlNetUnionModel.from_pretrained(tmp_path / "union")
    stock = diffusers.StableDiffusionXLControlNetUnionPipeline.from_pretrained(resolve("tiny-sdxl"), controlnet=loaded)
    stock.set_progress_bar_config(disable=True)
    mode = [UNION_TYPES.index("canny")]
    images = generate(stock, "sdxl", "control_image", control_mode=mode)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()
    ours = base.family.pipeline(base, [loaded])
    assert type(ours) is type(stock)
    # control_image for the union pipeline is a list, one per condition type used
    np.testing.assert_array_equal(generate(ours, "sdxl", "control_image", control_mode=mode), images)


def test_union_types_come_from_one_annotator_map_and_other_families_refuse_union():
    sdxl = base_of("sdxl").family
    assert [sdxl.union_mode(a) for a in ("openpose", "midas", "hed", "canny", "lineart_standard", "normalbae")] == [
        0,
        1,
        2,
        3,
        3,
        4,
    ]
    with pytest.raises(ValueError, match="annotator 'content_shuffle' has no ControlNet-Union type"):
        sdxl.union_mode("content_shuffle")
    sd = base_of("sd").family
    with pytest.raises(ValueError, match="union training is not supported for sd base models"):
        sd.union_mode("canny")


def test_union_generation_needs_its_control_mode_and_a_batch_equals_one_by_one():
    from model.inference import generate

    base = base_of("sdxl")
    pipe = base.family.pipeline(base, [nudged(base.family.new_controlnet(base, union=True))])
    conditions = np.zeros((2, 64, 64, 3), np.uint8)
    conditions[0, 16:48, 16:48], conditions[1, 8:24, 8:56] = 255, 255
    prompts = ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="a union ControlNet needs control_mode"):
        generate(pipe, prompts[:1], conditions[:1], steps=2)
    batch = generate(pipe, prompts, conditions, seed=[3, 4], steps=2, control_mode=3)
    alone = [
        generate(pipe, [p], conditions[i : i + 1], seed=[3 + i], steps=2, control_mode=3)
        for i, p in enumerate(prompts)
    ]
    np.testing.assert_array_equal(batch, np.concatenate(alone))
    assert not np.array_equal(batch, generate(pipe, prompts, conditions, seed=[3, 4], steps=2, control_mode=1))
