"""What a training run saves: checkpoints any number of workers can resume from (through Ray Train),
and the final export.

A checkpoint holds the run's trainable state whole, independent of how ZeRO partitioned it:

    weights.safetensors     fp32 master weights of every trained parameter (partitions gathered)
    optimizer.safetensors   AdamW's ``exp_avg.<name>`` / ``exp_avg_sq.<name>``, full size
    ema.safetensors         the EMA's weights (``ema=true``)
    state.json              step, data position, optimizer step count, lr schedule, EMA updates

Rank 0 writes it into a temp dir and hands it to ``ray.train.report`` (the other ranks report metrics
only); Ray stores it as ``storage_path/run_name/checkpoint_<step>/`` and keeps the last
``keep_checkpoints``. Loading scatters the same tensors into the partitions of whatever worker group
resumes, so a run saved by 2 workers continues on 1 (or 8), with its optimizer state. Frozen weights are
the base model's and are never saved. Only safetensors and JSON are read back: nothing written under
``storage_path`` is unpickled, so it cannot run code in the workers.

The export gathers full weights on rank 0 and writes diffusers format: the trained weights as the
optimizer's fp32 master copies (not the bf16 copies the forward pass used).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ray.train
import torch
import torch.distributed as dist

SUMMARY_FILE = "summary.json"
WEIGHTS_FILE, OPTIMIZER_FILE, EMA_FILE, STATE_FILE = (
    "weights.safetensors",
    "optimizer.safetensors",
    "ema.safetensors",
    "state.json",
)
MOMENTS = ("exp_avg", "exp_avg_sq")  # AdamW's state per parameter, besides its step count


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def trained_params(engine) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def inner_optimizer(engine) -> torch.optim.Optimizer:
    """The torch AdamW under DeepSpeed's ZeRO / bf16 wrapper (its state is per flat fp32 partition)."""
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def full_value(param, optimizer, key: str | None = None) -> torch.Tensor:
    """A trained parameter's fp32 master weight (``key=None``) or optimizer state, full size. Collective
    under ZeRO: every rank must call, in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if value is None:  # no ZeRO / bf16 optimizer: the parameter is its own master and holds its own state
        value = param.data if key is None else optimizer.state[param][key]
    return value


def set_full_value(param, optimizer, value: torch.Tensor, key: str | None = None) -> None:
    """The inverse of :func:`full_value`: each rank keeps its own partition of ``value``."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(param.device)
    if hasattr(param, "ds_id"):  # ZeRO-3
        set_zero3_partition(param, value, key)
    elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2, bf16
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
    elif key is not None:
        optimizer.state[param][key].copy_(value)
    if key is None:
        set_module_param(param, value)


def set_zero3_partition(param, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of ``value`` into ZeRO-3's fp32 partition (or its optimizer state). Not DeepSpeed's
    ``safe_set_full_*``: they slice the unpadded value, which fails on the last rank when padding exists."""
    zero3 = param._z3_optimizer
    partition, _ = zero3._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    begin = partition.numel() * zero3._get_param_partition_rank(param)
    flat = torch.nn.functional.pad(value.flatten().float(), (0, max(0, begin + partition.numel() - value.numel())))
    partition.data.copy_(flat[begin : begin + partition.numel()])


def set_module_param(param, value: torch.Tensor) -> None:
    """The copy the forward pass uses (bf16 or fp32; a ZeRO-3 shard)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([param], modifier_rank=0, enabled=hasattr(param, "ds_id")):
        if rank() == 0 or not hasattr(param, "ds_id"):
            param.data.copy_(value.view_as(param.data).to(param.dtype))


def init_optimizer_state(engine, step: int) -> None:
    """AdamW creates its state at the first step; a resumed run fills it before that, so create it now
    (zeros, at optimizer step ``step``) and let DeepSpeed map its partitions onto the parameters."""
    optimizer = inner_optimizer(engine)
    # ZeRO-3 hands its flat fp32 partitions to the optimizer only during a step; the others keep them there.
    flats = getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [
        flat for group in optimizer.param_groups for flat in group["params"]
    ]
    for flat in flats:
        state = optimizer.state[flat]
        state.setdefault("step", torch.tensor(0.0))
        for key in MOMENTS:
            state.setdefault(key, torch.zeros_like(flat, memory_format=torch.preserve_format))
        state["step"].fill_(step)
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:  # ZeRO-1/2 and bf16: point each parameter's fragment at the state just made
        link()


def save_checkpoint(engine, step: int, position: int, metrics: dict, ema=None) -> None:
    """All ranks call (the partitions are gathered, and ``ray.train.report`` is a barrier); rank 0 writes."""
    from safetensors.torch import save_file

    optimizer, is_writer = inner_optimizer(engine), rank() == 0
    weights, moments = {}, {}
    for name, param in trained_params(engine):
        weight = full_value(param, optimizer)
        states = {key: full_value(param, optimizer, key) for key in MOMENTS}
        if is_writer:
            weights[name] = weight.detach().to("cpu", torch.float32, copy=True).contiguous()
            moments.update(
                {f"{key}.{name}": v.detach().to("cpu", torch.float32, copy=True) for key, v in states.items()}
            )
    ema_weights = ema.full_weights() if ema is not None else None
    with tempfile.TemporaryDirectory(prefix="zeroconv-ckpt-") as tmp:
        checkpoint = None
        if is_writer:
            save_file(weights, Path(tmp) / WEIGHTS_FILE)
            save_file({k: v.contiguous() for k, v in moments.items()}, Path(tmp) / OPTIMIZER_FILE)
            if ema_weights is not None:
                save_file({k: v.contiguous() for k, v in ema_weights.items()}, Path(tmp) / EMA_FILE)
            state = {
                "step": step,
                "position": position,
                "optimizer_step": optimizer_step(optimizer),
                "lr_schedule": engine.lr_scheduler.state_dict(),
                "ema_updates": ema.updates if ema is not None else None,
                "metrics": metrics,
            }
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state, indent=2))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_{step:07d}")


