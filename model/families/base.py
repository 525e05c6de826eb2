"""Model families as adapters: one small class per family says how to drive its base model.

A family (SD 1.x/2.x, SDXL, SD3, Flux) is read from the base model's own files - ``model_index.json``'s
``_class_name`` - never guessed from a name (:func:`family_of`). Its adapter answers what every stage asks:

* ``load``               - the base as the family's stock diffusers pipeline (its components are the frozen parts);
* ``new_controlnet``     - a ControlNet copied from the base (diffusers' ``from_unet`` / ``from_transformer``);
* ``encode_prompts``     - the stock pipeline's own ``encode_prompt``, so training conditions like inference;
* ``encode_images``      - pixels -> latents in the space the denoiser works in (scale, shift, packing);
* ``control_inputs``     - condition pixels -> what the ControlNet reads (pixels, or VAE latents for SD3/Flux);
* ``predict``            - denoiser + summed ControlNet residuals (no ControlNets: the base prediction);
* ``noise``              - the objective: noisy input, timesteps and regression target for clean latents;
* ``pipeline``           - the stock ControlNet pipeline that generates with exported ControlNets.

:class:`Controlled` (the module the optimizer sees) and the trainability policies are shared by all families.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence, get_args

import torch
import torch.nn.functional as F
from torch import nn

# What trains besides the ControlNets: nothing (the paper's default), the denoiser's decoder side ("unlock SD"),
# or the whole denoiser; each family says which blocks its decoder side is (``decoder_prefixes`` / ``unlocked``).
# ``pretrain``: no ControlNet, the denoiser alone and all of it (text-to-image pretraining, as ``zeroconv
# pretrain-base`` makes the shapes base); only families with ``supports_pretrain``.
Policy = Literal["locked", "unlock_decoder", "unlock_full", "pretrain"]
POLICIES: tuple[str, ...] = get_args(Policy)

# Where training timesteps fall. ``uniform``: every DDPM step alike (diffusers' train_controlnet.py). ``cubic``:
# t = (1 - u^3) T, most draws at high noise, where a picture's layout - what a spatial condition controls - is
# decided (T2I-Adapter, Mou et al. 2023). On the shapes base (one seed each) it gave edge F1 0.80 at step 1500
# where uniform gave 0.76 (docs/experiments.md).
TimestepSampling = Literal["uniform", "cubic"]
TIMESTEP_SAMPLINGS: tuple[str, ...] = get_args(TimestepSampling)


@dataclass
class Base:
    """A loaded base model: its family and the family's stock pipeline, whose components stay frozen."""

    family: "Family"
    pipe: Any  # e.g. diffusers.StableDiffusionXLPipeline
    source: str
    local_dir: Path

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.family.denoiser_name)

    @property
    def vae(self) -> nn.Module:
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.vae.device  # every family has one; the denoiser may be dropped (precompute does)

    @property
    def resolution(self) -> int:
        """Native image size: the denoiser's sample size (in latents; 128 when it has none) times the VAE's factor."""
        return (getattr(self.denoiser.config, "sample_size", None) or 128) * self.pipe.vae_scale_factor


