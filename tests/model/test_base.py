"""Loading base models: tiny, local dir, s3://, and the errors users hit."""

import json

import pytest
import torch

from model.base import TINY, build_tiny, load_base, resolve_base_dir


def test_tiny_is_deterministic_and_diffusers_format(tiny_base_dir, tmp_path):
    assert json.loads((tiny_base_dir / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    build_tiny(tmp_path / "again")
    from safetensors.torch import load_file

    a = load_file(tiny_base_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "again" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_uses_clip_tokenizer(tiny_base):
    # CLIP's real ids: <|startoftext|> a red circle <|endoftext|>
    assert tiny_base.tokenizer("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    assert tiny_base.resolution == 64 and tiny_base.prediction_type == "epsilon"


def test_stock_diffusers_loads_the_tiny_dir(tiny_base_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_base_dir, safety_checker=None)
    image = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_base(str(tmp_path / "nope"))


def test_not_a_diffusers_dir_is_a_clear_error(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match="not a diffusers Stable Diffusion directory: missing vae/"):
        load_base(str(tmp_path))


def test_loads_from_s3(tiny_base_dir, s3_bucket, tmp_path, monkeypatch):
    import boto3

    s3 = boto3.client("s3")
    for f in tiny_base_dir.rglob("*"):
        if f.is_file():
            s3.upload_file(str(f), s3_bucket, f"models/tiny/{f.relative_to(tiny_base_dir)}")
    monkeypatch.setenv("ZEROCONV_CACHE", str(tmp_path / "cache"))
    base = load_base(f"s3://{s3_bucket}/models/tiny")
    assert str(base.local_dir).startswith(str(tmp_path / "cache"))
    assert base.tokenizer("a").input_ids == [49406, 320, 49407]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_base_dir(f"s3://{s3_bucket}/models/missing")


def test_tiny_name_resolves(tiny_base_dir):
    assert resolve_base_dir(TINY) == tiny_base_dir
