"""Where annotate's inputs come from: image files, Parquet, or WebDataset tar shards (local or s3://).

Two halves, run in different places:

* :meth:`Source.plan` (driver) lists the input once, sorted, and cuts it into :class:`Shard` s.
  The cut is deterministic - the same input always gives the same shards - which is what lets a
  re-run skip the shards that are already written.
* :meth:`Source.read` (workers) streams one shard as :class:`InputItem` s: the source URI, the raw
  image bytes and the caption. Nothing is decoded here; an item that cannot even be read carries a
  ``problem`` instead of bytes, so it can be counted and written to the rejects table.

Input layouts:

* ``images``: a folder or prefix, recursive; ``photo.jpg`` takes its caption from ``photo.txt``
  beside it when there is one. Files that are not images are inputs too (rejected as
  ``unsupported_file``), so nothing under the input disappears silently.
* ``parquet``: a file, folder or prefix of ``.parquet``; image bytes and captions from named columns
  (image columns may also be Hugging Face ``{bytes, path}`` structs).
* ``webdataset``: ``.tar`` shards whose members are grouped by key (``0001.jpg`` + ``0001.txt``).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.common.config import StorageConfig
from pipelines.common.storage import resolve
from pipelines.data.schema import MISSING_IMAGE, READ_ERROR, UNSUPPORTED_FILE

InputFormat = Literal["auto", "images", "parquet", "webdataset"]

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".webp",
    ".bmp",
    ".tif",
    ".tiff",
    ".gif",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
    ".avif",
)
CAPTION_EXTENSION = ".txt"
PARQUET_EXTENSION = ".parquet"
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")

# Reasons an input is rejected before any decoding (see docs/data-schema.md).

_READ_AHEAD = 16  # files fetched concurrently while a shard is processed (hides S3 latency)
_PARQUET_BATCH_ROWS = 64


@dataclass(frozen=True)
class InputItem:
    source: str  # URI naming exactly this input: a file, "<file>.parquet#row=N" or "<shard>.tar#key"
    data: bytes | None = None
    caption: str = ""
    problem: tuple[str, str] | None = None  # (reason, detail) when there are no usable bytes


@dataclass(frozen=True)
class Shard:
    """A deterministic slice of the input; ``index`` names its output file."""

    index: int
    kind: Literal["images", "parquet", "webdataset"]
    path: str = ""  # parquet / webdataset: the file on the filesystem
    start: int = 0  # parquet: row range [start, stop)
    stop: int = 0
    files: tuple[tuple[str, str | None], ...] = ()  # images: (image path, caption path or None)
    count: int | None = None  # inputs in the shard, when known before reading it

    def to_json(self) -> str:
        return json.dumps(
            {
                "index": self.index,
                "kind": self.kind,
                "path": self.path,
                "start": self.start,
                "stop": self.stop,
                "files": [list(f) for f in self.files],
                "count": self.count,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "Shard":
        d = json.loads(text)
        return cls(
            d["index"], d["kind"], d["path"], d["start"], d["stop"], tuple((p, c) for p, c in d["files"]), d["count"]
        )

    def fingerprint(self) -> str:
        """Identifies what the shard reads; a re-run must see the same one to skip the shard."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:32]