def optimizer_step(optimizer) -> int:
    steps = [int(s["step"]) for s in optimizer.state.values() if "step" in s]
    return max(steps, default=0)


def restore_checkpoint(engine, ema=None) -> tuple[int, int, dict]:
    """Load the latest checkpoint Ray hands this worker group, if any, into this group's partitions;
    return the step it was taken at, the data position (samples consumed by the run) and the metrics
    logged with it (what a re-run of a finished training reports: it takes no step of its own)."""
    from safetensors.torch import load_file

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, 0, {}
    with checkpoint.as_directory() as path:
        path = Path(path)
        if not (path / STATE_FILE).exists():
            raise ValueError(
                f"checkpoint {checkpoint.path} has no {STATE_FILE}: it was not written by this version of zeroconv "
                "(start a new run_name)"
            )
        state = json.loads((path / STATE_FILE).read_text())
        weights, moments = load_file(path / WEIGHTS_FILE), load_file(path / OPTIMIZER_FILE)
        ema_weights = load_file(path / EMA_FILE) if ema is not None and (path / EMA_FILE).exists() else None
    params = trained_params(engine)
    names = {name for name, _ in params}
    if names != set(weights):
        raise ValueError(
            f"checkpoint {checkpoint.path} does not match the model's trained parameters "
            f"({len(set(weights) - names)} only in the checkpoint, {len(names - set(weights))} only in the model): "
            "was the policy changed? Resume with the same policy, or start a new run_name"
        )
    optimizer = inner_optimizer(engine)
    init_optimizer_state(engine, state["optimizer_step"])
    for name, param in params:
        set_full_value(param, optimizer, weights[name])
        for key in MOMENTS:
            set_full_value(param, optimizer, moments[f"{key}.{name}"], key)
    scheduler = engine.lr_scheduler
    scheduler.load_state_dict(state["lr_schedule"])
    for group, lr in zip(scheduler.optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    if ema is not None:
        ema.load_full_weights(ema_weights if ema_weights is not None else weights, state["ema_updates"] or 0)
    return int(state["step"]), int(state["position"]), state.get("metrics", {})


def master_weights(engine) -> dict[str, torch.Tensor]:
    """The trained parameters' fp32 master copies, full size, as CPU tensors on rank 0 ({} elsewhere).
    Every rank must call (the ZeRO partitions are gathered)."""
    optimizer, out = inner_optimizer(engine), {}
    for name, param in trained_params(engine):
        weight = full_value(param, optimizer)
        if rank() == 0:
            out[name] = weight.detach().to("cpu", torch.float32, copy=True)
    return out


def full_state_dict(engine, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The whole model's weights as fp32 CPU tensors on rank 0 (None elsewhere): ``trained`` (full fp32
    values of the trained parameters, e.g. :func:`master_weights` or the EMA's) over the module's own
    values for the rest. Every rank must call: under ZeRO-3 each parameter is gathered from its shards."""
    import deepspeed

    module = engine.module
    partitioned = engine.zero_optimization_partition_weights()
    params = list(module.parameters()) if partitioned else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=partitioned):
        if rank() != 0:
            return None
        state = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in module.state_dict().items()}
    return {**state, **trained}


def sub_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def changed_params(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], dtype: torch.dtype
) -> list[str]:
    """Names whose trained value differs from ``reference`` (the base weights cast to the training dtype)."""
    return sorted(k for k, v in state.items() if not torch.equal(v, reference[k].to(dtype).float()))


def export_model(
    state: dict[str, torch.Tensor], model, denoiser_unlocked: bool, summary: dict, out_uri: str, storage=None
) -> None:
    """Rank 0: write the ControlNet (none under policy=pretrain) and an unlocked denoiser (as ``unet/`` or
    ``transformer/``) in diffusers format, plus ``summary`` (the final metrics and the family, which is how they
    reach the driver) as SUMMARY_FILE, to ``out_uri`` (local or s3://)."""
    from model.export import export_model as export_diffusers
    from pipelines.common.storage import upload_dir

    with tempfile.TemporaryDirectory(prefix="zeroconv-export-") as tmp:
        if len(model.controlnets):
            export_diffusers(model.controlnets[0], Path(tmp) / "controlnet", sub_state_dict(state, "controlnets.0."))
        if denoiser_unlocked:
            folder = Path(tmp) / model.family.denoiser_name
            export_diffusers(model.denoiser, folder, sub_state_dict(state, "denoiser."))
        (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        upload_dir(tmp, out_uri, storage)
