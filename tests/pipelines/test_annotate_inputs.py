"""Annotate end to end on awkward inputs: a file changed under the same name, a truncated tar."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.annotate import AnnotateConfig, run_annotate
from pipelines.common.config import ConfigError
from pipelines.common.images import encode_jpeg
from pipelines.data.schema import REJECTS_DIR
from pipelines.data.synthetic import fill50k, write_image_folder


def test_overwritten_image_is_refused_on_resume(ray_session, tmp_path):
    folder = write_image_folder(tmp_path / "in", n=6, size=64)
    config = AnnotateConfig(input=str(folder), output=str(tmp_path / "out"), resolution=64, min_side=32, shard_size=4)
    first = run_annotate(config)
    assert first.accepted == 6 and run_annotate(config).shards_skipped == first.shards  # unchanged: resumes

    target = folder / "000005.jpg"
    stat = target.stat()
    target.write_bytes(encode_jpeg(np.full((64, 64, 3), 7, np.uint8)))  # new bytes, same name
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    # Before: the shard fingerprint covered paths only, so this re-run skipped the stale shard silently;
    # then it was refused with the plan's hashes only. The message names the file and both its versions.
    with pytest.raises(ValueError) as refused:
        run_annotate(config)
    before, after = f"{stat.st_size} bytes", f"{target.stat().st_size} bytes"
    assert f"{target} changed: {before}, modified " in str(refused.value)
    assert f" then, {after}, modified " in str(refused.value) and "Use a new output" in str(refused.value)

    for name in ("000010.jpg", "000011.jpg", "000012.jpg"):  # new files, a new shard: the plan says so
        (folder / name).write_bytes(target.read_bytes())
    with pytest.raises(ConfigError, match="different annotation job.*plan"):
        run_annotate(config)


def test_truncated_tar_counts_every_sample_read(ray_session, tmp_path):
    buf, offsets = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for k, sample in enumerate(fill50k(5, size=64, seed=5)):
            for name, payload in ((f"{k:04d}.jpg", encode_jpeg(sample.image)), (f"{k:04d}.txt", sample.text.encode())):
                offsets.append(buf.tell())
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "cut.tar").write_bytes(buf.getvalue()[: offsets[6] + 600])  # inside sample 0003's jpg
    config = AnnotateConfig(input=str(tmp_path / "wds"), output=str(tmp_path / "out"), resolution=64, min_side=32)
    result = run_annotate(config)
    # Before: samples 0000-0002 and one reject named after the tar, whatever the tar still held.
    assert (result.read, result.accepted, result.rejected) == (4, 3, 1)
    rejects = pq.read_table(tmp_path / "out" / REJECTS_DIR).to_pylist()
    assert [r["source"].rsplit("#", 1)[1] for r in rejects] == ["0003"] and rejects[0]["reason"] == "read_error"