@dataclass
class Source:
    """An input location and how to read it; cheap to pickle into Ray workers."""

    uri: str
    storage: StorageConfig = field(default_factory=StorageConfig)
    format: InputFormat = "auto"
    image_column: str = "image"
    caption_column: str | None = "text"

    def __post_init__(self) -> None:
        if not self.uri:
            raise ValueError("no input given: set input=<folder, s3:// prefix, .parquet or .tar>")
        self._location = resolve(self.uri, self.storage)
        self.uri = self._location.uri  # absolute, so workers with another cwd read the same files

    def __getstate__(self) -> dict:  # the filesystem is rebuilt in the worker, not pickled
        return {k: v for k, v in self.__dict__.items() if k != "_location"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._location = resolve(self.uri, self.storage)

    # ------------------------------------------------------------------------------------------
    # Planning (driver)
    # ------------------------------------------------------------------------------------------

    def plan(self, shard_size: int) -> list[Shard]:
        """List the input and cut it into shards of at most ``shard_size`` inputs (one per tar)."""
        paths = self._list()
        kind = self._detect(paths)
        if kind == "images":
            return _plan_images(paths, shard_size)
        if kind == "parquet":
            return self._plan_parquet([p for p in paths if p.lower().endswith(PARQUET_EXTENSION)], shard_size)
        tars = [p for p in paths if p.lower().endswith(TAR_EXTENSIONS)]
        return [Shard(i, "webdataset", path=p) for i, p in enumerate(tars)]

    def _list(self) -> list[str]:
        loc = self._location
        info = loc.fs.get_file_info(loc.path)
        if info.type.name == "NotFound":
            raise FileNotFoundError(f"input {self.uri!r} does not exist")
        if info.type.name == "File":
            return [loc.path]
        root = loc.path.rstrip("/") + "/"
        # Hidden files and folders (.git, .DS_Store, ._photo.jpg) are not inputs.
        return sorted(
            i.path
            for i in loc.list_files(recursive=True)
            if not any(part.startswith(".") for part in i.path[len(root) :].split("/"))
        )

    def _detect(self, paths: list[str]) -> str:
        if not paths:
            raise FileNotFoundError(f"input {self.uri!r} holds no files")
        lowered = [p.lower() for p in paths]
        has = {
            "images": any(p.endswith(IMAGE_EXTENSIONS) for p in lowered),
            "parquet": any(p.endswith(PARQUET_EXTENSION) for p in lowered),
            "webdataset": any(p.endswith(TAR_EXTENSIONS) for p in lowered),
        }
        if self.format != "auto":
            if self.format != "images" and not has[self.format]:
                raise FileNotFoundError(f"input {self.uri!r} holds no {self.format} files")
            return self.format
        for kind in ("images", "parquet", "webdataset"):
            if has[kind]:
                return kind
        raise FileNotFoundError(
            f"input {self.uri!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}), .parquet or .tar files"
        )

    def _plan_parquet(self, paths: list[str], shard_size: int) -> list[Shard]:
        # One footer read per file; threads because on S3 each is a round trip.
        with ThreadPoolExecutor(16) as pool:
            metas = list(pool.map(self._parquet_rows, paths))
        shards: list[Shard] = []
        for path, num_rows in zip(paths, metas):
            for start in range(0, num_rows, shard_size):
                stop = min(start + shard_size, num_rows)
                shards.append(Shard(len(shards), "parquet", path=path, start=start, stop=stop, count=stop - start))
        return shards

    def _parquet_rows(self, path: str) -> int:
        fs = self._location.fs
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            schema, num_rows = parquet.schema_arrow, parquet.metadata.num_rows
        where = self._uri(path)
        if self.image_column not in schema.names:
            raise ValueError(
                f"{where}: no image column {self.image_column!r} (columns: {', '.join(schema.names)});"
                f" set image_column=<name>"
            )
        kind = schema.field(self.image_column).type
        if not (
            pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)
            or pa.types.is_struct(kind)
            and kind.get_field_index("bytes") >= 0
        ):
            raise ValueError(
                f"{where}: column {self.image_column!r} is {kind}, not image bytes"
                " (binary, or a struct with a 'bytes' field)"
            )
        if self.caption_column is not None and self.caption_column not in schema.names:
            raise ValueError(
                f"{where}: no caption column {self.caption_column!r} (columns: {', '.join(schema.names)});"
                f" set caption_column=<name>, or caption_column=null for empty captions"
            )
        return num_rows

    # ------------------------------------------------------------------------------------------
    # Reading (workers)
    # ------------------------------------------------------------------------------------------

    def read(self, shard: Shard) -> Iterator[InputItem]:
        if shard.kind == "images":
            return _read_ahead(self._read_file, shard.files, _READ_AHEAD)
        if shard.kind == "parquet":
            return self._read_parquet(shard)
        return self._read_webdataset(shard)

    def _uri(self, path: str) -> str:
        return f"s3://{path}" if self.uri.startswith("s3://") else path

    def _read_file(self, entry: tuple[str, str | None]) -> InputItem:
        path, caption_path = entry
        uri = self._uri(path)
        if not path.lower().endswith(IMAGE_EXTENSIONS):
            return InputItem(uri, problem=(UNSUPPORTED_FILE, f"not an image file type ({posixpath.basename(path)})"))
        fs = self._location.fs
        try:
            with fs.open_input_stream(path) as f:
                data = f.read()
            caption = ""
            if caption_path is not None:
                with fs.open_input_stream(caption_path) as f:
                    caption = _text(f.read())
        except OSError as exc:
            return InputItem(uri, problem=(READ_ERROR, str(exc)))
        return InputItem(uri, data, caption)

    def _read_parquet(self, shard: Shard) -> Iterator[InputItem]:
        fs = self._location.fs
        columns = [self.image_column] + ([self.caption_column] if self.caption_column else [])
        with fs.open_input_file(shard.path) as f:
            parquet = pq.ParquetFile(f)
            # Only the row groups that overlap [start, stop) are read.
            groups, first_row, offset = [], None, 0
            for g in range(parquet.metadata.num_row_groups):
                rows = parquet.metadata.row_group(g).num_rows
                if offset < shard.stop and offset + rows > shard.start:
                    groups.append(g)
                    first_row = offset if first_row is None else first_row
                offset += rows
            row = first_row or 0
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, row_groups=groups, columns=columns):
                images = batch.column(0).to_pylist()
                captions = batch.column(1).to_pylist() if self.caption_column else [None] * len(images)
                for image, caption in zip(images, captions):
                    if shard.start <= row < shard.stop:
                        yield _parquet_item(f"{self._uri(shard.path)}#row={row}", image, caption)
                    row += 1

    def _read_webdataset(self, shard: Shard) -> Iterator[InputItem]:
        tar_uri = self._uri(shard.path)
        key, members = None, {}
        try:
            with (
                self._location.fs.open_input_stream(shard.path) as stream,
                tarfile.open(fileobj=stream, mode="r|*") as tar,
            ):
                for member in tar:  # streaming: members arrive in order, a sample's files are adjacent
                    if not member.isfile():
                        continue
                    folder, name = posixpath.split(member.name)
                    if name.startswith("."):
                        continue
                    stem, _, ext = name.partition(".")
                    sample_key = posixpath.join(folder, stem)
                    if sample_key != key:
                        if key is not None:
                            yield _webdataset_item(f"{tar_uri}#{key}", members)
                        key, members = sample_key, {}
                    ext = ext.lower()
                    if f".{ext}" in IMAGE_EXTENSIONS or f".{ext}" == CAPTION_EXTENSION:
                        members[ext] = tar.extractfile(member).read()
                    else:
                        members.setdefault(ext, None)  # seen but not needed
        except (tarfile.TarError, OSError, EOFError) as exc:
            # A damaged tar: the samples before the damage were yielded; the rest is one rejected input.
            after = f" after sample {key!r}" if key else ""
            key = None
            yield InputItem(tar_uri, problem=(READ_ERROR, f"unreadable tar{after}: {exc}"))
        if key is not None:
            yield _webdataset_item(f"{tar_uri}#{key}", members)


