"""Loading base models: tiny, local dir, s3://, and the errors users hit."""

import json
from pathlib import Path

import pytest
import torch

from model.base import TINY, build_tiny, resolve_base_dir
from model.families import load


def test_tiny_is_deterministic_and_diffusers_format(tiny_base_dir, tmp_path):
    assert json.loads((tiny_base_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    build_tiny(tmp_path / "again")
    from safetensors.torch import load_file

    a = load_file(tiny_base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_uses_clip_tokenizer(tiny_base):
    # CLIP's real ids: <|startoftext|> a red circle <|endoftext|>
    assert tiny_base.pipe.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert tiny_base.resolution == 64 and tiny_base.pipe.scheduler.config.prediction_type == "epsilon"


def test_stock_diffusers_loads_the_tiny_dir(tiny_base_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_dir, safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(str(tmp_path / "nope"))


def test_not_a_diffusers_dir_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="not a diffusers Stable Diffusion directory: missing vae/"):
        load(str(tmp_path))


def test_loads_from_s3(tiny_base_dir, s3_bucket, tmp_path, monkeypatch):
    import boto3

    s3 = boto3.client("s3")
    for f in tiny_base_dir.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), s3_bucket, f"models/tiny/{f.relative_to(tiny_base_dir)}")
    monkeypatch.setenv("ZEROCONV_CACHE", str(tmp_path / "cache"))
    base = load(f"s3://{s3_bucket}/models/tiny")
    assert str(base.local_dir).startswith(str(tmp_path / "cache"))
    assert base.pipe.tokenizer("a").input_ids == [49406, 320, 49407]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base_dir(f"s3://{s3_bucket}/models/missing")


def test_tiny_name_resolves(tiny_base_dir):
    assert resolve_base_dir(TINY) == tiny_base_dir


def upload_tiny(tiny_base_dir, bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3")
    for f in tiny_base_dir.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(tiny_base_dir)}")


def test_s3_cache_survives_a_killed_download_and_notices_a_changed_model(
    tiny_base_dir, s3_bucket, tmp_path, monkeypatch
):
    import boto3

    from pipelines.common import storage

    upload_tiny(tiny_base_dir, s3_bucket, "models/tiny")
    monkeypatch.setenv("ZEROCONV_CACHE", str(tmp_path / "cache"))
    source = f"s3://{s3_bucket}/models/tiny"
    real_download = storage.download_dir

    def killed_part_way(uri, dest, storage_config=None):  # everything but the UNet weights, then the process "dies"
        real_download(uri, dest, storage_config)
        (Path(dest) / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(storage, "download_dir", killed_part_way)
    with pytest.raises(KeyboardInterrupt):
        resolve_base_dir(source)
    monkeypatch.setattr(storage, "download_dir", real_download)
    first = resolve_base_dir(source)
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(first.parent.glob(".download-*"))  # the killed download's leftovers are gone

    # The model changes on S3: the next load downloads the new version.
    changed = json.loads((tiny_base_dir / "scheduler" / "scheduler_config.json").read_text()) | {"beta_end": 0.02}
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key="models/tiny/scheduler/scheduler_config.json", Body=json.dumps(changed).encode()
    )
    second = resolve_base_dir(source)
    assert second != first
    assert json.loads((second / "scheduler" / "scheduler_config.json").read_text())["beta_end"] == 0.02


def test_s3_cache_downloads_once_for_concurrent_loaders(tiny_base_dir, s3_bucket, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from pipelines.common import storage

    upload_tiny(tiny_base_dir, s3_bucket, "models/tiny")
    monkeypatch.setenv("ZEROCONV_CACHE", str(tmp_path / "cache"))
    real_download, downloads = storage.download_dir, []

    def counted(uri, dest, storage_config=None):
        downloads.append(dest)
        return real_download(uri, dest, storage_config)

    monkeypatch.setattr(storage, "download_dir", counted)
    with ThreadPoolExecutor(4) as pool:
        dirs = list(pool.map(lambda _: resolve_base_dir(f"s3://{s3_bucket}/models/tiny"), range(4)))
    assert len(downloads) == 1 and len(set(dirs)) == 1
    assert (dirs[0] / "unet" / "diffusion_pytorch_model.safetensors").is_file()
