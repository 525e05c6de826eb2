"""The per-worker training loop: Ray Train runs :func:`train_loop` on every worker.

Each worker loads the frozen base (VAE, text encoder, UNet), builds UNet + ControlNet, wraps it in a
DeepSpeed engine (ZeRO stage from the config), resumes from Ray's latest checkpoint if there is one,
and streams its shard of the dataset: decode -> VAE latents + text embeddings -> prompt dropout ->
noise -> predict -> MSE -> step. Rank 0 logs to MLflow; all ranks checkpoint and export together.

This module must stay importable (Ray pickles ``train_loop`` by reference).
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path

import numpy as np
import ray.train
import torch

from model.controlnet import ControlledUNet, controlnet_from_unet, param_groups
from model.objective import diffusion_loss, drop_prompts
from pipelines.checkpoint import (
    changed_params,
    export_model,
    full_state_dict,
    restore_checkpoint,
    save_checkpoint,
    sub_state_dict,
)
from pipelines.common.dtypes import torch_dtype
from pipelines.common.images import decode_condition
from pipelines.data.tensors import batch_tensors
from pipelines.train_config import TrainConfig

TIMING_WARMUP_STEPS = 2  # steps after (re)start left out of samples/s: allocation, first-call overheads


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def micro_batches(shard, batch_size: int, seed: int):
    """Endless micro-batches from this worker's shard; each pass over the data is locally reshuffled."""
    epoch = 0
    while True:
        yield from shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=8 * batch_size,
            local_shuffle_seed=seed + epoch,
        )
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Model, engine, EMA
# ---------------------------------------------------------------------------------------------


def build_model(base, config: TrainConfig) -> ControlledUNet:
    model = ControlledUNet(base.unet, [controlnet_from_unet(base.unet)])
    if config.gradient_checkpointing:
        # The UNet too: even locked, backward runs through its decoder to reach the ControlNet residuals.
        for module in (model.unet, *model.controlnets):
            module.enable_gradient_checkpointing()
    return model


