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

Work is cut like the annotate job: one input Parquet file is one shard, written atomically under the
same name by one actor of a pool (GPU actors when the cluster has GPUs). A shard whose output exists
is done, so re-running the same command resumes.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import Field

from pipelines.common.cluster import ActorCompute, actor_device, actor_pool
from pipelines.common.config import BaseModelConfig, ConfigError, JobConfig, StorageConfig
from pipelines.common.images import decode_rgb
from pipelines.common.storage import Location, is_s3, resolve
from pipelines.data.dataset import canonical, read_manifest  # noqa: F401  (read_manifest: part of this stage's API)
from pipelines.data.schema import (
    CONDITION_COLUMN,
    EMPTY_PROMPT_FILE,
    LATENT_MEAN,
    LATENT_STD,
    MANIFEST,
    PRECOMPUTED_FORMAT,
    TENSOR_COLUMNS,
    TEXT_EMBEDDING,
)
from pipelines.data.tensors import image_tensor, latent_distribution

_FOOTER_KEY = b"zeroconv.precompute"
_TEMP_FILE = re.compile(r"^\..+\.tmp-")  # see Location.write_bytes_atomic
_ROW_GROUP_ROWS = 256


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class PrecomputeConfig(JobConfig):
    """Encode an annotated dataset once: VAE latent distributions and caption embeddings as tensor
    columns beside the condition maps. Train on the output with the same base model. Re-running on
    the same output resumes."""

    data: str = Field(
        default="runs/annotated", description="Annotated Parquet dataset (folder or file, local or s3://)."
    )
    output: str | None = Field(
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
class Shard:
    name: str  # file name, the same in input and output
    path: str  # input path on the input filesystem
    size: int  # input bytes: a changed input file is a different shard

    def fingerprint(self) -> str:
        return f"{self.name}:{self.size}"


@dataclass(frozen=True)
class PrecomputeJob:
    """Everything an actor needs; pickled once per actor."""

    data: str
    output: str
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
        self.output = resolve(job.output, job.storage)
        empty = self.output.join(EMPTY_PROMPT_FILE)
        if not empty.exists():  # written before any shard, so a finished shard implies it exists
            from safetensors.torch import save

            embedding = base.encode_prompts([""]).float().cpu().contiguous()
            empty.write_bytes_atomic(save({TEXT_EMBEDDING: embedding}, metadata={"base_model": job.base_model}))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [self.precompute_shard(Shard(**json.loads(text))) for text in batch["shard"]]
        return {"summary": np.array([json.dumps(s) for s in summaries], dtype=object)}

    def precompute_shard(self, shard: Shard) -> dict:
        start = time.perf_counter()
        with self.data.fs.open_input_file(shard.path) as f:
            table = canonical(pq.read_table(f), self.job.image_column, self.job.caption_column)
        if table.num_rows == 0:
            # Annotate writes empty shards when every input was rejected. Nothing to encode, and no
            # image to give the tensor columns their shape: no output file (a re-run looks again).
            return {"shard": shard.name, "fingerprint": shard.fingerprint(), "rows": 0, "seconds": 0.0}
        means, stds, texts = [], [], []
        for offset in range(0, table.num_rows, self.job.batch_size):
            rows = table.slice(offset, self.job.batch_size)
            images = np.stack([decode_rgb(b) for b in rows.column("image").to_pylist()])
            if images.shape[1] % 8 or images.shape[2] % 8:
                raise ValueError(
                    f"{shard.name}: images are {images.shape[2]}x{images.shape[1]}; the VAE needs "
                    "sides that are multiples of 8 (re-annotate with such a resolution)"
                )
            mean, std = latent_distribution(self.base.vae, image_tensor(images))
            means.append(mean.float().cpu().numpy())
            stds.append(std.float().cpu().numpy())
            texts.append(
                self.base.encode_prompts([str(t) for t in rows.column("text").to_pylist()]).float().cpu().numpy()
            )
        mean, std, text = np.concatenate(means), np.concatenate(stds), np.concatenate(texts)
        kept = [name for name in table.column_names if self.job.keep_images or name != "image"]
        out = table.select(kept)
        for name, values in ((LATENT_MEAN, mean), (LATENT_STD, std), (TEXT_EMBEDDING, text)):
            out = out.append_column(name, tensor_column(values))
        summary = {
            "shard": shard.name,
            "fingerprint": shard.fingerprint(),
            "rows": table.num_rows,
            "scaling_factor": self.scaling_factor,
            "shapes": {LATENT_MEAN: list(mean.shape[1:]), TEXT_EMBEDDING: list(text.shape[1:])},
            "seconds": round(time.perf_counter() - start, 3),
        }
        out = out.replace_schema_metadata({**(table.schema.metadata or {}), _FOOTER_KEY: json.dumps(summary)})
        self.output.join(shard.name).write_bytes_atomic(_parquet_bytes(out))
        return summary


def _parquet_bytes(table: pa.Table) -> bytes:
    # PNG/JPEG bytes are already compressed; float tensors barely compress: skip the work for both.
    encoded = {f.name for f in table.schema if pa.types.is_binary(f.type) or f.name in TENSOR_COLUMNS}
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=_ROW_GROUP_ROWS,
        compression={n: ("none" if n in encoded else "snappy") for n in table.column_names},
        use_dictionary=False,
        write_statistics=["id"] if "id" in table.column_names else False,
    )
    return sink.getvalue().to_pybytes()


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


