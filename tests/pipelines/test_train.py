"""`zeroconv train`: Ray Train + DeepSpeed on the tiny model, real MLflow server, 2 workers over gloo."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.common.config import BaseModelConfig, MLflowConfig
from pipelines.train import TrainConfig, run_train


def train_config(tmp_path: Path, data: Path, mlflow_uri: str, **overrides) -> TrainConfig:
    values = dict(
        data=str(data),
        work_dir=str(tmp_path / "work"),
        base_model=BaseModelConfig(source="tiny"),
        run_name="test-run",
        num_workers=2,
        cpus_per_worker=0.5,
        batch_size=2,
        max_steps=4,
        lr=1e-4,
        checkpoint_every=2,
        keep_checkpoints=2,
        log_every=1,
        validate_every=2,
        num_validation=2,
        validation_steps=2,
        registered_model=f"test-{tmp_path.name}"[:60],
        mlflow=MLflowConfig(tracking_uri=mlflow_uri, experiment="test-train"),
    )
    values.update(overrides)
    return TrainConfig(**values)


def mlflow_run(mlflow_uri: str, run_id: str):
    import mlflow

    return mlflow.MlflowClient(mlflow_uri).get_run(run_id)


def mlflow_artifacts(mlflow_uri: str, run_id: str, path: str):
    import mlflow

    return mlflow.MlflowClient(mlflow_uri).list_artifacts(run_id, path)


def metric_steps(mlflow_uri: str, run_id: str, key: str = "loss") -> list[int]:
    import mlflow

    return [m.step for m in mlflow.MlflowClient(mlflow_uri).get_metric_history(run_id, key)]


def generate_with_stock_diffusers(base_dir: Path, controlnet_dir: str, unet_dir: str | None = None) -> np.ndarray:
    """Load the export the way any diffusers user would and make an image (DDIM, CFG 9.0)."""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, UNet2DConditionModel

    controlnet = ControlNetModel.from_pretrained(controlnet_dir)
    extra = {"unet": UNet2DConditionModel.from_pretrained(unet_dir)} if unet_dir else {}
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        str(base_dir), controlnet=controlnet, safety_checker=None, **extra
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    condition = torch.zeros(1, 3, 64, 64)
    condition[..., 20:44, 20:44] = 1.0
    out = pipe(
        "red circle with blue background",
        image=condition,
        num_inference_steps=2,
        guidance_scale=9.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()
    return out


@pytest.mark.slow
def test_zero2_bf16_locked_trains_checkpoints_exports_and_registers(
    tmp_path, ray_session, mlflow_server, fill50k_parquet, tiny_base_dir
):
    config = train_config(
        tmp_path, fill50k_parquet, mlflow_server, zero_stage=2, policy="locked", precision="bf16", checkpoint_every=1
    )
    ctrl_c = signal.getsignal(signal.SIGINT)
    result = run_train(config)
    # Ray Train's fit installs its own Ctrl-C handler in the driver; after training, Ctrl-C is Python's again.
    assert signal.getsignal(signal.SIGINT) is ctrl_c

    assert result.steps == 4
    assert metric_steps(mlflow_server, result.mlflow_run_id) == [1, 2, 3, 4]
    assert metric_steps(mlflow_server, result.mlflow_run_id, "grad_norm") == [1, 2, 3, 4]
    assert result.unet_params_changed == []  # locked: the base UNet is bit-identical (in bf16) after training
    run = mlflow_run(mlflow_server, result.mlflow_run_id)
    assert run.data.params["precision"] == "bf16" and run.data.params["policy"] == "locked"
    assert run.data.params["storage_path"] == str(tmp_path / "work" / "train")
    assert run.info.status == "FINISHED"
    grids = [a.path for a in mlflow_artifacts(mlflow_server, result.mlflow_run_id, "images")]
    assert any("validation" in p for p in grids), grids  # the condition | generated grids
    assert result.unet_dir is None
    # 4 checkpoints written (every step), keep_checkpoints=2: only the last two remain.
    ckpts = sorted(p.name for p in (tmp_path / "work" / "train" / "test-run").glob("checkpoint_*") if p.is_dir())
    assert ckpts == ["checkpoint_0000003", "checkpoint_0000004"]
    # Safetensors and JSON only: resuming unpickles nothing from storage_path.
    files = sorted(p.name for p in (tmp_path / "work" / "train" / "test-run" / "checkpoint_0000004").iterdir())
    assert files == ["optimizer.safetensors", "state.json", "weights.safetensors"]
    generate_with_stock_diffusers(tiny_base_dir, result.controlnet_dir)
    # The ControlNet learned something: its zero convolutions are no longer zero.
    from diffusers import ControlNetModel

    net = ControlNetModel.from_pretrained(result.controlnet_dir)
    assert net.controlnet_mid_block.weight.abs().max() > 0
    # The export holds the fp32 master weights, not their bf16 copies.
    trained = net.controlnet_mid_block.weight.detach()
    assert net.dtype == torch.float32 and not torch.equal(trained, trained.bfloat16().float())
    assert_registered_model_loads_in_fresh_process(mlflow_server, config.registered_model, result.model_version)

    # Re-running the finished training registers nothing new: the same version comes back.
    again = run_train(config)
    assert again.model_version == result.model_version and again.mlflow_run_id == result.mlflow_run_id
    # It takes no step, yet reports the finished run's last metrics (from its checkpoint), not none.
    assert again.steps == 4 and again.metrics["loss"] == result.metrics["loss"]
    import mlflow

    versions = mlflow.MlflowClient(mlflow_server).search_model_versions(f"name = '{config.registered_model}'")
    assert [v.version for v in versions] == [result.model_version]


def assert_registered_model_loads_in_fresh_process(mlflow_uri: str, name: str, version: str) -> None:
    """models:/NAME@candidate, resolved and run by a new Python process against the real server."""
    import mlflow

    assert mlflow.MlflowClient(mlflow_uri).get_model_version_by_alias(name, "candidate").version == version
    code = f"""
