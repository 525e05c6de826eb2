"""``zeroconv pretrain-base``: build the ``shapes`` demo base from scratch, reproducibly from one seed.

A text-to-image Stable Diffusion of the tiny size that has learnt one thing, Fill50K-style images (a
circle of a named colour on a background of another, :mod:`pipelines.data.synthetic`), so that a
ControlNet trained on top of it has something to control. Phases, each writing under
``work_dir/pretrain-base`` (a phase whose output exists for the same settings is not redone, so a
re-run resumes):

1. ``vae``   - a stock ``AutoencoderKL`` downsampling x4, in a plain loop (:mod:`pipelines.pretrain_vae`);
2. ``init``  - the starting base: the ``tiny`` preset's text encoder, CLIP tokenizer, scheduler and
               random UNet (32, 64) over the new VAE (32 px images -> 8x8x4 latents);
3. ``data``  - Fill50K-style rows as annotated Parquet;
4. ``train`` - the UNet through ``zeroconv train policy=pretrain`` (Ray Train + DeepSpeed): every UNet
               weight at ``lr``, Min-SNR-gamma weighting, offset noise, caption dropout, EMA exported;
5. ``out``   - the init base with the EMA UNet, every weight as fp16 safetensors (loads to fp32), plus
               ``base.json`` (the command, seed, steps, times, losses, VAE PSNR, prompted-colour
               accuracy, zeroconv commit) and ``samples.png``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

from pydantic import Field, field_validator

from pipelines.common.config import JobConfig, MLflowConfig, PathStr
from pipelines.common.storage import is_s3
from pipelines.common.tracking import RUN_FILE

RECORD_FILE = "base.json"
SAMPLES_FILE = "samples.png"


class PretrainBaseConfig(JobConfig):
    """Build a small text-to-image base (VAE, then UNet on Ray Train) on Fill50K-style data from one seed."""

    out: PathStr = Field(default="runs/shapes-base", description="Local folder for the finished diffusers base.")
    seed: int = Field(default=0, description="Seed of every phase: VAE init and batches, data, UNet training.")
    resolution: int = Field(default=32, ge=8, description="Image size in pixels (latents are a quarter of it).")
    vae_steps: int = Field(default=4000, ge=1, description="Autoencoder optimizer steps.")
    vae_batch_size: int = Field(default=32, ge=1, description="Autoencoder batch (fresh images every step).")
    vae_lr: float = Field(default=2e-3, gt=0, description="Autoencoder peak learning rate (one-cycle schedule).")
    vae_kl_weight: float = Field(default=1e-6, ge=0, description="Weight of the posterior's KL term.")
    rows: int = Field(default=8192, ge=1, description="Rows of the UNet's Parquet dataset.")
    steps: int = Field(default=3500, ge=1, description="UNet optimizer steps.")
    batch_size: int = Field(default=64, ge=1, description="UNet micro-batch per worker.")
    lr: float = Field(default=1e-3, gt=0, description="UNet learning rate.")
    snr_gamma: float = Field(default=5.0, ge=0, description="Min-SNR-gamma loss weighting (0: off).")
    offset_noise: float = Field(default=0.1, ge=0, description="Offset noise std (0: off).")
    prompt_dropout: float = Field(
        default=0.1, ge=0, le=1, description="Caption dropout (for classifier-free guidance)."
    )
    ema_decay: float = Field(default=0.999, gt=0, lt=1, description="EMA decay of the exported UNet.")
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers for the UNet.")
    mlflow: MLflowConfig = MLflowConfig()

    @field_validator("resolution")
    @classmethod
    def _multiple_of_4(cls, value: int) -> int:
        if value % 4:
            raise ValueError(f"must be a multiple of 4 (the VAE downsamples by 4), got {value}")
        return value


def run_pretrain_base(config: PretrainBaseConfig) -> str:
    if is_s3(config.work_dir) or is_s3(config.out):
        raise ValueError("pretrain-base writes local folders: give a local work_dir and out")
    work = Path(config.work_dir).resolve() / "pretrain-base"  # absolute: Ray workers run in another directory
    times = {}
    started = time.perf_counter()
    vae = pretrain_vae(config, work / "vae")
    times["vae_s"] = vae["seconds"]
    init = build_init_base(config, work / "vae", work / "init")
    data = write_data(config, work / "data")
    phase = time.perf_counter()
    unet = pretrain_unet(config, init, data, work)
    times["unet_s"] = round(time.perf_counter() - phase, 1)
    out = Path(config.out)
    assemble(init, Path(unet["unet_dir"]), out)
    quality = check_base(out, config.seed)
    record = {
        "command": "zeroconv pretrain-base " + " ".join(f"{k}={v}" for k, v in changed_settings(config).items()),
        "seed": config.seed,
        "settings": config.model_dump(exclude={"mlflow", "ray", "storage", "work_dir", "out"}),
        "vae": {k: vae[k] for k in ("steps", "loss", "psnr_db", "scaling_factor")},
        "unet": {"steps": unet["steps"], "loss": unet["loss"]},
        "prompted_colour_accuracy": quality,
        "wall_s": {**times, "total_s": round(time.perf_counter() - started, 1)},
        "zeroconv_commit": zeroconv_commit(),
    }
    (out / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return (
        f"base written to {out} (VAE {vae['psnr_db']:.1f} dB, UNet loss {unet['loss']:.4f}, "
        f"prompted colours right: background {quality['background']:.0%}, circle {quality['circle']:.0%}); "
        f"use it with base_model.source={out}"
    )


def changed_settings(config: PretrainBaseConfig) -> dict:
    """The fields the user set away from their defaults: the command that reproduces this run."""
    defaults = PretrainBaseConfig()
    return {
        k: v for k, v in config.model_dump(exclude={"mlflow", "ray", "storage"}).items() if v != getattr(defaults, k)
    }


def tracking_uri(config: PretrainBaseConfig) -> str:
    from pipelines.common.tracking import resolve_tracking_uri

    return resolve_tracking_uri(config.mlflow.tracking_uri, config.work_dir)


def phase_marker(folder: Path) -> Path:
    """Where a phase records the settings that made ``folder`` and its result: beside it, not inside (the data
    phase's folder must hold only Parquet)."""
    return folder.with_name(folder.name + ".done.json")


def phase_done(folder: Path, settings: dict) -> dict | None:
    """The result a phase recorded for ``folder`` with exactly these settings; None: not done, or other settings."""
    marker = phase_marker(folder)
    if marker.is_file():
        recorded = json.loads(marker.read_text())
        if recorded.get("settings") == settings:
            return recorded.get("result", {})
    return None


def mark_done(folder: Path, settings: dict, result: dict) -> dict:
    phase_marker(folder).write_text(json.dumps({"settings": settings, "result": result}, indent=2))
    return result


# ---------------------------------------------------------------------------------------------
# Phases
# ---------------------------------------------------------------------------------------------


def pretrain_vae(config: PretrainBaseConfig, folder: Path) -> dict:
    """Phase 1: train the autoencoder (console progress; loss and PSNR to an MLflow run)."""
    import torch

    from pipelines.common import console, tracking
    from pipelines.common.storage import resolve
    from pipelines.pretrain_vae import train_vae

    settings = {
        "resolution": config.resolution,
        "steps": config.vae_steps,
        "batch_size": config.vae_batch_size,
        "lr": config.vae_lr,
        "kl_weight": config.vae_kl_weight,
        "seed": config.seed,
    }
    if (done := phase_done(folder, settings)) is not None:
        return done
    uri = tracking_uri(config)
    run_id = tracking.open_run(uri, config.mlflow.experiment, resolve(str(folder)), "pretrain-vae", settings)
    tracker = tracking.Tracker(uri, run_id)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions: the same seed gives the same VAE
    try:
        with console.progress(config.vae_steps, "vae", "step") as bar:

            def on_step(step: int, loss: float) -> None:
                bar.update(1, loss=loss)
                if step % 10 == 0:
                    tracker.log_metrics({"loss": loss}, step)

            result = train_vae(**settings, on_step=on_step)
    except BaseException:
        tracking.close_run(uri, run_id, ok=False)
        raise
    finally:
        torch.set_num_threads(threads)
    tracker.log_metrics({"psnr_db": result.psnr_db, "scaling_factor": result.scaling_factor}, result.steps)
    tracking.close_run(uri, run_id, ok=True)
    result.vae.save_pretrained(folder)
    summary = {
        "steps": result.steps,
        "loss": round(result.loss, 5),
        "psnr_db": round(result.psnr_db, 2),
        "scaling_factor": result.scaling_factor,
        "seconds": round(result.seconds, 1),
    }
    return mark_done(folder, settings, summary)


def build_init_base(config: PretrainBaseConfig, vae_dir: Path, folder: Path) -> Path:
    """Phase 2: the tiny preset with the trained VAE in place of its own (its UNet already fits 8x8 latents)."""
    from model.base import build_tiny

    settings = {"vae": json.loads(phase_marker(vae_dir).read_text())}
    if phase_done(folder, settings) is not None:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    build_tiny(folder)
    shutil.rmtree(folder / "vae")
    shutil.copytree(vae_dir, folder / "vae", ignore=shutil.ignore_patterns(RUN_FILE))
    mark_done(folder, settings, {})
    return folder


def write_data(config: PretrainBaseConfig, folder: Path) -> Path:
    """Phase 3: the UNet's training rows (another seed's stream than the VAE's batches)."""
    from pipelines.data.synthetic import write_fill50k_parquet

    settings = {"rows": config.rows, "resolution": config.resolution, "seed": config.seed + 1}
    if phase_done(folder, settings) is None:
        shutil.rmtree(folder, ignore_errors=True)
        write_fill50k_parquet(folder, config.rows, config.resolution, config.seed + 1, shards=4)
        mark_done(folder, settings, {})
    return folder


def pretrain_unet(config: PretrainBaseConfig, init: Path, data: Path, work: Path) -> dict:
    """Phase 4: ``zeroconv train policy=pretrain`` (resumes from its own checkpoints on a re-run)."""
    import mlflow

    from pipelines.train import run_train
    from pipelines.train_config import TrainConfig

    train_config = TrainConfig(
        data=str(data),
        base_model={"source": str(init)},
        policy="pretrain",
        run_name="pretrain-unet",
        work_dir=str(work),
        storage_path=str(work / "train"),
        registered_model="",
        num_workers=config.num_workers,
        max_steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        weight_decay=0.0,
        lr_schedule="cosine",
        warmup_steps=min(100, config.steps // 10),
        snr_gamma=config.snr_gamma,
        offset_noise=config.offset_noise,
        prompt_dropout=config.prompt_dropout,
        ema=True,
        ema_decay=config.ema_decay,
        seed=config.seed,
        checkpoint_every=max(config.steps // 4, 1),
        log_every=max(config.steps // 100, 1),
        validate_every=0,
        num_validation=4,
        # The same MLflow store as the VAE phase (its default lives under the user's work_dir, not this one).
        mlflow=config.mlflow.model_copy(update={"tracking_uri": tracking_uri(config)}),
        ray=config.ray,
        storage=config.storage,
    )
    result = run_train(train_config)
    # The last loss the workers logged (a re-run of a finished training trains no step, so its own result has none).
    history = mlflow.MlflowClient(train_config.mlflow.tracking_uri).get_metric_history(result.mlflow_run_id, "loss")
    loss = max(history, key=lambda m: m.step).value
    return {"unet_dir": result.unet_dir, "steps": result.steps, "loss": round(loss, 5)}


def assemble(init: Path, unet_dir: Path, out: Path) -> None:
    """Phase 5: the init base with the trained UNet, every weight fp16 (a third of the size; loads to fp32)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from model.base import save_text_encoder

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(init / name, tmp / name)
    shutil.copy(init / "model_index.json", tmp / "model_index.json")
    UNet2DConditionModel.from_pretrained(unet_dir).to(torch.float16).save_pretrained(tmp / "unet")
    AutoencoderKL.from_pretrained(init / "vae").to(torch.float16).save_pretrained(tmp / "vae")
    save_text_encoder(CLIPTextModel.from_pretrained(init / "text_encoder").to(torch.float16), tmp / "text_encoder")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def check_base(base_dir: Path, seed: int, seeds: int = 2) -> dict[str, float]:
    """Generate every caption the data can have (``seeds`` images each) and score the colours; write a grid."""
    from model.families import load
    from model.inference import text_to_image
    from pipelines.common.images import encode_png
    from pipelines.data.synthetic import colour_prompts, prompted_colour_accuracy

    base = load(str(base_dir))
    prompts = colour_prompts() * seeds
    images = text_to_image(base, prompts, seed=seed)
    # Samples: 8 rows (a circle colour each) x 7 background colours, first seed.
    grid = images[:56].reshape(8, 7, *images.shape[1:]).transpose(0, 2, 1, 3, 4)
    (base_dir / SAMPLES_FILE).write_bytes(encode_png(grid.reshape(8 * images.shape[1], 7 * images.shape[2], 3)))
    return {k: round(v, 3) for k, v in prompted_colour_accuracy(images, prompts).items()} | {"images": len(prompts)}


def zeroconv_commit() -> str | None:
    """The git commit of the zeroconv source that ran (None outside a git checkout)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
