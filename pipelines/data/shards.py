"""Resumable sharded Parquet output: the one way annotate and precompute write their datasets.

A job cuts its work into ``total`` shards, fixed before it starts; shard ``k`` always becomes
``data/train-<k>-of-<total>.parquet`` (docs/data-schema.md). Writing one shard:

    output.write_shard(k, table, summary, rejects)   # rejects first; the data file (or empty marker) last

A shard is finished once its data file - or, when it has no rows, its ``_empty/`` marker - exists;
both are written atomically (temp name + rename; one PUT on S3) and carry the shard's summary
(counts, the fingerprint of its inputs and each input's version). So a re-run lists the finished
shards, checks that they were made from the same inputs (naming the first input that changed when
one did), and does only the rest; a data file cut short (an S3 upload that failed mid-way) has no
readable footer and is done again. The driver side of that is
:func:`run_resumable`; the :class:`Manifest` records the job and its status, and refuses a re-run
whose job differs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.common import console
from pipelines.common.config import ConfigError
from pipelines.common.storage import Location, is_s3
from pipelines.data.listing import describe_version
from pipelines.data.schema import DATA_DIR, EMPTY_DIR, MAX_SHARDS, REJECTS_DIR, dumps, shard_file_name

_SHARD_FILE = re.compile(r"^train-(\d{5})-of-(\d{5})\.(parquet|json)$")
_TEMP_FILE = re.compile(r"^\..+\.tmp-")  # see Location.write_bytes_atomic
_ROW_GROUP_ROWS = 256


def check_output_outside(output: Location, input_uri: str) -> None:
    """Refuse an output that is the input or inside it: a re-run would read its own output."""
    if is_s3(output.uri) != is_s3(input_uri):
        return
    if (output.uri.rstrip("/") + "/").startswith(input_uri.rstrip("/") + "/"):
        raise ConfigError(
            f"output {output.uri} is the input or inside it ({input_uri}): a re-run would read its own output; "
            "choose another output"
        )


def plan_identity(fingerprints: list[str]) -> dict:
    """The part of a job's identity that says what its shards hold: how many, and a hash of their inputs."""
    return {"shards": len(fingerprints), "sha256": hashlib.sha256("".join(fingerprints).encode()).hexdigest()}


def parquet_bytes(table: pa.Table, encoded: set[str] = frozenset()) -> bytes:
    """Serialise a table; ``encoded`` columns (JPEG/PNG, tensors) skip compression, dictionaries, statistics."""
    others = [n for n in table.column_names if n not in encoded]
    sink = pa.BufferOutputStream()
    pq.write_table(
        table,
        sink,
        row_group_size=_ROW_GROUP_ROWS,
        compression={n: ("none" if n in encoded else "snappy") for n in table.column_names},
        use_dictionary=others,
        write_statistics=others,
    )
    return sink.getvalue().to_pybytes()