def deepspeed_config(config: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": {"stage": config.zero_stage},
        "bf16": {"enabled": config.precision == "bf16"},
        "fp16": {"enabled": config.precision == "fp16"},
        "steps_per_print": 10**12,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def build_engine(model: ControlledUNet, config: TrainConfig):
    import deepspeed
    from diffusers.optimization import get_scheduler

    # The shared-memory allreduce op is JIT-compiled on first use (~45 s); gloo is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # A client AdamW keeps the per-group learning rates (ControlNet vs unlocked UNet) as they are.
    optimizer = torch.optim.AdamW(
        param_groups(model, config.policy, config.lr, config.unet_lr), lr=config.lr, weight_decay=config.weight_decay
    )
    scheduler = get_scheduler(
        config.lr_schedule, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.max_steps
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(config)
    )
    return engine


def local_tensor(param: torch.nn.Parameter) -> torch.Tensor:
    """This rank's copy of a parameter: its shard under ZeRO-3, the whole tensor otherwise."""
    return param.ds_tensor if hasattr(param, "ds_tensor") else param.data


class EMA:
    """Exponential moving average of the trained weights, fp32, over this rank's share of each one."""

    def __init__(self, params, decay: float):
        self.params = [p for p in params if p.requires_grad]
        self.shadow = [local_tensor(p).detach().float().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(local_tensor(p).float(), 1 - decay)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for shadow, p in zip(self.shadow, self.params):
            local_tensor(p).copy_(shadow)

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.shadow, self.updates = [s.to(t.device) for s, t in zip(state["shadow"], self.shadow)], state["updates"]


# ---------------------------------------------------------------------------------------------
# Validation grids
# ---------------------------------------------------------------------------------------------


def validation_images(state: dict, model: ControlledUNet, base, validation: dict, config: TrainConfig) -> np.ndarray:
    """Rank 0: condition | generated grid from full fp32 weights ``state``, fixed prompts and seeds."""
    from model.inference import build_pipeline, generate
    from pipelines.common.tracking import image_grid

    controlnet = type(model.controlnets[0]).from_config(model.controlnets[0].config)
    controlnet.load_state_dict(sub_state_dict(state, "controlnets.0."))
    unet = type(model.unet).from_config(model.unet.config)
    unet.load_state_dict(sub_state_dict(state, "unet."))
    device = base.vae.device
    pipe = build_pipeline(base, [controlnet.to(device)], unet.to(device))
    conditions = np.stack([decode_condition(b, channels=3) for b in validation["condition"]])
    images = generate(pipe, validation["text"], conditions, seed=config.seed, steps=config.validation_steps)
    return image_grid(conditions, images)


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def train_step(
    engine, base, batches, empty_prompt: torch.Tensor, config: TrainConfig, scaling_factor: float | None
) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (detached)."""
    dtype = torch_dtype(config.precision)
    total = torch.zeros((), device=engine.device)
    for _ in range(config.grad_accum):
        latents, text, conditions = batch_tensors(
            next(batches), base, config.condition_column, scaling_factor, engine.device
        )
        text = drop_prompts(text, empty_prompt, config.prompt_dropout)
        loss = diffusion_loss(engine, base.noise_scheduler, latents.to(dtype), text.to(dtype), [conditions.to(dtype)])
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer and the lr schedule on accumulation boundaries
        total += loss.detach()
    return total / config.grad_accum


def maybe_fail(config: TrainConfig, step: int, rank: int, world: int, marker: str | None) -> None:
    """Testing hook: the last rank dies like a lost node before ``fail_at_step``, once per run (marker file).
    It waits until Ray has committed the latest checkpoint, so where the run resumes is known exactly."""
    if config.fail_at_step == step and rank == world - 1 and marker and not os.path.exists(marker):
        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        Path(marker).touch()
        os._exit(1)


def global_mean(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.detach().float().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


class Meter:
    """Loss and samples/s per logging window, from the training steps' own time (not checkpoints or
    validation); steady-state samples/s over the run, leaving out the first steps after (re)start."""

    def __init__(self, samples_per_step: int, warmup_steps: int = TIMING_WARMUP_STEPS):
        self.samples_per_step, self.warmup_steps = samples_per_step, warmup_steps
        self.losses, self.window_seconds, self.steps = [], 0.0, 0
        self.steady_steps, self.steady_seconds = 0, 0.0

    def add(self, loss: torch.Tensor, seconds: float) -> None:
        self.losses.append(loss)
        self.window_seconds += seconds
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.steady_steps, self.steady_seconds = self.steady_steps + 1, self.steady_seconds + seconds

    def window(self) -> dict[str, float]:
        """Metrics since the last call (all ranks must call: the loss is averaged across them)."""
        out = {
            "loss": global_mean(torch.stack(self.losses).mean()),
            "samples_per_s": self.samples_per_step * len(self.losses) / self.window_seconds,
        }
        self.losses, self.window_seconds = [], 0.0
        return out

    def steady_samples_per_s(self) -> float:
        return self.samples_per_step * self.steady_steps / self.steady_seconds if self.steady_steps else 0.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def learning_rates(engine) -> dict[str, float]:
    return {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def log_validation(engine, model, base, validation: dict, config: TrainConfig, tracker, step: int, rank: int) -> None:
    """All ranks gather the weights (ZeRO-3 needs everyone); rank 0 generates and logs the grid."""
    state = full_state_dict(engine, rank)
    if tracker:
        tracker.log_grid(validation_images(state, model, base, validation, config), step)


def train_loop(loop_config: dict) -> None:
    from model.base import load_base
    from pipelines.common.tracking import Tracker

    config = TrainConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed * 1000 + rank)  # ranks draw different noise, timesteps and dropout

    base = load_base(config.base_model.source, storage=config.storage, device=device)
    model = build_model(base, config)
    engine = build_engine(model, config)
    ema = EMA(model.parameters(), config.ema_decay) if config.ema else None
    step = restore_checkpoint(engine, ema)
    tracker = Tracker(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    empty_prompt = base.encode_prompts([""])
    batches = micro_batches(ray.train.get_dataset_shard("train"), config.batch_size, config.seed + step)

    meter, metrics = Meter(config.effective_batch), {}
    while step < config.max_steps:
        maybe_fail(config, step + 1, rank, world, loop_config.get("failure_marker"))
        started = time.perf_counter()
        loss = train_step(engine, base, batches, empty_prompt, config, loop_config["scaling_factor"])
        synchronize(device)
        meter.add(loss, time.perf_counter() - started)
        step += 1
        if ema is not None:
            ema.update()
        if step % config.log_every == 0 or step == config.max_steps:
            metrics = {
                **meter.window(),
                "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                **learning_rates(engine),
            }
            if tracker:
                tracker.log_metrics(metrics, step)
                print(
                    f"step {step}/{config.max_steps} " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()),
                    flush=True,
                )
        if (
            config.num_validation
            and config.validate_every
            and step % config.validate_every == 0
            and step < config.max_steps
        ):
            log_validation(engine, model, base, loop_config["validation"], config, tracker, step, rank)
        if step % config.checkpoint_every == 0 or step == config.max_steps:
            save_checkpoint(engine, step, {**metrics, "step": step}, ema)

    finish(
        engine,
        model,
        base,
        config,
        loop_config,
        ema,
        tracker,
        {**metrics, "step": step, "steady_samples_per_s": meter.steady_samples_per_s(), "peak_rss_mb": peak_rss_mb()},
        rank,
    )


def finish(engine, model, base, config: TrainConfig, loop_config: dict, ema, tracker, final: dict, rank: int) -> None:
    """All ranks gather the final (EMA) weights once; rank 0 checks the UNet against the base on disk,
    logs the last grid and writes the export with ``final`` (the driver reads the metrics from it)."""
    from diffusers import UNet2DConditionModel

    if ema is not None:
        ema.copy_to_model()  # the run is over: the module may hold the averaged weights now
    state = full_state_dict(engine, rank)
    if rank != 0:
        return
    base_unet = UNet2DConditionModel.from_pretrained(base.local_dir, subfolder="unet")
    final["unet_params_changed"] = changed_params(
        sub_state_dict(state, "unet."), base_unet, torch_dtype(config.precision)
    )
    if config.num_validation:
        tracker.log_grid(validation_images(state, model, base, loop_config["validation"], config), final["step"])
    tracker.log_metrics({k: final[k] for k in ("steady_samples_per_s", "peak_rss_mb")}, final["step"])
    export_model(state, model, config.policy != "locked", final, loop_config["export_uri"], config.storage)
