"""What a training run saves: resumable DeepSpeed checkpoints (through Ray Train) and the final export.

Checkpoints are DeepSpeed's own format. Every rank writes its shard into a local temp dir with the
same layout and hands it to ``ray.train.report``; Ray merges the ranks' files into one checkpoint
directory under ``storage_path/run_name`` and keeps the last ``keep_checkpoints``. A restarted
worker group (or a re-run of the same run name) gets it back from ``ray.train.get_checkpoint()``.

The export gathers full weights (ZeRO-3 shards included) on rank 0 and writes diffusers format.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import ray.train
import torch

SUMMARY_FILE = "summary.json"
TAG = "state"  # one DeepSpeed tag per Ray checkpoint dir: Ray's dir name carries the step
STEP_KEY = "step"


def ema_file(rank: int) -> str:
    return f"ema_rank{rank:03d}.pt"


def save_checkpoint(engine, step: int, metrics: dict, ema=None) -> None:
    """All ranks call: write this rank's share of the state, report it with ``metrics`` (a barrier)."""
    rank = ray.train.get_context().get_world_rank()
    with tempfile.TemporaryDirectory(prefix="zeroconv-ckpt-") as tmp:
        # Frozen weights are the base model's: saving them would copy the whole UNet every time.
        engine.save_checkpoint(tmp, tag=TAG, client_state={STEP_KEY: step}, exclude_frozen_parameters=True)
        if ema is not None:
            torch.save(ema.state_dict(), Path(tmp) / ema_file(rank))
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"checkpoint_{step:07d}"
        )


def restore_checkpoint(engine, ema=None) -> int:
    """Load the latest checkpoint Ray hands this worker group, if any; return the step it was taken at."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    rank = ray.train.get_context().get_world_rank()
    with checkpoint.as_directory() as path:
        loaded, client_state = engine.load_checkpoint(path, tag=TAG, load_module_strict=False)
        if loaded is None:
            raise RuntimeError(f"checkpoint {checkpoint.path} holds no DeepSpeed state under tag {TAG!r}")
        if ema is not None:
            ema.load_state_dict(torch.load(Path(path) / ema_file(rank), map_location="cpu"))
    return int(client_state[STEP_KEY])


def full_state_dict(engine, rank: int) -> dict[str, torch.Tensor] | None:
    """The whole model's weights as fp32 CPU tensors on rank 0 (None elsewhere). Every rank must call:
    under ZeRO-3 each parameter is gathered from its shards for the copy, then released."""
    import deepspeed

    module = engine.module
    partitioned = engine.zero_optimization_partition_weights()
    params = list(module.parameters()) if partitioned else []
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=partitioned):
        if rank != 0:
            return None
        return {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in module.state_dict().items()}


def sub_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def changed_params(state: dict[str, torch.Tensor], reference: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Names whose trained value differs from ``reference`` (the base weights cast to the training dtype)."""
    ref = reference.state_dict()
    return sorted(k for k, v in state.items() if not torch.equal(v, ref[k].to(dtype).float()))


def export_model(
    state: dict[str, torch.Tensor], model, unet_unlocked: bool, summary: dict, out_uri: str, storage=None
) -> None:
    """Rank 0: write the ControlNet (and an unlocked UNet) in diffusers format, plus ``summary`` (the final
    metrics, which is how they reach the driver) as SUMMARY_FILE, to ``out_uri`` (local or s3://)."""
    from model.export import export_controlnet, export_unet
    from pipelines.common.storage import upload_dir

    with tempfile.TemporaryDirectory(prefix="zeroconv-export-") as tmp:
        export_controlnet(model.controlnets[0], Path(tmp) / "controlnet", sub_state_dict(state, "controlnets.0."))
        if unet_unlocked:
            export_unet(model.unet, Path(tmp) / "unet", sub_state_dict(state, "unet."))
        (Path(tmp) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
        upload_dir(tmp, out_uri, storage)