import base64, io, json, mlflow, numpy as np, pandas as pd
from PIL import Image
mlflow.set_tracking_uri({mlflow_uri!r})
model = mlflow.pyfunc.load_model("models:/{name}@candidate")
cond = np.zeros((64, 64), np.uint8); cond[16:48, 16:48] = 255
buf = io.BytesIO(); Image.fromarray(cond).save(buf, format="PNG")
out = model.predict(pd.DataFrame({{"prompt": ["red circle"], "condition": [base64.b64encode(buf.getvalue()).decode()],
                                   "steps": [2], "seed": [0]}}))
image = np.asarray(Image.open(io.BytesIO(base64.b64decode(out["image"][0]))))
print(json.dumps({{"shape": list(image.shape)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"shape": [64, 64, 3]}


@pytest.mark.slow
def test_zero3_unlock_decoder_moves_only_decoder_and_exports_unet(
    tmp_path, ray_session, mlflow_server, fill50k_parquet, tiny_base_dir
):
    from diffusers import UNet2DConditionModel

    from model.families import FAMILIES

    DECODER_PREFIXES = FAMILIES["sd"].decoder_prefixes

    config = train_config(
        tmp_path,
        fill50k_parquet,
        mlflow_server,
        zero_stage=3,
        policy="unlock_decoder",
        unet_lr=2e-5,
        ema=True,
        ema_decay=0.9,
        gradient_checkpointing=True,
        grad_accum=2,
        lr_schedule="cosine",
        warmup_steps=1,
    )
    result = run_train(config)

    assert result.steps == 4
    assert result.unet_params_changed, "unlock_decoder trained no UNet weights"
    assert all(name.startswith(DECODER_PREFIXES) for name in result.unet_params_changed)
    # Independently of the loop's own check: compare the exported UNet with the base on disk.
    before = UNet2DConditionModel.from_pretrained(tiny_base_dir, subfolder="unet").state_dict()
    after = UNet2DConditionModel.from_pretrained(result.unet_dir).state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(DECODER_PREFIXES) for k in moved)
    assert any(k.startswith("up_blocks.") for k in moved)
    generate_with_stock_diffusers(tiny_base_dir, result.controlnet_dir, result.unet_dir)
    # Two param groups, two learning rates (lr 1e-4, unet_lr 2e-5), both following the schedule.
    import mlflow

    client = mlflow.MlflowClient(mlflow_server)
    controlnet_lrs = [m.value for m in client.get_metric_history(result.mlflow_run_id, "lr_controlnet")]
    unet_lrs = [m.value for m in client.get_metric_history(result.mlflow_run_id, "lr_unet")]
    assert len(controlnet_lrs) == len(unet_lrs) == 4 and controlnet_lrs[0] == pytest.approx(1e-4)
    assert all(u == pytest.approx(c / 5) for c, u in zip(controlnet_lrs, unet_lrs))


@pytest.mark.slow
def test_trains_on_precomputed_latents(tmp_path, ray_session, mlflow_server, fill50k_parquet, tiny_base_dir):
    from pipelines.precompute import PrecomputeConfig, run_precompute

    pre = run_precompute(
        PrecomputeConfig(data=str(fill50k_parquet), output=str(tmp_path / "pre"), work_dir=str(tmp_path))
    )
    config = train_config(
        tmp_path,
        Path(pre.output),
        mlflow_server,
        num_workers=1,
        cpus_per_worker=1,
        max_steps=2,
        checkpoint_every=2,
        num_validation=1,
        validate_every=0,
        registered_model=None,
    )
    result = run_train(config)
    assert result.steps == 2 and np.isfinite(result.metrics["loss"])
    generate_with_stock_diffusers(tiny_base_dir, result.controlnet_dir)
