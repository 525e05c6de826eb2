"""The annotate stage: images -> condition maps in Parquet, on Ray Data.

    zeroconv annotate input=./photos output=s3://bucket/annotated 'annotators=[{name: canny}]'

How the work is cut, and why:

* The driver lists the input once and cuts it into deterministic shards (``pipelines.data.sources``).
  Shard ``k`` always holds the same inputs and always becomes ``part-<k>.parquet``.
* Ray Data streams the shard list through a pool of annotator actors. Each actor does all the
  work of one shard in one place - read, decode, resize/crop, annotate, encode - so full-size
  pixel arrays never travel through the object store; only a one-line summary comes back.
* An actor writes its shard atomically (temp name + rename; one PUT on S3), rejects first, data
  last. A shard whose data file exists is finished: a re-run skips it, so an interrupted job
  resumes where it stopped and no row is ever written twice. The counts of finished shards live
  in their Parquet footers, so the manifest is rebuilt exactly on every run.

Memory is bounded by (actors x one shard of encoded output), whatever the size of the input.
Output layout and columns: docs/data-schema.md.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from pipelines.common.cluster import ActorCompute
from pipelines.common.config import ConfigError, JobConfig, Section, StorageConfig
from pipelines.common.images import ImageRejected, content_id, decode_training_image, encode_jpeg, encode_png
from pipelines.common.storage import Location, is_s3, resolve
from pipelines.data.schema import (
    ANNOTATED_FORMAT,
    ANNOTATOR_ERROR,
    MANIFEST,
    REJECTS_DIR,
    REJECTS_SCHEMA,
    annotated_schema,
    condition_columns,
    dumps,
)
from pipelines.data.sources import InputFormat, Shard, Source

_SHARD_FILE = re.compile(r"^part-(\d+)\.parquet$")
_TEMP_FILE = re.compile(r"^\.part-\d+\.parquet\.tmp-")  # see Location.write_bytes_atomic
_FOOTER_KEY = b"zeroconv.shard"
_ROW_GROUP_ROWS = 256


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class AnnotatorEntry(Section):
    name: str = Field(default="canny", description="Registered annotator name (see annotators.available()).")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword parameters for the annotator.")


class ComputeConfig(ActorCompute):
    batch_size: int = Field(default=16, ge=1, description="Images per annotator call.")
    num_actors: int | None = Field(
        default=None, ge=1, description="Annotator actors. Default: one per GPU when GPUs are used, else one per CPU."
    )
    threads_per_actor: int | None = Field(
        default=None,
        ge=1,
        description="Decode/encode threads inside each actor. Default: 1 on CPUs (one actor per CPU already), "
        "the node's CPUs per GPU actor when GPUs are used, so decoding keeps the GPU fed.",
    )


class AnnotateConfig(JobConfig):
    """
    Annotate images into ControlNet training data: one condition map per annotator, plus the
    resized image and its caption, as Parquet shards (docs/data-schema.md). Re-running the same
    command on the same output resumes where it stopped.

    Example: zeroconv annotate input=./photos 'annotators=[{name: canny, params: {low_threshold: 50}}]'
    """

    input: str = Field(
        default="", description="Images: a folder, s3:// prefix, .parquet file(s) or WebDataset .tar(s)."
    )
    input_format: InputFormat = Field(default="auto", description="How to read the input; auto looks at the files.")
    image_column: str = Field(default="image", description="Parquet input: the column with image bytes.")
    caption_column: str | None = Field(
        default="text",
        description="Parquet input: the caption column (null: empty captions). Image folders use "
        "a sidecar .txt per image; WebDataset the .txt member.",
    )
    output: str | None = Field(
        default=None, description="Local or s3:// folder for the Parquet shards. Default: <work_dir>/annotated."
    )
    annotators: list[AnnotatorEntry] = Field(
        default_factory=lambda: [AnnotatorEntry()],
        description="Annotators, each {name, params}. One annotator writes column conditioning_image; several "
        "write cond_<name> each.",
    )
    resolution: int = Field(
        default=512, ge=8, description="Training resolution: short side resized to it, centre-cropped square."
    )
    min_side: int = Field(default=256, ge=1, description="Reject inputs whose short side is below this many pixels.")
    shard_size: int = Field(default=500, ge=1, description="Inputs per output shard (the unit of work and of resume).")
    jpeg_quality: int = Field(default=95, ge=1, le=100, description="JPEG quality of the stored images.")
    compute: ComputeConfig = ComputeConfig()

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value

    @field_validator("annotators")
    @classmethod
    def _distinct_annotators(cls, value: list[AnnotatorEntry]) -> list[AnnotatorEntry]:
        if not value:
            raise ValueError("give at least one annotator")
        names = [a.name for a in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"annotator {', '.join(repeated)} appears more than once; each writes its own column")
        return value

    def output_uri(self) -> str:
        return self.output or f"{self.work_dir.rstrip('/')}/annotated"


def shard_name(index: int) -> str:
    return f"part-{index:06d}.parquet"


# ---------------------------------------------------------------------------------------------
# Worker side: one shard in, its Parquet written, one summary out
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """Everything an actor needs; pickled once per actor."""

    source: Source
    output: str
    storage: StorageConfig
    annotators: tuple[tuple[str, dict], ...]
    columns: dict[str, dict]
    resolution: int
    min_side: int
    jpeg_quality: int
    batch_size: int
    threads: int


@dataclass
class _Decoded:
    id: str
    source: str
    caption: str
    pixels: np.ndarray  # uint8 (resolution, resolution, 3)
    original_size: tuple[int, int]


@dataclass
class _ShardTables:
    rows: dict[str, list] = field(default_factory=dict)
    rejects: dict[str, list] = field(default_factory=lambda: {n: [] for n in REJECTS_SCHEMA.names})
    read: int = 0

    def reject(self, id_: str | None, source: str, reason: str, detail: str) -> None:
        for name, value in zip(REJECTS_SCHEMA.names, (id_, source, reason, detail)):
            self.rejects[name].append(value)


class AnnotateShards:
    """Ray Data actor: builds the annotators once, then turns shard descriptions into Parquet files."""

    def __init__(self, job: ShardJob):
        from annotators import create  # imported in the worker: annotators may load weights

        self.job = job
        self.annotators = [create(name, **params) for name, params in job.annotators]
        self.output = resolve(job.output, job.storage)
        self.schema = annotated_schema(job.columns)
        self.pool = ThreadPoolExecutor(job.threads) if job.threads > 1 else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        summaries = [self.annotate_shard(Shard.from_json(text)) for text in batch["shard"]]
        return {"summary": np.array([dumps(s) for s in summaries], dtype=object)}

    def annotate_shard(self, shard: Shard) -> dict:
        start = time.perf_counter()
        tables = _ShardTables(rows={name: [] for name in self.schema.names})
        for items in _batched(self.job.source.read(shard), self.job.batch_size):
            tables.read += len(items)
            self._annotate_batch(items, tables)
        accepted = len(tables.rows["id"])
        rejected = len(tables.rejects["id"])
        summary = {
            "shard": shard.index,
            "fingerprint": shard.fingerprint(),
            "read": tables.read,
            "accepted": accepted,
            "rejected": rejected,
            "reasons": dict(Counter(tables.rejects["reason"])),
            "seconds": round(time.perf_counter() - start, 3),
            "node": _node_id(),  # where it ran: shows the work spread over a cluster's nodes
        }
        # Rejects first, data last: the data file is the "shard finished" mark a re-run looks for.
        rejects_file = self.output.join(REJECTS_DIR, shard_name(shard.index))
        if rejected:
            rejects_file.write_bytes_atomic(_parquet_bytes(pa.table(tables.rejects, schema=REJECTS_SCHEMA)))
        elif rejects_file.exists():  # left by an earlier attempt whose failures were transient
            rejects_file.fs.delete_file(rejects_file.path)
        data = pa.table(tables.rows, schema=self.schema).replace_schema_metadata(
            {**(self.schema.metadata or {}), _FOOTER_KEY: dumps(summary)}
        )
        encoded_columns = ["image", *self.job.columns]
        self.output.join(shard_name(shard.index)).write_bytes_atomic(_parquet_bytes(data, encoded_columns))
        return summary

    def _annotate_batch(self, items: list, tables: _ShardTables) -> None:
        decoded = []
        for result in self._map(self._decode, items):
            if isinstance(result, _Decoded):
                decoded.append(result)
            else:
                tables.reject(*result)
        if not decoded:
            return
        conditions, failures = self._annotate(np.stack([d.pixels for d in decoded]))
        keep = []
        for i, d in enumerate(decoded):
            if i in failures:
                tables.reject(d.id, d.source, ANNOTATOR_ERROR, failures[i])
            else:
                keep.append(i)
        encoded = self._map(
            lambda i: (encode_jpeg(decoded[i].pixels, self.job.jpeg_quality), [encode_png(c[i]) for c in conditions]),
            keep,
        )
        rows = tables.rows
        for i, (image, condition_pngs) in zip(keep, encoded):
            d = decoded[i]
            rows["id"].append(d.id)
            rows["image"].append(image)
            rows["text"].append(d.caption)
            for column, png in zip(self.job.columns, condition_pngs):
                rows[column].append(png)
            rows["width"].append(self.job.resolution)
            rows["height"].append(self.job.resolution)
            rows["original_width"].append(d.original_size[0])
            rows["original_height"].append(d.original_size[1])
            rows["source"].append(d.source)

    def _decode(self, item) -> _Decoded | tuple[str | None, str, str, str]:
        if item.problem is not None:
            return (content_id(item.data) if item.data is not None else None, item.source, *item.problem)
        id_ = content_id(item.data)
        try:
            pixels, size = decode_training_image(item.data, self.job.resolution, self.job.min_side)
        except ImageRejected as exc:
            return (id_, item.source, exc.reason, exc.detail)
        return _Decoded(id_, item.source, item.caption, pixels, size)

    def _annotate(self, images: np.ndarray) -> tuple[list[np.ndarray], dict[int, str]]:
        """Every annotator on the batch. If a batch call fails, retry image by image so one bad
        image costs only itself; if every image of a batch fails alone too, the annotator is
        broken, not the images: raise (finished shards stay; a re-run resumes)."""
        outputs, failures = [], {}
        for annotator in self.annotators:
            try:
                outputs.append(annotator(images))
                continue
            except Exception as exc:
                batch_error = exc
            one_by_one = np.zeros((*images.shape[:3], annotator.channels), np.uint8)
            if len(images) == 1:  # nothing to retry: the one image is the batch
                errors = {0: f"{annotator.name}: {type(batch_error).__name__}: {batch_error}"}
            else:
                errors = {}
                for i in range(len(images)):
                    try:
                        one_by_one[i] = annotator(images[i : i + 1])[0]
                    except Exception as exc:
                        errors[i] = f"{annotator.name}: {type(exc).__name__}: {exc}"
                if len(errors) == len(images):
                    raise RuntimeError(
                        f"annotator {annotator.name!r} failed on every image of a batch: {next(iter(errors.values()))}"
                    ) from batch_error
            for i, message in errors.items():
                failures.setdefault(i, message)
            outputs.append(one_by_one)
        return outputs, failures

    def _map(self, fn, items: Iterable) -> list:
        return list(self.pool.map(fn, items) if self.pool else map(fn, items))


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _parquet_bytes(table: pa.Table, binary: list[str] | None = None) -> bytes:
    """Serialise a table; already-compressed image columns skip compression, dictionaries, statistics."""
    binary = set(binary or [])
    others = [n for n in table.column_names if n not in binary]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=_ROW_GROUP_ROWS,
        compression={n: ("none" if n in binary else "snappy") for n in table.column_names},
        use_dictionary=others,
        write_statistics=others,
    )
    return sink.getvalue().to_pybytes()


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


@dataclass
class AnnotateResult:
    output: str
    rejects: str
    manifest: str
    columns: dict[str, dict]
    read: int
    accepted: int
    rejected: int
    reasons: dict[str, int]
    shards: int
    shards_written: int  # by this run
    shards_skipped: int  # finished by an earlier run
    processed: int  # inputs read by this run
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items()))
        lines = [
            f"annotated {self.read} inputs -> {self.output}",
            f"  accepted {self.accepted}, rejected {self.rejected}" + (f" ({reasons})" if reasons else ""),
            f"  this run: {self.processed} inputs in {self.shards_written} shards, {self.seconds:.1f} s, "
            f"{self.images_per_second:.1f} images/s; {self.shards_skipped} of {self.shards} shards were already done",
        ]
        for column, spec in self.columns.items():
            lines.append(f"  {column}: {spec['name']} v{spec['version']} {dumps(spec['params'])}")
        lines.append(f"  rejects: {self.rejects}")
        lines.append(f"  manifest: {self.manifest}")
        return "\n".join(lines)


def run_annotate(config: AnnotateConfig) -> AnnotateResult:
    from annotators import create

    started = time.perf_counter()
    source = Source(config.input, config.storage, config.input_format, config.image_column, config.caption_column)
    output = resolve(config.output_uri(), config.storage)
    _check_not_inside(output, source)

    # Built here once to validate names/params and to record exactly what makes each column.
    built = [create(a.name, **a.params) for a in config.annotators]
    for annotator in built:
        multiple = getattr(annotator, "size_multiple", 1)
        if config.resolution % multiple:
            raise ConfigError(
                f"annotator {annotator.name!r} needs sides that are multiples of {multiple}; "
                f"resolution={config.resolution} is not"
            )
    specs = [a.spec() for a in built]
    del built  # the actors build their own
    columns = dict(zip(condition_columns([a.name for a in config.annotators]), specs))
    shards = list(source.plan(config.shard_size))
    if not shards:
        raise FileNotFoundError(f"input {config.input!r} holds nothing to annotate")
    job_identity = _job_identity(config, source, shards, columns)

    manifest = _Manifest(output.join(MANIFEST), job_identity)
    manifest.check_compatible()
    _remove_temp_files(output)
    finished = _finished_shards(output, shards)
    pending = [s for s in shards if s.index not in finished]
    manifest.write("running", finished)

    summaries = dict(finished)
    try:
        if pending:
            _run_shards(config, source, output, columns, pending, summaries)
    except BaseException:
        print(
            f"annotate stopped with {len(summaries)} of {len(shards)} shards written to {output.uri}; "
            "finished shards are kept: re-run the same command to resume",
            file=sys.stderr,
        )
        raise
    finally:
        manifest.write("complete" if len(summaries) == len(shards) else "incomplete", summaries)

    totals = _totals(summaries.values())
    processed = sum(s["read"] for i, s in summaries.items() if i not in finished)
    return AnnotateResult(
        output=output.uri,
        rejects=output.join(REJECTS_DIR).uri,
        manifest=manifest.location.uri,
        columns=columns,
        read=totals["read"],
        accepted=totals["accepted"],
        rejected=totals["rejected"],
        reasons=totals["reasons"],
        shards=len(shards),
        shards_written=len(pending),
        shards_skipped=len(finished),
        processed=processed,
        seconds=time.perf_counter() - started,
    )


def _run_shards(
    config: AnnotateConfig,
    source: Source,
    output: Location,
    columns: dict[str, dict],
    pending: list[Shard],
    summaries: dict[int, dict],
) -> None:
    import ray
    from tqdm import tqdm

    from pipelines.common.cluster import actor_pool, ensure_ray, storage_runtime_env

    ensure_ray(config.ray)
    compute = config.compute
    cpus = int(ray.cluster_resources().get("CPU", 1))
    # Annotation is single-threaded per image: one actor per CPU, or per GPU when actors get GPUs.
    pool = actor_pool(compute, len(pending), config.ray.resources, cpu_actors=max(1, cpus))
    actors = pool["compute"].min_size
    threads = compute.threads_per_actor or (max(1, cpus // actors) if "num_gpus" in pool else 1)

    job = ShardJob(
        source=source,
        output=output.uri,
        storage=config.storage,
        annotators=tuple((a.name, a.params) for a in config.annotators),
        columns=columns,
        resolution=config.resolution,
        min_side=config.min_side,
        jpeg_quality=config.jpeg_quality,
        batch_size=compute.batch_size,
        threads=threads,
    )
    uses_s3 = is_s3(source.uri) or is_s3(output.uri)
    # One shard per block, one shard in flight per actor: shards take seconds, so this costs
    # nothing, and no actor sits on a queue of shards while another is idle at the end.
    dataset = ray.data.from_items([{"shard": s.to_json()} for s in pending], override_num_blocks=len(pending))
    dataset = dataset.map_batches(
        AnnotateShards,
        batch_size=1,
        fn_constructor_kwargs={"job": job},
        runtime_env=storage_runtime_env() if uses_s3 else None,
        **pool,
    )
    known = [s.count for s in pending]
    total = sum(known) if all(c is not None for c in known) else None
    with tqdm(total=total, unit="img", desc="annotate", disable=None) as bar:
        for row in dataset.iter_rows():  # streams: one small summary per finished shard
            summary = json.loads(row["summary"])
            summaries[summary["shard"]] = summary
            bar.update(summary["read"])


def _job_identity(config: AnnotateConfig, source: Source, shards: list[Shard], columns: dict[str, dict]) -> dict:
    """What decides the output's content; a re-run must match it to resume on the same output."""
    plan = [s.fingerprint() for s in shards]
    identity = {"input": source.uri, "input_format": shards[0].kind}
    if shards[0].kind == "parquet":
        identity.update(image_column=config.image_column, caption_column=config.caption_column)
    identity.update(
        resolution=config.resolution,
        min_side=config.min_side,
        shard_size=config.shard_size,
        jpeg_quality=config.jpeg_quality,
        columns=columns,
        plan={"shards": len(shards), "sha256": hashlib.sha256("".join(plan).encode()).hexdigest()},
    )
    return json.loads(dumps(identity))


