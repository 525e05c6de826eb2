"""SDXL: a UNet conditioned on two CLIP text encoders, a pooled embedding and size/crop micro-conditioning.

Prompts: the penultimate hidden states of CLIP-L and CLIP-G concatenated (the stock pipeline's ``encode_prompt``),
plus CLIP-G's pooled projection and six "time ids" (original size, crop top-left, target size) that the UNet
embeds next to the timestep. Objective and policies as SD's. ControlNet-Union (``union=True``): one ControlNet
for several condition types; each sample says which type its condition is (an index into
:data:`UNION_TYPES`, the order of the published xinsir union model), and the type of an annotator's maps is
:data:`UNION_TYPE_OF_ANNOTATOR`.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from model.families.base import Base
from model.families.sd import UNetFamily, condition_embedding_channels
from pipelines.common.images import crop_top_left

UNION_TYPES = ("openpose", "depth", "hed", "canny", "normal", "segment")
# The one map annotator -> union type. xinsir's model card names the slots: 0 openpose, 1 depth, 2 thick lines
# (hed, pidi, scribble, ted), 3 thin lines (canny, lineart, anime lineart, mlsd), 4 normal, 5 segment.
# An annotator missing here (e.g. content_shuffle) has no slot and cannot train a union ControlNet.
UNION_TYPE_OF_ANNOTATOR = {
    "openpose": "openpose",
    "midas": "depth",
    "hed": "hed",
    "canny": "canny",
    "lineart": "canny",
    "lineart_standard": "canny",
    "mlsd": "canny",
    "normalbae": "normal",
}
TINY_VERSION = "1"


class Union:
    """A union ControlNet's input: condition pixels plus each sample's condition-type index."""

    def __init__(self, image: torch.Tensor, types: torch.Tensor):
        if types.shape != (image.shape[0],):
            raise ValueError(
                f"need one condition-type index per sample: got {tuple(types.shape)} for {image.shape[0]}"
            )
        self.image, self.types = image, types


class SDXL(UNetFamily):
    name = "sdxl"
    pipeline_names = ("StableDiffusionXLPipeline",)
    controlnet_class = "ControlNetModel"
    control_pipeline_class = "StableDiffusionXLControlNetPipeline"
    text_keys = ("prompt_embeds", "text_embeds")
    union_types = UNION_TYPES

    def new_controlnet(self, base: Base, union: bool = False, conditioning_channels: int = 3) -> nn.Module:
        if union:
            return union_from_unet(base.denoiser, condition_embedding_channels(base.pipe.vae_scale_factor))
        return super().new_controlnet(base, conditioning_channels=conditioning_channels)

    def union_mode(self, annotator: str) -> int:
        if annotator not in UNION_TYPE_OF_ANNOTATOR:
            known = ", ".join(f"{a} ({t})" for a, t in UNION_TYPE_OF_ANNOTATOR.items())
            raise ValueError(f"annotator {annotator!r} has no ControlNet-Union type; annotators with one: {known}")
        return UNION_TYPES.index(UNION_TYPE_OF_ANNOTATOR[annotator])

    def union_control(self, control: torch.Tensor, types: torch.Tensor) -> Union:
        return Union(control, types.to(control.device))

    def encode_prompts(self, base: Base, prompts: Sequence[str], size: tuple[int, int], crop=(0, 0), original=None):
        """``original``: the image's size before resizing (default ``size``); ``crop``: where the crop began."""
        embeds, _, pooled, _ = base.pipe.encode_prompt(
            list(prompts), device=base.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        time_ids = torch.tensor([*(original or size), *crop, *size], dtype=embeds.dtype, device=embeds.device)
        return {"prompt_embeds": embeds, "text_embeds": pooled, "time_ids": time_ids.expand(len(prompts), 6)}

    def with_image_sizes(
        self, prompt: dict[str, torch.Tensor], original_sizes: torch.Tensor, size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """SDXL's micro-conditioning from each image's real history: its original (height, width) and where the
        centre crop began in the scaled image (SDXL paper, section 2.2), instead of the training size and (0, 0)."""
        rows = [
            [int(h), int(w), *crop_top_left((int(w), int(h)), min(size)), *size] for w, h in original_sizes.tolist()
        ]
        time_ids = torch.tensor(rows, dtype=prompt["time_ids"].dtype, device=prompt["time_ids"].device)
        return {**prompt, "time_ids": time_ids}

    def complete_prompt(
        self, text: dict[str, torch.Tensor], empty: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        n = text["prompt_embeds"].shape[0]
        return {**text, "time_ids": empty["time_ids"][:1].expand(n, 6).to(text["prompt_embeds"].device)}

    def added_conditions(self, prompt: dict[str, torch.Tensor]) -> dict:
        return {"text_embeds": prompt["text_embeds"], "time_ids": prompt["time_ids"]}

    def condition_pixels(self, control) -> torch.Tensor:
        return control.image if isinstance(control, Union) else control

    def control_residuals(self, net, noisy, timesteps, control, scale, **kwargs):
        if not isinstance(control, Union):
            return super().control_residuals(net, noisy, timesteps, control, scale, **kwargs)
        types = torch.nn.functional.one_hot(control.types, net.config.num_control_type)
        with samples_apart(net, noisy.shape[0]):
            return net(
                noisy,
                timesteps,
                controlnet_cond=[control.image.to(noisy.dtype)],
                control_type=types.to(noisy.dtype),
                control_type_idx=[control.types],  # per sample: indexes the task embedding row-wise
                conditioning_scale=[scale],
                **kwargs,
            )

    def pipeline(self, base: Base, controlnets: Sequence[nn.Module]):
        from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline

        if len(controlnets) == 1 and isinstance(controlnets[0], ControlNetUnionModel):
            pipe = StableDiffusionXLControlNetUnionPipeline(**base.pipe.components, controlnet=controlnets[0])
            pipe.set_progress_bar_config(disable=True)
            return pipe
        return super().pipeline(base, controlnets)


@contextmanager
def samples_apart(net: nn.Module, n: int):
    """Keep each of ``n`` samples to itself in a union ControlNet's condition-fusion transformer.

    diffusers builds its layers with ``nn.MultiheadAttention`` without ``batch_first``, so they attend across the
    batch axis and the samples of a batch (with their different condition types) would mix. A diagonal mask gives
    every sample what it gets alone - what the stock union pipeline computes for one image, whose two CFG halves
    are identical rows."""
    mask = torch.full((n, n), float("-inf")).fill_diagonal_(0.0)
    layers = list(net.transformer_layes)
    saved = [layer.attn_mask for layer in layers]
    for layer in layers:
        layer.attn_mask = mask
    try:
        yield
    finally:
        for layer, original in zip(layers, saved):
            layer.attn_mask = original


def union_from_unet(unet: nn.Module, embedding_channels: tuple[int, ...]) -> nn.Module:
    """``ControlNetUnionModel.from_unet``, with its condition-fusion transformer as wide as the UNet's first block.

    from_unet leaves that transformer at SDXL's width (320), which only fits UNets whose first block is 320 wide;
    for others (the tiny preset) the same model is rebuilt at the UNet's width and keeps every copied weight."""
    from diffusers import ControlNetUnionModel

    net = ControlNetUnionModel.from_unet(unet, conditioning_embedding_out_channels=embedding_channels)
    width = unet.config.block_out_channels[0]
    if net.config.num_trans_channel == width:
        return net
    # Without "_use_default_values": from_config would put the defaults it lists (the 320s) back.
    config = {k: v for k, v in net.config.items() if k != "_use_default_values"}
    fitted = ControlNetUnionModel.from_config({**config, "num_trans_channel": width, "num_proj_channel": width})
    own = fitted.state_dict()
    fitted.load_state_dict({k: v for k, v in net.state_dict().items() if own[k].shape == v.shape}, strict=False)
    return fitted


def build_tiny(out_dir: Path) -> None:
    """A tiny SDXL look-alike: two CLIP encoders (32 wide each), text_time micro-conditioning, 64x64 images."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from model.base import TINY_SEED, save_clip_tokenizer, save_text_encoder
    from model.families.tiny import tiny_vae, write_index

    torch.manual_seed(TINY_SEED)
    UNet2DConditionModel(
        sample_size=8,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # CLIP-L + CLIP-G hidden sizes
        attention_head_dim=8,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six time ids + CLIP-G's pooled projection
    ).save_pretrained(out_dir / "unet")
    tiny_vae(scaling_factor=0.13025).save_pretrained(out_dir / "vae")
    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408)
    clip |= dict(
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407
    )
    save_text_encoder(CLIPTextModel(CLIPTextConfig(**clip)), out_dir / "text_encoder")
    save_text_encoder(CLIPTextModelWithProjection(CLIPTextConfig(**clip)), out_dir / "text_encoder_2")
    save_clip_tokenizer(out_dir / "tokenizer")
    save_clip_tokenizer(out_dir / "tokenizer_2")
    EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    ).save_pretrained(out_dir / "scheduler")
    write_index(
        out_dir,
        "StableDiffusionXLPipeline",
        unet=["diffusers", "UNet2DConditionModel"],
        vae=["diffusers", "AutoencoderKL"],
        text_encoder=["transformers", "CLIPTextModel"],
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        tokenizer=["transformers", "CLIPTokenizer"],
        tokenizer_2=["transformers", "CLIPTokenizer"],
        scheduler=["diffusers", "EulerDiscreteScheduler"],
        force_zeros_for_empty_prompt=True,
    )