@dataclass(frozen=True)
class ShardedOutput:
    """A dataset folder written shard by shard. ``footer_key`` names the summary in each shard's footer
    (one per job kind, so another job's folder is recognised as such)."""

    location: Location
    total: int
    footer_key: bytes

    def __post_init__(self) -> None:
        if self.total > MAX_SHARDS:
            raise ConfigError(
                f"{self.total} shards is more than the {MAX_SHARDS} one dataset can name; use a larger shard_size "
                "or split the input into several outputs"
            )

    def data_file(self, index: int) -> Location:
        return self.location.join(DATA_DIR, shard_file_name(index, self.total))

    def rejects_file(self, index: int) -> Location:
        return self.location.join(REJECTS_DIR, shard_file_name(index, self.total))

    def empty_marker(self, index: int) -> Location:
        return self.location.join(EMPTY_DIR, shard_file_name(index, self.total).replace(".parquet", ".json"))

    def write_shard(
        self,
        index: int,
        table: pa.Table,
        summary: dict,
        rejects: pa.Table | None = None,
        encoded: set[str] = frozenset(),
        inputs: dict[str, str] | None = None,
    ) -> None:
        """Write shard ``index``: its rejects (if any), then its rows with ``summary`` in the footer -
        or, with no rows, the ``_empty/`` marker holding ``summary``. The last write marks it finished.
        ``inputs`` (path -> version) go into the footer too, so a re-run can say which input changed."""
        rejects_file = self.rejects_file(index)
        if rejects is not None and rejects.num_rows:
            rejects_file.write_bytes_atomic(parquet_bytes(rejects))
        elif rejects_file.exists():  # left by an earlier attempt whose failures were transient
            rejects_file.fs.delete_file(rejects_file.path)
        summary = {**summary, "shard": index, **({"inputs": inputs} if inputs is not None else {})}
        if table.num_rows:
            table = table.replace_schema_metadata({**(table.schema.metadata or {}), self.footer_key: dumps(summary)})
            self.data_file(index).write_bytes_atomic(parquet_bytes(table, encoded))
        else:
            self.empty_marker(index).write_bytes_atomic(json.dumps({self.footer_key.decode(): summary}).encode())

    def discard(self, index: int) -> None:
        """Forget that shard ``index`` was finished: the next run writes it again."""
        for mark in (self.data_file(index), self.empty_marker(index)):
            if mark.exists():
                mark.fs.delete_file(mark.path)

    def finished_shards(
        self, fingerprints: dict[int, str], inputs: Callable[[int], dict[str, str]] | None = None
    ) -> dict[int, dict]:
        """Summaries of the shards already written, by index. ``fingerprints`` are this job's; a finished
        shard made from other inputs is an error (the input changed since that run) that names the first
        changed input, comparing the versions the shard recorded with ``inputs(index)``, this job's."""
        files = [
            info
            for folder in (self.location.join(DATA_DIR), self.location.join(EMPTY_DIR))
            if folder.exists()
            for info in folder.list_files(recursive=False)
            if _SHARD_FILE.match(info.base_name)
        ]
        with ThreadPoolExecutor(16) as pool:  # one footer read each; round trips on S3
            summaries = [s for s in pool.map(self._summary, files) if s is not None]
        for s in summaries:
            recorded = s.pop("inputs", None)  # only needed here: the driver keeps small summaries
            if fingerprints.get(s["shard"]) != s.get("fingerprint"):
                change = _first_change(recorded, inputs(s["shard"])) if recorded is not None and inputs else None
                raise ValueError(
                    f"{self.location.uri}: shard {s['shard']} was made from different inputs than this job's ("
                    + (change or "the input changed since that run")
                    + "). Use a new output, or delete the old one."
                )
        return {s["shard"]: s for s in summaries}

    def _summary(self, info) -> dict | None:
        key = self.footer_key.decode()
        where = f"{self.location.uri}/{info.path.rsplit('/', 2)[-2]}/{info.base_name}"
        try:
            with self.location.fs.open_input_file(info.path) as f:
                if info.base_name.endswith(".json"):
                    meta = json.loads(f.read())  # an _empty/ marker: {key: summary}
                else:
                    raw = (pq.read_schema(f).metadata or {}).get(self.footer_key)
                    meta = {key: json.loads(raw)} if raw else {}
        except (pa.ArrowInvalid, OSError, ValueError):
            # No readable footer: a write cut short (S3 completes a multipart upload even when the
            # writer failed mid-way). Not finished: this run writes it again.
            return None
        if key not in meta:
            raise ValueError(f"{where} was not written by this kind of zeroconv job; choose another output")
        summary = meta[key]
        if not re.match(rf"^train-{summary.get('shard', -1):05d}-of-{self.total:05d}\.", info.base_name):
            raise ValueError(f"{where} belongs to a job cut into other shards; choose another output")
        return summary

    def remove_temp_files(self) -> None:
        """Half-written files of an interrupted run (the rename never happened)."""
        for folder in (self.location, *(self.location.join(d) for d in (DATA_DIR, EMPTY_DIR, REJECTS_DIR))):
            if folder.exists():
                for info in folder.list_files(recursive=False):
                    if _TEMP_FILE.match(info.base_name):
                        folder.fs.delete_file(info.path)


