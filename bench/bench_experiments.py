"""Two of the ControlNet paper's open questions, measured in small on Fill50K-style data (docs/experiments.md).

1. **Fidelity vs dataset size at fixed steps.** The paper claims training is robust from small (1k) to
   large (1M) datasets. Here: one ControlNet per dataset size (e.g. 250 / 1k / 4k images), the same steps,
   batch and seed each, all scored on one held-out set; each run's fidelity curve (``fidelity.every``)
   also gives the step where edge F1 first exceeded 2x the no-control baseline.
2. **Two ControlNets composed.** An edge ControlNet (the circle's outline) and a segmentation-like one
   (the filled disc, ``cond_mask``), trained separately on the same images, then used alone and summed
   (diffusers' MultiControlNet: residuals add) on the same prompts and seeds.

Each training set is encoded once by ``run_precompute`` (VAE latents + caption embeddings, as the demo
does), and every ControlNet is trained by ``run_train`` (Ray Train + DeepSpeed) on a locked base; every score is
``zeroconv evaluate``'s: generate -> re-annotate with canny -> edge F1 (2 px tolerance) against the true
outline, and the circle-mask IoU (``pipelines.evaluate_worker.generate_and_score``).

    python bench/bench_experiments.py [--base shapes] [--sizes 250 1000 4000] [--steps 1500]

Prints one JSON object; logs its numbers, the JSON and a plot to MLflow (experiment zeroconv-experiments
in <work>/mlflow.db). tests/pipelines/test_experiments.py runs the same code with tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

HELDOUT_SEED = 10_000  # the held-out images' seed: never a training seed below


@dataclass
class Settings:
    base: str = "shapes"
    sizes: tuple[int, ...] = (250, 1000, 4000)
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    timestep_sampling: str = "cubic"  # the demo's recipe
    heldout: int = 32
    sampling_steps: int = 20
    guidance_scale: float = 5.0
    curve_every: int = 250
    compose_size: int = 1000  # images the two composed ControlNets train on
    seed: int = 0


def encode(settings: Settings, data: Path) -> Path:
    """``data`` precomputed once (``zeroconv precompute``): every run on it skips the VAE and text encoder."""
    from pipelines.precompute import PrecomputeConfig, run_precompute

    output = data.with_name(f"{data.name}-precomputed")
    run_precompute(
        PrecomputeConfig(
            data=str(data), output=str(output), work_dir=str(data.parent), base_model={"source": settings.base}
        )
    )
    return output


def train(settings: Settings, data: Path, work: Path, name: str, condition_column: str, heldout: Path | None):
    """One ControlNet through ``run_train``; with ``heldout``, a fidelity curve on it. Returns the TrainResult."""
    from pipelines.train import TrainConfig, run_train

    curve = {"every": settings.curve_every, "data": str(heldout), "annotator": "canny", "limit": 16}
    return run_train(
        TrainConfig(
            data=str(data),
            work_dir=str(work),
            base_model={"source": settings.base},
            condition_column=condition_column,
            run_name=name,
            num_workers=1,
            cpus_per_worker=2,
            zero_stage=0,
            batch_size=settings.batch_size,
            max_steps=settings.steps,
            lr=settings.lr,
            timestep_sampling=settings.timestep_sampling,
            seed=settings.seed,
            checkpoint_every=settings.steps,
            log_every=max(1, settings.steps // 20),
            num_validation=0,
            registered_model=None,
            fidelity={
                **curve,
                "steps": settings.sampling_steps,
                "guidance_scale": settings.guidance_scale,
                "mask_iou": True,
            }
            if heldout is not None and settings.curve_every
            else {},
            mlflow={"experiment": "zeroconv-experiments"},
        )
    )


def score(settings: Settings, controlnets: dict[str, str], heldout, active: list[set[str]]) -> list[dict]:
    """Edge F1 and mask IoU on the held-out rows for each set of ``active`` ControlNets (the others at
    conditioning scale 0; the empty set is the base alone), same prompts and seeds for all."""
    from annotators import create
    from model.inference import load_pipeline
    from pipelines.evaluate_worker import generate_and_score
    from pipelines.fidelity import Scoring

    names = list(controlnets)
    pipe = load_pipeline(settings.base, [controlnets[n] for n in names])
    conditions = [heldout[n] for n in names]
    canny, scoring = create("canny"), Scoring("canny", mask_iou=True)
    results = []
    for on in active:
        scales = [1.0 if n in on else 0.0 for n in names]
        _, _, per_sample = generate_and_score(
            pipe,
            canny,
            scoring,
            heldout["text"],
            conditions if len(names) > 1 else conditions[0],
            heldout["seed"],
            settings.sampling_steps,
            settings.guidance_scale,
            scales if len(names) > 1 else scales[0],
            references=heldout["outline"],
        )
        results.append(
            {
                "controlnets": sorted(on),
                **{k: round(float(np.mean([s[k] for s in per_sample])), 4) for k in ("edge_f1", "mask_iou")},
            }
        )
    return results


def heldout_rows(settings: Settings, resolution: int) -> dict:
    from pipelines.data.synthetic import fill50k

    samples = fill50k(settings.heldout, resolution, HELDOUT_SEED)
    return {
        "text": [s.text for s in samples],
        "seed": list(range(len(samples))),
        "outline": np.stack([s.condition for s in samples]),
        "edges": np.stack([s.condition for s in samples]),
        "mask": np.stack([s.mask for s in samples]),
    }


def run_experiments(settings: Settings, work: Path) -> dict:
    from model.families import load
    from pipelines.data.synthetic import MASK_COLUMN, write_fill50k_parquet

    started = time.perf_counter()
    resolution = load(settings.base).resolution
    heldout = heldout_rows(settings, resolution)
    heldout_dir = write_fill50k_parquet(work / "heldout", settings.heldout, resolution, HELDOUT_SEED, shards=1)

    by_size = []
    for n in settings.sizes:
        data = encode(settings, write_fill50k_parquet(work / f"data-{n}", n, resolution, settings.seed, 1, mask=True))
        run_started = time.perf_counter()
        result = train(settings, data, work, f"size-{n}", "conditioning_image", heldout_dir)
        without, with_control = score(settings, {"edges": result.controlnet_dir}, heldout, [set(), {"edges"}])
        by_size.append(
            {
                "images": n,
                "epochs": round(settings.steps * settings.batch_size / n, 1),
                "edge_f1": with_control["edge_f1"],
                "mask_iou": with_control["mask_iou"],
                "no_control": {k: without[k] for k in ("edge_f1", "mask_iou")},
                "converged_step": result.metrics.get("fidelity_converged_step"),
                "train_s": round(time.perf_counter() - run_started, 1),
            }
        )
        if n == settings.compose_size:
            edges_dir, compose_data = result.controlnet_dir, data
    if settings.compose_size not in settings.sizes:
        compose_data = encode(
            settings,
            write_fill50k_parquet(
                work / f"data-{settings.compose_size}", settings.compose_size, resolution, settings.seed, 1, mask=True
            ),
        )
        edges_dir = train(settings, compose_data, work, "compose-edges", "conditioning_image", None).controlnet_dir
    mask_dir = train(settings, compose_data, work, "compose-mask", MASK_COLUMN, None).controlnet_dir
    composed = score(
        settings,
        {"edges": edges_dir, "mask": mask_dir},
        heldout,
        [set(), {"edges"}, {"mask"}, {"edges", "mask"}],
    )
    return {
        "benchmark": "experiments",
        "base_model": settings.base,
        "resolution": resolution,
        "settings": {k: v for k, v in vars(settings).items() if k != "base"},
        "heldout": settings.heldout,
        "metric": "edge F1 (canny re-annotation vs the true outline, 2 px) and circle-mask IoU, held-out means",
        "dataset_size": by_size,
        "composition": {"trained_on": settings.compose_size, "results": composed},
        "wall_s": round(time.perf_counter() - started, 1),
    }


def plot(report: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [r["images"] for r in report["dataset_size"]]
    for key in ("edge_f1", "mask_iou"):
        left.plot(sizes, [r[key] for r in report["dataset_size"]], "o-", label=key)
        left.plot(sizes, [r["no_control"][key] for r in report["dataset_size"]], "x--", label=f"{key}, no control")
    left.set_xscale("log")
    left.set_xlabel(f"training images ({report['settings']['steps']} steps each)")
    left.set_title("fidelity vs dataset size")
    left.legend(fontsize=8)
    results = report["composition"]["results"]
    labels = [" + ".join(r["controlnets"]) or "none" for r in results]
    x = np.arange(len(results))
    right.bar(x - 0.2, [r["edge_f1"] for r in results], 0.4, label="edge_f1")
    right.bar(x + 0.2, [r["mask_iou"] for r in results], 0.4, label="mask_iou")
    right.set_xticks(x, labels)
    right.set_title("ControlNets alone and composed")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def log_to_mlflow(report: dict, work: Path) -> str:
    """The report's numbers as metrics, the JSON and the plot as artifacts, on one run."""
    import mlflow

    from pipelines.common.tracking import connect

    connect(f"sqlite:///{work / 'mlflow.db'}", "zeroconv-experiments")
    with mlflow.start_run(run_name="experiments", log_system_metrics=False) as run:
        for r in report["dataset_size"]:
            mlflow.log_metrics({"size/edge_f1": r["edge_f1"], "size/mask_iou": r["mask_iou"]}, step=r["images"])
        for r in report["composition"]["results"]:
            label = "_".join(r["controlnets"]) or "none"
            mlflow.log_metrics({f"compose/{label}/edge_f1": r["edge_f1"], f"compose/{label}/mask_iou": r["mask_iou"]})
        mlflow.log_dict(report, "experiments.json")
        mlflow.log_artifact(str(plot(report, work / "experiments.png")))
    return run.info.run_id


