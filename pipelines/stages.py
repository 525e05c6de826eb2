"""The table of stages: name -> module, config class, run function, help. The CLI and ``submit`` read it.

Modules are named as strings and imported on use, so ``zeroconv --help`` stays fast and a stage's
heavy imports (torch, Ray Train) happen only when that stage runs.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str
    config: str
    run: str
    help: str
    usage: str = "[--config FILE.yaml] [--print-config] [key=value ...]"


# One line per stage. The module defines the config class and the run function.
STAGES: dict[str, Stage] = {
    "demo": Stage(
        "pipelines.demo",
        "DemoConfig",
        "run_demo",
        "run the whole product end to end on this machine with a tiny model",
    ),
    "annotate": Stage(
        "pipelines.annotate", "AnnotateConfig", "run_annotate", "images -> condition maps in Parquet (Ray Data)"
    ),
    "train": Stage(
        "pipelines.train",
        "TrainConfig",
        "run_train",
        "train a ControlNet on annotated Parquet (Ray Train + DeepSpeed), log and register in MLflow",
    ),
    "pretrain-base": Stage(
        "pipelines.pretrain_base",
        "PretrainBaseConfig",
        "run_pretrain_base",
        "build the shapes demo base from scratch: VAE, then the UNet on Ray Train (Fill50K-style data)",
    ),
    "precompute": Stage(
        "pipelines.precompute",
        "PrecomputeConfig",
        "run_precompute",
        "annotated Parquet -> VAE latents + text embeddings for faster training (Ray Data)",
    ),
    "evaluate": Stage(
        "pipelines.evaluate",
        "EvaluateConfig",
        "run_evaluate",
        "score how well a registered model follows its conditions; log to its MLflow run",
    ),
    "promote": Stage(
        "pipelines.promote",
        "PromoteConfig",
        "run_promote",
        "move the champion alias to the candidate if its fidelity beats the champion's by a margin",
    ),
    "serve": Stage("deploy.app", "ServeConfig", "run_serve", "serve registered ControlNets over HTTP (Ray Serve)"),
    "pipeline": Stage(
        "pipelines.pipeline",
        "PipelineConfig",
        "run_pipeline",
        "the recurring pipeline: annotate new images, train, evaluate, promote",
        "run CONFIG.yaml [key=value ...]",
    ),
    "submit": Stage(
        "pipelines.submit",
        "SubmitConfig",
        "run_submit",
        "run any stage on a Ray cluster as a Ray Job and follow it",
        "STAGE [--config FILE.yaml] [key=value ...] [submit.KEY=VALUE ...]",
    ),
}


def load_stage(name: str):
    stage = STAGES[name]
    try:
        module = importlib.import_module(stage.module)
    except ModuleNotFoundError as exc:
        if exc.name == stage.module:
            raise SystemExit(f"error: stage {name!r} is not available in this version of zeroconv") from None
        raise
    return getattr(module, stage.config), getattr(module, stage.run)