def list_shards(data: Location) -> list[Shard]:
    """The input's Parquet files, sorted; a single file is a dataset of one shard."""
    if not data.exists():
        raise FileNotFoundError(
            f"dataset {data.uri!r} does not exist (expected annotated Parquet from 'zeroconv annotate')"
        )
    if data.is_dir():
        infos = [
            i
            for i in data.list_files(recursive=False)
            if i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", "."))
        ]
    else:
        infos = [data.fs.get_file_info(data.path)]
    if not infos:
        raise FileNotFoundError(f"dataset {data.uri!r} holds no .parquet files")
    return sorted((Shard(i.base_name, i.path, i.size) for i in infos), key=lambda s: s.name)


def check_schema(data: Location, shard: Shard, image_column: str = "image", caption_column: str = "text") -> pa.Schema:
    try:
        with data.fs.open_input_file(shard.path) as f:
            schema = pq.read_schema(f)
    except Exception as exc:  # pyarrow raises several types for "not parquet"
        raise ValueError(f"{data.uri}: {shard.name} is not readable Parquet: {exc}") from None
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
    if output.uri.rstrip("/") == data.uri.rstrip("/") or (
        is_s3(output.uri) == is_s3(data.uri) and (output.uri + "/").startswith(data.uri.rstrip("/") + "/")
    ):
        raise ConfigError(f"output {output.uri} is the input or inside it; choose another output")
    shards = list_shards(data)
    check_schema(data, shards[0], config.image_column, config.caption_column)

    # What decides the output's content. New input files are fine (they are new shards); a changed
    # file is caught by its shard's fingerprint.
    identity = {"data": data.uri, "base_model": config.base_model.source, "keep_images": config.keep_images}
    manifest = output.join(MANIFEST)
    _check_resumable(manifest, identity)
    _remove_temp_files(output)
    finished = _finished_shards(output, shards)
    pending = [s for s in shards if s.name not in finished]
    if not pending and not output.join(EMPTY_PROMPT_FILE).exists():
        pending = shards[:1]  # the actor that redoes it writes the empty prompt first
    _write_manifest(manifest, identity, "running", len(shards), finished)

    summaries = dict(finished)
    try:
        if pending:
            _run_shards(config, data, output, pending, summaries)
    finally:
        done = len(summaries) == len(shards)
        _write_manifest(manifest, identity, "complete" if done else "incomplete", len(shards), summaries)

    first = _first_with_tensors(summaries)
    return PrecomputeResult(
        output=output.uri,
        rows=sum(s["rows"] for s in summaries.values()),
        shards=len(shards),
        shards_written=len(pending),
        shards_skipped=len(shards) - len(pending),
        rows_written=sum(summaries[s.name]["rows"] for s in pending),
        shapes=first.get("shapes", {}),
        scaling_factor=first.get("scaling_factor", float("nan")),
        seconds=time.perf_counter() - started,
    )


