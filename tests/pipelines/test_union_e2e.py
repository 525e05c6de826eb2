"""ControlNet-Union through the whole product, on the tiny SDXL: annotate with two annotators -> train one union
ControlNet on both condition columns (Ray Train + DeepSpeed) -> the export loads with stock diffusers in a Python
without zeroconv -> evaluate scores each condition column with its own annotator -> serving answers a union
request (and refuses a type the model was not trained on with a 4xx)."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest

from pipelines.common.config import BaseModelConfig, MLflowConfig

RES = 64
NAME = "e2e-union"
COLUMNS = ["cond_canny", "cond_hed"]  # two union types: canny is thin lines (3), hed thick lines (2)

# Run with a Python that cannot import zeroconv: stock classes only, as a diffusers user would.
STOCK_UNION = """
import json, sys
import numpy as np, torch
from diffusers import ControlNetUnionModel, StableDiffusionXLControlNetUnionPipeline
net = ControlNetUnionModel.from_pretrained(sys.argv[1])
pipe = StableDiffusionXLControlNetUnionPipeline.from_pretrained(sys.argv[2], controlnet=net)
pipe.set_progress_bar_config(disable=True)
condition = torch.zeros(1, 3, 64, 64)
condition[..., 20:44, 20:44] = 1.0
out = pipe("a red circle", control_image=[condition], control_mode=[3], num_inference_steps=2, height=64, width=64,
           generator=torch.Generator().manual_seed(0), output_type="np").images
trained = any(p.abs().max() > 0 for p in net.controlnet_mid_block.parameters())
print(json.dumps({"class": type(net).__name__, "shape": list(out.shape), "finite": bool(np.isfinite(out).all()),
                  "trained": bool(trained)}))
