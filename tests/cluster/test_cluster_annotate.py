"""Annotation on an autoscaling cluster that starts with no worker nodes: the actor pool asks for the
`cpu_decode` node type's resource, the autoscaler adds nodes, shards are written on several of them;
losing a node mid-job loses and duplicates nothing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipelines.annotate import AnnotateConfig, run_annotate
from pipelines.data.synthetic import write_image_folder
from tests.cluster.harness import wait_for

pytestmark = pytest.mark.cluster

BROKEN = 4  # write_image_folder(broken=True) adds four inputs that must become reject rows
FOOTER_KEY = b"zeroconv.shard"  # each shard's summary: its Parquet footer, or its _empty/ marker (docs/data-schema.md)


def annotate_config(images: Path, out: Path, **overrides) -> AnnotateConfig:
    values = {
        "input": str(images),
        "output": str(out),
        "resolution": 256,
        # A wide blur makes each image cost ~0.1 s: enough work that the job outlives the autoscaler adding nodes.
        "annotators": [{"name": "lineart_standard", "params": {"gaussian_sigma": 40.0}}],
        "min_side": 32,
        "shard_size": 8,
        # The decode node type's resource, as a stage on the AWS cluster asks for it; up to 3 actors (one a node).
        "ray": {"resources": {"decode": 1}},
        "compute": {"max_actors": 3},
        **overrides,
    }
    return AnnotateConfig.model_validate(values)


def shard_summaries(out: Path) -> dict[str, dict]:
    """File name -> the summary its actor wrote (counts, and the node it ran on); shards with no row
    (every input rejected) keep theirs in an _empty/ marker instead of a data file."""
    summaries = {p.name: json.loads(pq.read_schema(p).metadata[FOOTER_KEY]) for p in data_files(out)}
    for marker in sorted((out / "_empty").glob("train-*.json")):
        summaries[marker.name] = json.loads(marker.read_text())[FOOTER_KEY.decode()]
    return summaries


def data_files(out: Path) -> list[Path]:
    return sorted((out / "data").glob("train-*.parquet"))


def written_rows(out: Path) -> tuple[list[str], list[str]]:
    """(sources of the data rows, sources of the reject rows) over every file of the output."""
    data = [s for p in data_files(out) for s in pq.read_table(p, columns=["source"])["source"]]
    rejects = [s for p in sorted((out / "_rejects").glob("train-*.parquet")) for s in pq.read_table(p)["source"]]
    return [s.as_py() for s in data], [s.as_py() for s in rejects]


def ids_of(out: Path) -> list[str]:
    return [i.as_py() for p in data_files(out) for i in pq.read_table(p, columns=["id"])["id"]]


def no_decode_nodes(cluster) -> None:
    """Start from zero: wait until the autoscaler has removed idle decode nodes of an earlier test."""
    wait_for(lambda: not cluster.worker_nodes("cpu_decode"), 180, "idle cpu_decode nodes removed")


def test_annotate_from_zero_workers_scales_out_over_nodes(fake_cluster, tmp_path, monkeypatch):
    from ray.data import DataContext

    no_decode_nodes(fake_cluster)
    n = 256
    images, out = tmp_path / "images", tmp_path / "annotated"
    config = annotate_config(images, out)
    write_image_folder(images, n=n, size=256, seed=0, broken=True)
    # The pool starts working on its first node while the autoscaler adds the others; on a loaded machine
    # that node can finish the job before the next one joins (the spread is then a matter of speed). Here
    # Ray Data starts the job once all the pool's actors are up, so the spread is the autoscaler's doing.
    monkeypatch.setattr(DataContext.get_current(), "wait_for_min_actors_s", 600)

    result = run_annotate(config)

    assert (result.read, result.accepted, result.rejected) == (n + BROKEN, n, BROKEN)
    data, rejects = written_rows(out)
    assert len(data) == n and len(rejects) == BROKEN
    assert len(set(data) | set(rejects)) == n + BROKEN  # every input once, as a row or a reject
    assert len(set(ids_of(out))) == n  # ids unique
    summaries = shard_summaries(out)
    assert len(summaries) == result.shards
    nodes = {s["node"] for s in summaries.values()}
    assert len(nodes) >= 2, f"every shard ran on one node: {nodes}"  # the autoscaler added nodes, the pool used them
    assert {fake_cluster.node_type(node) for node in nodes} == {"cpu_decode"}  # and only the decode type


def test_annotate_survives_losing_a_node_mid_job(fake_cluster, tmp_path):
    # No need to start from zero nodes here: decode nodes the previous test left (until idle) save a scale-up.
    n = 256
    images, out = tmp_path / "images", tmp_path / "annotated"
    config = annotate_config(images, out)
    write_image_folder(images, n=n, size=256, seed=1, broken=True)
    shards = -(-(n + BROKEN) // config.shard_size)
    outcome: dict = {}

    def annotate() -> None:
        try:
            outcome["result"] = run_annotate(config)
        except BaseException as exc:  # re-raised in the test's thread below
            outcome["error"] = exc

    job = threading.Thread(target=annotate, daemon=True)
    job.start()
    # Mid-job: some shards written, not all. Kill a node that has written one (it hosts an annotator actor).
    done = wait_for(lambda: shard_summaries(out) if len(data_files(out)) >= 2 else None, 300, "shards")
    assert len(done) < shards, "the job finished before a node could be lost: give it more work"
    victim = next(iter(done.values()))["node"]
    fake_cluster.kill_node(victim)
    job.join(timeout=600)
    assert not job.is_alive(), "annotation did not finish after the node loss"
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]

    assert (result.read, result.accepted, result.rejected) == (n + BROKEN, n, BROKEN)
    data, rejects = written_rows(out)
    assert sorted(data) == sorted(set(data)) and len(data) == n  # no row lost, none duplicated
    assert len(rejects) == BROKEN and not set(data) & set(rejects)
    assert len(set(ids_of(out))) == n
    summaries = shard_summaries(out)
    assert len(summaries) == shards
    assert {s["node"] for s in summaries.values()} - {victim}, "no shard was written after the node was lost"
    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["read"] == n + BROKEN
