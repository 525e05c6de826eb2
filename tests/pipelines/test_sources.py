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


def read_all(source: Source, shards) -> list:
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
    shards = list(source.plan(shard_size=4))
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
    shards = list(source.plan(shard_size=5))
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
        list(Source(str(tmp_path / "a.parquet")).plan(5))
    with pytest.raises(ValueError, match="no caption column 'text'.*caption_column=null"):
        list(Source(str(tmp_path / "a.parquet"), image_column="img").plan(5))
    with pytest.raises(ValueError, match="'caption' is string, not image bytes"):
        list(Source(str(tmp_path / "a.parquet"), image_column="caption", caption_column=None).plan(5))


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
    shards = list(source.plan(shard_size=2))  # one shard per tar, whatever the shard size
    assert [(s.kind, Path(s.path).name, s.count) for s in shards] == [
        ("webdataset", "shard-000.tar", None),
        ("webdataset", "shard-001.tar", None),
    ]
    items = read_all(source, shards)
    assert [i.source.rsplit("#", 1)[1] for i in items] == ["s/0001", "s/0002", "s/0003", "s/0004", "0005"]
    assert [i.caption for i in items] == ["first", "", "", "über", "padded"]
    assert items[0].data == jpeg(1) and items[3].data == jpeg(4) and items[4].data == b"whatever"
    assert items[2].problem[0] == sources.MISSING_IMAGE and "cls" in items[2].problem[1]


def tar_bytes(members: list[tuple[str, bytes]]) -> tuple[bytes, list[int]]:
    """An uncompressed tar and the byte offset of each member's header."""
    buf = io.BytesIO()
    offsets = []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            offsets.append(buf.tell())
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue(), offsets


SAMPLES = [member for k in range(6) for member in ((f"{k:04d}.jpg", jpeg(k, size=64)), (f"{k:04d}.txt", b"cap"))]


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda offsets: offsets[6] + 700, id="inside-image-data"),  # sample 0003's jpg
        pytest.param(lambda offsets: offsets[7] + 100, id="inside-a-header"),  # sample 0003's txt header
        pytest.param(lambda offsets: offsets[8], id="at-a-member-boundary"),  # right after sample 0003
    ],
)
def test_truncated_tar_rejects_the_sample_it_cut_on_its_own(tmp_path, cut):
    data, offsets = tar_bytes(SAMPLES)
    (tmp_path / "cut.tar").write_bytes(data[: cut(offsets)])
    source = Source(str(tmp_path))
    items = read_all(source, source.plan(10))
    # Samples 0000-0002 are whole; 0003 was being read when the tar ended: one reject of its own,
    # named by its key. Nothing else is known to be lost, so nothing else is counted.
    assert [i.source.rsplit("#", 1)[1] for i in items] == ["0000", "0001", "0002", "0003"]
    assert [i.problem is None for i in items] == [True, True, True, False]
    assert all(i.data == jpeg(int(i.source[-4:]), size=64) and i.caption == "cap" for i in items[:3])
    assert items[3].problem[0] == sources.READ_ERROR and "damaged tar" in items[3].problem[1]


def test_tar_with_a_damaged_header_rejects_the_hidden_stretch(tmp_path):
    data, offsets = tar_bytes(SAMPLES)
    broken = bytearray(data)
    broken[offsets[4] : offsets[4] + 100] = b"\xff" * 100  # sample 0002's jpg header: name and checksum gone
    (tmp_path / "bad.tar").write_bytes(bytes(broken))
    source = Source(str(tmp_path))
    items = read_all(source, source.plan(10))
    # Before: tarfile stopped quietly at the bad header and samples 0002-0005 vanished without a trace.
    # Now: 0001, the sample being assembled (the hidden member could have been one of its own), is its
    # own reject; the stretch whose members cannot be named is one more.
    assert [i.source.rsplit("#", 1)[1] for i in items] == ["0000", "0001", f"@{offsets[4]}"]
    assert [i.problem is None for i in items] == [True, False, False]
    assert items[2].problem[0] == sources.READ_ERROR and f"byte {offsets[4]}" in items[2].problem[1]


def test_whole_tars_end_cleanly_plain_and_gzipped(tmp_path):
    data, _ = tar_bytes(SAMPLES)
    (tmp_path / "a.tar").write_bytes(data)
    with tarfile.open(tmp_path / "b.tar.gz", "w:gz") as tar:
        for name, member in SAMPLES[:4]:
            info = tarfile.TarInfo(name)
            info.size = len(member)
            tar.addfile(info, io.BytesIO(member))
    source = Source(str(tmp_path))
    items = read_all(source, source.plan(10))
    assert len(items) == 8 and all(i.problem is None for i in items)


