"""`zeroconv pretrain-base`: the recipe that makes the shapes base still trains (a short run of every phase)."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipelines.common.config import MLflowConfig
from pipelines.pretrain_base import RECORD_FILE, SAMPLES_FILE, PretrainBaseConfig, run_pretrain_base


def test_pretrain_base_short_run_trains_every_phase_and_writes_a_stock_diffusers_base(tmp_path, ray_session):
    import mlflow
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    config = PretrainBaseConfig(
        out=str(tmp_path / "base"),
        work_dir=str(tmp_path / "work"),
        vae_steps=30,
        vae_batch_size=8,
        rows=64,
        steps=40,
        batch_size=8,
        lr=2e-3,
        # MLflow without a server (SQLite): the phases log there exactly as to a server.
        mlflow=MLflowConfig(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="test-pretrain"),
    )
    message = run_pretrain_base(config)
    out = tmp_path / "base"
    assert str(out) in message
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["seed"] == 0 and record["unet"]["steps"] == 40 and record["vae"]["steps"] == 30
    assert "steps=40" in record["command"] and "vae_steps=30" in record["command"]
    assert (out / SAMPLES_FILE).stat().st_size > 0

    # The UNet trained through `zeroconv train policy=pretrain`: its logged loss fell.
    client = mlflow.MlflowClient(config.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name("test-pretrain")
    (unet_run,) = client.search_runs([experiment.experiment_id], "attributes.run_name = 'pretrain-unet'")
    losses = [m.value for m in sorted(client.get_metric_history(unet_run.info.run_id, "loss"), key=lambda m: m.step)]
    assert len(losses) >= 10
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    assert unet_run.data.params["policy"] == "pretrain" and unet_run.data.params["snr_gamma"] == "5.0"
    # The VAE's scaling factor was measured (1 / latent std), not left at diffusers' default of 0.18215.
    vae_config = json.loads((out / "vae" / "config.json").read_text())
    assert vae_config["block_out_channels"] == [16, 32, 64]
    assert vae_config["scaling_factor"] == record["vae"]["scaling_factor"] != 0.18215

    # The stock pipeline loads it and generates a 32 px image; every weight shipped is fp16.
    for part in ("unet", "vae", "text_encoder"):
        from safetensors import safe_open

        (weights,) = (out / part).glob("*.safetensors")
        with safe_open(weights, "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}, part
    pipe = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe("red circle with blue background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()

    # A re-run finds every phase done for the same settings: nothing retrains (the VAE phase keeps its marker).
    marker = tmp_path / "work" / "pretrain-base" / "vae.done.json"
    before = marker.stat().st_mtime_ns
    run_pretrain_base(config)
    assert marker.stat().st_mtime_ns == before