def _first_change(recorded: dict[str, str], current: dict[str, str]) -> str | None:
    """The first input, in path order, that is new, gone or of another version, said as a person reads it."""
    for path in sorted(set(recorded) | set(current)):
        then, now = recorded.get(path), current.get(path)
        if then != now:
            if then is None:
                return f"{path} is new"
            if now is None:
                return f"{path} is gone"
            return f"{path} changed: {describe_version(then)} then, {describe_version(now)} now"
    return None


@dataclass
class Manifest:
    """``_manifest.json``: what the job is (``job``: a re-run must match it), its status and totals.

    ``describe(summaries)`` adds the job kind's own fields (counts, tensor shapes...)."""

    location: Location
    format: str
    kind: str  # for messages: "annotation", "precompute"
    job: dict
    describe: Callable[[dict[int, dict]], dict]

    def check_resumable(self, explain_plan: Callable[[], object] | None = None) -> None:
        """Refuse to resume a different job. When only the plan's inputs differ, ``explain_plan`` runs
        first: it may raise a sharper error (the finished shard and the input that changed)."""
        if not self.location.exists():
            return
        try:
            previous = json.loads(self.location.read_bytes())
            if previous.get("format") != self.format:
                raise ValueError(f"format {previous.get('format')!r}, not {self.format!r}")
            previous = previous["job"]
        except (ValueError, KeyError) as exc:
            raise ValueError(
                f"{self.location.uri} is not a zeroconv {self.kind} manifest ({exc}); choose another output"
            ) from None
        changed = [key for key in sorted(set(previous) | set(self.job)) if previous.get(key) != self.job.get(key)]
        same_shards = (previous.get("plan") or {}).get("shards") == (self.job.get("plan") or {}).get("shards")
        if changed == ["plan"] and same_shards and explain_plan is not None:
            explain_plan()
        if changed:
            what = "; ".join(f"{k}: {dumps(previous.get(k))} then, {dumps(self.job.get(k))} now" for k in changed)
            raise ConfigError(
                f"output {self.location.uri.rsplit('/', 1)[0]} holds a different {self.kind} job, so it cannot be "
                f"resumed ({what}). Use a new output, or delete the old one."
            )

    def write(self, status: str, total: int, summaries: dict[int, dict]) -> None:
        output = self.location.uri.rsplit("/", 1)[0]
        manifest = {
            "format": self.format,
            "status": status,
            "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "output": output,
            "job": self.job,
            **self.describe(summaries),
            "shards": {"total": total, "done": len(summaries)},
        }
        self.location.write_bytes_atomic(json.dumps(manifest, indent=2).encode())


def run_resumable(
    output: ShardedOutput,
    manifest: Manifest,
    fingerprints: dict[int, str],
    run: Callable[[list[int], Callable[[dict], None]], None],
    inputs: Callable[[int], dict[str, str]] | None = None,
) -> tuple[dict[int, dict], set[int]]:
    """Resume a sharded job: check the manifest, clean up, skip finished shards, ``run(pending, done)``
    the rest (``done(summary)`` for each shard it finishes), record the outcome in the manifest.
    ``inputs(index)``: shard ``index``'s input paths -> versions, to name an input that changed.

    Returns every shard's summary and the indexes finished by earlier runs."""
    manifest.check_resumable(explain_plan=lambda: output.finished_shards(fingerprints, inputs))
    output.remove_temp_files()
    finished = output.finished_shards(fingerprints, inputs)
    pending = [i for i in sorted(fingerprints) if i not in finished]
    manifest.write("running", output.total, finished)
    summaries = dict(finished)
    try:
        if pending:
            run(pending, lambda summary: summaries.__setitem__(summary["shard"], summary))
    except BaseException:
        print(
            f"stopped with {len(summaries)} of {output.total} shards written to {output.location.uri}; finished "
            "shards are kept: re-run the same command to resume",
            file=console.terminal(),
        )
        raise
    finally:
        manifest.write("complete" if len(summaries) == output.total else "incomplete", output.total, summaries)
    return summaries, set(finished)