def test_caption_extension_in_any_case_pairs_with_its_image(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(jpeg(0))
    (tmp_path / "photo.TXT").write_text("upper")
    (tmp_path / "other.png").write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8)))
    (tmp_path / "other.Txt").write_text("mixed")
    (tmp_path / "plain.jpg").write_bytes(jpeg(1))
    source = Source(str(tmp_path))
    items = read_all(source, source.plan(10))
    # Before: photo.jpg looked for photo.txt, failed to open it and became a read_error reject.
    assert [(Path(i.source).name, i.caption, i.problem) for i in items] == [
        ("other.png", "mixed", None),
        ("photo.jpg", "upper", None),
        ("plain.jpg", "", None),
    ]


def test_captions_pair_across_interleaved_names_and_folders(tmp_path):
    # Sorted paths put photo.m/ (a folder) and photo.v2.jpg between photo.jpg and photo.txt.
    (tmp_path / "photo.m").mkdir()
    (tmp_path / "photo.m" / "x.jpg").write_bytes(jpeg(2))
    (tmp_path / "photo.m" / "x.txt").write_text("inner")
    (tmp_path / "photo.jpg").write_bytes(jpeg(0))
    (tmp_path / "photo.txt").write_text("outer")
    (tmp_path / "photo.v2.jpg").write_bytes(jpeg(1))
    (tmp_path / "photo.v2.txt").write_text("second")
    (tmp_path / "photo.webp").write_bytes(b"webp")  # sorts after photo.txt: same caption
    source = Source(str(tmp_path))
    items = {Path(i.source).relative_to(tmp_path).as_posix(): i.caption for i in read_all(source, source.plan(2))}
    assert items == {"photo.jpg": "outer", "photo.m/x.jpg": "inner", "photo.v2.jpg": "second", "photo.webp": "outer"}


def test_local_walk_lists_in_sorted_path_order(tmp_path):
    for name in ("b/x.jpg", "b-c.jpg", "b.jpg", "b0.jpg", "a/z/y.jpg", "a.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    from pipelines.common.storage import resolve
    from pipelines.data.listing import list_files

    listed = [f.path for f in list_files(resolve(tmp_path))]
    assert listed == sorted(listed) and len(listed) == 6


def test_local_walk_follows_symlinked_folders_but_not_a_loop(tmp_path):
    from pipelines.common.storage import resolve
    from pipelines.data.listing import list_files

    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "a" / "x.jpg").write_bytes(b"x")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "y.jpg").write_bytes(b"y")
    (tmp_path / "in" / "a" / "up").symlink_to(tmp_path / "in", target_is_directory=True)  # a loop
    (tmp_path / "in" / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # a linked folder
    # Before: the walk went round the loop (in/a/up/a/up/...) until the path was too long for the OS.
    listed = [Path(f.path).relative_to(tmp_path / "in").as_posix() for f in list_files(resolve(tmp_path / "in"))]
    assert listed == ["a/x.jpg", "b/y.jpg"]


def test_overwritten_file_changes_its_shard_fingerprint(tmp_path):
    import os

    write_image_folder(tmp_path / "in", n=6, size=16)
    before = [s.fingerprint() for s in Source(str(tmp_path / "in")).plan(4)]
    assert before == [s.fingerprint() for s in Source(str(tmp_path / "in")).plan(4)]
    target = tmp_path / "in" / "000005.jpg"
    stat = target.stat()
    target.write_bytes(jpeg(99))  # different bytes under the same name
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    after = [s.fingerprint() for s in Source(str(tmp_path / "in")).plan(4)]
    shard_of = {p: s.index for s in Source(str(tmp_path / "in")).plan(4) for p, _, _ in s.files}
    changed = shard_of[str(target)]
    assert [b != a for b, a in zip(before, after)] == [i == changed for i in range(len(before))]
    (tmp_path / "in" / "000001.txt").write_text("a new caption")  # a caption is part of its input too
    assert [s.fingerprint() for s in Source(str(tmp_path / "in")).plan(4)][0] != after[0]


def test_plan_is_a_stream(tmp_path):
    write_image_folder(tmp_path / "in", n=6, size=16)
    plan = Source(str(tmp_path / "in")).plan(2)
    first = next(plan)  # the first shard exists before the listing has been read to its end
    assert first.index == 0 and first.count == 2


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
    # Versions are the ETags: rewriting an object changes its shard, nothing else does.
    before = [s.fingerprint() for s in source.plan(2)]
    s3.put_object(Bucket=s3_bucket, Key="photos/d1/1.jpg", Body=jpeg(7))
    after = [s.fingerprint() for s in source.plan(2)]
    assert before[0] == after[0] and before[1] != after[1]
