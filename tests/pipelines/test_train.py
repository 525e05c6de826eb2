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


def trained_samples(record_dir: Path) -> dict[int, list[str]]:
    """Sample ids per step over all ranks, from the debug recorder (one micro-batch per step); a step
    replayed after a restart counts once, with what it trained on the last time."""
    per_step: dict[int, list[str]] = {}
    for file in sorted(record_dir.glob("samples_rank*.jsonl")):
        last = {entry["step"]: entry["ids"] for entry in map(json.loads, file.read_text().splitlines())}
        for step, ids in last.items():
            per_step.setdefault(step, []).extend(ids)
    return per_step


@pytest.mark.slow
def test_worker_killed_mid_run_resumes_where_it_stopped_and_rerun_continues(
    tmp_path, ray_session, mlflow_server, fill50k_parquet
):
    """Rank 1 dies (os._exit) right before step 6, once; the checkpoint at step 4 is the latest committed.
    32 rows, 2 workers x batch 2 = 4 samples a step: an epoch is 8 steps. The resumed run continues the
    epoch where the checkpoint left it: over steps 1-8 every sample is trained on exactly once."""
    import pyarrow.parquet as pq

    config = train_config(
        tmp_path,
        fill50k_parquet,
        mlflow_server,
        max_steps=8,
        checkpoint_every=2,
        shuffle_buffer=8,
        max_failures=1,
        validate_every=0,
        num_validation=0,
        ema=True,
        registered_model=None,
        debug={"fail_at_step": 6, "record_samples": str(tmp_path / "samples")},
    )
    first = run_train(config)

    assert (tmp_path / "work" / "train" / "test-run" / "failure_injected").exists(), "the failure never happened"
    assert first.steps == 8
    # Every step logged once per attempt: 1-5 by the first worker group, 5-8 again by the restarted one
    # (step 5 trained after the step-4 checkpoint and before the crash is trained again).
    assert metric_steps(mlflow_server, first.mlflow_run_id) == [1, 2, 3, 4, 5, 5, 6, 7, 8]
    samples = trained_samples(tmp_path / "samples")
    assert sorted(samples) == list(range(1, 9)) and all(len(ids) == 4 for ids in samples.values())
    epoch = [i for step in range(1, 9) for i in samples[step]]
    assert sorted(epoch) == sorted(pq.read_table(fill50k_parquet, columns=["id"]).column("id").to_pylist())
    assert first.model_version is None

    # Re-running the same run name continues it (same checkpoints, same MLflow run) into the next epoch.
    second = run_train(config.model_copy(update={"max_steps": 10}))
    assert second.steps == 10
    assert second.mlflow_run_id == first.mlflow_run_id
    assert metric_steps(mlflow_server, second.mlflow_run_id)[-2:] == [9, 10]


@pytest.mark.slow
def test_resumes_on_fewer_workers_with_weights_and_schedule_intact(
    tmp_path, ray_session, mlflow_server, fill50k_parquet
):
    """2 workers train 4 steps (ZeRO-2, 10 warmup steps); the same run continues on 1 worker. The
    checkpoint is world-size-free: at step 4 the 1-worker group holds exactly the weights the 2 workers
    saved, and steps 5-6 continue the step history, the lr warmup and the loss."""
    import mlflow
    from safetensors.torch import load_file

    config = train_config(
        tmp_path,
        fill50k_parquet,
        mlflow_server,
        max_steps=4,
        checkpoint_every=4,
        warmup_steps=10,
        validate_every=0,
        num_validation=0,
        registered_model=None,
    )
    two = run_train(config)
    saved = load_file(Path(two.controlnet_dir) / "diffusion_pytorch_model.safetensors")

    one = run_train(config.model_copy(update={"num_workers": 1, "cpus_per_worker": 1}))  # nothing left to train
    assert one.steps == 4 and one.mlflow_run_id == two.mlflow_run_id
    restored = load_file(Path(one.controlnet_dir) / "diffusion_pytorch_model.safetensors")
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)

    longer = run_train(config.model_copy(update={"num_workers": 1, "cpus_per_worker": 1, "max_steps": 6}))
    assert longer.steps == 6
    client = mlflow.MlflowClient(mlflow_server)
    assert metric_steps(mlflow_server, longer.mlflow_run_id) == [1, 2, 3, 4, 5, 6]
    lrs = {m.step: m.value for m in client.get_metric_history(longer.mlflow_run_id, "lr_controlnet")}
    # After step k the warmup is at k/10 of lr 1e-4: it continues at 5/10, 6/10 (a restart would give 1/10).
    assert [lrs[k] for k in (4, 5, 6)] == pytest.approx([4e-5, 5e-5, 6e-5])
    losses = {m.step: m.value for m in client.get_metric_history(longer.mlflow_run_id, "loss")}
    before = np.mean([losses[s] for s in (1, 2, 3, 4)])
    assert all(np.isfinite(losses[s]) and losses[s] < 3 * before for s in (5, 6)), losses


