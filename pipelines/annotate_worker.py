"""The worker side of ``zeroconv annotate``: one shard in, its Parquet written, one summary out.

An :class:`AnnotateShards` actor builds the annotators once, then does all the work of each shard it
is given in one place - read, decode, resize/crop, annotate, encode, write - so full-size pixel
arrays never travel through the object store. The driver (:mod:`pipelines.annotate`) plans the
shards and streams them through a pool of these actors.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipelines.common.config import StorageConfig
from pipelines.common.images import ImageRejected, content_id, decode_training_image, encode_jpeg, encode_png
from pipelines.common.storage import resolve
from pipelines.data.schema import (
    ANNOTATE_FOOTER_KEY,
    ENCODED_IMAGE,
    REJECTS_SCHEMA,
    annotated_schema,
    dumps,
    image_column_from_bytes,
)
from pipelines.data.shards import ShardedOutput
from pipelines.data.sources import Shard, Source

ANNOTATOR_ATTEMPTS = 3  # calls of an annotator on one batch before its shard fails


@dataclass(frozen=True)
class ShardJob:
    """Everything an actor needs; pickled once per actor."""

    source: Source
    output: str
    shards: int  # in the whole job: part of every shard's file name
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
        self.output = ShardedOutput(resolve(job.output, job.storage), job.shards, ANNOTATE_FOOTER_KEY)
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
        rejects = pa.table(tables.rejects, schema=REJECTS_SCHEMA)
        data = pa.table(
            [
                image_column_from_bytes(tables.rows[f.name])
                if f.type == ENCODED_IMAGE
                else pa.array(tables.rows[f.name], f.type)
                for f in self.schema
            ],
            schema=self.schema,
        )
        summary = {
            "fingerprint": shard.fingerprint(),
            "read": tables.read,
            "accepted": data.num_rows,
            "rejected": rejects.num_rows,
            "reasons": dict(Counter(tables.rejects["reason"])),
            "seconds": round(time.perf_counter() - start, 3),
            "node": _node_id(),  # where it ran: shows the work spread over a cluster's nodes
        }
        self.output.write_shard(
            shard.index, data, summary, rejects, encoded={"image", *self.job.columns}, inputs=shard.inputs()
        )
        return {**summary, "shard": shard.index}

    def _annotate_batch(self, items: list, tables: _ShardTables) -> None:
        decoded = []
        for result in self._map(self._decode, items):
            if isinstance(result, _Decoded):
                decoded.append(result)
            else:
                tables.reject(*result)
        if not decoded:
            return
        images = np.stack([d.pixels for d in decoded])
        conditions = [self._annotate(annotator, images) for annotator in self.annotators]
        encoded = self._map(
            lambda i: (encode_jpeg(decoded[i].pixels, self.job.jpeg_quality), [encode_png(c[i]) for c in conditions]),
            range(len(decoded)),
        )
        rows = tables.rows
        for d, (image, condition_pngs) in zip(decoded, encoded):
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

    @staticmethod
    def _annotate(annotator, images: np.ndarray) -> np.ndarray:
        """One annotator on a batch of decoded images. The images are known good (they decoded), so an
        exception is the annotator failing, not the input: try again (a GPU hiccup, a lost weight
        download), then fail the shard loudly. Finished shards stay; a re-run resumes."""
        for attempt in range(1, ANNOTATOR_ATTEMPTS + 1):
            try:
                return annotator(images)
            except Exception as exc:
                if attempt == ANNOTATOR_ATTEMPTS:
                    raise RuntimeError(
                        f"annotator {annotator.name!r} failed {attempt} times on a batch of {len(images)} images: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                time.sleep(0.1 * 2**attempt)

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