@dataclass
class _Manifest:
    location: Location
    job: dict

    def check_compatible(self) -> None:
        if not self.location.exists():
            return
        try:
            previous = json.loads(self.location.read_bytes())["job"]
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"{self.location.uri} is not a zeroconv annotate manifest ({exc}); choose another output"
            ) from None
        changed = [key for key in sorted(set(previous) | set(self.job)) if previous.get(key) != self.job.get(key)]
        if changed:
            what = "; ".join(f"{k}: {dumps(previous.get(k))} then, {dumps(self.job.get(k))} now" for k in changed)
            raise ConfigError(
                f"output {self.location.uri.rsplit('/', 1)[0]} holds a different annotation job, so it cannot be "
                f"resumed ({what}). Use a new output, or delete the old one."
            )

    def write(self, status: str, summaries: dict[int, dict]) -> None:
        totals = _totals(summaries.values())
        output = self.location.uri.rsplit("/", 1)[0]
        self.location.write_bytes_atomic(
            json.dumps(
                {
                    "format": ANNOTATED_FORMAT,
                    "status": status,
                    "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "output": output,
                    "rejects": f"{output}/{REJECTS_DIR}",
                    "job": self.job,
                    "counts": {k: totals[k] for k in ("read", "accepted", "rejected")},
                    "reject_reasons": totals["reasons"],
                    "shards": {"total": self.job["plan"]["shards"], "done": len(summaries)},
                },
                indent=2,
                sort_keys=False,
            ).encode()
        )


