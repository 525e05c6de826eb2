"""ControlNet for Stable Diffusion: the locked UNet plus one or more ControlNets, and what trains.

The trainable copy is the UNet's encoder + middle block (``ControlNetModel.from_unet`` copies them
exactly and zero-initialises every output projection and the condition encoder's last conv), so at
initialisation ``ControlledUNet`` predicts exactly what the plain UNet predicts. Several ControlNets
compose by summing their residuals, each scaled by its conditioning scale.

Trainability policies (what the optimizer sees):

* ``locked``          - ControlNet(s) only; the UNet stays bit-identical (the paper's default).
* ``unlock_decoder``  - plus the UNet's decoder side (up blocks and output layers) at its own lower
                        learning rate: the original "unlock SD" (sd_locked=False), lr ~2e-6 vs 1e-5.
* ``unlock_full``     - the whole UNet at the lower learning rate.
* ``pretrain``        - no ControlNet: the UNet alone (:class:`UNetOnly`), every weight at ``lr``; how
                        ``zeroconv pretrain-base`` trains a text-to-image base from scratch.
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

import torch
from torch import nn

Policy = Literal["locked", "unlock_decoder", "unlock_full", "pretrain"]
POLICIES: tuple[str, ...] = get_args(Policy)
# The UNet's decoder side in diffusers naming; the original code's output_blocks + out.
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


def condition_embedding_channels(vae_scale_factor: int) -> tuple[int, ...]:
    """The condition encoder's channels for a base whose VAE downsamples by ``vae_scale_factor``: one
    stride-2 step per channel after the first, so conditions at image size meet the latents at their size.
    x8 -> diffusers' default (16, 32, 96, 256); x4 -> (16, 32, 96); x16 -> (16, 32, 96, 256, 256)."""
    steps = int(vae_scale_factor).bit_length() - 1
    if vae_scale_factor < 1 or 2**steps != vae_scale_factor:
        raise ValueError(f"the VAE's scale factor must be a power of 2, got {vae_scale_factor}")
    default = (16, 32, 96, 256)
    return default[: steps + 1] + (default[-1],) * max(0, steps + 1 - len(default))


def condition_scale_factor(controlnet: nn.Module) -> int:
    """How much a ControlNet's condition encoder downsamples: conditions are latents' size times this."""
    return 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)


def controlnet_from_unet(unet: nn.Module, vae_scale_factor: int = 8, conditioning_channels: int = 3) -> nn.Module:
    """A new ControlNet whose encoder + mid block are an exact copy of ``unet``'s, taking conditions at the
    size of the images the base's VAE (downsampling by ``vae_scale_factor``) encodes."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_unet(
        unet,
        conditioning_embedding_out_channels=condition_embedding_channels(vae_scale_factor),
        conditioning_channels=conditioning_channels,
    )


class UNetOnly(nn.Module):
    """The ``pretrain`` policy's model: the UNet alone, called like :class:`ControlledUNet` (conditions
    are ignored), so the objective and the train loop serve both."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, noisy_latents, timesteps, text_embeddings, conditions=(), conditioning_scales=None):
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=text_embeddings).sample


class ControlledUNet(nn.Module):
    """The locked UNet driven by the summed residuals of one or more ControlNets."""

    def __init__(self, unet: nn.Module, controlnets: Sequence[nn.Module], only_mid_control: bool = False):
        super().__init__()
        if not controlnets:
            raise ValueError("ControlledUNet needs at least one ControlNet")
        self.unet = unet
        self.controlnets = nn.ModuleList(controlnets)
        self.only_mid_control = only_mid_control

    def check_conditions(self, latents: torch.Tensor, conditions: Sequence[torch.Tensor]) -> None:
        if len(conditions) != len(self.controlnets):
            raise ValueError(f"got {len(conditions)} condition(s) for {len(self.controlnets)} ControlNet(s)")
        n, _, h, w = latents.shape
        for i, (cond, net) in enumerate(zip(conditions, self.controlnets)):
            want_c = net.config.conditioning_channels
            if cond.dim() != 4 or cond.shape[1] != want_c:
                raise ValueError(
                    f"condition {i} has shape {tuple(cond.shape)}; expected (N, {want_c}, H, W) "
                    f"with {want_c} channel(s)"
                )
            f = condition_scale_factor(net)
            if cond.shape[0] != n or cond.shape[2:] != (h * f, w * f):
                raise ValueError(
                    f"condition {i} has shape {tuple(cond.shape)}; expected ({n}, {want_c}, {h * f}, {w * f}) "
                    f"to match latents {tuple(latents.shape)}"
                )

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
        conditions: Sequence[torch.Tensor],
        conditioning_scales: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Noise (or v) prediction. ``conditions[i]`` is float in [0, 1], NCHW, at image resolution."""
        self.check_conditions(noisy_latents, conditions)
        scales = conditioning_scales or [1.0] * len(self.controlnets)
        down_sum, mid_sum = None, None
        for net, cond, scale in zip(self.controlnets, conditions, scales):
            down, mid = net(
                noisy_latents,
                timesteps,
                encoder_hidden_states=text_embeddings,
                controlnet_cond=cond.to(noisy_latents.dtype),
                conditioning_scale=scale,
                return_dict=False,
            )
            if down_sum is None:
                down_sum, mid_sum = list(down), mid
            else:
                down_sum = [a + b for a, b in zip(down_sum, down)]
                mid_sum = mid_sum + mid
        if self.only_mid_control:
            # The original code's only_mid_control: control enters the middle block only, not the skips.
            down_sum = [torch.zeros_like(d) for d in down_sum]
        return self.unet(
            noisy_latents,
            timesteps,
            encoder_hidden_states=text_embeddings,
            down_block_additional_residuals=down_sum,
            mid_block_additional_residual=mid_sum,
        ).sample


def apply_policy(model: ControlledUNet | UNetOnly, policy: str) -> dict[str, list[str]]:
    """Set requires_grad for ``policy``; return the parameter names that train, by group."""
    if policy not in POLICIES:
        raise ValueError(f"unknown trainability policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if (policy == "pretrain") != isinstance(model, UNetOnly):
        raise ValueError(f"policy {policy!r} does not fit a {type(model).__name__} (pretrain trains a UNetOnly)")
    if policy == "pretrain":
        model.unet.requires_grad_(True)
        return {"unet": [n for n, _ in model.unet.named_parameters()]}
    model.controlnets.requires_grad_(True)
    model.unet.requires_grad_(False)
    for name, param in model.unet.named_parameters():
        if policy == "unlock_full" or (policy == "unlock_decoder" and name.startswith(DECODER_PREFIXES)):
            param.requires_grad_(True)
    return {
        "controlnet": [n for n, p in model.controlnets.named_parameters() if p.requires_grad],
        "unet": [n for n, p in model.unet.named_parameters() if p.requires_grad],
    }


def param_groups(model: ControlledUNet | UNetOnly, policy: str, lr: float, unet_lr: float) -> list[dict]:
    """Optimizer parameter groups: ControlNet(s) at ``lr``, any unlocked UNet params at ``unet_lr``
    (``pretrain``: the whole UNet at ``lr``)."""
    apply_policy(model, policy)
    if policy == "pretrain":
        return [{"name": "unet", "lr": lr, "params": list(model.unet.parameters())}]
    groups = [
        {"name": "controlnet", "lr": lr, "params": [p for p in model.controlnets.parameters() if p.requires_grad]}
    ]
    unet_params = [p for p in model.unet.parameters() if p.requires_grad]
    if unet_params:
        groups.append({"name": "unet", "lr": unet_lr, "params": unet_params})
    return groups