"""


@pytest.fixture(scope="module")
def annotated(ray_session, tmp_path_factory, random_weights) -> Path:
    """Fill50K-style images annotated with canny and hed (one cond_<annotator> column each); hed's network has
    random weights (offline), recorded by source and checksum like real ones, so evaluate and serve load them."""
    from pipelines.annotate import AnnotateConfig, run_annotate
    from pipelines.data.synthetic import write_image_folder

    root = tmp_path_factory.mktemp("union-data")
    images = write_image_folder(root / "images", n=8, size=RES, seed=0, broken=False)
    hed_weights = str(random_weights("ControlNetHED.pth"))
    annotators = [{"name": "canny"}, {"name": "hed", "params": {"weights_source": hed_weights}}]
    config = AnnotateConfig(
        input=str(images), output=str(root / "annotated"), resolution=RES, min_side=32, annotators=annotators
    )
    run_annotate(config)
    return root / "annotated"


@pytest.mark.slow
def test_union_trains_on_two_columns_exports_evaluates_each_type_and_serves(
    annotated, ray_session, mlflow_server, without_zeroconv, tmp_path
):
    from deploy.batching import run_batch
    from deploy.config import ServeConfig
    from deploy.jobs import prepare_job
    from deploy.schemas import GenerateRequest, LimitsConfig, RequestError
    from deploy.store import ModelStore
    from model.families import resolve
    from model.registry import resolve_model
    from pipelines.common.config import load_config
    from pipelines.common.images import decode_rgb, encode_png
    from pipelines.evaluate import EvaluateConfig, run_evaluate
    from pipelines.train import TrainConfig, run_train

    mlflow = MLflowConfig(tracking_uri=mlflow_server, experiment="union-e2e")
    result = run_train(
        TrainConfig(
            data=str(annotated),
            work_dir=str(tmp_path / "work"),
            base_model=BaseModelConfig(source="tiny-sdxl"),
            union=True,  # condition_columns: every cond_* column of the dataset
            run_name="e2e-union",
            num_workers=2,
            cpus_per_worker=0.5,
            batch_size=2,
            max_steps=2,
            lr=1e-3,
            checkpoint_every=2,
            log_every=1,
            num_validation=1,  # the final grid generates with the first column's control mode
            validation_steps=2,
            registered_model=NAME,
            mlflow=mlflow,
        )
    )
    assert result.steps == 2 and np.isfinite(result.metrics["loss"]) and result.unet_params_changed == []

    # Registered: the columns, each with the annotator that made it and its union type.
    resolved = resolve_model(NAME, "candidate", dest=tmp_path / "resolved")
    union = resolved.metadata["union"]
    assert [(u["column"], u["annotator"]["name"], u["control_mode"]) for u in union] == [
        ("cond_canny", "canny", 3),
        ("cond_hed", "hed", 2),
    ]

    # Export: stock ControlNetUnionModel + StableDiffusionXLControlNetUnionPipeline, without zeroconv.
    stock = without_zeroconv.run_json(STOCK_UNION, result.controlnet_dir, resolve("tiny-sdxl"), cwd=tmp_path)
    assert stock == {"class": "ControlNetUnionModel", "shape": [1, RES, RES, 3], "finite": True, "trained": True}

    # Evaluate: each column scored with its own annotator; the headline is the mean of the types' headlines.
    overrides = dict(data=annotated, model=NAME, alias="candidate", limit=2, grid_samples=1, steps=2)
    overrides |= {"mlflow.tracking_uri": mlflow_server, "mlflow.experiment": "union-e2e", "compute.batch_size": 2}
    scored = run_evaluate(load_config(EvaluateConfig, None, [f"{k}={v}" for k, v in overrides.items()]))
    per_type = [scored.metrics["canny/edge_f1"], scored.metrics["hed/edge_f1"]]
    assert scored.metric == "union_mean" and scored.samples == 4
    assert scored.score == pytest.approx(np.mean(per_type)) and all(0.0 <= v <= 1.0 for v in per_type)
    assert "baseline_canny/edge_f1" in scored.metrics and scored.annotator == "canny, hed"

    # Serve: union requests of each trained type (named: the model has two) through the request path.
    store = ModelStore(ServeConfig(models=[NAME], alias="candidate", mlflow={"tracking_uri": mlflow_server}), "cpu")
    assert store.models[NAME].info(True).control_types == ["canny", "hed"]
    condition = np.zeros((RES, RES, 3), np.uint8)
    condition[16:48, 16:48] = 255
    image = base64.b64encode(encode_png(condition)).decode()

    def request(**control):
        body = {"prompt": "a red circle", "steps": 2, "seed": 1, "controls": [{"image": image, **control}]}
        return prepare_job(GenerateRequest.model_validate(body), store, LimitsConfig())

    hed, canny = request(control_type="hed"), request(control_type="canny")
    assert (hed.control_modes, canny.control_modes) == ((2,), (3,))
    answers = run_batch(store, [hed, canny])  # two types: two groups, each with its own mode
    assert [(decode_rgb(png).shape, versions[0].name) for png, versions, _ in answers] == [((RES, RES, 3), NAME)] * 2
    for control_type, error in (
        (None, "control_type is required for union model 'e2e-union': one of hed, canny"),  # two types: name one
        ("depth", "was not trained on 'depth'"),
        ("sketch", "unknown type 'sketch'"),
    ):
        with pytest.raises(RequestError, match=error) as caught:
            request(control_type=control_type)
        assert caught.value.status == 422 and caught.value.field == "controls[0].control_type"
    twice = {"prompt": "a red circle", "controls": [{"image": image, "control_type": "canny"}] * 2}
    with pytest.raises(RequestError, match="a union ControlNet serves alone") as caught:
        prepare_job(GenerateRequest.model_validate(twice), store, LimitsConfig())
    assert caught.value.status == 422


@pytest.mark.slow
def test_union_trains_on_precomputed_latents_with_every_condition_column(
    annotated, ray_session, mlflow_server, tmp_path
):
    """Precompute keeps the cond_* columns (and their annotators); the pick runs before the tensors."""
    from pipelines.precompute import PrecomputeConfig, run_precompute
    from pipelines.train import TrainConfig, run_train

    pre = run_precompute(
        PrecomputeConfig(
            data=str(annotated),
            output=str(tmp_path / "pre"),
            work_dir=str(tmp_path),
            base_model={"source": "tiny-sdxl"},
        )
    )
    result = run_train(
        TrainConfig(
            data=pre.output,
            work_dir=str(tmp_path / "work"),
            base_model=BaseModelConfig(source="tiny-sdxl"),
            union=True,
            condition_columns=COLUMNS,
            run_name="pre-union",
            num_workers=1,
            cpus_per_worker=1,
            batch_size=2,
            max_steps=1,
            checkpoint_every=1,
            num_validation=0,
            registered_model=None,
            mlflow=MLflowConfig(tracking_uri=mlflow_server, experiment="union-e2e"),
        )
    )
    assert result.steps == 1 and np.isfinite(result.metrics["loss"]) and result.unet_params_changed == []
    assert json.loads(Path(result.controlnet_dir, "config.json").read_text())["_class_name"] == "ControlNetUnionModel"
