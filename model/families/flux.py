"""Flux: a double- then single-stream transformer on packed latents, rectified flow, CLIP pooled + T5 prompts.

Prompts (the stock pipeline's ``encode_prompt``): T5's token states, CLIP's pooled output, zero text ids.
Latents: ``(z - shift) * scale``, then packed 2x2 into tokens of 4 x 16 channels (the stock pipeline's
``_pack_latents``); every prediction and target lives in that packed space. Objective: flow matching, s
logit-normal and shifted by exp(mu), mu growing with the number of image tokens as the scheduler's dynamic
shifting does at inference; the target is ε - x_0; the transformer takes s (not s * 1000) and, for
guidance-distilled bases (``guidance_embeds``), a guidance value (:data:`TRAIN_GUIDANCE`, as diffusers' script).

The ControlNet (``FluxControlNetModel.from_transformer``) copies the double- and single-stream blocks and reads
the condition as packed VAE latents through a zero-initialised linear embedder; its residuals enter through
zero-initialised linear layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from model.families.base import Base, Family, check_control, flow_noise, flow_sigmas

TINY_VERSION = "1"
TRAIN_GUIDANCE = 3.5


class Flux(Family):
    name = "flux"
    pipeline_names = ("FluxPipeline",)
    denoiser_name = "transformer"
    controlnet_class = "FluxControlNetModel"
    control_pipeline_class = "FluxControlNetPipeline"
    text_keys = ("prompt_embeds", "pooled_projections")
    # unlock_decoder: the single-stream blocks (they follow the double-stream ones) and the output layers.
    decoder_prefixes = ("single_transformer_blocks.", "norm_out.", "proj_out.")

    def new_controlnet(self, base: Base, num_layers: int | None = None, num_single_layers: int | None = None):
        from diffusers import FluxControlNetModel

        config = base.denoiser.config
        return FluxControlNetModel.from_transformer(
            base.denoiser,
            num_layers=num_layers or config.num_layers,
            num_single_layers=num_single_layers if num_single_layers is not None else config.num_single_layers,
            attention_head_dim=config.attention_head_dim,
            num_attention_heads=config.num_attention_heads,
        )

    def encode_prompts(self, base: Base, prompts: Sequence[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        prompts = list(prompts)
        embeds, pooled, text_ids = base.pipe.encode_prompt(
            prompts, prompts, device=base.device, max_sequence_length=32
        )
        h, w = (s // base.pipe.vae_scale_factor // 2 for s in size)
        image_ids = base.pipe._prepare_latent_image_ids(len(prompts), h, w, embeds.device, embeds.dtype)
        return {"prompt_embeds": embeds, "pooled_projections": pooled, "txt_ids": text_ids, "img_ids": image_ids}

    def scale_latents(self, base: Base, latents: torch.Tensor) -> torch.Tensor:
        latents = (latents - base.vae.config.shift_factor) * base.vae.config.scaling_factor
        n, c, h, w = latents.shape
        return base.pipe._pack_latents(latents, n, c, h, w)

    def complete_prompt(
        self, text: dict[str, torch.Tensor], empty: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        # txt_ids / img_ids have no batch dimension: the empty prompt's serve every row.
        device = text["prompt_embeds"].device
        return {**text, "txt_ids": empty["txt_ids"].to(device), "img_ids": empty["img_ids"].to(device)}

    def control_inputs(self, base: Base, conditions: torch.Tensor, generator: torch.Generator | None = None):
        # As FluxControlNetPipeline prepares the control image for a ControlNet without input_hint_block.
        with torch.no_grad():
            return self.encode_images(base, conditions * 2 - 1, generator)

    def predict(self, denoiser, controlnets, noisy, timesteps, prompt, controls, scales) -> torch.Tensor:
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((noisy.shape[0],), TRAIN_GUIDANCE, device=noisy.device, dtype=noisy.dtype)
        inputs = dict(
            hidden_states=noisy,
            timestep=timesteps,
            guidance=guidance,
            pooled_projections=prompt["pooled_projections"],
            encoder_hidden_states=prompt["prompt_embeds"],
            txt_ids=prompt["txt_ids"],
            img_ids=prompt["img_ids"],
            return_dict=False,
        )
        double, single = None, None
        for net, control, scale in zip(controlnets, controls, scales):
            check_control(control, noisy, self.name)
            d, s = net(controlnet_cond=control.to(noisy.dtype), conditioning_scale=scale, **inputs)
            double = d if double is None else [a + b for a, b in zip(double, d)]
            single = s if single is None else [a + b for a, b in zip(single, s)]
        return denoiser(**inputs, controlnet_block_samples=double, controlnet_single_block_samples=single)[0]

    def noise(
        self,
        base: Base,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        offset_noise: float = 0.0,
        timestep_sampling: str = "uniform",
    ):  # flow matching: no offset noise, logit-normal noise levels only (check_training refuses the others)
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = base.pipe.scheduler.config
        mu = calculate_shift(
            latents.shape[1], config.base_image_seq_len, config.max_image_seq_len, config.base_shift, config.max_shift
        )
        sigmas = flow_sigmas(latents.shape[0], float(torch.tensor(mu).exp()), generator)
        noisy, target = flow_noise(latents, sigmas, generator)
        return noisy, sigmas.to(latents.device, latents.dtype), target

    def multi_controlnet(self, controlnets: Sequence[nn.Module]) -> nn.Module:
        from diffusers import FluxMultiControlNetModel

        return FluxMultiControlNetModel(list(controlnets))


def build_tiny(out_dir: Path) -> None:
    """A tiny Flux look-alike: 1 double + 1 single block 32 wide, guidance embedding, CLIP 32 + T5 64, 64x64 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from model.base import TINY_SEED, save_clip_tokenizer, save_text_encoder
    from model.families.tiny import save_t5_tokenizer, tiny_t5, tiny_vae, write_index

    torch.manual_seed(TINY_SEED)
    FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=64,  # T5's width
        pooled_projection_dim=32,  # CLIP's pooled output
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    ).save_pretrained(out_dir / "transformer")
    tiny_vae(
        16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
    ).save_pretrained(out_dir / "vae")
    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408)
    clip |= dict(
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407
    )
    save_text_encoder(CLIPTextModel(CLIPTextConfig(**clip)), out_dir / "text_encoder")
    save_clip_tokenizer(out_dir / "tokenizer")
    vocab = save_t5_tokenizer(out_dir / "tokenizer_2")
    save_text_encoder(tiny_t5(vocab, d_model=64), out_dir / "text_encoder_2")
    FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ).save_pretrained(out_dir / "scheduler")
    write_index(
        out_dir,
        "FluxPipeline",
        transformer=["diffusers", "FluxTransformer2DModel"],
        vae=["diffusers", "AutoencoderKL"],
        text_encoder=["transformers", "CLIPTextModel"],
        text_encoder_2=["transformers", "T5EncoderModel"],
        tokenizer=["transformers", "CLIPTokenizer"],
        tokenizer_2=["transformers", "T5TokenizerFast"],
        scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
        image_encoder=[None, None],
        feature_extractor=[None, None],
    )