def _totals(summaries: Iterable[dict]) -> dict:
    totals = {"read": 0, "accepted": 0, "rejected": 0, "reasons": Counter()}
    for s in summaries:
        for key in ("read", "accepted", "rejected"):
            totals[key] += s[key]
        totals["reasons"].update(s["reasons"])
    totals["reasons"] = dict(sorted(totals["reasons"].items()))
    if totals["read"] != totals["accepted"] + totals["rejected"]:  # by construction; a loud check all the same
        raise AssertionError(
            f"lost inputs: read {totals['read']} != accepted {totals['accepted']} + rejected {totals['rejected']}"
        )
    return totals


def _finished_shards(output: Location, shards: list[Shard]) -> dict[int, dict]:
    """Summaries of the shards already written, read from their footers."""
    if not output.exists():
        return {}
    by_index = {s.index: s for s in shards}
    files = [f for f in output.list_files(recursive=False) if _SHARD_FILE.match(f.base_name)]

    def summary(info) -> tuple[int, dict] | None:
        try:
            with output.fs.open_input_file(info.path) as f:
                meta = pq.read_schema(f).metadata or {}
        except (pa.ArrowInvalid, OSError):
            # No readable footer: an upload cut short (S3 completes a multipart upload even when the
            # writer failed mid-way). Not finished: this run writes it again.
            return None
        if _FOOTER_KEY not in meta:
            raise ValueError(
                f"{output.uri}/{info.base_name} was not written by zeroconv annotate; choose another output"
            )
        s = json.loads(meta[_FOOTER_KEY])
        shard = by_index.get(s["shard"])
        if shard is None or shard.fingerprint() != s["fingerprint"]:
            raise ValueError(
                f"{output.uri}/{info.base_name} was made from different inputs than this job's shard "
                f"{s['shard']}; the input changed since that run. Use a new output."
            )
        return s["shard"], s

    with ThreadPoolExecutor(16) as pool:  # one footer read each; round trips on S3
        return dict(s for s in pool.map(summary, files) if s is not None)


def _remove_temp_files(output: Location) -> None:
    """Half-written files from an interrupted run (the rename never happened)."""
    for folder in (output, output.join(REJECTS_DIR)):
        if folder.exists():
            for info in folder.list_files(recursive=False):
                if _TEMP_FILE.match(info.base_name):
                    folder.fs.delete_file(info.path)


def _check_not_inside(output: Location, source: Source) -> None:
    if is_s3(output.uri) != is_s3(source.uri):
        return
    inside = (output.uri + "/").startswith(source.uri.rstrip("/") + "/")
    if inside:
        raise ConfigError(f"output {output.uri} is inside the input {source.uri}; a re-run would read its own output")
