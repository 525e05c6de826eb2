"""List a folder or ``s3://`` prefix recursively, sorted by path, as a stream; pair images with captions.

pyarrow's recursive ``FileSelector`` returns the whole listing at once; at millions of inputs that is
the driver's memory. Here a local tree is walked one directory at a time and an S3 prefix is read one
``ListObjectsV2`` page (1,000 keys) at a time, so only one directory (one page) is held.

Both yield the same order: sorted by the full path, as S3 lists keys. For a local walk that means
sorting each directory's entries by name with ``/`` appended to folder names (``b-c.jpg`` < ``b.jpg``
< ``b/x.jpg`` < ``b0.jpg``), so the walk needs no global sort. Symlinked folders are followed, except
one that leads back to a folder the walk is already inside (a loop would never end).

Each file comes with a ``version``: something that changes when its bytes change - size and
modification time locally, the ETag on S3 - so a plan built from a listing notices a file
overwritten under the same name.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from pipelines.common.config import StorageConfig
from pipelines.common.storage import Location, is_s3

_S3_PAGE = 1000
CAPTION_EXTENSION = ".txt"  # photo.txt (any case) beside photo.jpg: its caption


@dataclass(frozen=True)
class ListedFile:
    path: str  # on the location's filesystem ("bucket/key" on S3)
    version: str  # "size:mtime_ns" locally, "etag" on S3


def list_files(location: Location, storage: StorageConfig | None = None) -> Iterator[ListedFile]:
    """Every non-hidden file under ``location`` (or the file itself), sorted by path, streamed.

    Names starting with "." (``.git``, ``.DS_Store``, ``._photo.jpg``) and everything under such a
    folder are not inputs. Raises FileNotFoundError at once when the location does not exist.
    """
    info = location.fs.get_file_info(location.path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input {location.uri!r} does not exist")
    if info.type == pafs.FileType.File:
        return iter([ListedFile(location.path, _version(info.size, info.mtime_ns))])
    if is_s3(location.uri):
        return _list_s3(location.path.rstrip("/") + "/", storage or StorageConfig())
    return _walk_local(location.path)


def _version(size: int | None, mtime_ns: int | None) -> str:
    return f"{size}:{mtime_ns}"


def describe_version(version: str) -> str:
    """A :class:`ListedFile` version as a person reads it: ``"1234 bytes, modified <UTC time>"`` or ``"ETag x"``."""
    size, sep, mtime_ns = version.partition(":")
    if not (sep and size.isdigit() and mtime_ns.isdigit()):
        return f"ETag {version}"
    modified = datetime.fromtimestamp(int(mtime_ns) / 1e9, timezone.utc).isoformat(timespec="microseconds")
    return f"{size} bytes, modified {modified}"


def _walk_local(folder: str, inside: frozenset[tuple[int, int]] = frozenset()) -> Iterator[ListedFile]:
    """``inside``: (device, inode) of the folders above this one, to notice a symlink that loops back."""
    here = os.stat(folder)
    inside = inside | {(here.st_dev, here.st_ino)}
    with os.scandir(folder) as entries:
        visible = [(e.name + "/" if e.is_dir() else e.name, e) for e in entries if not e.name.startswith(".")]
    for _, entry in sorted(visible, key=lambda pair: pair[0]):
        if entry.is_dir():
            target = entry.stat()
            if (target.st_dev, target.st_ino) not in inside:
                yield from _walk_local(entry.path, inside)
        elif entry.is_file():
            stat = entry.stat()
            yield ListedFile(entry.path, _version(stat.st_size, stat.st_mtime_ns))


def _list_s3(prefix: str, storage: StorageConfig) -> Iterator[ListedFile]:
    import boto3

    bucket, _, key_prefix = prefix.partition("/")
    # endpoint_url None: boto3 reads AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL itself, as pyarrow does.
    client = boto3.client("s3", endpoint_url=storage.s3_endpoint_url, region_name=storage.s3_region)
    pages = client.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix=key_prefix, PaginationConfig={"PageSize": _S3_PAGE}
    )
    for page in pages:  # keys arrive sorted (UTF-8 byte order: the same as sorting the strings)
        for obj in page.get("Contents", []):
            relative = obj["Key"][len(key_prefix) :]
            if obj["Key"].endswith("/") or any(part.startswith(".") for part in relative.split("/")):
                continue  # folder placeholder objects and hidden files
            yield ListedFile(f"{bucket}/{obj['Key']}", obj["ETag"].strip('"'))


def with_captions(files: Iterator[ListedFile]) -> Iterator[tuple[str, str | None, str]]:
    """Sorted files -> (input, its caption file or None, version of both), streamed.

    ``photo.jpg`` and ``photo.txt`` are both in the group of paths ``<folder>/photo`` or
    ``<folder>/photo.*``; in sorted order such a group is contiguous, except that it may enclose
    deeper groups (``photo.v2/x.jpg``). So a stack of open groups, one per folder level, is all
    that is held: a group is complete once a path outside it arrives.
    """
    open_groups: list[tuple[str, list[ListedFile]]] = []  # (group key, its files), innermost last
    for f in files:
        while open_groups and not _in_group(f.path, open_groups[-1][0]):
            yield from _pair(open_groups.pop()[1])
        folder, name = posixpath.split(f.path)
        key = posixpath.join(folder, name.split(".", 1)[0])
        if open_groups and open_groups[-1][0] == key:
            open_groups[-1][1].append(f)
        else:
            open_groups.append((key, [f]))
    while open_groups:
        yield from _pair(open_groups.pop()[1])


def _in_group(path: str, key: str) -> bool:
    return path == key or path.startswith(key + ".")


def _pair(group: list[ListedFile]) -> Iterator[tuple[str, str | None, str]]:
    """One group's inputs with their captions (``photo.txt``, ``photo.TXT``...; orphan captions
    describe nothing and are not inputs)."""
    captions = {
        posixpath.splitext(f.path)[0]: f for f in group if posixpath.splitext(f.path)[1].lower() == CAPTION_EXTENSION
    }
    for f in group:
        stem, extension = posixpath.splitext(f.path)
        if extension.lower() == CAPTION_EXTENSION:
            continue
        caption = captions.get(stem)
        yield (
            (f.path, None, f.version) if caption is None else (f.path, caption.path, f"{f.version}+{caption.version}")
        )
