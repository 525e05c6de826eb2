"""``zeroconv precompute``: annotated Parquet -> VAE latents + text embeddings, once, on Ray Data.

Training spends a large share of each step in the frozen VAE and text encoder (MosaicML measured
1.4x for SD2 on A100s). Running them once over the dataset moves that cost out of the loop:

    zeroconv precompute data=runs/annotated output=runs/precomputed base_model.source=tiny

What is stored, and why (details: docs/evaluation.md, "Precomputed data"):

* ``latent_mean`` and ``latent_std``: the VAE posterior's parameters (unscaled), not one sample.
  Training draws ``(mean + std * eps) * scaling_factor`` each step, exactly what
  ``BaseModel.encode_images`` does, so training on precomputed data is the same objective as
  training on images - and with the same RNG state it gives the same loss (tests check this).
* ``text_embedding``: the text encoder's last hidden state for the row's caption.
* every input column except ``image`` (kept with ``keep_images=true``): ``id``, ``text``, the
  condition PNGs with their annotator metadata, sizes, source.
* ``_empty_prompt.safetensors`` beside the shards: the empty caption's embedding, stored once, so
  prompt dropout still happens at train time.

Tensors are Arrow's canonical fixed-shape tensor columns (``arrow.fixed_shape_tensor``, float32):
Ray Data reads them as (N, ...) numpy arrays, pyarrow as ``FixedShapeTensorArray.to_numpy_ndarray()``.

Work is cut like the annotate job and written the same way (``pipelines.data.shards``): input
Parquet file ``k`` (sorted) becomes output shard ``k``, written atomically by one actor of an
autoscaling pool (``compute.use_gpu`` for GPU actors). Finished shards are skipped, so re-running
the same command resumes.
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from pipelines.common.cluster import ActorCompute, actor_device
from pipelines.common.config import BaseModelConfig, JobConfig, PathStr, StorageConfig
from pipelines.common.images import decode_rgb
from pipelines.common.storage import Location, is_s3, resolve
from pipelines.data.dataset import canonical
from pipelines.data.schema import (
    CONDITION_COLUMN,
    EMPTY_PROMPT_FILE,
    LATENT_MEAN,
    LATENT_STD,
    MANIFEST,
    PRECOMPUTE_FOOTER_KEY,
    PRECOMPUTED_FORMAT,
    TENSOR_COLUMNS,
    TEXT_EMBEDDING,
    is_image_type,
    with_hf_features,
)
from pipelines.data.shards import Manifest, ShardedOutput, check_output_outside, plan_identity, run_resumable
from pipelines.data.tensors import image_tensor, latent_distribution

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class PrecomputeConfig(JobConfig):
    """Encode an annotated dataset once: VAE latent distributions and caption embeddings as tensor
    columns beside the condition maps. Train on the output with the same base model. Re-running on
    the same output resumes."""

    data: PathStr = Field(
        default="runs/annotated", description="Annotated Parquet dataset (folder or file, local or s3://)."
    )
    output: PathStr | None = Field(
        default=None, description="Local or s3:// folder for the output. Default: <work_dir>/precomputed."
    )
    base_model: BaseModelConfig = BaseModelConfig()
    keep_images: bool = Field(default=False, description="Also keep the JPEG image column (not needed to train).")
    image_column: str = Field(
        default="image", description="Column holding the images: binary, or Hugging Face Image structs."
    )
    caption_column: str = Field(default="text", description="Column holding the captions.")
    compute: ActorCompute = ActorCompute()

    def output_uri(self) -> str:
        return self.output or f"{self.work_dir.rstrip('/')}/precomputed"


def load_empty_prompt(data: str, storage: StorageConfig | None = None) -> torch.Tensor:
    """The empty caption's embedding (1, tokens, dim) stored beside a precomputed dataset."""
    from safetensors.torch import load

    location = resolve(data, storage)
    folder = location if location.is_dir() else resolve(posixpath.dirname(location.uri), storage)
    file = folder.join(EMPTY_PROMPT_FILE)
    if not file.exists():
        raise FileNotFoundError(
            f"{file.uri} does not exist: {data!r} is not a precomputed dataset "
            "(run 'zeroconv precompute') or its run did not finish"
        )
    return load(file.read_bytes())[TEXT_EMBEDDING]