def _run_shards(
    config: PrecomputeConfig, data: Location, output: Location, pending: list[Shard], summaries: dict[str, dict]
) -> None:
    import ray
    from tqdm import tqdm

    from pipelines.common.cluster import ensure_ray, storage_runtime_env

    ensure_ray(config.ray)
    job = PrecomputeJob(
        data=data.uri,
        output=output.uri,
        storage=config.storage,
        base_model=config.base_model.source,
        keep_images=config.keep_images,
        batch_size=config.compute.batch_size,
        image_column=config.image_column,
        caption_column=config.caption_column,
    )
    uses_s3 = is_s3(data.uri) or is_s3(output.uri) or is_s3(config.base_model.source)
    # One shard per block and per actor at a time: no actor queues shards while another idles.
    shard_list = [{"shard": json.dumps(s.__dict__)} for s in pending]
    dataset = ray.data.from_items(shard_list, override_num_blocks=len(pending)).map_batches(
        PrecomputeShards,
        batch_size=1,
        fn_constructor_kwargs={"job": job},
        runtime_env=storage_runtime_env() if uses_s3 else None,
        **actor_pool(config.compute, len(pending), config.ray.resources),
    )
    with tqdm(total=len(pending), unit="shard", desc="precompute", disable=None) as bar:
        for row in dataset.iter_rows():  # streams: one small summary per finished shard
            summary = json.loads(row["summary"])
            summaries[summary["shard"]] = summary
            bar.update(1)


def _check_resumable(manifest: Location, identity: dict) -> None:
    if not manifest.exists():
        return
    try:
        previous = json.loads(manifest.read_bytes())["job"]
    except (ValueError, KeyError) as exc:
        raise ValueError(
            f"{manifest.uri} is not a zeroconv precompute manifest ({exc}); choose another output"
        ) from None
    changed = [k for k in sorted(set(previous) | set(identity)) if previous.get(k) != identity.get(k)]
    if changed:
        raise ConfigError(
            f"output {manifest.uri.rsplit('/', 1)[0]} holds a different precompute job "
            f"({', '.join(changed)} changed), so it cannot be resumed. Use a new output, or delete the old one."
        )


def _write_manifest(manifest: Location, identity: dict, status: str, total: int, summaries: dict[str, dict]) -> None:
    first = _first_with_tensors(summaries)
    latent, text = first.get("shapes", {}).get(LATENT_MEAN), first.get("shapes", {}).get(TEXT_EMBEDDING)
    manifest.write_bytes_atomic(
        json.dumps(
            {
                "format": PRECOMPUTED_FORMAT,
                "status": status,
                "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "job": identity,
                "rows": sum(s["rows"] for s in summaries.values()),
                "shards": {"total": total, "done": len(summaries)},
                "scaling_factor": first.get("scaling_factor"),
                "tensors": {
                    LATENT_MEAN: {"shape": latent, "dtype": "float32"},
                    LATENT_STD: {"shape": latent, "dtype": "float32"},
                    TEXT_EMBEDDING: {"shape": text, "dtype": "float32"},
                },
                "empty_prompt": EMPTY_PROMPT_FILE,
            },
            indent=2,
        ).encode()
    )


def _first_with_tensors(summaries: dict[str, dict]) -> dict:
    return next((s for s in summaries.values() if s.get("shapes")), {})


def _finished_shards(output: Location, shards: Iterable[Shard]) -> dict[str, dict]:
    """Summaries of the shards already written, from their footers; a changed input is an error."""
    if not output.exists():
        return {}
    by_name = {s.name: s for s in shards}
    finished = {}
    for info in output.list_files(recursive=False):
        if info.base_name not in by_name:
            continue
        with output.fs.open_input_file(info.path) as f:
            meta = pq.read_schema(f).metadata or {}
        if _FOOTER_KEY not in meta:
            raise ValueError(
                f"{output.uri}/{info.base_name} was not written by zeroconv precompute; choose another output"
            )
        summary = json.loads(meta[_FOOTER_KEY])
        if summary["fingerprint"] != by_name[info.base_name].fingerprint():
            raise ValueError(
                f"{output.uri}/{info.base_name} was made from a different version of that input file; "
                "the input changed since that run. Use a new output."
            )
        finished[info.base_name] = summary
    return finished


def _remove_temp_files(output: Location) -> None:
    """Half-written files from an interrupted run (the rename never happened)."""
    if output.exists():
        for info in output.list_files(recursive=False):
            if _TEMP_FILE.match(info.base_name):
                output.fs.delete_file(info.path)
