"""Input planning (deterministic shards) and reading: image folders, Parquet, WebDataset, S3."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.common.config import StorageConfig
from pipelines.common.images import encode_jpeg, encode_png
from pipelines.data import sources
from pipelines.data.sources import Shard, Source
from pipelines.data.synthetic import write_image_folder


def jpeg(seed: int, size: int = 16) -> bytes:
    return encode_jpeg(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


def read_all(source: Source, shards: list[Shard]) -> list:
    return [item for shard in shards for item in source.read(shard)]


def test_image_folder_plan_is_sorted_deterministic_and_pairs_captions(tmp_path):
    write_image_folder(tmp_path / "in" / "a", n=5, size=16)
    (tmp_path / "in" / "b").mkdir()
    (tmp_path / "in" / "b" / "no_caption.png").write_bytes(encode_png(np.zeros((16, 16, 3), np.uint8)))
    (tmp_path / "in" / "b" / "orphan.txt").write_text("a caption without an image")
    (tmp_path / "in" / "b" / "notes.json").write_text("{}")
    (tmp_path / "in" / ".hidden").mkdir()
    (tmp_path / "in" / ".hidden" / "x.jpg").write_bytes(jpeg(0))
    (tmp_path / "in" / "b" / ".DS_Store").write_bytes(b"junk")

    source = Source(str(tmp_path / "in"))
    shards = source.plan(shard_size=4)
    assert [s.fingerprint() for s in shards] == [s.fingerprint() for s in Source(str(tmp_path / "in")).plan(4)]
    assert [s.index for s in shards] == [0, 1, 2] and [s.count for s in shards] == [4, 4, 3]
    assert all(Shard.from_json(s.to_json()) == s for s in shards)

    items = read_all(source, shards)
    assert [i.source for i in items] == sorted(i.source for i in items)  # sorted by path, across shards
    assert len(items) == 11  # 5 images + 4 broken files + no_caption.png + notes.json; no .txt, no hidden files
    by_name = {Path(i.source).name: i for i in items}
    assert (
        by_name["000002.jpg"].caption and by_name["000002.jpg"].caption == (tmp_path / "in/a/000002.txt").read_text()
    )
    assert by_name["000002.jpg"].data == (tmp_path / "in/a/000002.jpg").read_bytes()
    assert by_name["no_caption.png"].caption == "" and by_name["no_caption.png"].problem is None
    assert by_name["notes.json"].problem[0] == sources.UNSUPPORTED_FILE and by_name["notes.json"].data is None
    assert by_name["broken_empty.jpg"].data == b"" and by_name["broken_empty.jpg"].problem is None


def test_a_single_file_is_an_input(tmp_path):
    (tmp_path / "one.jpg").write_bytes(jpeg(1))
    source = Source(str(tmp_path / "one.jpg"))
    [item] = read_all(source, source.plan(10))
    assert item.data == jpeg(1) and item.source == str(tmp_path / "one.jpg")


def test_missing_and_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Source(str(tmp_path / "nope")).plan(10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no files"):
        Source(str(tmp_path / "empty")).plan(10)
    with pytest.raises(ValueError, match="no input given"):
        Source("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "readme.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match="no image"):
        Source(str(tmp_path / "docs")).plan(10)
    with pytest.raises(FileNotFoundError, match="no parquet files"):
        Source(str(tmp_path / "docs"), format="parquet").plan(10)


def write_parquet(
    path: Path, images: list, captions: list, row_group_size: int, caption_name: str = "caption", struct: bool = False
) -> None:
    image_col = (
        pa.array(
            [None if b is None else {"bytes": b, "path": "x.jpg"} for b in images],
            pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
        )
        if struct
        else pa.array(images, pa.binary())
    )
    table = pa.table(
        {"img": image_col, caption_name: pa.array(captions, pa.string()), "extra": list(range(len(images)))}
    )
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_shards_cover_every_row_once_across_row_groups(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    images = [jpeg(i) for i in range(23)]
    images[5] = None
    write_parquet(folder / "a.parquet", images[:13], [f"cap {i}" for i in range(13)], row_group_size=4)
    write_parquet(
        folder / "b.parquet", images[13:], [f"cap {i}" for i in range(13, 23)], row_group_size=7, struct=True
    )
    source = Source(str(folder), image_column="img", caption_column="caption")
    shards = source.plan(shard_size=5)
    assert [(Path(s.path).name, s.start, s.stop) for s in shards] == [
        ("a.parquet", 0, 5),
        ("a.parquet", 5, 10),
        ("a.parquet", 10, 13),
        ("b.parquet", 0, 5),
        ("b.parquet", 5, 10),
    ]
    items = read_all(source, shards)
    assert len(items) == 23
    assert [i.caption for i in items if i.problem is None] == [f"cap {i}" for i in range(23) if i != 5]
    assert [i.data for i in items if i.problem is None] == [b for b in images if b is not None]
    assert items[5].problem[0] == sources.MISSING_IMAGE and items[5].source.endswith("a.parquet#row=5")
    assert items[13].source.endswith("b.parquet#row=0")

    no_captions = Source(str(folder), image_column="img", caption_column=None)
    assert {i.caption for i in read_all(no_captions, no_captions.plan(50))} == {""}


def test_parquet_column_mistakes_name_the_columns(tmp_path):
    write_parquet(tmp_path / "a.parquet", [jpeg(0)], ["x"], row_group_size=1)
    with pytest.raises(ValueError, match=r"no image column 'image' \(columns: img, caption, extra\)"):
        Source(str(tmp_path / "a.parquet")).plan(5)
    with pytest.raises(ValueError, match="no caption column 'text'.*caption_column=null"):
        Source(str(tmp_path / "a.parquet"), image_column="img").plan(5)
    with pytest.raises(ValueError, match="'caption' is string, not image bytes"):
        Source(str(tmp_path / "a.parquet"), image_column="caption", caption_column=None).plan(5)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_groups_members_by_key(tmp_path):
    write_tar(
        tmp_path / "shard-000.tar",
        [
            ("s/0001.jpg", jpeg(1)),
            ("s/0001.txt", b"first"),
            ("s/0001.json", b"{}"),
            ("s/0002.png", encode_png(np.zeros((8, 8, 3), np.uint8))),  # no caption
            ("s/0003.txt", b"caption without image"),
            ("s/0003.cls", b"3"),
            ("s/0004.seg.png", b"not the image"),
            ("s/0004.JPG", jpeg(4)),
            ("s/0004.txt", "über".encode()),
        ],
    )
    write_tar(tmp_path / "shard-001.tar", [("0005.webp", b"whatever"), ("0005.txt", b" padded \n")])
    source = Source(str(tmp_path))
    shards = source.plan(shard_size=2)  # one shard per tar, whatever the shard size
    assert [(s.kind, Path(s.path).name, s.count) for s in shards] == [
        ("webdataset", "shard-000.tar", None),
        ("webdataset", "shard-001.tar", None),
    ]
    items = read_all(source, shards)
    assert [i.source.rsplit("#", 1)[1] for i in items] == ["s/0001", "s/0002", "s/0003", "s/0004", "0005"]
    assert [i.caption for i in items] == ["first", "", "", "über", "padded"]
    assert items[0].data == jpeg(1) and items[3].data == jpeg(4) and items[4].data == b"whatever"
    assert items[2].problem[0] == sources.MISSING_IMAGE and "cls" in items[2].problem[1]


def test_damaged_tar_keeps_the_samples_before_the_damage(tmp_path):
    write_tar(tmp_path / "full.tar", [(f"{k:04d}.jpg", jpeg(k, size=64)) for k in range(6)])
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "full.tar").unlink()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    source = Source(str(tmp_path))
    items = read_all(source, source.plan(10))
    good = [i for i in items if i.problem is None]
    assert 1 <= len(good) < 6 and all(i.data == jpeg(int(i.source[-4:]), size=64) for i in good)
    assert items[-1].problem[0] == sources.READ_ERROR and items[-1].source.endswith("cut.tar")


def test_s3_prefix_listing_and_reading(s3_bucket, s3_server):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    for k in range(3):
        s3.put_object(Bucket=s3_bucket, Key=f"photos/d{k % 2}/{k}.jpg", Body=jpeg(k))
    s3.put_object(Bucket=s3_bucket, Key="photos/d0/0.txt", Body=b"zero")
    source = Source(f"s3://{s3_bucket}/photos", StorageConfig())
    items = read_all(source, source.plan(2))
    assert [i.source for i in items] == [
        f"s3://{s3_bucket}/photos/d0/0.jpg",
        f"s3://{s3_bucket}/photos/d0/2.jpg",
        f"s3://{s3_bucket}/photos/d1/1.jpg",
    ]
    assert [i.caption for i in items] == ["zero", "", ""] and items[2].data == jpeg(1)
