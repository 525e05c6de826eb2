"""Stable Diffusion 3: an MM-DiT transformer, rectified flow, three text encoders (CLIP-L, CLIP-G, T5).

Prompts (the stock pipeline's ``encode_prompt``): CLIP-L and CLIP-G penultimate states concatenated, zero-padded
to T5's width and followed by T5's tokens; pooled = both CLIPs' pooled projections. Latents: ``(z - shift) *
scale`` (the VAE's shift_factor / scaling_factor). Objective: flow matching, x_t = (1 - s) x_0 + s ε with s
logit-normal and shifted by the scheduler's ``shift``; the target is ε - x_0; the transformer takes s * 1000.

The ControlNet (``SD3ControlNetModel.from_transformer``) copies the first ``num_layers`` joint blocks and reads
the condition as VAE latents through a zero-initialised patch embedding; each of its blocks adds a residual to
the matching transformer blocks through a zero-initialised linear layer. As the stock pipeline does for such a
ControlNet (``force_zeros_for_pooled_projection``), it gets zeros for the pooled prompt and unshifted latents.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from model.families.base import Base, Family, check_control, flow_noise, flow_sigmas

TINY_VERSION = "1"


class SD3(Family):
    name = "sd3"
    pipeline_names = ("StableDiffusion3Pipeline",)
    denoiser_name = "transformer"
    controlnet_class = "SD3ControlNetModel"
    control_pipeline_class = "StableDiffusion3ControlNetPipeline"
    text_keys = ("prompt_embeds", "pooled_projections")
    # unlock_decoder: the transformer's last half of joint blocks (set per model in `unlocked`) + output layers.
    decoder_prefixes = ("norm_out.", "proj_out.")

    def unlocked(self, name: str, policy: str, denoiser: nn.Module) -> bool:
        if super().unlocked(name, policy, denoiser):
            return True
        if policy == "unlock_decoder" and name.startswith("transformer_blocks."):
            return int(name.split(".")[1]) >= denoiser.config.num_layers // 2
        return False

    def new_controlnet(self, base: Base, num_layers: int | None = None) -> nn.Module:
        from diffusers import SD3ControlNetModel

        # num_layers: how many joint blocks the trainable copy has. Default: all but the last, which has no text
        # stream output (context_pre_only) so cannot be copied into a ControlNet block; published SD3 ControlNets
        # use 6-12.
        num_layers = num_layers or base.denoiser.config.num_layers - 1
        return SD3ControlNetModel.from_transformer(base.denoiser, num_layers, num_extra_conditioning_channels=0)

    def encode_prompts(self, base: Base, prompts: Sequence[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        prompts = list(prompts)
        embeds, _, pooled, _ = base.pipe.encode_prompt(
            prompts, prompts, prompts, device=base.device, do_classifier_free_guidance=False, max_sequence_length=32
        )
        return {"prompt_embeds": embeds, "pooled_projections": pooled}

    def scale_latents(self, base: Base, latents: torch.Tensor) -> torch.Tensor:
        return (latents - base.vae.config.shift_factor) * base.vae.config.scaling_factor

    def control_inputs(self, base: Base, conditions: torch.Tensor, generator: torch.Generator | None = None):
        # As StableDiffusion3ControlNetPipeline prepares the control image: [-1, 1], VAE, no shift for these nets.
        vae = base.vae
        with torch.no_grad():
            posterior = vae.encode((conditions * 2 - 1).to(vae.device, vae.dtype)).latent_dist
            return posterior.sample(generator) * vae.config.scaling_factor

    def predict(self, denoiser, controlnets, noisy, timesteps, prompt, controls, scales) -> torch.Tensor:
        embeds, pooled = prompt["prompt_embeds"], prompt["pooled_projections"]
        residuals = None
        for net, control, scale in zip(controlnets, controls, scales):
            check_control(control, noisy, self.name)
            pooled_in = torch.zeros_like(pooled) if net.config.force_zeros_for_pooled_projection else pooled
            blocks = net(
                hidden_states=noisy,
                controlnet_cond=control.to(noisy.dtype),
                conditioning_scale=scale,
                encoder_hidden_states=embeds,
                pooled_projections=pooled_in,
                timestep=timesteps,
                return_dict=False,
            )[0]
            residuals = list(blocks) if residuals is None else [a + b for a, b in zip(residuals, blocks)]
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            block_controlnet_hidden_states=residuals,
            return_dict=False,
        )[0]

    def noise(
        self,
        base: Base,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        offset_noise: float = 0.0,
        timestep_sampling: str = "uniform",
    ):  # flow matching: no offset noise, logit-normal noise levels only (check_training refuses the others)
        sigmas = flow_sigmas(latents.shape[0], base.pipe.scheduler.config.shift, generator)
        noisy, target = flow_noise(latents, sigmas, generator)
        return noisy, (sigmas * 1000).to(latents.device, latents.dtype), target

    def multi_controlnet(self, controlnets: Sequence[nn.Module]) -> nn.Module:
        from diffusers import SD3MultiControlNetModel

        return SD3MultiControlNetModel(list(controlnets))


def build_tiny(out_dir: Path) -> None:
    """A tiny SD3 look-alike: 2 joint blocks 32 wide, 16-channel VAE, CLIP-L/G 32 wide, T5 64 wide, 64x64 images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from model.base import TINY_SEED, save_clip_tokenizer, save_text_encoder
    from model.families.tiny import save_t5_tokenizer, tiny_t5, tiny_vae, write_index

    torch.manual_seed(TINY_SEED)
    SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,  # T5's width (CLIP states are zero-padded to it)
        caption_projection_dim=32,
        pooled_projection_dim=64,  # CLIP-L + CLIP-G pooled projections
        pos_embed_max_size=16,
    ).save_pretrained(out_dir / "transformer")
    tiny_vae(
        16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    ).save_pretrained(out_dir / "vae")
    clip = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408)
    clip |= dict(
        max_position_embeddings=77, projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407
    )
    for i in ("", "_2"):
        save_text_encoder(CLIPTextModelWithProjection(CLIPTextConfig(**clip)), out_dir / f"text_encoder{i}")
        save_clip_tokenizer(out_dir / f"tokenizer{i}")
    vocab = save_t5_tokenizer(out_dir / "tokenizer_3")
    save_text_encoder(tiny_t5(vocab, d_model=64), out_dir / "text_encoder_3")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(out_dir / "scheduler")
    write_index(
        out_dir,
        "StableDiffusion3Pipeline",
        transformer=["diffusers", "SD3Transformer2DModel"],
        vae=["diffusers", "AutoencoderKL"],
        text_encoder=["transformers", "CLIPTextModelWithProjection"],
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        text_encoder_3=["transformers", "T5EncoderModel"],
        tokenizer=["transformers", "CLIPTokenizer"],
        tokenizer_2=["transformers", "CLIPTokenizer"],
        tokenizer_3=["transformers", "T5TokenizerFast"],
        scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
        image_encoder=[None, None],
        feature_extractor=[None, None],
    )
