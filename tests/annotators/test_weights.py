"""Weights sources (local directory, s3:// prefix, hub id), their errors, and sha256 pins."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from annotators import create
from annotators.weights import sha256_file

FILE = "sk_model.pth"  # lineart: the smallest network (17 MB)


def test_missing_file_in_a_local_directory_names_file_source_and_remedy(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        create("lineart", weights_source=str(tmp_path))
    message = str(err.value)
    assert FILE in message and str(tmp_path) in message
    assert "weights_source=" in message and "s3://" in message and "lllyasviel/Annotators" in message


def test_a_source_that_is_nothing_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="'/no/such/dir' is not an existing local directory"):
        create("lineart", weights_source="/no/such/dir")


def test_hub_source_offline_without_the_file_cached_says_so():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(FileNotFoundError) as err:
        create("lineart")  # default source: the lllyasviel/Annotators hub repo
    message = str(err.value)
    assert FILE in message and "'lllyasviel/Annotators'" in message and "HF_HUB_OFFLINE" in message


def test_only_the_file_in_use_is_required(random_weights, tmp_path):
    (tmp_path / "sk_model2.pth").write_bytes((random_weights("sk_model2.pth") / "sk_model2.pth").read_bytes())
    coarse = create("lineart", coarse=True, weights_source=str(tmp_path), device="cpu")  # no sk_model.pth there
    assert list(coarse.spec()["weights"]["sha256"]) == ["sk_model2.pth"]


def test_s3_prefix_is_fetched_once_into_the_cache(random_weights, s3_bucket, photos):
    import boto3

    local = random_weights(FILE)
    s3 = boto3.client("s3")
    s3.upload_file(str(local / FILE), s3_bucket, f"annotators/{FILE}")
    s3.put_object(Bucket=s3_bucket, Key="annotators/unrelated.bin", Body=b"x" * 1000)  # never fetched

    from_s3 = create("lineart", weights_source=f"s3://{s3_bucket}/annotators", device="cpu")
    from_dir = create("lineart", weights_source=str(local), device="cpu")
    images = photos(64, 64, n=2)
    np.testing.assert_array_equal(from_s3(images), from_dir(images))
    assert from_s3.spec()["weights"]["sha256"] == from_dir.spec()["weights"]["sha256"]

    cached = [p for p in Path(os.environ["ZEROCONV_CACHE"], "annotator-weights").rglob("*") if p.is_file()]
    assert [p.name for p in cached] == [FILE]  # only what is used; no temp file left behind
    fetched_at = cached[0].stat().st_mtime_ns
    create("lineart", weights_source=f"s3://{s3_bucket}/annotators", device="cpu")
    assert cached[0].stat().st_mtime_ns == fetched_at  # the second actor on a machine reuses the copy

    with pytest.raises(FileNotFoundError) as err:
        create("hed", weights_source=f"s3://{s3_bucket}/annotators")
    assert f"s3://{s3_bucket}/annotators/ControlNetHED.pth" in str(err.value)


def test_pinned_sha256_is_checked(random_weights):
    directory = random_weights(FILE)
    actual = sha256_file(directory / FILE)
    pinned = create("lineart", weights_source=str(directory), weights_sha256={FILE: actual}, device="cpu")
    assert pinned.spec()["weights"]["sha256"] == {FILE: actual}
    with pytest.raises(ValueError, match=f"{FILE}.*sha256 {actual}, but {'0' * 64} is pinned"):
        create("lineart", weights_source=str(directory), weights_sha256={FILE: "0" * 64}, device="cpu")
