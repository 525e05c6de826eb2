"""``zeroconv demo``: the whole product, end to end, on this machine, with a built-in base model.

    1. base       load the base (default ``shapes``, pretrained on Fill50K-style pictures); show the
                  zero-convolution identity (y_c == y at step 0)
    2. data       write Fill50K-style images (plus a few broken files) and a held-out set, at the base's size
    3. pipeline   `zeroconv pipeline run`: annotate -> train (Ray Train + DeepSpeed; a fidelity curve on the
                  held-out set) -> register -> evaluate (edge F1 and circle-mask IoU vs no control) -> promote
    4. grid       condition | base alone | with ControlNet for held-out rows (PNG, also on the model's MLflow run)
    5. serve      `zeroconv serve`: Ray Serve loads models:/NAME@champion; one real HTTP request; image saved

Every step calls the same ``run_<stage>`` function a user or a scheduler would; only the synthetic
input is demo-specific. Re-running resumes: finished stages are skipped. The numbers land in
``demo_summary.json`` (``resolution``, ``fidelity``).
"""

from __future__ import annotations

import base64
import io
import json
import os
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
GRID_FILE = "demo-grid.png"
GRID_ARTIFACT = "demo/grid.png"


class DemoConfig(JobConfig):
    """The demo's knobs; everything else uses each stage's own defaults, sized for the demo base."""

    work_dir: str = Field(default="demo-output", description="where the demo writes everything")
    base_model: BaseModelConfig = BaseModelConfig(source="shapes")
    mlflow: MLflowConfig = MLflowConfig(experiment="zeroconv-demo")
    images: int = Field(
        default=500,
        ge=8,
        description="synthetic training images (plus 4 broken files); at a fixed step budget fewer images did no "
        "worse (docs/experiments.md): 500 reached edge F1 0.90 at 2000 steps where 2000 images reached 0.80-0.85",
    )
    heldout: int = Field(default=32, ge=1, description="held-out images for evaluation")
    train_steps: int = Field(
        default=2000,
        ge=1,
        description="training steps (on the shapes base control jumps between ~1000 and ~1750 steps; 2000 gave "
        "edge F1 0.78-0.90 vs 0.29 without control in 7-12 min on 2 CPU cores, by machine; 1500 as little as "
        "0.67: see README)",
    )
    batch_size: int = Field(default=32, ge=1, description="training batch")
    lr: float = Field(
        default=1e-3, gt=0, description="ControlNet learning rate (higher than the paper's 1e-5: a short CPU run)"
    )
    fidelity_every: int = Field(
        default=250, ge=0, description="training steps between fidelity scores on the held-out set (0: off)"
    )
    guidance_scale: float = Field(default=5.0, ge=0, description="CFG scale for evaluation, the grid and serving")
    sampling_steps: int = Field(default=20, ge=1, description="DDIM steps for evaluation, the grid and serving")
    grid_rows: int = Field(default=8, ge=1, description="held-out rows in the condition | base | ControlNet grid")
    serve: bool = Field(default=True, description="serve the promoted model and send one HTTP request")
    fresh: bool = Field(default=False, description="delete work_dir first instead of resuming")
    seed: int = Field(default=0, description="random seed for the synthetic data")


def _say(step: str, text: str) -> None:
    print(f"[demo] {step:<9} {text}", flush=True)


def show_zero_conv_identity(config: DemoConfig) -> tuple[float, int]:
    """Load the base model and build a ControlNet from it; the controlled denoiser equals the plain one exactly.
    Returns the largest difference and the base's native resolution (the demo's image size)."""
    from model.families import load
    from pipelines.data.synthetic import fill50k
    from pipelines.data.tensors import condition_tensor, image_tensor

    base = load(config.base_model.source)
    fam = base.family
    params = {
        n: sum(p.numel() for p in m.parameters()) for n, m in base.pipe.components.items() if hasattr(m, "parameters")
    }
    _say(
        "base",
        f"{config.base_model.source} -> {base.local_dir} ({fam.name}, {base.resolution}px, parameters {params})",
    )
    samples = fill50k(4, base.resolution, config.seed)
    g = torch.Generator().manual_seed(config.seed)
    size = (base.resolution, base.resolution)
    with torch.no_grad():
        latents = fam.encode_images(base, image_tensor(np.stack([s.image for s in samples])), g)
        noisy, t, _ = fam.noise(base, latents, g)
        prompt = fam.encode_prompts(base, [s.text for s in samples], size)
        controls = [fam.control_inputs(base, condition_tensor(np.stack([s.condition for s in samples])), g)]
        model = fam.controlled(base, [fam.new_controlnet(base)])
        plain, controlled = model.base_prediction(noisy, t, prompt), model(noisy, t, prompt, controls)
    diff = float((plain - controlled).abs().max())
    _say(
        "identity",
        f"max |{fam.denoiser_name} + ControlNet - {fam.denoiser_name}| at step 0 = {diff} "
        "(zero convolutions: training starts from the base model)",
    )
    return diff, base.resolution


