"""A re-run of annotate on the same output must notice inputs that changed under the same name."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pipelines.annotate import AnnotateConfig, run_annotate
from pipelines.common.config import ConfigError
from pipelines.common.images import encode_jpeg
from pipelines.data.synthetic import write_image_folder


def test_overwritten_image_is_refused_on_resume(ray_session, tmp_path):
    folder = write_image_folder(tmp_path / "in", n=6, size=64)
    config = AnnotateConfig(input=str(folder), output=str(tmp_path / "out"), resolution=64, min_side=32, shard_size=4)
    first = run_annotate(config)
    assert first.accepted == 6 and run_annotate(config).shards_skipped == first.shards  # unchanged: resumes

    target = folder / "000005.jpg"
    stat = target.stat()
    target.write_bytes(encode_jpeg(np.full((64, 64, 3), 7, np.uint8)))  # new bytes, same name
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    # Before: the shard fingerprint covered paths only, so this re-run skipped the stale shard silently.
    with pytest.raises(ConfigError, match="different annotation job.*plan"):
        run_annotate(config)