def informative_tiny_base(out_dir: Path, images: np.ndarray) -> Path:
    """The built-in tiny SD with a VAE whose latents carry the image.

    The tiny VAE is random: its posterior std (~0.19 after scaling) dwarfs how much the posterior mean
    varies between images (~0.025), so a latent is mostly sampling noise and no condition can predict
    it. A near-deterministic posterior (logvar -20) and unit-variance scaling make the latent a
    function of the image, as in a trained VAE; the UNet and text encoder stay the random tiny ones.
    """
    from diffusers import AutoencoderKL

    from model.base import build_tiny

    build_tiny(out_dir)
    vae = AutoencoderKL.from_pretrained(out_dir / "vae")
    with torch.no_grad():
        vae.quant_conv.weight[vae.config.latent_channels :] = 0
        vae.quant_conv.bias[vae.config.latent_channels :] = -20.0
        pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        mean = vae.encode(pixels).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / mean.std()))
    vae.save_pretrained(out_dir / "vae")
    return out_dir


def denoising_losses(base, controlnet, samples, repeats: int = 4) -> dict[str, float]:
    """Loss with each sample's own condition vs with the conditions rolled across the batch; the
    same noise and timesteps (one generator seed) for both."""
    from pipelines.data.tensors import condition_tensor

    fam = base.family
    model = fam.controlled(base, [controlnet]).eval()
    images = torch.from_numpy(np.stack([s.image for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    conditions = condition_tensor(np.stack([s.condition for s in samples]))
    with torch.no_grad():
        latents = fam.encode_images(base, images)
        text = fam.encode_prompts(base, [s.text for s in samples], (64, 64))
    losses = {}
    for name, conds in (("true", conditions), ("shuffled", conditions.roll(1, 0))):
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            losses[name] = float(
                np.mean([fam.loss(model, base, latents, text, [conds], generator=generator) for _ in range(repeats)])
            )
    return losses


@pytest.mark.slow
def test_control_is_learned_on_fill50k(tmp_path, ray_session, mlflow_server):
    """Condition = circle outline, target = the filled circle: after a short run the true outlines
    explain the images clearly better than outlines shuffled across the batch (at init they are
    exactly equal: the zero convolutions make the condition irrelevant).

    Measured on the 32 training samples: on the random tiny model, using the condition for unseen
    circles takes far more steps than a test can spend (see docs/training.md)."""
    from diffusers import ControlNetModel

    from model.families import load
    from pipelines.data.synthetic import fill50k, write_fill50k_parquet

    samples = fill50k(32, size=64, seed=0)
    base_dir = informative_tiny_base(tmp_path / "base", np.stack([s.image for s in samples]))
    data = write_fill50k_parquet(tmp_path / "fill50k", n=32, size=64, seed=0)
    config = train_config(
        tmp_path,
        data,
        mlflow_server,
        base_model=BaseModelConfig(source=str(base_dir)),
        num_workers=1,
        cpus_per_worker=1,
        batch_size=8,
        max_steps=800,
        lr=3e-3,
        checkpoint_every=800,
        log_every=50,
        validate_every=0,
        num_validation=0,
        registered_model=None,
    )
    result = run_train(config)

    base = load(str(base_dir))
    at_init = denoising_losses(base, base.family.new_controlnet(base), samples)
    assert at_init["true"] == at_init["shuffled"]
    trained = denoising_losses(base, ControlNetModel.from_pretrained(result.controlnet_dir), samples)
    print(
        f"denoising loss at init {at_init['true']:.4f}; trained: true conditions {trained['true']:.4f}, "
        f"shuffled {trained['shuffled']:.4f}"
    )
    assert trained["true"] < at_init["true"]
    assert trained["true"] < 0.95 * trained["shuffled"], trained  # measured: 0.320 vs 0.366


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
