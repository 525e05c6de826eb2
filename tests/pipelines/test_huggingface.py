"""Training on datasets in the Hugging Face ControlNet convention, written by `datasets` itself:
Image-struct Parquet and a save_to_disk folder, with diffusers' configurable column names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.common.images import decode_condition, encode_jpeg, encode_png
from pipelines.data.dataset import inspect_dataset
from pipelines.data.schema import bytes_from_image_column
from pipelines.data.synthetic import fill50k
from pipelines.train import TrainConfig, run_train

N = 8


def hf_dataset(columns=("image", "conditioning_image", "text")):
    """Fill50K rows as `datasets` stores them: Image features ({bytes, path} structs) and a string column."""
    import datasets

    image, condition, text = columns
    samples = fill50k(N, size=64, seed=3)
    features = datasets.Features(
        {image: datasets.Image(), condition: datasets.Image(), text: datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {
            image: [{"bytes": encode_jpeg(s.image), "path": None} for s in samples],
            condition: [{"bytes": encode_png(s.condition), "path": None} for s in samples],
            text: [s.text for s in samples],
        },
        features=features,
    )


@pytest.fixture(scope="module")
def hf_parquet(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "parquet"
    folder.mkdir()
    hf_dataset(("target", "source", "prompt")).to_parquet(str(folder / "train-00000.parquet"))
    return folder


@pytest.fixture(scope="module")
def hf_disk(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "saved"
    hf_dataset().save_to_disk(str(folder))
    return folder


NAMED = {"image_column": "target", "conditioning_image_column": "source", "caption_column": "prompt"}


def test_image_struct_parquet_is_inspected_with_diffusers_column_names(hf_parquet):
    assert str(pq.read_schema(next(hf_parquet.glob("*.parquet"))).field("target").type).startswith("struct")
    info = inspect_dataset(TrainConfig(data=str(hf_parquet), batch_size=2, num_validation=2, **NAMED))
    assert info.format == "parquet" and info.rows == N
    samples = fill50k(N, size=64, seed=3)
    assert info.validation["text"] == [s.text for s in samples[:2]]
    assert np.array_equal(decode_condition(info.validation["condition"][0]), samples[0].condition)


def test_save_to_disk_folder_is_inspected(hf_disk):
    info = inspect_dataset(TrainConfig(data=str(hf_disk), batch_size=2, num_validation=1))
    assert info.format == "arrow" and info.rows == N and len(info.files) == 1
    assert isinstance(info.validation["condition"][0], bytes)


def test_bytes_from_image_column_takes_the_bytes_of_image_structs(hf_disk):
    import pyarrow as pa

    table = pa.ipc.open_stream(pa.memory_map(str(next(hf_disk.glob("*.arrow"))))).read_all()
    assert bytes_from_image_column(table.column("image")).type == pa.binary()
    assert bytes_from_image_column(table.column("image")).to_pylist() == [
        v["bytes"] for v in table.column("image").to_pylist()
    ]


def test_wrong_column_types_fail_before_any_worker_starts(tmp_path, hf_parquet):
    import datasets

    bad = datasets.Dataset.from_dict({"image": ["not bytes"] * N, "conditioning_image": [1] * N, "text": ["x"] * N})
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    # Before: these passed the checks and every Ray Train worker then died decoding them, max_failures times.
    with pytest.raises(ValueError, match=r"column 'conditioning_image' is int64, not encoded images"):
        run_train(TrainConfig(data=str(tmp_path / "bad.parquet"), batch_size=1, work_dir=str(tmp_path)))
    with pytest.raises(ValueError, match=r"caption column 'target' is struct"):
        inspect_dataset(TrainConfig(data=str(hf_parquet), batch_size=1, **{**NAMED, "caption_column": "target"}))
    with pytest.raises(
        ValueError,
        match=r"no column 'text' \(set caption_column\), .*'image' \(set image_column\); its columns are target",
    ):
        inspect_dataset(TrainConfig(data=str(hf_parquet), batch_size=1))


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["parquet", "save_to_disk"])
def test_trains_on_a_huggingface_dataset(tmp_path, ray_session, mlflow_server, hf_parquet, hf_disk, layout):
    from tests.pipelines.test_train import metric_steps, train_config

    data, names = (hf_parquet, NAMED) if layout == "parquet" else (hf_disk, {})
    config = train_config(
        tmp_path,
        data,
        mlflow_server,
        num_workers=1,
        cpus_per_worker=1,
        max_steps=2,
        checkpoint_every=2,
        validate_every=0,
        num_validation=1,
        registered_model="",
        zero_stage=2,
        precision="fp32",
        **names,
    )
    result = run_train(config)
    assert result.steps == 2 and metric_steps(mlflow_server, result.mlflow_run_id) == [1, 2]
    assert np.isfinite(result.metrics["loss"])


def test_evaluate_reads_a_huggingface_heldout_set(hf_parquet, hf_disk):
    from pipelines.common.images import content_id
    from pipelines.evaluate import EvaluationSettings
    from pipelines.evaluate_data import read_heldout

    settings = EvaluationSettings.model_validate(
        {"data": str(hf_parquet), "conditioning_image_column": "source", "caption_column": "prompt", "limit": 3}
    )
    column, rows = read_heldout(settings, "canny", None)
    samples = fill50k(N, size=64, seed=3)
    assert column == "source" and rows.column("text").to_pylist() == [s.text for s in samples[:3]]
    conditions = rows.column("condition").to_pylist()
    assert rows.column("id").to_pylist() == [content_id(c) for c in conditions]  # no id column: content hashes
    assert np.array_equal(decode_condition(conditions[2]), samples[2].condition)
    _, saved = read_heldout(EvaluationSettings(data=str(hf_disk), limit=2), "canny", None)
    assert saved.num_rows == 2


def test_canonical_keeps_field_metadata_and_renames(hf_parquet):
    import pyarrow as pa

    from pipelines.data.dataset import canonical

    table = pq.read_table(hf_parquet)
    spec = {b"zeroconv.annotator": b'{"name": "canny"}'}
    table = table.cast(pa.schema([f.with_metadata(spec) if f.name == "source" else f for f in table.schema]))
    out = canonical(table, image_column="target", caption_column="prompt")
    assert out.column_names == ["image", "source", "text"]
    assert out.schema.field("image").type == pa.binary() and out.schema.field("source").type == pa.binary()
    assert out.schema.field("source").metadata == spec  # the annotator spec a model is registered with
    assert out.schema.metadata == table.schema.metadata


@pytest.mark.slow
def test_precompute_reads_image_struct_parquet(tmp_path, ray_session, tiny_base_dir):
    import pyarrow as pa

    from pipelines.precompute import PrecomputeConfig, run_precompute

    (tmp_path / "hf").mkdir()
    hf_dataset(("target", "conditioning_image", "prompt")).to_parquet(str(tmp_path / "hf" / "train.parquet"))
    config = PrecomputeConfig(
        data=str(tmp_path / "hf"),
        output=str(tmp_path / "pre"),
        base_model={"source": str(tiny_base_dir)},
        image_column="target",
        caption_column="prompt",
    )
    assert run_precompute(config).rows == N
    out = pq.read_table(tmp_path / "pre")
    assert {"text", "conditioning_image", "latent_mean", "text_embedding"} <= set(out.column_names)
    stored = pq.read_table(tmp_path / "hf" / "train.parquet").column("conditioning_image")
    assert pa.types.is_struct(stored.type)  # datasets' Image struct...
    assert out.column("conditioning_image").to_pylist() == stored.to_pylist()  # ...kept as stored
    assert out.column("text").to_pylist() == [s.text for s in fill50k(N, size=64, seed=3)]
