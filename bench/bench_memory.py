"""Memory planning at real size, without weights: per-GPU model-state memory of ControlNet training.

Each family's published denoiser config is written here (facts from the model cards' config.json,
not downloads) and built on PyTorch's meta device: real shapes, no storage, no weights. The
ControlNet is made from it the way upstream does (``ControlNetModel.from_unet``,
``SD3ControlNetModel.from_transformer``, ``FluxControlNetModel.from_transformer``); the frozen text
encoders and VAE are built the same way, for what precomputing them saves.

Per family and ZeRO stage (bf16, 8 GPUs on one node) it prints DeepSpeed 0.19.8's own estimate for the
trained parameters (``estimate_zero{2,3}_model_states_mem_needs``, the numbers its
``..._all_cold`` helpers print: ZeRO-2 2P + 18P/N bytes; ZeRO-3 4 x largest layer + 18P/N), plus
what DeepSpeed's formula leaves out because those parameters are frozen: the locked denoiser in bf16
inside the engine (replicated under ZeRO-2, partitioned under ZeRO-3) and the VAE + text encoders
outside it (replicated; zero with ``zeroconv precompute``). Activations are not included: they
depend on batch, resolution and gradient checkpointing, and need a GPU to measure.

    python bench/bench_memory.py [--gpus 8]

Prints one JSON object (GiB = 2^30 bytes). CPU only: about 20 s of CPU time, most of it imports.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

GIB = 2**30
BF16 = 2  # bytes per frozen parameter (the engine casts the whole module to bf16)

# --- Published configs (diffusers config.json of each model card) --------------------------------

SD15_UNET = dict(  # runwayml/stable-diffusion-v1-5, unet/config.json
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD3_MEDIUM = dict(  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev, transformer/config.json
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20)
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
VAE_BLOCKS = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
)


# --- Builders (meta device) ----------------------------------------------------------------------


def unet(config: dict):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config)


def clip_text(config: dict, projection: int | None = None):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if projection is None:
        return CLIPTextModel(CLIPTextConfig(**config))
    return CLIPTextModelWithProjection(CLIPTextConfig(**config, projection_dim=projection))


def t5_encoder():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, **T5_XXL))


def vae(latent_channels: int):
    from diffusers import AutoencoderKL

    return AutoencoderKL(latent_channels=latent_channels, **VAE_BLOCKS)


def sd15():
    from diffusers import ControlNetModel

    base = unet(SD15_UNET)
    return base, ControlNetModel.from_unet(base), [vae(4), clip_text(CLIP_L)]


def sdxl():
    from diffusers import ControlNetModel

    base = unet(SDXL_UNET)
    encoders = [vae(4), clip_text(CLIP_L), clip_text(CLIP_BIGG, projection=1280)]
    return base, ControlNetModel.from_unet(base), encoders


def sd3_medium():
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    base = SD3Transformer2DModel(**SD3_MEDIUM)
    encoders = [vae(16), clip_text(CLIP_L, projection=768), clip_text(CLIP_BIGG, projection=1280), t5_encoder()]
    return base, SD3ControlNetModel.from_transformer(base), encoders  # 12 layers: diffusers' default


def flux_dev(double: int, single: int):
    def build():
        from diffusers import FluxControlNetModel, FluxTransformer2DModel

        base = FluxTransformer2DModel(**FLUX_DEV)
        net = FluxControlNetModel.from_transformer(base, num_layers=double, num_single_layers=single)
        return base, net, [vae(16), clip_text(CLIP_L), t5_encoder()]

    return build


FAMILIES = {
    "sd15": sd15,
    "sdxl": sdxl,
    "sd3_medium": sd3_medium,
    "flux_dev_controlnet_2x0": flux_dev(2, 0),  # 2 double-stream blocks, no single ones
    "flux_dev_controlnet_4x10": flux_dev(4, 10),  # diffusers' from_transformer default
}


# --- Counting and DeepSpeed's estimate -----------------------------------------------------------


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def largest_layer(module: torch.nn.Module) -> int:
    """What DeepSpeed's ZeRO-3 estimate calls the largest layer: most parameters held by one module itself."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in module.modules())


def plan(name: str, gpus: int) -> dict:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    started = time.perf_counter()
    with torch.device("meta"):
        base, controlnet, encoders = FAMILIES[name]()
    trained, frozen, encoder_params = count(controlnet), count(base), sum(count(e) for e in encoders)
    largest = largest_layer(controlnet)
    stages = {}
    for stage in (2, 3):
        if stage == 2:
            _, states = estimate_zero2_model_states_mem_needs(trained, gpus, 1, cpu_offload=False)
            _, offloaded = estimate_zero2_model_states_mem_needs(trained, gpus, 1, cpu_offload=True)
            frozen_bytes = BF16 * frozen  # ZeRO-2 partitions optimizer state and gradients, not weights
        else:
            _, states, _ = estimate_zero3_model_states_mem_needs(trained, largest, gpus, 1, cpu_offload=False)
            _, offloaded, _ = estimate_zero3_model_states_mem_needs(
                trained, largest, gpus, 1, cpu_offload=True, cpu_offload_params=True
            )
            frozen_bytes = BF16 * frozen / gpus  # ZeRO-3 partitions every parameter of the engine's module
        encoders_bytes = BF16 * encoder_params
        stages[f"zero{stage}"] = {
            "deepspeed_trained_states_gib": round(states / GIB, 2),
            "deepspeed_trained_states_offload_gib": round(offloaded / GIB, 2),
            "frozen_denoiser_gib": round(frozen_bytes / GIB, 2),
            "frozen_encoders_gib": round(encoders_bytes / GIB, 2),
            "total_gib": round((states + frozen_bytes + encoders_bytes) / GIB, 2),
            "total_precomputed_gib": round((states + frozen_bytes) / GIB, 2),
        }
    return {
        "denoiser_params": frozen,
        "controlnet_params": trained,
        "total_params": frozen + trained,
        "trainable_params": trained,
        "encoder_params": encoder_params,
        "largest_layer_params": largest,
        "per_gpu": stages,
        "build_s": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (one node) the states are sharded over")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()
    print(
        json.dumps(
            {
                "gpus": args.gpus,
                "precision": "bf16 weights, fp32 master weights and Adam states (DeepSpeed's estimate)",
                "policy": "locked: the ControlNet is trained, the denoiser is frozen",
                "families": {name: plan(name, args.gpus) for name in args.families},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
