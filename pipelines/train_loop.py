"""The per-worker training loop: Ray Train runs :func:`train_loop` on every worker.

Each worker loads the frozen base through its family's adapter (``model.families``: SD, SDXL, SD3, Flux; the
family is read from the base's model_index.json), builds denoiser + ControlNet, wraps it in a DeepSpeed engine
(ZeRO stage from the config), resumes from Ray's latest checkpoint if there is one, and reads its share of the
data from where the run stopped (pipelines/train_data.py): decode -> ``fam.encode_images`` latents +
``fam.encode_prompts`` tensors -> ``fam.drop_prompts`` -> ``fam.loss`` (the family's noising, prediction and
target) -> step. Nothing here is family-specific. Rank 0 logs to MLflow (other ranks get a NullTracker); all
ranks checkpoint and export together.

This module must stay importable (Ray pickles ``train_loop`` by reference).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import ray.train
import torch

from model.families import Controlled, param_groups
from pipelines.checkpoint import (
    changed_params,
    export_model,
    full_state_dict,
    master_weights,
    restore_checkpoint,
    save_checkpoint,
    sub_state_dict,
)
from pipelines.common.dtypes import torch_dtype
from pipelines.common.images import decode_condition
from pipelines.data.tensors import PICKED, PICKED_INDEX, batch_tensors
from pipelines.train_config import TrainConfig
from pipelines.train_data import SampleStream, TrainFiles, stream_transform
from pipelines.train_debug import StepHooks
from pipelines.train_fidelity import FidelityCurve, denoiser_from_weights, pipeline_from_weights

TIMING_WARMUP_STEPS = 2  # steps after (re)start left out of samples/s: allocation, first-call overheads


# ---------------------------------------------------------------------------------------------
# Model, engine, EMA
# ---------------------------------------------------------------------------------------------


def build_model(base, config: TrainConfig) -> Controlled:
    """The denoiser with a new ControlNet; under policy=pretrain the denoiser alone."""
    fam = base.family
    fam.check_training(config.policy, config.snr_gamma, config.offset_noise, config.timestep_sampling)
    union = {"union": True} if config.union else {}  # resolve_union refused families without one
    model = fam.controlled(base, [] if config.policy == "pretrain" else [fam.new_controlnet(base, **union)])
    if config.gradient_checkpointing:
        # The denoiser too: even locked, backward runs through it to reach the ControlNet residuals.
        for module in (model.denoiser, *model.controlnets):
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


def build_engine(model: Controlled, config: TrainConfig):
    import deepspeed
    from diffusers.optimization import get_scheduler

    # The shared-memory allreduce op is JIT-compiled on first use (~45 s); gloo is enough here.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # A client AdamW keeps the per-group learning rates (ControlNet vs unlocked denoiser) as they are.
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

    def __init__(self, named_params, decay: float):
        self.names, self.params = zip(*[(n, p) for n, p in named_params if p.requires_grad])
        self.shadow = [local_tensor(p).detach().float().clone() for p in self.params]
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for shadow, p in zip(self.shadow, self.params):
            shadow.lerp_(local_tensor(p).float(), 1 - decay)

    @torch.no_grad()
    def full_weights(self) -> dict[str, torch.Tensor]:
        """The averaged weights, full size, fp32 CPU tensors (every rank calls: ZeRO-3 shards are gathered)."""
        import torch.distributed as dist

        out = {}
        for name, shadow, p in zip(self.names, self.shadow, self.params):
            if hasattr(p, "ds_tensor"):  # a ZeRO-3 shard of the flattened, padded parameter
                parts = [torch.empty_like(shadow) for _ in range(dist.get_world_size())]
                dist.all_gather(parts, shadow)
                shadow = torch.cat(parts)[: p.ds_numel].view(p.ds_shape)
            out[name] = shadow.detach().to("cpu", copy=True)
        return out

    @torch.no_grad()
    def load_full_weights(self, weights: dict[str, torch.Tensor], updates: int) -> None:
        """The inverse of :meth:`full_weights`, into this rank's share (e.g. from a checkpoint of another
        number of workers)."""
        import torch.distributed as dist

        for shadow, name, p in zip(self.shadow, self.names, self.params):
            value = weights[name].to(shadow.device, torch.float32).flatten()
            if hasattr(p, "ds_tensor"):
                begin = dist.get_rank() * shadow.numel()
                value = torch.nn.functional.pad(value, (0, max(0, begin + shadow.numel() - value.numel())))
                value = value[begin : begin + shadow.numel()]
            shadow.copy_(value.view_as(shadow))
        self.updates = updates


# ---------------------------------------------------------------------------------------------
# Validation grids
# ---------------------------------------------------------------------------------------------


def validation_images(state: dict, model: Controlled, base, validation: dict, config: TrainConfig) -> np.ndarray:
    """Rank 0: condition | generated grid from full fp32 weights ``state``, fixed prompts and seeds."""
    from model.inference import generate, text_to_image
    from pipelines.common.tracking import image_grid

    conditions = np.stack([decode_condition(b, channels=3) for b in validation["condition"]])
    if not len(model.controlnets):  # pretraining: text-to-image, beside the conditions of the rows' images
        denoiser = denoiser_from_weights(state, model).to(base.device)
        return image_grid(
            conditions, text_to_image(base, validation["text"], denoiser, config.seed, config.validation_steps)
        )
    pipe = pipeline_from_weights(state, model, base)
    images = generate(
        pipe,
        validation["text"],
        conditions,
        seed=config.seed,
        steps=config.validation_steps,
        control_mode=validation.get("control_mode"),
    )
    return image_grid(conditions, images)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


@dataclass
class LoopInputs:
    """What the driver hands every worker (pickled once with the train function)."""

    config: TrainConfig
    files: TrainFiles
    tracking_uri: str
    run_id: str
    run_dir: str  # storage_path/run_name: checkpoints live here (through Ray), the export under export/
    validation: dict  # {"text": [...], "condition": [PNG bytes, ...], "control_mode": union type or None}
    scaling_factor: float | None  # set for a precomputed dataset (latent posteriors + text embeddings)
    resolution: tuple[int, int] = (0, 0)  # the dataset's (height, width): size-dependent prompt tensors
    union_modes: list[int] = field(default_factory=list)  # union=true: the control mode of each condition column

    @property
    def export_uri(self) -> str:
        return f"{self.run_dir}/export"


@dataclass
class TrainState:
    """Everything one worker's loop carries from step to step."""

    engine: object  # the DeepSpeed engine around ``model``
    model: Controlled
    base: object  # model.families.Base: the frozen base and its family's adapter
    ema: EMA | None
    tracker: object  # Tracker on rank 0, NullTracker elsewhere
    console: Callable[[str], None]  # print on rank 0, silent elsewhere
    hooks: StepHooks
    batches: SampleStream
    empty_prompt: dict[str, torch.Tensor]  # the empty caption encoded once: what prompt dropout substitutes
    step: int  # optimizer steps done
    position: int  # samples consumed by the whole run (all ranks): where the data stream resumes
    meter: Meter
    metrics: dict = field(default_factory=dict)
    fidelity: FidelityCurve = field(default_factory=FidelityCurve)  # fidelity.every: scores on held-out rows


