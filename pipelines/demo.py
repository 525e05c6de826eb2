"""``zeroconv demo``: the whole product, end to end, on this machine, with the built-in tiny model.

    1. base       build the tiny Stable Diffusion; show the zero-convolution identity (y_c == y at step 0)
    2. data       write Fill50K-style images (plus a few broken files) and a held-out set
    3. pipeline   `zeroconv pipeline run`: annotate -> train (Ray Train + DeepSpeed) -> register -> evaluate -> promote
    4. serve      `zeroconv serve`: Ray Serve loads models:/NAME@champion; one real HTTP request; image saved

Every step calls the same ``run_<stage>`` function a user or a scheduler would; only the synthetic
input is demo-specific. Re-running resumes: finished stages are skipped.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch
from pydantic import Field

from pipelines.common.config import BaseModelConfig, JobConfig, MLflowConfig

MODEL_NAME = "zeroconv-demo"


class DemoConfig(JobConfig):
    """The demo's knobs; everything else uses each stage's own defaults, sized for the tiny model."""

    work_dir: str = Field(default="demo-output", description="where the demo writes everything")
    base_model: BaseModelConfig = BaseModelConfig()
    mlflow: MLflowConfig = MLflowConfig(experiment="zeroconv-demo")
    images: int = Field(default=256, ge=8, description="synthetic training images (plus 4 broken files)")
    heldout: int = Field(default=16, ge=1, description="held-out images for evaluation")
    train_steps: int = Field(default=120, ge=1, description="training steps")
    lr: float = Field(
        default=2e-4, gt=0, description="ControlNet learning rate (higher than the paper's 1e-5: a short CPU run)"
    )
    serve: bool = Field(default=True, description="serve the promoted model and send one HTTP request")
    fresh: bool = Field(default=False, description="delete work_dir first instead of resuming")
    seed: int = Field(default=0, description="random seed for the synthetic data")


def _say(step: str, text: str) -> None:
    print(f"[demo] {step:<9} {text}", flush=True)


def show_zero_conv_identity(config: DemoConfig) -> float:
    """Build the base model and a ControlNet from it; the controlled UNet equals the plain one exactly."""
    from model.base import load_base
    from model.controlnet import ControlledUNet, controlnet_from_unet
    from pipelines.data.synthetic import fill50k
    from pipelines.data.tensors import condition_tensor

    base = load_base(config.base_model.source)
    params = {n: sum(p.numel() for p in getattr(base, n).parameters()) for n in ("unet", "vae", "text_encoder")}
    _say("base", f"{config.base_model.source} -> {base.local_dir} ({base.resolution}px, parameters {params})")
    samples = fill50k(4, base.resolution, config.seed)
    g = torch.Generator().manual_seed(config.seed)
    latents = torch.randn(len(samples), 4, base.unet.config.sample_size, base.unet.config.sample_size, generator=g)
    t = torch.full((len(samples),), 500)
    text = base.encode_prompts([s.text for s in samples])
    conditions = [condition_tensor(np.stack([s.condition for s in samples]))]
    with torch.no_grad():
        plain = base.unet(latents, t, encoder_hidden_states=text).sample
        controlnet = controlnet_from_unet(base.unet, base.vae_scale_factor)
        controlled = ControlledUNet(base.unet, [controlnet])(latents, t, text, conditions)
    diff = float((plain - controlled).abs().max())
    _say(
        "identity",
        f"max |UNet + ControlNet - UNet| at step 0 = {diff} (zero convolutions: training starts from the base model)",
    )
    return diff


def make_data(config: DemoConfig, work: Path) -> tuple[Path, Path]:
    from pipelines.data.synthetic import write_image_folder

    incoming = work / "incoming"
    write_image_folder(incoming / "batch-0001", config.images, size=64, seed=config.seed, broken=True)
    heldout = write_image_folder(
        work / "heldout-images", config.heldout, size=64, seed=config.seed + 10_000, broken=False
    )
    _say(
        "data",
        f"{config.images} Fill50K-style images + 4 broken files in {incoming}/batch-0001; "
        f"{config.heldout} held-out in {heldout}",
    )
    return incoming, heldout


def pipeline_config(config: DemoConfig, work: Path, incoming: Path):
    from pipelines.pipeline import PipelineConfig

    return PipelineConfig.model_validate(
        {
            "work_dir": str(work),
            "storage": config.storage.model_dump(),
            "ray": config.ray.model_dump(),
            "mlflow": config.mlflow.model_dump(),
            "annotate": {"input": str(incoming), "resolution": 64, "min_side": 32, "shard_size": 64},
            "train": {
                "base_model": config.base_model.model_dump(),
                "run_name": "demo",
                "registered_model": MODEL_NAME,
                "num_workers": 1,
                "batch_size": 8,
                "max_steps": config.train_steps,
                "lr": config.lr,
                "checkpoint_every": max(1, config.train_steps // 2),
                "log_every": 10,
                "validate_every": 0,
                "num_validation": 4,
                "validation_steps": 10,
            },
            "evaluate": {"data": str(work / "heldout"), "limit": config.heldout, "steps": 10, "grid_samples": 8},
            "promote": {"margin": 0.0},
        }
    )


def annotate_heldout(config: DemoConfig, work: Path, heldout_images: Path) -> None:
    from pipelines.annotate import AnnotateConfig, run_annotate

    run_annotate(
        AnnotateConfig.model_validate(
            {
                "work_dir": str(work),
                "storage": config.storage.model_dump(),
                "ray": config.ray.model_dump(),
                "input": str(heldout_images),
                "output": str(work / "heldout"),
                "resolution": 64,
                "min_side": 32,
            }
        )
    )


def serve_one_request(config: DemoConfig, work: Path) -> Path:
    """Serve models:/NAME@champion over HTTP on 127.0.0.1, ask for one image, save it next to its condition."""
    from PIL import Image

    from deploy.app import ServeConfig, run_serve
    from pipelines.common.images import decode_condition, encoded_bytes

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = run_serve(
        ServeConfig.model_validate(
            {
                "work_dir": str(work),
                "mlflow": config.mlflow.model_dump(),
                "models": [MODEL_NAME],
                "port": port,
                "block": False,
                "reload_interval_s": 0,
            }
        )
    )
    try:
        import pyarrow.parquet as pq

        row = pq.read_table(work / "heldout", columns=["text", "conditioning_image"]).slice(0, 1).to_pylist()[0]
        body = json.dumps(
            {
                "prompt": row["text"],
                "seed": 0,
                "steps": 20,
                "guidance_scale": 9.0,
                "controls": [{"image": base64.b64encode(encoded_bytes(row["conditioning_image"])).decode()}],
            }
        ).encode()
        request = urllib.request.Request(
            f"{served.url}/v1/generate", data=body, headers={"Content-Type": "application/json"}
        )
        started = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
        elapsed = time.perf_counter() - started
    finally:
        served.stop()
    generated = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["image"]))).convert("RGB"))
    condition = decode_condition(row["conditioning_image"], channels=3)
    out = work / "generated.png"
    Image.fromarray(np.concatenate([condition, generated], axis=1)).resize((256, 128), Image.NEAREST).save(out)
    _say(
        "serve",
        f"POST {served.url}/v1/generate {row['text']!r} -> 200 in {elapsed * 1000:.0f} ms "
        f"({answer['models'][0]['name']} v{answer['models'][0]['version']}); condition | generated saved to {out}",
    )
    return out


def run_demo(config: DemoConfig) -> str:
    from pipelines.common.cluster import ensure_ray
    from pipelines.pipeline import run_pipeline

    started = time.time()
    work = Path(config.work_dir).resolve()
    if config.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    summary: dict = {"identity_max_abs_diff": show_zero_conv_identity(config)}
    incoming, heldout_images = make_data(config, work)
    ensure_ray(config.ray)
    annotate_heldout(config, work, heldout_images)
    result = run_pipeline(pipeline_config(config, work, incoming))
    _say("pipeline", str(result).replace("\n", "\n" + " " * 17))
    summary["pipeline"] = result.steps
    for manifest in sorted((work / "annotated").rglob("_manifest.json")):
        summary.setdefault("manifests", {})[str(manifest.relative_to(work))] = json.loads(manifest.read_text())[
            "counts"
        ]
    if config.serve:
        summary["generated"] = str(serve_one_request(config, work))
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return (
        f"demo finished in {time.time() - started:.0f}s. Look at:\n"
        f"  {work / 'demo_summary.json'}  (counts, scores, versions)\n"
        f"  {work / 'generated.png'}  (condition | generated, from a real HTTP request)\n"
        f"  mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}  (runs, loss curves, image grids, registry)"
    )