def tensor_column(values: np.ndarray) -> pa.Array:
    """float32 (N, ...) -> an ``arrow.fixed_shape_tensor`` column."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values, dtype=np.float32))


# ---------------------------------------------------------------------------------------------
# Worker side: one input file in, one output file written, one summary out
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InputFile:
    """One Parquet file of the input: the unit of work; file ``index`` becomes output shard ``index``."""

    index: int
    name: str  # path relative to the dataset folder
    path: str  # on the input filesystem
    size: int  # bytes: a changed input file is a different shard

    def fingerprint(self) -> str:
        return f"{self.name}:{self.size}"


@dataclass(frozen=True)
class PrecomputeJob:
    """Everything an actor needs; pickled once per actor."""

    data: str
    output: str
    shards: int
    storage: StorageConfig
    base_model: str
    keep_images: bool
    batch_size: int
    image_column: str = "image"  # input names; the output has the canonical image / text
    caption_column: str = "text"


class PrecomputeShards:
    """Ray Data actor: loads the VAE and text encoder once, then encodes whole input files."""

    def __init__(self, job: PrecomputeJob):
        from model.base import load_base

        self.job = job
        self.device = actor_device()
        base = load_base(job.base_model, storage=job.storage, device=self.device)
        base.unet = None  # not needed here: free its memory
        self.base = base
        self.scaling_factor = float(base.vae.config.scaling_factor)
        self.data = resolve(job.data, job.storage)
        self.output = ShardedOutput(resolve(job.output, job.storage), job.shards, PRECOMPUTE_FOOTER_KEY)
        empty = self.output.location.join(EMPTY_PROMPT_FILE)
        if not empty.exists():  # written before any shard, so a finished shard implies it exists
            from safetensors.torch import save

            embedding = base.encode_prompts([""]).float().cpu().contiguous()
            empty.write_bytes_atomic(save({TEXT_EMBEDDING: embedding}, metadata={"base_model": job.base_model}))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [self.precompute_shard(InputFile(**json.loads(text))) for text in batch["shard"]]
        return {"summary": np.array([json.dumps(s) for s in summaries], dtype=object)}

    def precompute_shard(self, shard: InputFile) -> dict:
        start = time.perf_counter()
        with self.data.fs.open_input_file(shard.path) as f:
            stored = pq.read_table(f)
        table = canonical(stored, self.job.image_column, self.job.caption_column)  # image bytes for the encoders
        kept = [name for name in table.column_names if self.job.keep_images or name != "image"]
        # The output keeps the input's columns as stored (an image struct stays a struct), under the canonical names.
        out = stored.rename_columns(table.column_names).select(kept)
        summary = {"fingerprint": shard.fingerprint(), "rows": table.num_rows}
        if table.num_rows:  # (an empty input file has no image to give the tensor columns their shape)
            mean, std, text = self._encode(shard, table)
            for name, values in ((LATENT_MEAN, mean), (LATENT_STD, std), (TEXT_EMBEDDING, text)):
                out = out.append_column(name, tensor_column(values))
            summary.update(
                scaling_factor=self.scaling_factor,
                shapes={LATENT_MEAN: list(mean.shape[1:]), TEXT_EMBEDDING: list(text.shape[1:])},
            )
        summary["seconds"] = round(time.perf_counter() - start, 3)
        # PNG/JPEG bytes are already compressed; float tensors barely compress: skip the work for both.
        encoded = {f.name for f in out.schema if is_image_type(f.type) or f.name in TENSOR_COLUMNS}
        out = out.replace_schema_metadata(with_hf_features(out.schema.remove_metadata()).metadata)
        self.output.write_shard(shard.index, out, summary, encoded=encoded)
        return {**summary, "shard": shard.index}

    def _encode(self, shard: InputFile, table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        means, stds, texts = [], [], []
        for offset in range(0, table.num_rows, self.job.batch_size):
            rows = table.slice(offset, self.job.batch_size)
            images = np.stack([decode_rgb(b) for b in rows.column("image").to_pylist()])
            factor = self.base.vae_scale_factor
            if images.shape[1] % factor or images.shape[2] % factor:
                raise ValueError(
                    f"{shard.name}: images are {images.shape[2]}x{images.shape[1]}; the VAE needs "
                    f"sides that are multiples of {factor} (re-annotate with such a resolution)"
                )
            mean, std = latent_distribution(self.base.vae, image_tensor(images))
            means.append(mean.float().cpu().numpy())
            stds.append(std.float().cpu().numpy())
            texts.append(
                self.base.encode_prompts([str(t) for t in rows.column("text").to_pylist()]).float().cpu().numpy()
            )
        return np.concatenate(means), np.concatenate(stds), np.concatenate(texts)


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


@dataclass
class PrecomputeResult:
    output: str
    rows: int
    shards: int
    shards_written: int
    shards_skipped: int
    rows_written: int
    shapes: dict[str, list[int]]
    scaling_factor: float
    seconds: float

    def __str__(self) -> str:
        rate = self.rows_written / self.seconds if self.seconds > 0 else 0.0
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in self.shapes.items())
        return "\n".join(
            [
                f"precomputed {self.rows} rows -> {self.output}",
                f"  this run: {self.rows_written} rows in {self.shards_written} shards, {self.seconds:.1f} s, "
                f"{rate:.1f} rows/s; {self.shards_skipped} of {self.shards} shards were already done",
                f"  tensors: {shapes} float32 (latents unscaled; scaling_factor {self.scaling_factor:g})",
                f"  empty prompt: {self.output}/{EMPTY_PROMPT_FILE}",
            ]
        )


def list_input_files(data: Location) -> list[InputFile]:
    """The input's Parquet files in path order, by pyarrow's rules ("_" and "." names are not data: an
    annotated dataset's rejects, manifest, temp files); a single file is a dataset of one file."""
    if not data.exists():
        raise FileNotFoundError(
            f"dataset {data.uri!r} does not exist (expected annotated Parquet from 'zeroconv annotate')"
        )
    if data.is_dir():
        root = data.path.rstrip("/") + "/"
        infos = [
            i
            for i in data.list_files(recursive=True)
            if i.base_name.endswith(".parquet")
            and not any(part.startswith(("_", ".")) for part in i.path[len(root) :].split("/"))
        ]
        names = [i.path[len(root) :] for i in infos]
    else:
        infos = [data.fs.get_file_info(data.path)]
        names = [infos[0].base_name]
    if not infos:
        raise FileNotFoundError(f"dataset {data.uri!r} holds no .parquet files")
    ordered = sorted(zip(names, infos), key=lambda pair: pair[0])
    return [InputFile(k, name, info.path, info.size) for k, (name, info) in enumerate(ordered)]


def check_schema(
    data: Location, file: InputFile, image_column: str = "image", caption_column: str = "text"
) -> pa.Schema:
    try:
        with data.fs.open_input_file(file.path) as f:
            schema = pq.read_schema(f)
    except Exception as exc:  # pyarrow raises several types for "not parquet"
        raise ValueError(f"{data.uri}: {file.name} is not readable Parquet: {exc}") from None
    missing = [c for c in (image_column, caption_column) if c not in schema.names]
    conditions = [c for c in schema.names if CONDITION_COLUMN.match(c)]
    if missing or not conditions:
        what = ", ".join(missing + ([] if conditions else ["conditioning_image or cond_<annotator>"]))
        raise ValueError(
            f"dataset {data.uri!r} is not annotated data: no column {what} (its columns: {', '.join(schema.names)})"
        )
    return schema


def run_precompute(config: PrecomputeConfig) -> PrecomputeResult:
    started = time.perf_counter()
    data = resolve(config.data, config.storage)
    output = resolve(config.output_uri(), config.storage)
    check_output_outside(output, data.uri)
    files = list_input_files(data)
    check_schema(data, files[0], config.image_column, config.caption_column)

    fingerprints = {f.index: f.fingerprint() for f in files}
    identity = {
        "data": data.uri,
        "base_model": config.base_model.source,
        "keep_images": config.keep_images,
        "plan": plan_identity(list(fingerprints.values())),
    }
    sharded = ShardedOutput(output, len(files), PRECOMPUTE_FOOTER_KEY)
    manifest = Manifest(output.join(MANIFEST), PRECOMPUTED_FORMAT, "precompute", identity, _describe)
    if output.exists() and not output.join(EMPTY_PROMPT_FILE).exists():
        sharded.discard(0)  # a finished shard implies the empty prompt: redo one, its actor writes the prompt first

    def precompute(pending: list[int], done) -> None:
        from pipelines.common.cluster import run_actor_pool, storage_runtime_env

        job = PrecomputeJob(
            data=data.uri,
            output=output.uri,
            shards=len(files),
            storage=config.storage,
            base_model=config.base_model.source,
            keep_images=config.keep_images,
            batch_size=config.compute.batch_size,
            image_column=config.image_column,
            caption_column=config.caption_column,
        )
        uses_s3 = is_s3(data.uri) or is_s3(output.uri) or is_s3(config.base_model.source)
        batches = run_actor_pool(
            PrecomputeShards,
            [{"shard": json.dumps(files[i].__dict__)} for i in pending],
            compute=config.compute,
            ray_config=config.ray,
            constructor_kwargs={"job": job},
            runtime_env=storage_runtime_env() if uses_s3 else None,
            total=len(pending),
            desc="precompute",
            unit="shard",
        )
        for batch in batches:  # streams: one small summary per finished shard
            for summary in batch["summary"]:
                done(json.loads(summary))

    summaries, finished = run_resumable(sharded, manifest, fingerprints, precompute)
    first = _first_with_tensors(summaries)
    return PrecomputeResult(
        output=output.uri,
        rows=sum(s["rows"] for s in summaries.values()),
        shards=len(files),
        shards_written=len(files) - len(finished),
        shards_skipped=len(finished),
        rows_written=sum(s["rows"] for i, s in summaries.items() if i not in finished),
        shapes=first.get("shapes", {}),
        scaling_factor=first.get("scaling_factor", float("nan")),
        seconds=time.perf_counter() - started,
    )


def _describe(summaries: dict[int, dict]) -> dict:
    """The manifest's precompute fields: rows, the latent scaling factor and tensor shapes (what train checks)."""
    first = _first_with_tensors(summaries)
    latent, text = first.get("shapes", {}).get(LATENT_MEAN), first.get("shapes", {}).get(TEXT_EMBEDDING)
    return {
        "rows": sum(s["rows"] for s in summaries.values()),
        "scaling_factor": first.get("scaling_factor"),
        "tensors": {
            LATENT_MEAN: {"shape": latent, "dtype": "float32"},
            LATENT_STD: {"shape": latent, "dtype": "float32"},
            TEXT_EMBEDDING: {"shape": text, "dtype": "float32"},
        },
        "empty_prompt": EMPTY_PROMPT_FILE,
    }


def _first_with_tensors(summaries: dict[int, dict]) -> dict:
    return next((s for s in summaries.values() if s.get("shapes")), {})