def _plan_images(paths: list[str], shard_size: int) -> list[Shard]:
    captions = {p[: -len(CAPTION_EXTENSION)] for p in paths if p.lower().endswith(CAPTION_EXTENSION)}
    entries = []
    for path in paths:
        if path.lower().endswith(CAPTION_EXTENSION):
            continue  # a caption, not an input (an orphan caption has nothing to describe)
        stem = posixpath.splitext(path)[0]
        entries.append((path, stem + CAPTION_EXTENSION if stem in captions else None))
    return [
        Shard(
            i,
            "images",
            files=tuple(entries[start : start + shard_size]),
            count=len(entries[start : start + shard_size]),
        )
        for i, start in enumerate(range(0, len(entries), shard_size))
    ]


def _parquet_item(source: str, image: Any, caption: Any) -> InputItem:
    if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes": ..., "path": ...}
        image = image.get("bytes")
    if image is None:
        return InputItem(source, problem=(MISSING_IMAGE, "null image"))
    return InputItem(source, bytes(image), _text(caption))


def _webdataset_item(source: str, members: dict[str, bytes | None]) -> InputItem:
    caption = _text(members.get(CAPTION_EXTENSION[1:]))
    for ext in IMAGE_EXTENSIONS:
        if members.get(ext[1:]) is not None:
            return InputItem(source, members[ext[1:]], caption)
    return InputItem(
        source, problem=(MISSING_IMAGE, f"no image member (has: {', '.join(sorted(members)) or 'nothing'})")
    )


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip()


def _read_ahead(fn: Callable[[Any], InputItem], items: Iterable[Any], depth: int) -> Iterator[InputItem]:
    """``map(fn, items)`` in order, with up to ``depth`` calls running ahead in threads."""
    with ThreadPoolExecutor(depth) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= depth:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
