"""Where annotator weights come from: the one place that turns a weights source into local files.

A source is one of

* a local directory holding the files (``/models/annotators``),
* an ``s3://bucket/prefix`` holding them: each needed file is copied once into the local cache
  (``$ZEROCONV_CACHE/annotator-weights/<hash of the prefix>/``), never the whole prefix,
* a Hugging Face hub repo id, by default ``lllyasviel/Annotators`` (needs network, or the files
  already in the hub cache; ``HF_HUB_OFFLINE=1`` allows only the cache).

Every file that is loaded is hashed (sha256) so the dataset records exactly which weights made a
condition map; a pinned hash that does not match is an error.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Iterable

HUB_REPO = "lllyasviel/Annotators"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def _how_to_provide(file: str) -> str:
    return (
        f"Provide {file!r} one of these ways: put it in a local directory and pass weights_source=DIR; "
        f"upload it under an S3 prefix and pass weights_source=s3://BUCKET/PREFIX; or, with network access "
        f"(HF_HUB_OFFLINE unset), pass the hub repo weights_source={HUB_REPO!r}."
    )


def fetch(files: Iterable[str], source: str, storage=None) -> Path:
    """Make every file in ``files`` available in one local directory and return that directory."""
    files = list(files)
    source = str(source)
    if source.startswith("s3://"):
        return _fetch_s3(files, source, storage)
    local = Path(source).expanduser()
    if local.is_dir():
        for file in files:
            if not (local / file).is_file():
                raise FileNotFoundError(
                    f"annotator weights {file!r} not found in local directory {str(local)!r}. {_how_to_provide(file)}"
                )
        return local.resolve()
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        return _fetch_hub(files, source)
    raise FileNotFoundError(
        f"annotator weights source {source!r} is not an existing local directory, an s3:// prefix or a "
        f"hub repo id like {HUB_REPO!r}. {_how_to_provide(files[0] if files else 'the weights')}"
    )


def _fetch_s3(files: list[str], source: str, storage) -> Path:
    import pyarrow.fs as pafs

    from pipelines.common.storage import (
        cache_dir,  # the project's one cache location
        resolve,  # the one S3 helper; imported only when needed
    )

    prefix = resolve(source, storage)
    dest = cache_dir() / "annotator-weights" / hashlib.sha256(prefix.uri.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    for file in files:
        remote = prefix.join(file)
        info = remote.fs.get_file_info(remote.path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(
                f"annotator weights {file!r} not found under {prefix.uri!r} (looked for {remote.uri!r}). "
                f"{_how_to_provide(file)}"
            )
        local = dest / file
        if local.is_file() and local.stat().st_size == info.size:
            continue  # cached by an earlier actor on this machine
        # Copy to a unique temp name, then rename: actors starting together never read half a file.
        tmp = dest / f".{file}.{uuid.uuid4().hex}.part"
        try:
            with remote.fs.open_input_stream(remote.path) as src, open(tmp, "wb") as out:
                while chunk := src.read(16 << 20):
                    out.write(chunk)
            os.replace(tmp, local)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def _fetch_hub(files: list[str], repo: str) -> Path:
    from huggingface_hub import hf_hub_download

    paths = []
    for file in files:
        try:
            paths.append(Path(hf_hub_download(repo, file)))
        except Exception as exc:  # offline, missing file, unknown repo, gated repo...
            offline = (
                " (HF_HUB_OFFLINE is set and the file is not in the hub cache)"
                if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
                else ""
            )
            raise FileNotFoundError(
                f"annotator weights {file!r} could not be fetched from hub repo {repo!r}{offline}: "
                f"{type(exc).__name__}. {_how_to_provide(file)}"
            ) from None
    # hf_hub_download puts every file of one repo revision in the same snapshot directory.
    return paths[0].parent


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify(directory: Path, files: Iterable[str], pinned: dict[str, str], source: str) -> dict[str, str]:
    """Hash each file; raise ValueError if a pinned hash differs. Returns {file: sha256}."""
    hashes = {}
    for file in files:
        actual = sha256_file(directory / file)
        expected = pinned.get(file)
        if expected and expected.lower() != actual:
            raise ValueError(
                f"annotator weights {file!r} from {source!r} have sha256 {actual}, but {expected} is pinned; "
                f"the file is corrupt or not the expected weights (update the pin if they are meant to change)"
            )
        hashes[file] = actual
    return hashes