def main() -> None:
    from model.families.base import TIMESTEP_SAMPLINGS

    defaults = Settings()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=defaults.base, help="base model (shapes: the pretrained 32 px demo base)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(defaults.sizes), help="training set sizes")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="training steps per ControlNet")
    parser.add_argument("--batch", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--timestep-sampling", default=defaults.timestep_sampling, choices=TIMESTEP_SAMPLINGS)
    parser.add_argument("--heldout", type=int, default=defaults.heldout, help="held-out images scored")
    parser.add_argument("--compose-size", type=int, default=defaults.compose_size)
    parser.add_argument("--work", default=None, help="keep everything here (default: a temp dir)")
    args = parser.parse_args()
    settings = Settings(
        base=args.base,
        sizes=tuple(args.sizes),
        steps=args.steps,
        batch_size=args.batch,
        lr=args.lr,
        timestep_sampling=args.timestep_sampling,
        heldout=args.heldout,
        compose_size=args.compose_size,
        curve_every=max(1, args.steps // 6),
    )

    from bench_train import local_ray

    with tempfile.TemporaryDirectory(prefix="bench-experiments-") as tmp:
        work = Path(args.work or tmp).resolve()
        with local_ray():
            report = run_experiments(settings, work)
        report["mlflow_run_id"] = log_to_mlflow(report, work)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
