"""Where annotate's inputs come from: image files, Parquet, or WebDataset tar shards (local or s3://).

Two halves, run in different places:

* :meth:`Source.plan` (driver) lists the input once, sorted, and cuts it into :class:`Shard` s as it
  goes: a generator, so the driver holds one directory listing (one page on S3) and one shard at a
  time, never the whole input. The cut is deterministic - the same input always gives the same
  shards - and a shard's fingerprint covers each file's size and modification time (ETag on S3),
  which is what lets a re-run skip the shards that are already written, and only those.
* :meth:`Source.read` (workers) streams one shard as :class:`InputItem` s: the source URI, the raw
  image bytes and the caption. Nothing is decoded here; an item that cannot even be read carries a
  ``problem`` instead of bytes, so it can be counted and written to the rejects table.

Input layouts:

* ``images``: a folder or prefix, recursive; ``photo.jpg`` takes its caption from ``photo.txt``
  (any case of the extension) beside it when there is one. Files that are not images are inputs too (rejected as
  ``unsupported_file``), so nothing under the input disappears silently.
* ``parquet``: a file, folder or prefix of ``.parquet``; image bytes and captions from named columns
  (image columns may also be Hugging Face ``{bytes, path}`` structs).
* ``webdataset``: ``.tar`` shards whose members are grouped by key (``0001.jpg`` + ``0001.txt``).
  A damaged tar costs only what it must: each sample whose members were listed but not read is its
  own reject, and a damaged stretch whose members cannot be named is one reject.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow.parquet as pq

from pipelines.common.config import StorageConfig
from pipelines.common.storage import resolve
from pipelines.data.listing import CAPTION_EXTENSION, ListedFile, list_files, with_captions
from pipelines.data.schema import MISSING_IMAGE, READ_ERROR, UNSUPPORTED_FILE, bytes_from_image_column, is_image_type

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
    # images: (image path, caption path or None, version of both: see pipelines.data.listing)
    files: tuple[tuple[str, str | None, str], ...] = ()
    count: int | None = None  # inputs in the shard, when known before reading it
    version: str = ""  # parquet / webdataset: the file's version

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
                "version": self.version,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> "Shard":
        d = json.loads(text)
        files = tuple((p, c, v) for p, c, v in d["files"])
        return cls(d["index"], d["kind"], d["path"], d["start"], d["stop"], files, d["count"], d["version"])

    def fingerprint(self) -> str:
        """Identifies what the shard reads, down to each file's version; a re-run must see the same one
        to skip the shard, so a file overwritten under the same name makes its shard a different one."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:32]

    def inputs(self) -> dict[str, str]:
        """Each file the shard reads -> its version (see pipelines.data.listing), captions included."""
        if self.kind != "images":
            return {self.path: self.version}
        found = {}
        for image, caption, version in self.files:
            image_version, _, caption_version = version.partition("+")  # "image+caption" when paired
            found[image] = image_version
            if caption is not None:
                found[caption] = caption_version
        return found


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

    def plan(self, shard_size: int) -> Iterator[Shard]:
        """Cut the input into shards of at most ``shard_size`` inputs (one per tar), streamed: the
        listing is read as the shards are consumed. A missing input or one without usable files
        raises here; a Parquet file without the configured columns when its shards are reached."""
        kind, files = self._detect(list_files(self._location, self.storage))
        if kind == "images":
            return plan_images(files, shard_size)
        if kind == "parquet":
            return self._plan_parquet((f for f in files if f.path.lower().endswith(PARQUET_EXTENSION)), shard_size)
        tars = (f for f in files if f.path.lower().endswith(TAR_EXTENSIONS))
        return (Shard(i, "webdataset", path=f.path, version=f.version) for i, f in enumerate(tars))

    def _detect(self, files: Iterator[ListedFile]) -> tuple[str, Iterator[ListedFile]]:
        """The input's kind, from the first file that has one (explicit ``format`` wins); the
        listing comes back whole, the files looked at put in front again."""
        seen: list[ListedFile] = []
        for f in files:
            seen.append(f)
            kind = "images" if self.format == "images" else _kind(f.path)  # any file is an image input
            if kind is not None and self.format in ("auto", kind):
                return kind, itertools.chain(seen, files)
        if not seen:
            raise FileNotFoundError(f"input {self.uri!r} holds no files")
        if self.format != "auto":
            raise FileNotFoundError(f"input {self.uri!r} holds no {self.format} files")
        raise FileNotFoundError(
            f"input {self.uri!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}), .parquet or .tar files"
        )

    def _plan_parquet(self, files: Iterator[ListedFile], shard_size: int) -> Iterator[Shard]:
        index = 0
        # One footer read per file, a few ahead in threads: on S3 each is a round trip.
        for f, num_rows in _read_ahead(lambda f: (f, self._parquet_rows(f.path)), files, _READ_AHEAD):
            for start in range(0, num_rows, shard_size):
                stop = min(start + shard_size, num_rows)
                yield Shard(
                    index, "parquet", path=f.path, start=start, stop=stop, count=stop - start, version=f.version
                )
                index += 1

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
        if not is_image_type(kind):
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

    def _read_file(self, entry: tuple[str, str | None, str]) -> InputItem:
        path, caption_path, _ = entry
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
                images = bytes_from_image_column(batch.column(0)).to_pylist()
                captions = batch.column(1).to_pylist() if self.caption_column else [None] * len(images)
                for image, caption in zip(images, captions):
                    if shard.start <= row < shard.stop:
                        yield _parquet_item(f"{self._uri(shard.path)}#row={row}", image, caption)
                    row += 1

    def _read_webdataset(self, shard: Shard) -> Iterator[InputItem]:
        """Samples in member order, from one streamed read of the tar.

        Damage costs only what it must. The sample being assembled when the tar breaks is its own
        reject (its key is known from a member header; members of it may be lost). tarfile stops
        quietly at a truncated or invalid header, so the end is checked too: a damaged header with
        data after it hides members that cannot be named, and that stretch is one more reject.
        """
        tar_uri = self._uri(shard.path)
        key, members, damage, hidden = None, {}, None, None
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
                damage, hidden = _end_of_archive_problem(tar)
        except (tarfile.TarError, OSError, EOFError) as exc:
            damage = f"{type(exc).__name__}: {exc}"
        if key is not None:
            if damage is None:
                yield _webdataset_item(f"{tar_uri}#{key}", members)
            else:
                got = ", ".join(sorted(members)) or "nothing"
                yield InputItem(f"{tar_uri}#{key}", problem=(READ_ERROR, f"damaged tar ({damage}); read of it: {got}"))
        elif damage is not None:
            yield InputItem(tar_uri, problem=(READ_ERROR, f"unreadable tar: {damage}"))
        if hidden is not None:
            yield InputItem(f"{tar_uri}#@{hidden}", problem=(READ_ERROR, f"damaged tar ({damage}): members lost"))


