"""The spilled shard plan: annotate's driver keeps fingerprints and counts, the shards stay on disk."""

from __future__ import annotations

import pytest

from pipelines.data.plan import SpilledPlan
from pipelines.data.sources import Shard, Source
from pipelines.data.synthetic import write_image_folder


def test_the_plan_file_holds_every_shard_and_streams_back_the_pending_ones(tmp_path):
    write_image_folder(tmp_path / "in", n=10, size=16)  # + 4 broken files: 14 inputs
    source = Source(str(tmp_path / "in"))
    shards = list(source.plan(shard_size=4))

    plan = SpilledPlan.write(source.plan(shard_size=4), str(tmp_path))

    assert len(plan) == len(shards) == 4 and plan.kind == "images"
    assert plan.fingerprints == {s.index: s.fingerprint() for s in shards}  # what resume and the manifest check
    assert plan.inputs(range(4)) == 14 and plan.inputs([1, 3]) == shards[1].count + shards[3].count
    stream = plan.items([3, 1])  # any order asked; plan order given
    assert len(stream) == 2
    assert [Shard.from_json(i["shard"]) for i in stream.read(stream.keys)] == [shards[1], shards[3]]
    assert [Shard.from_json(i["shard"]) for i in stream.read(stream.keys[1:])] == [shards[3]]  # one read task's
    assert len(plan.items([])) == 0


def test_an_empty_plan_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to annotate"):
        SpilledPlan.write(iter(()), str(tmp_path))