def train_step(state: TrainState, inputs: LoopInputs) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (detached)."""
    config, engine, base = inputs.config, state.engine, state.base
    fam, dtype = base.family, torch_dtype(config.precision)
    total = torch.zeros((), device=engine.device)
    for _ in range(config.grad_accum):
        batch = next(state.batches)
        state.hooks.on_batch(state.step + 1, batch.pop("ids", None))
        picked = batch.pop(PICKED_INDEX, None)  # union: which condition column each sample trains on
        column = PICKED if picked is not None else config.condition_column
        latents, prompt, conditions = batch_tensors(
            batch, base, column, inputs.scaling_factor, engine.device, state.empty_prompt
        )
        prompt = fam.drop_prompts(prompt, state.empty_prompt, config.prompt_dropout)
        prompt = {k: v.to(dtype) for k, v in prompt.items()}
        controls = [fam.control_inputs(base, conditions).to(dtype)] if len(state.model.controlnets) else []
        if picked is not None:
            controls = [fam.union_control(controls[0], torch.as_tensor(np.asarray(inputs.union_modes)[picked]))]
        loss = fam.loss(
            engine,
            base,
            latents.to(dtype),
            prompt,
            controls,
            snr_gamma=config.snr_gamma,
            offset_noise=config.offset_noise,
            timestep_sampling=config.timestep_sampling,
        )
        engine.backward(loss)
        engine.step()  # DeepSpeed steps the optimizer and the lr schedule on accumulation boundaries
        total += loss.detach()
    state.step += 1
    state.position += state.meter.samples_per_step  # this run's worker count: elastic runs change it
    if state.ema is not None:
        state.ema.update()
    return total / config.grad_accum


def setup(inputs: LoopInputs) -> TrainState:
    """Load the base, build model + engine, restore the latest checkpoint, open the data stream there."""
    from model.families import load
    from pipelines.common.storage import resolve
    from pipelines.common.tracking import NullTracker, Tracker

    config = inputs.config
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    base = load(config.base_model.source, storage=config.storage, device=device)
    model = build_model(base, config)
    engine = build_engine(model, config)
    ema = EMA(model.named_parameters(), config.ema_decay) if config.ema else None
    step, position, metrics = restore_checkpoint(engine, ema)
    # Ranks draw different noise, timesteps and dropout; a resumed run does not replay the first steps' draws.
    torch.manual_seed(int(np.random.SeedSequence([config.seed, rank, step]).generate_state(1)[0]))
    batches = SampleStream(
        inputs.files,
        config.seed,
        config.shuffle_buffer,
        rank,
        world,
        config.batch_size,
        position,
        stream_transform(
            config.condition_columns if config.union else [],
            config.condition_column,
            config.seed,
            precomputed=inputs.scaling_factor is not None,
        ),
    )
    tracker = Tracker(inputs.tracking_uri, inputs.run_id) if rank == 0 else NullTracker()
    return TrainState(
        engine=engine,
        model=model,
        base=base,
        ema=ema,
        tracker=tracker,
        console=print if rank == 0 else (lambda line: None),
        hooks=StepHooks(config.debug, resolve(inputs.run_dir, config.storage), rank, world),
        batches=batches,
        empty_prompt=base.family.encode_prompts(base, [""], inputs.resolution),
        step=step,
        position=position,
        meter=Meter(config.effective_batch(world)),
        metrics={k: v for k, v in metrics.items() if k != "step"},
        fidelity=FidelityCurve.start(config, model, base, engine, tracker, rank, step),
    )


def train_loop(inputs: LoopInputs) -> None:
    """What every Ray Train worker runs."""
    config = inputs.config
    state = setup(inputs)
    while state.step < config.max_steps:
        state.hooks.before_step(state.step + 1)
        started = time.perf_counter()
        loss = train_step(state, inputs)
        synchronize(state.engine.device)
        state.meter.add(loss, time.perf_counter() - started)
        step, last = state.step, state.step == config.max_steps
        if step % config.log_every == 0 or last:
            log_metrics(state, config.max_steps)
        state.fidelity.after_step(step, state.engine)
        if config.num_validation and config.validate_every and step % config.validate_every == 0 and not last:
            log_validation(state, inputs)
        if step % config.checkpoint_every == 0 or last:
            save_checkpoint(state.engine, step, state.position, {**state.metrics, "step": step}, state.ema)
    finish(state, inputs)


def log_metrics(state: TrainState, max_steps: int) -> None:
    """All ranks call (the loss is averaged across them); rank 0's tracker and console record it."""
    # DeepSpeed reports the norm only from its ZeRO / fp16 / bf16 optimizers; plain fp32 at stage 0 clips
    # without keeping it, and a logged 0 would read as "no gradient".
    grad_norm = state.engine.get_global_grad_norm()
    state.metrics = {
        **state.meter.window(),
        **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
        **learning_rates(state.engine),
    }
    state.tracker.log_metrics(state.metrics, state.step)
    state.console(f"step {state.step}/{max_steps} " + " ".join(f"{k} {v:.4g}" for k, v in state.metrics.items()))