class Family(ABC):
    name: ClassVar[str]
    pipeline_names: ClassVar[tuple[str, ...]]  # model_index.json _class_name values of this family
    denoiser_name: ClassVar[str]  # "unet" or "transformer"
    controlnet_class: ClassVar[str]  # diffusers class that loads an exported ControlNet
    control_pipeline_class: ClassVar[str]  # stock diffusers pipeline that generates with it
    # Denoiser parameter-name prefixes that ``unlock_decoder`` trains (see each family's docs page).
    decoder_prefixes: ClassVar[tuple[str, ...]]
    # The prompt tensors that come from the text (one row per sample): what prompt dropout replaces and what
    # precompute stores; the other prompt tensors depend only on the image size (see complete_prompt).
    text_keys: ClassVar[tuple[str, ...]] = ("prompt_embeds",)
    # Whether policy=pretrain (the denoiser alone, text-to-image) and the objective's options (Min-SNR weighting,
    # offset noise) are implemented for this family: see :meth:`check_training`.
    supports_pretrain: ClassVar[bool] = False
    objective_options: ClassVar[tuple[str, ...]] = ()
    # ControlNet-Union: one ControlNet for several condition types, each sample saying its type (an index into
    # these names); empty for families without one. See :meth:`union_mode`.
    union_types: ClassVar[tuple[str, ...]] = ()

    def load(self, local_dir: Path, source: str, device="cpu", dtype: torch.dtype = torch.float32) -> Base:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(local_dir, torch_dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval()
        return Base(self, pipe, source, Path(local_dir))

    @abstractmethod
    def new_controlnet(self, base: Base, **kwargs) -> nn.Module: ...

    @abstractmethod
    def encode_prompts(self, base: Base, prompts: Sequence[str], size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """Prompt tensors the denoiser takes, one row per prompt; ``size`` is the image's (height, width)."""

    def complete_prompt(
        self, text: dict[str, torch.Tensor], empty: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The prompt for stored ``text`` tensors (:attr:`text_keys`, e.g. precomputed): the size-dependent rest
        comes from ``empty``, the empty prompt encoded at the training size."""
        return {**{k: v for k, v in empty.items() if k not in self.text_keys}, **text}

    def with_image_sizes(
        self, prompt: dict[str, torch.Tensor], original_sizes: torch.Tensor, size: tuple[int, int]
    ) -> dict[str, torch.Tensor]:
        """The prompt of images that were ``original_sizes`` ((N, 2) width, height) before annotate scaled and
        centre-cropped them to ``size`` (height, width). Only families conditioned on sizes (SDXL) use it."""
        return prompt

    def encode_images(
        self, base: Base, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """images: float in [-1, 1], NCHW -> latents as the denoiser sees them (posterior sample, as in training)."""
        vae = base.vae
        posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
        return self.scale_latents(base, posterior.sample(generator))

    @abstractmethod
    def scale_latents(self, base: Base, latents: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (a posterior sample) -> the space the denoiser works in (scale, shift, packing)."""

    def control_inputs(
        self, base: Base, conditions: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """conditions: float in [0, 1], NCHW at image size -> the ControlNet's input (UNet families: as is)."""
        return conditions

    @abstractmethod
    def predict(
        self,
        denoiser: nn.Module,
        controlnets: Sequence[nn.Module],
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        prompt: dict[str, torch.Tensor],
        controls: Sequence[Any],
        scales: Sequence[float],
    ) -> torch.Tensor: ...

    @abstractmethod
    def noise(
        self,
        base: Base,
        latents: torch.Tensor,
        generator: torch.Generator | None = None,
        offset_noise: float = 0.0,
        timestep_sampling: str = "uniform",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The objective's sampling: (noisy latents, timesteps as the denoiser takes them, target). ``offset_noise``
        and a ``timestep_sampling`` other than uniform only where :attr:`objective_options` has them."""

    def loss_weights(self, base: Base, timesteps: torch.Tensor, snr_gamma: float) -> torch.Tensor:
        """Per-sample loss weights for ``snr_gamma`` > 0 (Min-SNR), where :attr:`objective_options` has it."""
        raise ValueError(f"{self.name}: Min-SNR weighting (snr_gamma) is not implemented for this family")

    def check_training(
        self, policy: str, snr_gamma: float = 0.0, offset_noise: float = 0.0, timestep_sampling: str = "uniform"
    ) -> None:
        """Refuse a policy or objective option this family does not implement (one line naming it)."""
        if policy not in POLICIES:
            raise ValueError(f"unknown trainability policy {policy!r}; choose one of {', '.join(POLICIES)}")
        if policy == "pretrain" and not self.supports_pretrain:
            raise ValueError(f"policy=pretrain is not supported for {self.name} base models (only sd)")
        if timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"unknown timestep_sampling {timestep_sampling!r}; choose one of {TIMESTEP_SAMPLINGS}")
        for option, value in (("snr_gamma", snr_gamma), ("offset_noise", offset_noise)):
            if value and option not in self.objective_options:
                raise ValueError(f"{option} is not supported for {self.name} base models (set it to 0)")
        if timestep_sampling != "uniform" and "timestep_sampling" not in self.objective_options:
            raise ValueError(
                f"timestep_sampling={timestep_sampling} is not supported for {self.name} base models (use uniform: "
                "flow matching already samples logit-normal noise levels shifted towards noise)"
            )

    def union_mode(self, annotator: str) -> int:
        """The union control type (index into :attr:`union_types`) of conditions made by ``annotator``."""
        raise ValueError(f"union training is not supported for {self.name} base models (only sdxl)")

    def union_control(self, control: torch.Tensor, types: torch.Tensor) -> Any:
        """A union ControlNet's input: the condition (from :meth:`control_inputs`) plus each sample's type."""
        raise ValueError(f"union training is not supported for {self.name} base models (only sdxl)")

    def pipeline(self, base: Base, controlnets: Sequence[nn.Module]):
        import diffusers

        cls = getattr(diffusers, self.control_pipeline_class)
        controlnet = controlnets[0] if len(controlnets) == 1 else self.multi_controlnet(controlnets)
        pipe = cls(**base.pipe.components, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def multi_controlnet(self, controlnets: Sequence[nn.Module]) -> nn.Module:
        raise ValueError(f"{self.name}: the stock pipeline takes one ControlNet at a time")

    def controlled(self, base: Base, controlnets: Sequence[nn.Module]) -> "Controlled":
        return Controlled(self, base.denoiser, controlnets)

    def loss(
        self,
        model: "Controlled",
        base: Base,
        latents: torch.Tensor,
        prompt: dict[str, torch.Tensor],
        conditions: Sequence[Any],
        generator: torch.Generator | None = None,
        snr_gamma: float = 0.0,
        offset_noise: float = 0.0,
        timestep_sampling: str = "uniform",
    ) -> torch.Tensor:
        """One evaluation of the family's objective on clean ``latents`` (from :meth:`encode_images`): MSE against
        the target, each sample weighted by :meth:`loss_weights` when ``snr_gamma`` > 0."""
        noisy, timesteps, target = self.noise(base, latents, generator, offset_noise, timestep_sampling)
        prediction = model(noisy, timesteps, prompt, conditions)
        if snr_gamma <= 0:
            return F.mse_loss(prediction.float(), target.float())
        per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)
        return (per_sample * self.loss_weights(base, timesteps, snr_gamma)).mean()

    def drop_prompts(
        self,
        prompt: dict[str, torch.Tensor],
        empty: dict[str, torch.Tensor],
        probability: float,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Replace each sample's prompt by the empty prompt's (``empty``: one row) with ``probability``.

        The paper's 50% prompt dropout, for every text-derived tensor of the family at once (same rows)."""
        if probability <= 0:
            return prompt
        n = prompt[self.text_keys[0]].shape[0]
        drop = torch.rand(n, generator=generator) < probability
        out = dict(prompt)
        for key in self.text_keys:
            rows = drop.to(prompt[key].device).view(n, *[1] * (prompt[key].dim() - 1))
            out[key] = torch.where(rows, empty[key].to(prompt[key].dtype).expand_as(prompt[key]), prompt[key])
        return out

    def unlocked(self, name: str, policy: str, denoiser: nn.Module) -> bool:
        """Whether ``denoiser``'s parameter ``name`` trains under ``policy``."""
        self.check_training(policy)
        return policy in ("unlock_full", "pretrain") or (
            policy == "unlock_decoder" and name.startswith(self.decoder_prefixes)
        )


class Controlled(nn.Module):
    """The frozen denoiser driven by the summed residuals of one or more ControlNets (what trains); with none, the
    denoiser alone (policy=pretrain), called the same way so the objective and the train loop serve both."""

    def __init__(self, family: Family, denoiser: nn.Module, controlnets: Sequence[nn.Module]):
        super().__init__()
        self.family = family
        self.denoiser = denoiser
        self.controlnets = nn.ModuleList(controlnets)

    def forward(self, noisy, timesteps, prompt, controls, scales: Sequence[float] | None = None) -> torch.Tensor:
        if len(controls) != len(self.controlnets):
            raise ValueError(f"got {len(controls)} condition(s) for {len(self.controlnets)} ControlNet(s)")
        scales = scales or [1.0] * len(self.controlnets)
        return self.family.predict(self.denoiser, list(self.controlnets), noisy, timesteps, prompt, controls, scales)

    def base_prediction(self, noisy, timesteps, prompt) -> torch.Tensor:
        """What the denoiser alone predicts: the reference the zero-initialised ControlNets must not move."""
        return self.family.predict(self.denoiser, [], noisy, timesteps, prompt, [], [])


def param_groups(model: Controlled, policy: str, lr: float, base_lr: float) -> list[dict]:
    """Set requires_grad for ``policy``: ControlNets at ``lr``, unlocked denoiser parameters at ``base_lr``
    (``pretrain``: no ControlNet, the whole denoiser at ``lr``)."""
    model.family.check_training(policy)
    if (policy == "pretrain") != (len(model.controlnets) == 0):
        raise ValueError(
            f"policy {policy!r} does not fit a model with {len(model.controlnets)} ControlNet(s) "
            "(pretrain trains the denoiser alone; the other policies train ControlNets)"
        )
    if policy == "pretrain":
        model.denoiser.requires_grad_(True)
        return [{"name": model.family.denoiser_name, "lr": lr, "params": list(model.denoiser.parameters())}]
    model.controlnets.requires_grad_(True)
    unlocked = []
    for name, param in model.denoiser.named_parameters():
        param.requires_grad_(model.family.unlocked(name, policy, model.denoiser))
        if param.requires_grad:
            unlocked.append(param)
    groups = [{"name": "controlnet", "lr": lr, "params": list(model.controlnets.parameters())}]
    if unlocked:
        groups.append({"name": model.family.denoiser_name, "lr": base_lr, "params": unlocked})
    return groups


def flow_sigmas(n: int, shift: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Noise levels for flow matching: logit-normal (SD3 paper, mean 0, std 1), then shifted towards noise.

    ``shift`` > 1 spends more steps at high noise, which larger images need (SD3: 3.0; Flux: by resolution)."""
    u = torch.sigmoid(torch.randn(n, generator=generator))
    return shift * u / (1 + (shift - 1) * u)


def flow_noise(latents: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None):
    """Rectified flow: x_t = (1 - s) x_0 + s noise; the velocity target is noise - x_0."""
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    s = sigmas.to(latents.device, latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return (1 - s) * latents + s * noise, noise - latents


def check_control(control: torch.Tensor, noisy: torch.Tensor, family: str) -> None:
    """VAE-encoded conditions must match the noisy latents: same batch and the same image size."""
    if control.shape != noisy.shape:
        raise ValueError(
            f"{family}: condition encodes to shape {tuple(control.shape)} but the latents have shape "
            f"{tuple(noisy.shape)}: give one condition per sample at the image's size"
        )


def read_class_name(base_dir: Path) -> str:
    index = Path(base_dir) / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{base_dir} has no model_index.json: not a diffusers pipeline directory")
    return json.loads(index.read_text()).get("_class_name", "")
