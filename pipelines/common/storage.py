"""One way to reach bytes: a URI (local path or ``s3://bucket/key``) becomes a pyarrow filesystem.

Everything that reads or writes data goes through :func:`resolve`, so switching a job from local
files to S3 is a config change. S3 credentials come from the standard AWS chain (environment,
profile, instance role); only the endpoint and region are configurable.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from pipelines.common.config import StorageConfig


def cache_dir() -> Path:
    """The one local cache: built/copied base models, annotator weights. ZEROCONV_CACHE overrides it."""
    return Path(os.environ.get("ZEROCONV_CACHE", Path.home() / ".cache" / "zeroconv"))


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


@dataclass(frozen=True)
class Location:
    """A filesystem plus a path on it, e.g. (S3FileSystem, "bucket/prefix")."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def join(self, *parts: str) -> "Location":
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts)
        return Location(self.fs, path, uri)

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_bytes_atomic(self, data: bytes) -> None:
        """Write to a temp name then move: readers never see half a file (S3 puts are atomic anyway)."""
        parent = posixpath.dirname(self.path)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        if isinstance(self.fs, pafs.S3FileSystem):
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            return
        # A hidden temp name ("." prefix): dataset readers (pyarrow, Ray Data) skip it if it is ever left behind.
        tmp = posixpath.join(parent, f".{posixpath.basename(self.path)}.tmp-{uuid.uuid4().hex}")
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path)

    def list_files(self, recursive: bool = True) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(self.path, recursive=recursive, allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]


def s3_filesystem(storage: StorageConfig | None = None) -> pafs.S3FileSystem:
    storage = storage or StorageConfig()
    endpoint = storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict = {"region": storage.s3_region or os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:  # "127.0.0.1:9000" without a scheme
            scheme, host = "https", endpoint
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    # Access keys are picked up by pyarrow from the AWS chain; we never pass or log them.
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str | os.PathLike, storage: StorageConfig | None = None) -> Location:
    uri = str(uri)
    if is_s3(uri):
        path = uri[len("s3://") :].rstrip("/")
        if not path or "/" not in path and len(path) < 3:
            raise ValueError(f"{uri!r} is not a valid s3:// URI (expected s3://bucket/prefix)")
        return Location(s3_filesystem(storage), path, uri.rstrip("/"))
    local = str(Path(uri).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), local, local)


def download_dir(uri: str, dest: str | os.PathLike, storage: StorageConfig | None = None) -> Path:
    """Copy a directory tree (local or s3://) to a local folder; used for model weights."""
    src = resolve(uri, storage)
    if not src.is_dir():
        raise FileNotFoundError(f"{uri!r} does not exist or is not a directory")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(src.path, str(dest), source_filesystem=src.fs, destination_filesystem=pafs.LocalFileSystem())
    return dest


def upload_dir(local_dir: str | os.PathLike, uri: str, storage: StorageConfig | None = None) -> None:
    dst = resolve(uri, storage)
    dst.mkdir()
    pafs.copy_files(str(local_dir), dst.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=dst.fs)
