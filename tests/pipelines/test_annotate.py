"""The annotate stage end to end on a real local Ray (and a moto S3 server): schema, ids, rejects,
counts, captions, input formats, resume, and the errors a user can make."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from annotators import Annotator, create
from pipelines.annotate import AnnotateConfig, run_annotate
from pipelines.annotate_worker import AnnotateShards, ShardJob
from pipelines.cli import main as cli_main
from pipelines.common import images
from pipelines.common.cluster import DEFAULT_MAX_ACTORS, actor_pool_options
from pipelines.common.config import ConfigError, load_config
from pipelines.common.images import decode_training_image, encode_jpeg, encode_png
from pipelines.common.storage import resolve
from pipelines.data import sources
from pipelines.data.schema import DATA_DIR, EMPTY_DIR, MANIFEST, REJECTS_DIR, condition_columns, shard_file_name
from pipelines.data.sources import Source
from pipelines.data.synthetic import fill50k, write_image_folder

RES = 64
COLUMNS = [
    "id",
    "image",
    "text",
    "conditioning_image",
    "width",
    "height",
    "original_width",
    "original_height",
    "source",
]
EXPECTED_REASONS = {
    "broken_empty.jpg": images.EMPTY,
    "broken_truncated.jpg": images.TRUNCATED,
    "broken_not_an_image.jpg": images.NOT_AN_IMAGE,
    "broken_too_small.png": images.TOO_SMALL,
    "notes.json": sources.UNSUPPORTED_FILE,
}


def make_config(input_uri, output_uri, **overrides) -> AnnotateConfig:
    values = {"input": str(input_uri), "output": str(output_uri), "resolution": RES, "min_side": 32, "shard_size": 8}
    return AnnotateConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """20 captioned JPEGs, the four broken kinds, a non-image file and an uncaptioned RGBA PNG: 26 inputs."""
    folder = write_image_folder(tmp_path_factory.mktemp("annotate") / "in", n=20, size=RES, broken=True)
    (folder / "notes.json").write_text("{}")
    (folder / "extra").mkdir()
    rgba = np.zeros((RES, 80, 4), np.uint8)
    rgba[:, 40:] = (200, 30, 30, 255)  # left half transparent
    (folder / "extra" / "no_caption.png").write_bytes(encode_png(rgba))
    return folder


def read_output(uri: str, storage=None) -> tuple[pa.Table, pa.Table]:
    loc = resolve(uri, storage)
    data = pq.read_table(loc.path, filesystem=loc.fs)  # the dataset folder reads as plain Parquet
    rejects_dir = loc.join(REJECTS_DIR)
    rejects = (
        pq.read_table(rejects_dir.path, filesystem=loc.fs)
        if rejects_dir.exists()
        else pa.table({"id": [], "source": [], "reason": []})
    )
    return data, rejects


def test_folder_to_parquet_schema_ids_captions_rejects(ray_session, image_folder, tmp_path):
    result = run_annotate(make_config(image_folder, tmp_path / "out"))
    data, rejects = read_output(result.output)

    assert data.column_names == COLUMNS
    assert (result.read, result.accepted, result.rejected) == (26, 21, 5)
    assert result.read == result.accepted + result.rejected == data.num_rows + rejects.num_rows
    assert {
        Path(s).name: r for s, r in zip(rejects["source"].to_pylist(), rejects["reason"].to_pylist())
    } == EXPECTED_REASONS
    assert result.reasons == {r: 1 for r in EXPECTED_REASONS.values()}

    rows = data.to_pylist()
    assert len({r["id"] for r in rows}) == len(rows)
    canny = create("canny")
    for row in rows:
        source_bytes = Path(row["source"]).read_bytes()
        assert row["id"] == hashlib.sha256(source_bytes).hexdigest()[:32]  # content hash of the source
        caption = Path(row["source"]).with_suffix(".txt")
        assert row["text"] == (caption.read_text() if caption.exists() else "")
        assert (row["width"], row["height"]) == (RES, RES)
        image = Image.open(io.BytesIO(row["image"]["bytes"]))  # Hugging Face's {bytes, path}
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (RES, RES))
        condition = Image.open(io.BytesIO(row["conditioning_image"]["bytes"]))
        assert (condition.format, condition.mode, condition.size) == ("PNG", "L", (RES, RES))  # 1 channel stays 1
        pixels, original = decode_training_image(source_bytes, RES)
        assert np.array_equal(np.asarray(condition), canny(pixels[None])[0, ..., 0])
        assert (row["original_width"], row["original_height"]) == original
    uncaptioned = next(r for r in rows if r["source"].endswith("no_caption.png"))
    assert uncaptioned["text"] == "" and (uncaptioned["original_width"], uncaptioned["original_height"]) == (80, RES)
    assert np.asarray(Image.open(io.BytesIO(uncaptioned["image"]["bytes"])))[RES // 2, 2].min() > 240  # alpha -> white

    field_meta = data.schema.field("conditioning_image").metadata
    assert json.loads(field_meta[b"zeroconv.annotator"]) == canny.spec()
    manifest = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"read": 26, "accepted": 21, "rejected": 5}
    assert manifest["job"]["columns"] == {"conditioning_image": canny.spec()}
    assert ray_session.data.read_parquet(result.output).count() == 21  # Ray skips _rejects and the manifest
    summary = str(result)
    assert "accepted 21, rejected 5" in summary and "images/s" in summary and REJECTS_DIR in summary


def test_resume_after_interruption_writes_each_row_once(ray_session, image_folder, tmp_path):
    out = tmp_path / "out"
    config = make_config(image_folder, out, shard_size=5)
    first = run_annotate(config)
    assert (first.shards, first.shards_written) == (6, 6)
    before, rejects_before = read_output(first.output)

    # Interrupt: the shard holding the broken files is gone (data and rejects); another was cut short
    # (an S3 upload that failed mid-way); a half-written temp file is left behind; the manifest still
    # says "running".
    data, name1, name4 = out / DATA_DIR, shard_file_name(1, 6), shard_file_name(4, 6)
    (data / name4).unlink()
    whole = (data / name1).read_bytes()
    (data / name1).write_bytes(whole[: len(whole) // 2])
    (out / REJECTS_DIR / name4).unlink()
    (data / f".{name4}.tmp-0123").write_bytes(b"half a file")
    manifest = json.loads((out / MANIFEST).read_text())
    (out / MANIFEST).write_text(json.dumps({**manifest, "status": "running"}))

    second = run_annotate(config)
    assert (second.shards_written, second.shards_skipped) == (2, 4)
    assert second.processed == 10  # only the two unfinished shards were read again
    assert not (data / f".{name4}.tmp-0123").exists()
    after, rejects_after = read_output(second.output)
    ids = after["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 21
    assert sorted(ids) == sorted(before["id"].to_pylist())  # content-hash ids: the same on every run
    assert sorted(rejects_after["source"].to_pylist()) == sorted(rejects_before["source"].to_pylist())
    assert (second.read, second.accepted, second.rejected) == (first.read, first.accepted, first.rejected)
    assert json.loads((out / MANIFEST).read_text())["status"] == "complete"

    third = run_annotate(config)  # nothing left to do: Ray is not even asked
    assert (third.shards_written, third.processed, third.accepted) == (0, 0, 21)

    with pytest.raises(ConfigError, match="different annotation job.*resolution"):
        run_annotate(make_config(image_folder, out, shard_size=5, resolution=128))


def test_s3_input_and_output(ray_session, s3_server, s3_bucket, tmp_path):
    import boto3

    folder = write_image_folder(tmp_path / "in", n=6, size=RES, broken=True)
    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for path in sorted(folder.iterdir()):
        s3.put_object(Bucket=s3_bucket, Key=f"raw/{path.name}", Body=path.read_bytes())
    config = make_config(
        f"s3://{s3_bucket}/raw", f"s3://{s3_bucket}/annotated", shard_size=4, compute={"max_actors": 1}
    )  # fewer worker processes: a faster test

    result = run_annotate(config)
    assert (result.read, result.accepted, result.rejected) == (10, 6, 4)
    data, rejects = read_output(result.output)
    assert data.num_rows == 6 and rejects.num_rows == 4
    assert all(s.startswith(f"s3://{s3_bucket}/raw/") for s in data["source"].to_pylist())
    assert sorted(data["text"].to_pylist()) == sorted((folder / f"{i:06d}.txt").read_text() for i in range(6))
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="annotated/")["Contents"]}
    assert {f"annotated/{DATA_DIR}/{shard_file_name(0, 3)}", f"annotated/{MANIFEST}"} <= keys

    s3.delete_object(Bucket=s3_bucket, Key=f"annotated/{DATA_DIR}/{shard_file_name(1, 3)}")
    again = run_annotate(config)
    assert (again.shards_written, again.shards_skipped, again.accepted) == (1, 2, 6)
    assert sorted(read_output(again.output)[0]["id"].to_pylist()) == sorted(data["id"].to_pylist())


def test_parquet_input_with_named_columns(ray_session, tmp_path):
    samples = fill50k(7, size=RES, seed=3)
    image_bytes = [encode_jpeg(s.image) for s in samples] + [None, b"garbage"]
    captions = [s.text for s in samples] + ["no image", "bad image"]
    pq.write_table(
        pa.table({"jpg": pa.array(image_bytes, pa.binary()), "caption": captions}),
        tmp_path / "train.parquet",
        row_group_size=3,
    )

    result = run_annotate(
        make_config(
            tmp_path / "train.parquet",
            tmp_path / "out",
            image_column="jpg",
            caption_column="caption",
            shard_size=4,
            compute={"max_actors": 1},
        )
    )
    data, rejects = read_output(result.output)
    assert (result.read, result.accepted, result.rejected) == (9, 7, 2)
    by_row = {int(s.rsplit("=", 1)[1]): t for s, t in zip(data["source"].to_pylist(), data["text"].to_pylist())}
    assert by_row == {i: s.text for i, s in enumerate(samples)}
    assert dict(zip(rejects["source"].to_pylist(), rejects["reason"].to_pylist())) == {
        f"{tmp_path}/train.parquet#row=7": sources.MISSING_IMAGE,
        f"{tmp_path}/train.parquet#row=8": images.NOT_AN_IMAGE,
    }


def test_webdataset_input(ray_session, tmp_path):
    samples = fill50k(5, size=RES, seed=4)
    folder = tmp_path / "wds"
    folder.mkdir()
    for shard, keys in enumerate([(0, 1, 2), (3, 4)]):
        with tarfile.open(folder / f"shard-{shard:03d}.tar", "w") as tar:
            for k in keys:
                members = [(f"{k:05d}.jpg", encode_jpeg(samples[k].image))]
                if k != 4:  # the last sample has no caption
                    members.append((f"{k:05d}.txt", samples[k].text.encode()))
                for name, payload in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))

    result = run_annotate(make_config(folder, tmp_path / "out", compute={"max_actors": 1}))
    data, _ = read_output(result.output)
    assert (result.read, result.accepted, result.shards) == (5, 5, 2)
    texts = dict(zip(data["source"].to_pylist(), data["text"].to_pylist()))
    assert texts[f"{folder}/shard-000.tar#00001"] == samples[1].text
    assert texts[f"{folder}/shard-001.tar#00004"] == ""


class Invert(Annotator):
    name, version, channels = "invert", "7", 3

    def annotate(self, batch: np.ndarray) -> np.ndarray:
        return 255 - batch


class FailsOnBright(Annotator):
    """Raises on very bright images only, like a model that chokes on one kind of input."""

    name, channels = "fragile", 1

    def annotate(self, batch: np.ndarray) -> np.ndarray:
        if any(img.mean() > 150 for img in batch):
            raise RuntimeError("cannot handle bright images")
        return batch[..., :1]


class FailsOnce(Annotator):
    """Raises on its first call only, like a GPU hiccup or a weight download that timed out once."""

    name, channels = "flaky", 1

    def __init__(self):
        super().__init__()
        self.calls = 0

    def annotate(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return batch[..., :1]


def local_actor(folder: Path, output: Path, annotators: list[Annotator], batch_size: int) -> AnnotateShards:
    """The actor class, run in this process on a real folder (the Ray plumbing is tested above)."""
    source = Source(str(folder))
    columns = dict(zip(condition_columns([a.name for a in annotators]), [a.spec() for a in annotators]))
    job = ShardJob(
        source=source,
        output=str(output),
        shards=1,
        storage=source.storage,
        annotators=(("canny", {}),),
        columns=columns,
        resolution=RES,
        min_side=32,
        jpeg_quality=90,
        batch_size=batch_size,
        threads=2,
    )
    actor = AnnotateShards(job)
    actor.annotators = annotators
    return actor


def test_several_annotators_get_a_column_each(tmp_path):
    samples = fill50k(6, size=RES, seed=5)
    (tmp_path / "in").mkdir()
    for i, s in enumerate(samples):
        (tmp_path / "in" / f"{i}.jpg").write_bytes(encode_jpeg(s.image))
    annotators = [create("canny"), Invert(), FailsOnBright()]
    actor = local_actor(tmp_path / "in", tmp_path / "out", annotators, batch_size=4)
    assert list(actor.job.columns) == ["cond_canny", "cond_invert", "cond_fragile"]
    [shard] = actor.job.source.plan(shard_size=100)

    summary = actor.annotate_shard(shard)
    assert (summary["read"], summary["accepted"], summary["rejected"]) == (6, 6, 0)
    data, rejects = read_output(str(tmp_path / "out"))
    assert data.column_names == [
        "id",
        "image",
        "text",
        "cond_canny",
        "cond_invert",
        "cond_fragile",
        "width",
        "height",
        "original_width",
        "original_height",
        "source",
    ]
    assert rejects.num_rows == 0
    row = next(r for r in data.to_pylist() if r["source"].endswith("/0.jpg"))
    assert Image.open(io.BytesIO(row["cond_canny"]["bytes"])).mode == "L"
    assert Image.open(io.BytesIO(row["cond_invert"]["bytes"])).mode == "RGB"
    pixels, _ = decode_training_image((tmp_path / "in" / "0.jpg").read_bytes(), RES)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(row["cond_invert"]["bytes"]))), 255 - pixels)
    for column, spec in actor.job.columns.items():
        assert json.loads(data.schema.field(column).metadata[b"zeroconv.annotator"]) == json.loads(json.dumps(spec))


def test_a_transient_annotator_failure_is_retried_not_a_reject(tmp_path):
    # Issue 12: a 1-image batch whose annotator call failed once became a permanent annotator_error reject.
    samples = fill50k(3, size=RES, seed=6)
    (tmp_path / "in").mkdir()
    for i, s in enumerate(samples):
        (tmp_path / "in" / f"{i}.jpg").write_bytes(encode_jpeg(s.image))
    flaky = FailsOnce()
    actor = local_actor(tmp_path / "in", tmp_path / "out", [flaky], batch_size=1)
    [shard] = actor.job.source.plan(shard_size=100)

    summary = actor.annotate_shard(shard)
    assert (summary["read"], summary["accepted"], summary["rejected"]) == (3, 3, 0)
    assert flaky.calls == 4  # the failed call, its retry, then one call per remaining image
    data, rejects = read_output(str(tmp_path / "out"))
    assert data.num_rows == 3 and rejects.num_rows == 0


def test_an_annotator_that_keeps_failing_fails_the_shard_without_rejects(tmp_path):
    # Images that decode are good input: an annotator raising on them is the annotator's fault, so the
    # shard stops loudly (a re-run resumes) instead of filing good images as rejects.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "0.jpg").write_bytes(encode_jpeg(fill50k(1, size=RES, seed=7)[0].image))
    (tmp_path / "in" / "1_bright.png").write_bytes(encode_png(np.full((RES, RES, 3), 250, np.uint8)))
    actor = local_actor(tmp_path / "in", tmp_path / "out", [create("canny"), FailsOnBright()], batch_size=4)
    [shard] = actor.job.source.plan(shard_size=100)

    with pytest.raises(RuntimeError, match="annotator 'fragile' failed 3 times .*cannot handle bright images"):
        actor.annotate_shard(shard)
    assert not (tmp_path / "out").exists()  # no data, no rejects, no marker: the shard is not finished


def test_user_mistakes_are_clear_errors(tmp_path, capsys):
    assert cli_main(["annotate", f"input={tmp_path}/missing", f"output={tmp_path}/out"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli_main(["annotate", f"output={tmp_path}/out"]) == 2
    assert "no input given" in capsys.readouterr().err

    with pytest.raises(ConfigError, match="resolution: .*multiple of 8"):
        load_config(AnnotateConfig, overrides=["input=x", "resolution=60"])
    with pytest.raises(ConfigError, match="canny appears more than once"):
        load_config(AnnotateConfig, overrides=["input=x", "annotators=[{name: canny}, {name: canny}]"])
    with pytest.raises(ConfigError, match=r"compute\.batch_size"):
        load_config(AnnotateConfig, overrides=["input=x", "compute.batch_size=0"])

    folder = write_image_folder(tmp_path / "in", n=2, size=RES, broken=False)
    with pytest.raises(ValueError, match="unknown annotator 'nope'"):
        run_annotate(make_config(folder, tmp_path / "out", annotators=[{"name": "nope"}]))
    with pytest.raises(ValueError, match="bad parameters"):
        run_annotate(make_config(folder, tmp_path / "out", annotators=[{"name": "canny", "params": {"sigma": 2}}]))
    with pytest.raises(ConfigError, match="is the input or inside it"):
        run_annotate(make_config(folder, folder / "annotated"))


def test_output_may_not_be_the_input_or_inside_it(tmp_path):
    from pipelines.data.shards import check_output_outside

    for output in (tmp_path / "in", tmp_path / "in" / "out"):
        with pytest.raises(ConfigError, match="is the input or inside it"):
            check_output_outside(resolve(str(output)), str(tmp_path / "in/"))
    check_output_outside(resolve(str(tmp_path / "in-annotated")), str(tmp_path / "in"))  # a sibling, not inside
    check_output_outside(resolve(str(tmp_path / "in" / "out")), "s3://bucket" + str(tmp_path / "in"))


def test_pool_bounds_come_from_config_not_from_the_cluster():
    # Issue 11: sizing from a snapshot of ray.cluster_resources() gave one actor for a whole autoscaling
    # cluster that starts with no workers. The pool autoscales from 1 to a bound that only config decides.
    compute = AnnotateConfig(input="x", compute={"max_actors": 3}).compute
    pool = actor_pool_options(compute, work_items=10, resources={"decode": 1}, single_threaded=True)
    assert (pool["compute"].min_size, pool["compute"].max_size) == (1, 3)
    assert pool["num_cpus"] == 0.9 and pool["resources"] == {"decode": 1} and "num_gpus" not in pool
    assert actor_pool_options(compute, work_items=2, single_threaded=True)["compute"].max_size == 2  # no idle actors
    # On a cluster that may grow, every actor is asked for at once: pending actors are the demand the cluster
    # autoscaler adds nodes for (Ray Data alone grows a pool only within the nodes that exist).
    growing = actor_pool_options(compute, work_items=10, resources={"decode": 1}, cluster_may_grow=True)
    assert (growing["compute"].min_size, growing["compute"].max_size) == (3, 3)
    growing = actor_pool_options(compute, work_items=2, cluster_may_grow=True)
    assert (growing["compute"].min_size, growing["compute"].max_size) == (2, 2)  # still one per work item at most

    default = AnnotateConfig(input="x").compute
    assert actor_pool_options(default, work_items=500, single_threaded=True)["compute"].max_size == DEFAULT_MAX_ACTORS
    assert actor_pool_options(default, work_items=500)["compute"].max_size == 1  # a torch model uses every core
    gpu = AnnotateConfig(input="x", compute={"use_gpu": True, "gpus_per_actor": 0.5, "cpus_per_actor": 4}).compute
    pool = actor_pool_options(gpu, work_items=500)
    assert (pool["compute"].max_size, pool["num_gpus"], pool["num_cpus"]) == (DEFAULT_MAX_ACTORS, 0.5, 4)
    assert gpu.threads() == 4  # decode threads follow the CPUs an actor reserves


def test_an_unsatisfiable_request_fails_with_a_clear_message(ray_session, tmp_path):
    folder = write_image_folder(tmp_path / "in", n=2, size=RES, broken=False)
    with pytest.raises(ValueError, match="actors cannot be placed.*this local Ray has no node with GPU: 1"):
        run_annotate(make_config(folder, tmp_path / "out", compute={"use_gpu": True}))
    with pytest.raises(ValueError, match=r"no node with annotate_gpu: 1 \("):
        run_annotate(make_config(folder, tmp_path / "out2", ray={"resources": {"annotate_gpu": 1}}))
    with pytest.raises(ValueError, match="no node with CPU: 64"):
        run_annotate(make_config(folder, tmp_path / "out3", compute={"cpus_per_actor": 64}))


def test_output_loads_in_hugging_face_datasets(ray_session, image_folder, tmp_path):
    # Issue 15.1: `datasets` read the manifest and the rejects as data, and crashed on the 0-row file of a
    # shard whose inputs were all rejected; image columns loaded as raw bytes.
    import datasets

    out = tmp_path / "out"
    result = run_annotate(make_config(image_folder, out, shard_size=5))  # the last shard is notes.json alone
    assert (result.accepted, result.rejected, result.shards) == (21, 5, 6)
    assert not (out / DATA_DIR / shard_file_name(5, 6)).exists()  # no 0-row data file...
    assert (out / EMPTY_DIR / shard_file_name(5, 6).replace(".parquet", ".json")).exists()  # ...a marker instead
    assert (out / REJECTS_DIR / shard_file_name(5, 6)).exists()

    for dataset in (
        datasets.load_dataset("parquet", data_dir=str(out), cache_dir=str(tmp_path / "hf")),
        datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf")),
    ):
        train = dataset["train"]
        assert list(dataset) == ["train"] and train.num_rows == 21
        assert {"image", "conditioning_image", "text"} <= set(train.column_names)
        assert isinstance(train.features["image"], datasets.Image)
        assert isinstance(train.features["conditioning_image"], datasets.Image)
        for row in train:
            assert row["image"].convert("RGB").size == (RES, RES)
            assert row["conditioning_image"].convert("RGB").size == (RES, RES)
        assert sorted(train["id"]) == sorted(read_output(result.output)[0]["id"].to_pylist())

    again = run_annotate(make_config(image_folder, out, shard_size=5))  # the empty shard counts as finished
    assert (again.shards_written, again.shards_skipped, again.rejected) == (0, 6, 5)


def test_condition_column_rule():
    assert condition_columns(["canny"]) == ["conditioning_image"]
    assert condition_columns(["canny", "hed"]) == ["cond_canny", "cond_hed"]
