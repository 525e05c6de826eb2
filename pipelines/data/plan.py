"""A shard plan kept on the driver's disk, not in its memory.

    plan = SpilledPlan.write(source.plan(shard_size), directory)   # one pass over the listing
    plan.fingerprints            # {index: fingerprint}: what resume and the manifest need, a few bytes a shard
    plan.items(pending)          # the pending shards as work items: line offsets, each line read where needed

A planned shard carries the paths of its inputs (hundreds of them); a million inputs make a plan of
about a hundred megabytes. Written to a JSON-lines file as the listing streams, the driver keeps only
each shard's fingerprint, input count and line offset: its memory stays flat in the number of inputs,
and the listing is read once, so the shards handed out are exactly the ones fingerprinted.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

from pipelines.common.cluster import ItemStream
from pipelines.data.sources import Shard


@dataclass
class SpilledPlan:
    path: str  # one Shard.to_json() per line, line k = shard k
    fingerprints: dict[int, str]
    counts: dict[int, int | None]  # inputs per shard, when the plan knows them (not for tars)
    offsets: list[int]  # byte offset of shard k's line
    kind: str  # the shards' kind: images, parquet or webdataset

    @classmethod
    def write(cls, shards: Iterable[Shard], directory: str) -> SpilledPlan:
        """Stream ``shards`` into ``directory``/plan.jsonl; an empty plan is a FileNotFoundError."""
        path = os.path.join(directory, "plan.jsonl")
        fingerprints, counts, offsets, kind = {}, {}, [], None
        with open(path, "wb") as out:
            for shard in shards:
                if shard.index != len(offsets):  # line k must be shard k: offsets[k] relies on it
                    raise AssertionError(f"plan out of order: shard {shard.index} at line {len(offsets)}")
                offsets.append(out.tell())
                out.write(shard.to_json().encode() + b"\n")
                fingerprints[shard.index], counts[shard.index] = shard.fingerprint(), shard.count
                kind = kind or shard.kind
        if kind is None:
            raise FileNotFoundError("the input holds nothing to annotate")
        return cls(path, fingerprints, counts, offsets, kind)

    def __len__(self) -> int:
        return len(self.fingerprints)

    def inputs(self, indexes: Iterable[int]) -> int | None:
        """How many inputs the shards ``indexes`` hold, if the plan knows every one's count."""
        counts = [self.counts[i] for i in indexes]
        return None if any(c is None for c in counts) else sum(counts)

    def shard(self, index: int) -> Shard:
        """Shard ``index`` as planned (read back from the file: e.g. to name an input that changed since)."""
        return Shard.from_json(read_shards(self.path, [self.offsets[index]])[0]["shard"])

    def items(self, indexes: Iterable[int]) -> ItemStream:
        """The shards ``indexes`` as work items the driver does not hold (read from the file where needed)."""
        return ItemStream([self.offsets[i] for i in sorted(indexes)], partial(read_shards, self.path))


def read_shards(path: str, offsets: list[int]) -> list[dict]:
    """``{"shard": json}`` for the plan file's lines that start at ``offsets``."""
    with open(path, "rb") as plan:
        items = []
        for offset in offsets:
            plan.seek(offset)
            items.append({"shard": plan.readline().decode().rstrip("\n")})
        return items
