"""Precompute: tensors that equal what the VAE and text encoder give, a resumable job, and the same
training loss from precomputed rows as from images."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.common.config import ConfigError, load_config
from pipelines.common.images import decode_rgb
from pipelines.data.dataset import dataset_manifests
from pipelines.data.schema import (
    DATA_DIR,
    EMPTY_PROMPT_FILE,
    MANIFEST,
    PRECOMPUTED_FORMAT,
    REJECTS_DIR,
    image_column_from_bytes,
    shard_file_name,
)
from pipelines.data.tensors import image_tensor, latent_distribution, precomputed_tensors, raw_tensors
from pipelines.precompute import PrecomputeConfig, load_empty_prompt, run_precompute


def _config(data, output, base_dir, **extra) -> PrecomputeConfig:
    return load_config(
        PrecomputeConfig,
        None,
        [
            f"data={data}",
            f"output={output}",
            f"base_model.source={base_dir}",
            "compute.batch_size=5",
            *[f"{k}={v}" for k, v in extra.items()],
        ],
    )


@pytest.fixture(scope="module")
def precomputed(ray_session, fill50k_parquet, tiny_base_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("precompute") / "out"
    result = run_precompute(_config(fill50k_parquet, output, tiny_base_dir))
    return output, result


def _rows(path) -> dict[str, np.ndarray]:
    """All rows of a Parquet dataset as Ray Data gives a training loop its batches."""
    import ray

    return ray.data.read_parquet(str(path)).take_batch(1000, batch_format="numpy")


def _select(batch: dict, ids) -> dict:
    where = {id_: i for i, id_ in enumerate(batch["id"])}
    index = [where[i] for i in ids]
    return {k: v[index] for k, v in batch.items()}


def test_tensors_are_the_encoders_outputs(precomputed, fill50k_parquet, tiny_base):
    output, result = precomputed
    assert (result.rows, result.shards, result.shards_written, result.shards_skipped) == (32, 2, 2, 0)
    assert result.shapes == {"latent_mean": [4, 8, 8], "text_embedding": [77, 32]}
    assert "precomputed 32 rows" in str(result)

    pre = _rows(output)
    assert set(pre) == {
        "id",
        "text",
        "conditioning_image",
        "width",
        "height",
        "source",
        "latent_mean",
        "latent_std",
        "text_embedding",
    }  # no image unless keep_images
    assert pre["latent_mean"].dtype == np.float32 and pre["latent_mean"].shape == (32, 4, 8, 8)
    assert pre["text_embedding"].shape == (32, 77, 32)

    raw = pq.read_table(fill50k_parquet).to_pydict()
    ids = raw["id"][:6]
    rows = _select(pre, ids)
    images = image_tensor(np.stack([decode_rgb(b) for b in raw["image"][:6]]))
    mean, std = latent_distribution(tiny_base.vae, images)
    assert torch.allclose(torch.from_numpy(rows["latent_mean"]), mean, atol=1e-5)
    assert torch.allclose(torch.from_numpy(rows["latent_std"]), std, atol=1e-5)
    assert float(std.min()) > 0  # a distribution, not a point: training still samples
    text = tiny_base.family.encode_prompts(tiny_base, raw["text"][:6], (64, 64))["prompt_embeds"]
    assert torch.allclose(torch.from_numpy(rows["text_embedding"]), text, atol=1e-5)
    assert list(rows["conditioning_image"]) == raw["conditioning_image"][:6]  # condition PNGs kept as they were

    # Plain pyarrow reads the canonical tensor type too.
    first = pq.read_table(output / DATA_DIR / shard_file_name(0, 2))
    assert first.column("latent_mean").combine_chunks().to_numpy_ndarray().shape[1:] == (4, 8, 8)

    empty = load_empty_prompt(str(output))
    assert torch.allclose(
        empty, tiny_base.family.encode_prompts(tiny_base, [""], (64, 64))["prompt_embeds"], atol=1e-6
    )
    (manifest,) = dataset_manifests(str(output)).values()
    assert manifest["format"] == PRECOMPUTED_FORMAT
    assert manifest["status"] == "complete" and manifest["rows"] == 32
    assert manifest["scaling_factor"] == tiny_base.vae.config.scaling_factor and manifest["family"] == "sd"
    assert manifest["tensors"]["text_embedding"]["shape"] == [77, 32]


def test_same_loss_from_images_and_from_precomputed_rows(precomputed, fill50k_parquet, tiny_base):
    fam = tiny_base.family
    output, _ = precomputed
    controlnet = fam.new_controlnet(tiny_base)
    with torch.no_grad():  # a trained-looking ControlNet, so the condition matters to the loss
        g = torch.Generator().manual_seed(1)
        for p in controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model = fam.controlled(tiny_base, [controlnet])
    empty = fam.encode_prompts(tiny_base, [""], (64, 64))

    raw_all = pq.read_table(fill50k_parquet).to_pydict()
    raw = {k: np.array(v, dtype=object) for k, v in raw_all.items()}
    ids = list(raw["id"][4:12])
    raw_batch, pre_batch = _select(raw, ids), _select(_rows(output), ids)

    def loss(path: str, seed: int) -> float:
        torch.manual_seed(seed)  # the train loop's RNG: posterior sample, then noise and timesteps
        if path == "raw":
            latents, text, cond = raw_tensors(tiny_base, raw_batch, "conditioning_image")
        else:
            latents, text, cond = precomputed_tensors(pre_batch, tiny_base, "conditioning_image", empty)
        with torch.no_grad():
            return float(fam.loss(model, tiny_base, latents, text, [cond]))

    assert loss("precomputed", 0) == pytest.approx(loss("raw", 0), rel=1e-5, abs=1e-6)
    assert loss("precomputed", 7) == pytest.approx(loss("raw", 7), rel=1e-5, abs=1e-6)
    assert loss("raw", 0) != pytest.approx(loss("raw", 7), rel=1e-3)  # the seed matters: the match is not trivial

    # An explicit generator gives the same latents on both sides of a sample as the global RNG would.
    pre_latents = precomputed_tensors(
        pre_batch, tiny_base, "conditioning_image", empty, generator=torch.Generator().manual_seed(3)
    )[0]
    torch.manual_seed(3)
    raw_latents = raw_tensors(tiny_base, raw_batch, "conditioning_image")[0]
    assert torch.allclose(pre_latents, raw_latents, atol=1e-5)


def test_rerun_resumes_by_shard(precomputed, fill50k_parquet, tiny_base_dir):
    output, _ = precomputed
    config = _config(fill50k_parquet, output, tiny_base_dir)
    again = run_precompute(config)
    assert (again.shards_written, again.shards_skipped, again.rows) == (0, 2, 32)

    kept, redone = output / DATA_DIR / shard_file_name(0, 2), output / DATA_DIR / shard_file_name(1, 2)
    kept_mtime = os.stat(kept).st_mtime_ns
    redone.unlink()
    (output / DATA_DIR / f".{redone.name}.tmp-deadbeef").write_bytes(b"half a file")  # an interrupted write
    resumed = run_precompute(config)
    assert (resumed.shards_written, resumed.rows_written, resumed.rows) == (1, 16, 32)
    assert os.stat(kept).st_mtime_ns == kept_mtime
    assert not list(output.rglob(".*tmp-*"))

    # Issue 10: a shard cut short (an S3 upload that failed mid-way) crashed the re-run; it is written again.
    whole = redone.read_bytes()
    redone.write_bytes(whole[: len(whole) // 2])
    again = run_precompute(config)
    assert (again.shards_written, again.shards_skipped, again.rows) == (1, 1, 32)
    assert pq.read_table(redone).num_rows == 16 and os.stat(kept).st_mtime_ns == kept_mtime

    (output / EMPTY_PROMPT_FILE).unlink()  # lost: redone before anything counts as finished
    assert run_precompute(config).shards_written == 1 and (output / EMPTY_PROMPT_FILE).exists()

    with pytest.raises(ConfigError, match="different precompute job.*base_model"):
        run_precompute(_config(fill50k_parquet, output, "tiny"))
    # Before: the columns read were not part of the job, so this re-run skipped every shard and kept the
    # text embeddings of the "text" column.
    with pytest.raises(ConfigError, match='different precompute job.*caption_column: "text" then, "id" now'):
        run_precompute(_config(fill50k_parquet, output, tiny_base_dir, caption_column="id"))
    assert json.loads((output / MANIFEST).read_text())["job"]["base_model"] == str(tiny_base_dir)


def test_reads_annotate_output_layout(ray_session, fill50k_parquet, tiny_base_dir, tmp_path):
    # What annotate writes: shards under data/, image columns as {bytes, path}, rejects beside them.
    table = pq.read_table(fill50k_parquet).slice(0, 6)
    for name in ("image", "conditioning_image"):
        table = table.set_column(
            table.schema.get_field_index(name), name, image_column_from_bytes(table.column(name).to_pylist())
        )
    (tmp_path / "ann" / DATA_DIR).mkdir(parents=True)
    (tmp_path / "ann" / REJECTS_DIR).mkdir()
    pq.write_table(table, tmp_path / "ann" / DATA_DIR / shard_file_name(0, 1))
    pq.write_table(pa.table({"id": ["x"], "reason": ["too_small"]}), tmp_path / "ann" / REJECTS_DIR / "r.parquet")

    result = run_precompute(_config(tmp_path / "ann", tmp_path / "pre", tiny_base_dir))
    assert (result.rows, result.shards) == (6, 1)
    out = pq.read_table(tmp_path / "pre")
    assert out.column("conditioning_image").to_pylist() == table.column("conditioning_image").to_pylist()
    assert out.column("latent_mean").combine_chunks().to_numpy_ndarray().shape == (6, 4, 8, 8)

    # An input file rewritten under the same name: the refusal names it, not just the plan's hash.
    pq.write_table(table.slice(0, 5), tmp_path / "ann" / DATA_DIR / shard_file_name(0, 1))
    with pytest.raises(ValueError, match=rf"{shard_file_name(0, 1)} changed: \d+ bytes, modified .* then, \d+ bytes"):
        run_precompute(_config(tmp_path / "ann", tmp_path / "pre", tiny_base_dir))


def test_user_mistakes_are_clear(tmp_path, fill50k_parquet, tiny_base_dir):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_precompute(_config(tmp_path / "nope", tmp_path / "out", tiny_base_dir))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .parquet files"):
        run_precompute(_config(tmp_path / "empty", tmp_path / "out", tiny_base_dir))

    (tmp_path / "plain").mkdir()
    pq.write_table(pa.table({"id": ["a"], "text": ["t"]}), tmp_path / "plain" / "x.parquet")
    with pytest.raises(ValueError, match="not annotated data: no column image, conditioning_image or cond_"):
        run_precompute(_config(tmp_path / "plain", tmp_path / "out", tiny_base_dir))
    with pytest.raises(ConfigError, match="inside it"):
        run_precompute(_config(fill50k_parquet, fill50k_parquet / "pre", tiny_base_dir))
    with pytest.raises(FileNotFoundError, match="not a precomputed dataset"):
        load_empty_prompt(str(fill50k_parquet))
