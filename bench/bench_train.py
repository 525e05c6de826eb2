"""Training throughput: a plain PyTorch ControlNet loop vs zeroconv's job (Ray Train + DeepSpeed), one run.

Same tiny model, same Fill50K-style data (64 px), same micro-batch, one CPU thread per process:

* plain:    the step diffusers' ``train_controlnet.py`` takes - VAE encode, text encode, noise,
            ControlNet + UNet, MSE, backward, grad clip, AdamW - on batches decoded into memory first
            (the most favourable baseline: no data loading inside the timed loop). It runs before and
            after the Ray runs; its rate is the mean of the two, so machine noise hits both sides.
* zeroconv: ``run_train`` - each worker reading its share of the Parquet files in the resumable epoch
            order, DeepSpeed ZeRO-2, prompt dropout, checkpoint at the end - with 1 worker (the
            comparison) and 2 workers (gloo, shown too).
            Its rate is the loop's own steady-state metric (``steady_samples_per_s``: the training
            steps' time, leaving out the first steps after start; not Ray/DeepSpeed start-up).

    python bench/bench_train.py [--steps 200] [--batch 8] [--rows 256]

Prints one JSON object. Peak RSS: the plain loop's process; for zeroconv each worker's own process
(Ray's raylet, GCS and object store are not counted). Target: zeroconv >= 0.85x plain.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

WARMUP_STEPS = 10
TARGET_RATIO = 0.85


def plain_pytorch(data: Path, steps: int, batch: int, seed: int = 0) -> float:
    """samples/s of the minimal loop over ``steps`` steps after WARMUP_STEPS."""
    import pyarrow.parquet as pq
    import torch.nn.functional as F
    from diffusers import ControlNetModel, DDPMScheduler, StableDiffusionPipeline

    from model.base import TINY, resolve_base_dir
    from pipelines.common.images import decode_condition, decode_rgb

    torch.manual_seed(seed)
    base = StableDiffusionPipeline.from_pretrained(resolve_base_dir(TINY), safety_checker=None)
    unet, vae, text_encoder = base.unet, base.vae, base.text_encoder
    scheduler = DDPMScheduler.from_config(base.scheduler.config)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    controlnet = ControlNetModel.from_unet(unet)
    unet.requires_grad_(False)
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=1e-5, weight_decay=1e-2)

    table = pq.read_table(data)
    images = torch.from_numpy(np.stack([decode_rgb(b) for b in table.column("image").to_pylist()]))
    conditions = torch.from_numpy(
        np.stack([decode_condition(b) for b in table.column("conditioning_image").to_pylist()])
    )
    captions = table.column("text").to_pylist()
    pixels_all = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    cond_all = conditions.permute(0, 3, 1, 2).float() / 255

    started = 0.0
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            started = time.perf_counter()
        idx = torch.randint(0, len(captions), (batch,))
        with torch.no_grad():
            latents = vae.encode(pixels_all[idx]).latent_dist.sample() * vae.config.scaling_factor
            ids = base.tokenizer(
                [captions[i] for i in idx],
                padding="max_length",
                truncation=True,
                max_length=base.tokenizer.model_max_length,
                return_tensors="pt",
            ).input_ids
            text = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        down, mid = controlnet(
            noisy, timesteps, encoder_hidden_states=text, controlnet_cond=cond_all[idx], return_dict=False
        )
        pred = unet(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - started)


def zeroconv(data: Path, work: Path, steps: int, batch: int, workers: int) -> dict:
    from pipelines.common.config import BaseModelConfig, MLflowConfig
    from pipelines.train import TrainConfig, run_train

    started = time.perf_counter()
    result = run_train(
        TrainConfig(
            data=str(data),
            work_dir=str(work),
            base_model=BaseModelConfig(source="tiny"),
            run_name=f"bench-{workers}",
            num_workers=workers,
            cpus_per_worker=1.0 if workers == 1 else 0.5,
            zero_stage=2,
            batch_size=batch,
            max_steps=WARMUP_STEPS + steps,
            checkpoint_every=WARMUP_STEPS + steps,
            log_every=50,
            num_validation=0,
            registered_model=None,
            mlflow=MLflowConfig(tracking_uri=f"sqlite:///{work}/mlflow.db", experiment="bench"),
        )
    )
    return {
        "samples_per_s": round(result.metrics["steady_samples_per_s"], 2),
        "peak_rss_mb_per_worker": round(result.metrics["peak_rss_mb"], 1),
        "job_wall_s": round(time.perf_counter() - started, 1),
    }


@contextlib.contextmanager
def local_ray():
    """A local Ray for this process, stopped with every process it started: ``ray.shutdown()`` alone can
    leave a worker that is still exiting (e.g. Ray Train's ``TrainController`` actor) orphaned, so the
    processes are recorded first and any survivor is stopped by its PID. Its session folder goes too."""
    import shutil

    import psutil
    import ray

    temp_dir = tempfile.mkdtemp(prefix="zc-ray-", dir="/tmp")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=temp_dir)
    try:
        yield
    finally:
        started = psutil.Process().children(recursive=True)  # GCS, raylet and, below it, every worker
        ray.shutdown()
        _, alive = psutil.wait_procs(started, timeout=10)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(temp_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="micro-batch per worker")
    parser.add_argument("--rows", type=int, default=256, help="dataset rows (64 px Fill50K-style)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a Ray worker with 1 CPU runs torch on one thread: the same here

    from pipelines.data.synthetic import write_fill50k_parquet

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        data = write_fill50k_parquet(Path(tmp) / "data", n=args.rows, size=64, seed=0, shards=2)
        plain_before = plain_pytorch(data, args.steps, args.batch)
        plain_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        with local_ray():
            ours = zeroconv(data, Path(tmp) / "one", args.steps, args.batch, workers=1)
            two = zeroconv(data, Path(tmp) / "two", args.steps, args.batch, workers=2)
        plain_after = plain_pytorch(data, args.steps, args.batch)
    plain = (plain_before + plain_after) / 2
    print(
        json.dumps(
            {
                "benchmark": "train_step_throughput",
                "model": "tiny",
                "resolution": 64,
                "micro_batch": args.batch,
                "timed_steps": args.steps,
                "threads_per_process": 1,
                "plain_pytorch": {
                    "samples_per_s": round(plain, 2),
                    "runs": [round(plain_before, 2), round(plain_after, 2)],
                    "peak_rss_mb": round(plain_rss, 1),
                },
                "zeroconv_1_worker": ours,
                "ratio": round(ours["samples_per_s"] / plain, 3),
                "target_ratio": TARGET_RATIO,
                "meets_target": ours["samples_per_s"] / plain >= TARGET_RATIO,
                "zeroconv_2_workers": {
                    **two,
                    "note": "global samples/s; 2 gloo workers share this machine's 2 cores with Ray Data",
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
