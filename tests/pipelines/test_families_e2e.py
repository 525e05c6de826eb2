"""Every model family through the whole product: annotate -> train (Ray Train + DeepSpeed) -> export -> register
-> evaluate -> serve, with each family's tiny preset (sd = ``tiny``, ``tiny-sdxl``, ``tiny-sd3``, ``tiny-flux``).

The stages hold nothing family-specific: each one drives the base through its adapter (model/families), picked
from the base's model_index.json. The export must load with the family's stock ControlNet class and generate with
the family's stock pipeline, as any diffusers user would use it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.common.config import BaseModelConfig, MLflowConfig

RES = 64
# family -> (preset, what else this family's run covers): ZeRO-2 for all, ZeRO-3 and gradient checkpointing for some.
RUNS = {
    "sd": ("tiny", dict(zero_stage=2, num_validation=1, validate_every=1)),
    "sdxl": ("tiny-sdxl", dict(zero_stage=2, gradient_checkpointing=True)),
    "sd3": ("tiny-sd3", dict(zero_stage=3)),
    "flux": ("tiny-flux", dict(zero_stage=2, precision="bf16")),
}
_TRAINED: dict[str, object] = {}


@pytest.fixture(scope="module")
def annotated(ray_session, tmp_path_factory) -> Path:
    """Fill50K-style images annotated with canny by the real annotate stage (Ray Data)."""
    from pipelines.annotate import AnnotateConfig, run_annotate
    from pipelines.data.synthetic import write_image_folder

    root = tmp_path_factory.mktemp("families-data")
    images = write_image_folder(root / "images", n=8, size=RES, seed=0, broken=False)
    run_annotate(AnnotateConfig(input=str(images), output=str(root / "annotated"), resolution=RES, min_side=32))
    return root / "annotated"


def trained(family: str, annotated: Path, mlflow_uri: str, tmp_root: Path):
    """Train (once per module) a ControlNet for ``family`` on the annotated data and register it."""
    from pipelines.train import TrainConfig, run_train

    if family not in _TRAINED:
        preset, extra = RUNS[family]
        values = dict(
            data=str(annotated),
            work_dir=str(tmp_root / family),
            base_model=BaseModelConfig(source=preset),
            run_name=f"e2e-{family}",
            num_workers=2,
            cpus_per_worker=0.5,
            batch_size=2,
            max_steps=2,
            lr=1e-3,
            checkpoint_every=2,
            log_every=1,
            num_validation=0,
            registered_model=f"e2e-{family}",
            mlflow=MLflowConfig(tracking_uri=mlflow_uri, experiment="families-e2e"),
        )
        _TRAINED[family] = run_train(TrainConfig(**{**values, **extra}))
    return _TRAINED[family]


def stock_generate(family: str, controlnet_dir: str) -> np.ndarray:
    """Load the export with the family's stock ControlNet class and generate with its stock pipeline."""
    import diffusers

    from model.families import FAMILIES, resolve

    fam = FAMILIES[family]
    net = getattr(diffusers, fam.controlnet_class).from_pretrained(controlnet_dir)
    pipe = getattr(diffusers, fam.control_pipeline_class).from_pretrained(
        str(resolve(RUNS[family][0])), controlnet=net
    )
    pipe.set_progress_bar_config(disable=True)
    condition = torch.zeros(1, 3, RES, RES)
    condition[..., 20:44, 20:44] = 1.0
    image_arg = "image" if family in ("sd", "sdxl") else "control_image"
    torch.manual_seed(0)  # SD3's and Flux's pipelines VAE-encode the condition with the global RNG
    out = pipe(
        "red circle with blue background",
        **{image_arg: condition},
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        height=RES,
        width=RES,
        output_type="np",
    ).images
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family", list(RUNS))
def test_family_trains_exports_registers_evaluates_and_serves(
    family, annotated, ray_session, mlflow_server, tmp_path_factory
):
    import diffusers
    import mlflow

    from deploy.app import ServeConfig
    from deploy.store import ModelStore
    from model.families import FAMILIES
    from model.inference import generate
    from pipelines.common.config import load_config
    from pipelines.common.tracking import connect
    from pipelines.evaluate import EvaluateConfig, run_evaluate

    fam = FAMILIES[family]
    result = trained(family, annotated, mlflow_server, tmp_path_factory.mktemp(family))

    # Train: 2 steps through the family's objective; the locked base is bit-identical afterwards.
    assert result.steps == 2 and np.isfinite(result.metrics["loss"])
    assert result.unet_params_changed == []
    # Export: the family's stock ControlNet class loads it, and its zero-initialised outputs have trained.
    net = getattr(diffusers, fam.controlnet_class).from_pretrained(result.controlnet_dir)
    zero_init = {"sd": "controlnet_mid_block", "sdxl": "controlnet_mid_block"}.get(family, "controlnet_blocks")
    assert any(p.abs().max() > 0 for p in getattr(net, zero_init).parameters()), "the zero convs did not train"
    image = stock_generate(family, result.controlnet_dir)
    assert image.shape == (1, RES, RES, 3) and np.isfinite(image).all()

    # Register: the version records the family the base was read as.
    connect(mlflow_server, "families-e2e")
    client = mlflow.MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias(f"e2e-{family}", "candidate")
    assert version.version == result.model_version
    from model.registry import resolve_model

    resolved = resolve_model(f"e2e-{family}", "candidate", dest=tmp_path_factory.mktemp("resolved"))
    assert resolved.metadata["family"] == family and resolved.metadata["base_model"] == RUNS[family][0]

    # Evaluate: generate with the family's pipeline, re-annotate, score against the no-control baseline.
    overrides = dict(data=annotated, model=f"e2e-{family}", alias="candidate", limit=2, grid_samples=1, steps=2)
    overrides |= {"mlflow.tracking_uri": mlflow_server, "mlflow.experiment": "families-e2e", "compute.batch_size": 2}
    scored = run_evaluate(load_config(EvaluateConfig, None, [f"{k}={v}" for k, v in overrides.items()]))
    assert scored.samples == 2 and 0.0 <= scored.score <= 1.0 and 0.0 <= scored.baseline_score <= 1.0

    # Serve: the serving store loads the registered version and generates through the family's pipeline.
    store = ModelStore(
        ServeConfig(models=[f"e2e-{family}"], alias="candidate", mlflow={"tracking_uri": mlflow_server}), "cpu"
    )
    served = store.models[f"e2e-{family}"]
    assert store.base.family.name == family and served.family == family
    condition = np.zeros((1, RES, RES, 3), np.uint8)
    condition[:, 16:48, 16:48] = 255
    out = generate(store.pipeline([served]), ["a red circle"], condition, seed=0, steps=2)
    assert out.shape == (1, RES, RES, 3)