def log_validation(state: TrainState, inputs: LoopInputs) -> None:
    """All ranks gather the weights (ZeRO-3 needs everyone); rank 0 generates and logs the grid."""
    weights = full_state_dict(state.engine, master_weights(state.engine))
    if weights is not None:  # rank 0
        grid = validation_images(weights, state.model, state.base, inputs.validation, inputs.config)
        state.tracker.log_grid(grid, state.step)


def finish(state: TrainState, inputs: LoopInputs) -> None:
    """All ranks gather the final (EMA) weights once; rank 0 checks the denoiser against the base on disk,
    logs the last grid and writes the export with the final metrics (the driver reads them from it)."""
    config, fam = inputs.config, state.base.family
    trained = state.ema.full_weights() if state.ema is not None else master_weights(state.engine)
    weights = full_state_dict(state.engine, trained)
    if weights is None:  # only rank 0 holds the gathered weights
        return
    on_disk = type(state.model.denoiser).from_pretrained(state.base.local_dir, subfolder=fam.denoiser_name)
    base_weights = on_disk.state_dict()
    final = {
        **state.metrics,
        "step": state.step,
        "family": fam.name,
        **state.fidelity.summary(),
        "steady_samples_per_s": state.meter.steady_samples_per_s(),
        "peak_rss_mb": peak_rss_mb(),
        "unet_params_changed": changed_params(
            sub_state_dict(weights, "denoiser."), base_weights, torch_dtype(config.precision)
        ),
    }
    # Weights that did not train are exported as the base's own, not as their copies in the training dtype.
    trained = {name for name, p in state.model.named_parameters() if p.requires_grad}
    weights.update({f"denoiser.{k}": v for k, v in base_weights.items() if f"denoiser.{k}" not in trained})
    if config.num_validation:
        state.tracker.log_grid(
            validation_images(weights, state.model, state.base, inputs.validation, config), state.step
        )
    state.tracker.log_metrics({k: final[k] for k in ("steady_samples_per_s", "peak_rss_mb")}, state.step)
    export_model(weights, state.model, config.policy != "locked", final, inputs.export_uri, config.storage)