def _end_of_archive_problem(tar: tarfile.TarFile) -> tuple[str | None, int | None]:
    """(what is wrong, offset of a damaged stretch with data after it) once tarfile stopped listing.

    A well-formed archive ends with zero blocks and nothing else. tarfile stops at the header block
    at ``tar.offset`` and its stream stands right after what it read of that block.
    """
    stream, offset = tar.fileobj, tar.offset
    read = stream.tell() - offset
    if read == 0:
        return f"ends at byte {offset} without an end-of-archive marker (truncated)", None
    if read < tarfile.BLOCKSIZE:
        return f"truncated in a member header at byte {offset}", None
    while chunk := stream.read(2**16):
        if chunk.strip(b"\0"):
            return f"invalid member header at byte {offset}", offset
    return None, None


def _kind(path: str) -> str | None:
    lowered = path.lower()
    for kind, extensions in (
        ("images", IMAGE_EXTENSIONS),
        ("parquet", PARQUET_EXTENSION),
        ("webdataset", TAR_EXTENSIONS),
    ):
        if lowered.endswith(extensions):
            return kind
    return None


def plan_images(files: Iterator[ListedFile], shard_size: int) -> Iterator[Shard]:
    """A sorted listing -> image shards of ``shard_size`` inputs (captions paired), one at a time."""
    entries, index = [], 0
    for entry in with_captions(files):
        entries.append(entry)
        if len(entries) == shard_size:
            yield Shard(index, "images", files=tuple(entries), count=len(entries))
            entries, index = [], index + 1
    if entries:
        yield Shard(index, "images", files=tuple(entries), count=len(entries))


def _parquet_item(source: str, image: bytes | None, caption: Any) -> InputItem:
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