@pytest.mark.slow
def test_serving_refuses_to_compose_controlnets_of_two_families(
    annotated, ray_session, mlflow_server, tmp_path_factory
):
    from deploy.app import ServeConfig
    from deploy.schemas import RequestError
    from deploy.store import ModelStore

    root = tmp_path_factory.mktemp("mix")
    for family in ("sd", "flux"):
        trained(family, annotated, mlflow_server, root)
    # base_model set: the server does not insist that every model names it, so a Flux ControlNet gets loaded.
    config = ServeConfig(
        models=["e2e-sd", "e2e-flux"], alias="candidate", base_model="tiny", mlflow={"tracking_uri": mlflow_server}
    )
    store = ModelStore(config, "cpu")
    with pytest.raises(RequestError, match="'e2e-flux' is a flux ControlNet .* this server's sd base") as caught:
        store.pipeline([store.models["e2e-sd"], store.models["e2e-flux"]])
    assert 400 <= caught.value.status < 500


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_family_trains_on_precomputed_prompts_and_latents(family, annotated, ray_session, mlflow_server, tmp_path):
    """Precompute stores the family's text tensors (SDXL: + pooled; Flux: T5 + CLIP pooled) and the VAE posterior;
    training samples latents, scales / packs them as the family does and rebuilds the size-dependent prompt parts."""
    import pyarrow.parquet as pq

    from pipelines.precompute import PrecomputeConfig, run_precompute
    from pipelines.train import TrainConfig, run_train

    preset = RUNS[family][0]
    pre = run_precompute(
        PrecomputeConfig(
            data=str(annotated), output=str(tmp_path / "pre"), work_dir=str(tmp_path), base_model={"source": preset}
        )
    )
    columns = set(pq.read_schema(next((tmp_path / "pre").rglob("*.parquet"))).names)
    assert {"latent_mean", "latent_std", "text_embedding"} <= columns
    extra = {"sdxl": "prompt_text_embeds", "flux": "prompt_pooled_projections"}[family]
    assert extra in columns and pre.shapes[extra][-1] > 0
    result = run_train(
        TrainConfig(
            data=pre.output,
            work_dir=str(tmp_path / "work"),
            base_model=BaseModelConfig(source=preset),
            run_name=f"pre-{family}",
            num_workers=1,
            cpus_per_worker=1,
            batch_size=2,
            max_steps=1,
            checkpoint_every=1,
            num_validation=0,
            registered_model=None,
            mlflow=MLflowConfig(tracking_uri=mlflow_server, experiment="families-e2e"),
        )
    )
    assert result.steps == 1 and np.isfinite(result.metrics["loss"]) and result.unet_params_changed == []