def make_data(config: DemoConfig, work: Path, resolution: int) -> tuple[Path, Path]:
    from pipelines.data.synthetic import write_image_folder

    incoming = work / "incoming"
    write_image_folder(incoming / "batch-0001", config.images, size=resolution, seed=config.seed, broken=True)
    heldout = write_image_folder(
        work / "heldout-images", config.heldout, size=resolution, seed=config.seed + 10_000, broken=False
    )
    _say(
        "data",
        f"{config.images} Fill50K-style images + 4 broken files in {incoming}/batch-0001; "
        f"{config.heldout} held-out in {heldout}",
    )
    return incoming, heldout


def pipeline_config(config: DemoConfig, work: Path, incoming: Path, resolution: int):
    from pipelines.pipeline import PipelineConfig

    sampling = {"steps": config.sampling_steps, "guidance_scale": config.guidance_scale}
    return PipelineConfig.model_validate(
        {
            "work_dir": str(work),
            "storage": config.storage.model_dump(),
            "ray": config.ray.model_dump(),
            "mlflow": config.mlflow.model_dump(),
            "annotate": {
                "input": str(incoming),
                "resolution": resolution,
                "min_side": resolution // 2,
                "shard_size": 500,
            },
            # The VAE and text encoder run once per image instead of in every training step:
            # 0.29 s a step instead of 0.35 on this machine's two cores.
            "precompute": {"enabled": True},
            "train": {
                "base_model": config.base_model.model_dump(),
                "run_name": "demo",
                "registered_model": MODEL_NAME,
                "num_workers": 1,
                # Two cores to the one worker: torch runs 1.4x faster on two threads than on one.
                "cpus_per_worker": min(2, os.cpu_count() or 1),
                # ZeRO partitions nothing on one worker; stage 0 skips its bookkeeping (0.5M parameters).
                "zero_stage": 0,
                "batch_size": config.batch_size,
                "max_steps": config.train_steps,
                "lr": config.lr,
                "prompt_dropout": 0.5,
                # Most draws at high noise, where the circle's place is decided: control came sooner
                # (model/families/base.py, TimestepSampling).
                "timestep_sampling": "cubic",
                "checkpoint_every": max(1, config.train_steps // 2),
                "log_every": 50,
                "validate_every": 0,
                "num_validation": 4,
                "validation_steps": config.sampling_steps,
                "fidelity": {
                    "every": config.fidelity_every,
                    "data": str(work / "heldout"),
                    "limit": min(16, config.heldout),
                    "mask_iou": True,
                    **sampling,
                },
            },
            "evaluate": {
                "data": str(work / "heldout"),
                "limit": config.heldout,
                "mask_iou": True,
                "grid_samples": config.grid_rows,
                **sampling,
            },
            "promote": {"margin": 0.0},
        }
    )


def annotate_heldout(config: DemoConfig, work: Path, heldout_images: Path, resolution: int) -> None:
    from pipelines.annotate import AnnotateConfig, run_annotate

    run_annotate(
        AnnotateConfig.model_validate(
            {
                "work_dir": str(work),
                "storage": config.storage.model_dump(),
                "ray": config.ray.model_dump(),
                "input": str(heldout_images),
                "output": str(work / "heldout"),
                "resolution": resolution,
                "min_side": resolution // 2,
            }
        )
    )


def serve_one_request(config: DemoConfig, work: Path, resolution: int) -> Path:
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
                "limits": {"min_size": min(64, resolution)},  # the shapes base makes 32 px images
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
                "steps": config.sampling_steps,
                "guidance_scale": config.guidance_scale,
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


def control_grid(config: DemoConfig, work: Path) -> tuple[Path, dict]:
    """condition | base alone | with ControlNet for the first held-out rows, generated exactly as evaluate
    did (the evaluated version, same seeds, steps and CFG; the base alone is conditioning scale 0). Saved
    as a PNG and logged on the model's MLflow run. Returns its path and the version's fidelity numbers."""
    import tempfile

    import mlflow
    import pyarrow.parquet as pq
    from PIL import Image

    from model.inference import generate, load_pipeline
    from model.registry import resolve_model
    from pipelines.common.images import decode_condition
    from pipelines.common.tracking import connect, resolve_tracking_uri
    from pipelines.evaluate import evaluation_grid
    from pipelines.fidelity_record import read_fidelity
    from pipelines.train_fidelity import CONVERGED_TAG

    connect(resolve_tracking_uri(config.mlflow.tracking_uri, str(work), must_exist=True), config.mlflow.experiment)
    rows = pq.read_table(work / "heldout", columns=["text", "conditioning_image"]).slice(0, config.grid_rows)
    prompts = rows.column("text").to_pylist()
    conditions = np.stack([decode_condition(b, channels=3) for b in rows.column("conditioning_image").to_pylist()])
    with tempfile.TemporaryDirectory(prefix="zc-demo-") as tmp:
        model = resolve_model(MODEL_NAME, alias="candidate", dest=tmp)
        pipe = load_pipeline(config.base_model.source, [model.controlnet_dir], model.unet_dir, storage=config.storage)
        images = {
            scale: generate(
                pipe,
                prompts,
                conditions,
                seed=0,  # evaluate's default seed: row i gets seed i
                steps=config.sampling_steps,
                guidance_scale=config.guidance_scale,
                conditioning_scale=scale,
            )
            for scale in (0.0, 1.0)
        }
    grid = evaluation_grid(
        [[c, base, controlled] for c, base, controlled in zip(conditions, images[0.0], images[1.0])]
    )
    out = work / GRID_FILE
    Image.fromarray(grid).resize((grid.shape[1] * 4, grid.shape[0] * 4), Image.NEAREST).save(out)
    client = mlflow.MlflowClient()
    client.log_image(model.run_id, grid, artifact_file=GRID_ARTIFACT)
    record = read_fidelity(MODEL_NAME, model.version)  # what evaluate measured for this version
    run = client.get_run(model.run_id).data
    converged = run.tags.get(CONVERGED_TAG)
    fidelity = {
        "metric": record.metric,
        "controlnet": record.score,
        "no_control": record.baseline_score,
        "mask_iou": run.metrics.get("fidelity/mask_iou"),
        "mask_iou_no_control": run.metrics.get("fidelity/baseline_mask_iou"),
        "samples": record.samples,
        "guidance_scale": config.guidance_scale,
        "model_version": model.version,
        "converged_step": int(converged) if converged else None,  # training's curve: first step above 2x
    }
    _say(
        "grid",
        f"condition | base alone | with ControlNet -> {out}; {record.metric} {record.score:.3f} vs "
        f"{record.baseline_score:.3f} without control, mask IoU {fidelity['mask_iou']:.3f} vs "
        f"{fidelity['mask_iou_no_control']:.3f} ({record.samples} held-out samples, CFG {config.guidance_scale:g})",
    )
    return out, fidelity


def run_demo(config: DemoConfig) -> str:
    from pipelines.common.cluster import ensure_ray
    from pipelines.pipeline import run_pipeline

    started = time.time()
    work = Path(config.work_dir).resolve()
    if config.fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    diff, resolution = show_zero_conv_identity(config)
    summary: dict = {"identity_max_abs_diff": diff, "resolution": resolution, "base_model": config.base_model.source}
    incoming, heldout_images = make_data(config, work, resolution)
    ensure_ray(config.ray)
    annotate_heldout(config, work, heldout_images, resolution)
    result = run_pipeline(pipeline_config(config, work, incoming, resolution))
    _say("pipeline", str(result).replace("\n", "\n" + " " * 17))
    summary["pipeline"] = result.steps
    for manifest in sorted((work / "annotated").rglob("_manifest.json")):
        summary.setdefault("manifests", {})[str(manifest.relative_to(work))] = json.loads(manifest.read_text())[
            "counts"
        ]
    grid, summary["fidelity"] = control_grid(config, work)
    summary["grid"] = str(grid)
    if config.serve:
        summary["generated"] = str(serve_one_request(config, work, resolution))
    summary["seconds"] = round(time.time() - started, 1)
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return (
        f"demo finished in {summary['seconds']:.0f}s. Look at:\n"
        f"  {grid}  (condition | base alone | with ControlNet)\n"
        f"  {work / 'demo_summary.json'}  (counts, fidelity with and without control, versions)\n"
        f"  {work / 'generated.png'}  (condition | generated, from a real HTTP request)\n"
        f"  mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}  (runs, loss and fidelity curves, grids, "
        "registry)"
    )
