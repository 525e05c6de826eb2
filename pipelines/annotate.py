"""The annotate stage: images -> condition maps in Parquet, on Ray Data.

    zeroconv annotate input=./photos output=s3://bucket/annotated 'annotators=[{name: canny}]'

How the work is cut, and why:

* The driver lists the input once and cuts it into deterministic shards (``pipelines.data.sources``).
  Shard ``k`` always holds the same inputs and always becomes ``data/train-<k>-of-<n>.parquet``. The
  plan streams into a file on the driver's disk (``pipelines.data.plan``): the driver keeps each
  shard's fingerprint, not its inputs, so its memory stays flat in the number of inputs.
* The pending shards stream from that file through an autoscaling pool of annotator actors
  (``pipelines.common.cluster.run_actor_pool``; the actor: :mod:`pipelines.annotate_worker`). Each
  actor does all the work of one shard in one place - read, decode, resize/crop, annotate, encode -
  so full-size pixel arrays never travel through the object store; only a one-line summary comes back.
* An actor writes its shard through ``pipelines.data.shards.ShardedOutput``: atomically, rejects
  first, data last, counts in the footer. A re-run skips finished shards, so an interrupted job
  resumes where it stopped and no row is ever written twice.
* An input that cannot be used is a reject row; an annotator that raises is retried on the same
  batch, then fails the shard (and the job) loudly - a flaky model never turns good images into rejects.

Memory is bounded by (actors x one shard of encoded output), whatever the size of the input.
Output layout and columns: docs/data-schema.md.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from pipelines.annotate_worker import AnnotateShards, ShardJob
from pipelines.common.cluster import ActorCompute
from pipelines.common.config import ConfigError, JobConfig, PathStr, Section
from pipelines.common.storage import Location, is_s3, resolve
from pipelines.data.plan import SpilledPlan
from pipelines.data.schema import (
    ANNOTATE_FOOTER_KEY,
    ANNOTATED_FORMAT,
    MANIFEST,
    REJECTS_DIR,
    condition_columns,
    dumps,
)
from pipelines.data.shards import Manifest, ShardedOutput, check_output_outside, plan_identity, run_resumable
from pipelines.data.sources import InputFormat, Source

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


class AnnotatorEntry(Section):
    name: str = Field(default="canny", description="Registered annotator name (see annotators.available()).")
    params: dict[str, Any] = Field(default_factory=dict, description="Keyword parameters for the annotator.")


class ComputeConfig(ActorCompute):
    batch_size: int = Field(default=16, ge=1, description="Images per annotator call.")
    threads_per_actor: int | None = Field(
        default=None,
        ge=1,
        description="Decode/encode threads inside each actor. Default: the CPUs it reserves (cpus_per_actor, "
        "rounded; at least 1): give GPU actors several CPUs so decoding keeps the GPU fed.",
    )

    def threads(self) -> int:
        return self.threads_per_actor or max(1, round(self.cpus_per_actor))


class AnnotateConfig(JobConfig):
    """
    Annotate images into ControlNet training data: one condition map per annotator, plus the
    resized image and its caption, as Parquet shards (docs/data-schema.md). Re-running the same
    command on the same output resumes where it stopped.

    Example: zeroconv annotate input=./photos 'annotators=[{name: canny, params: {low_threshold: 50}}]'
    """

    input: PathStr = Field(
        default="", description="Images: a folder, s3:// prefix, .parquet file(s) or WebDataset .tar(s)."
    )
    input_format: InputFormat = Field(default="auto", description="How to read the input; auto looks at the files.")
    image_column: str = Field(default="image", description="Parquet input: the column with image bytes.")
    caption_column: str | None = Field(
        default="text",
        description="Parquet input: the caption column (null: empty captions). Image folders use "
        "a sidecar .txt per image; WebDataset the .txt member.",
    )
    output: PathStr | None = Field(
        default=None, description="Local or s3:// folder for the Parquet shards. Default: <work_dir>/annotated."
    )
    annotators: list[AnnotatorEntry] = Field(
        default_factory=lambda: [AnnotatorEntry()],
        description="Annotators, each {name, params}. One annotator writes column conditioning_image; several "
        "write cond_<name> each.",
    )
    resolution: int = Field(
        default=512, ge=8, description="Training resolution: short side resized to it, centre-cropped square."
    )
    min_side: int = Field(default=256, ge=1, description="Reject inputs whose short side is below this many pixels.")
    shard_size: int = Field(default=500, ge=1, description="Inputs per output shard (the unit of work and of resume).")
    jpeg_quality: int = Field(default=95, ge=1, le=100, description="JPEG quality of the stored images.")
    compute: ComputeConfig = ComputeConfig()

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value: int) -> int:
        if value % 8:
            raise ValueError(f"must be a multiple of 8 (the VAE downsamples by 8), got {value}")
        return value

    @field_validator("annotators")
    @classmethod
    def _distinct_annotators(cls, value: list[AnnotatorEntry]) -> list[AnnotatorEntry]:
        if not value:
            raise ValueError("give at least one annotator")
        names = [a.name for a in value]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"annotator {', '.join(repeated)} appears more than once; each writes its own column")
        return value

    def output_uri(self) -> str:
        return self.output or f"{self.work_dir.rstrip('/')}/annotated"


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------


@dataclass
class AnnotateResult:
    output: str
    rejects: str
    manifest: str
    columns: dict[str, dict]
    read: int
    accepted: int
    rejected: int
    reasons: dict[str, int]
    shards: int
    shards_written: int  # by this run
    shards_skipped: int  # finished by an earlier run
    processed: int  # inputs read by this run
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def __str__(self) -> str:
        reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.reasons.items()))
        lines = [
            f"annotated {self.read} inputs -> {self.output}",
            f"  accepted {self.accepted}, rejected {self.rejected}" + (f" ({reasons})" if reasons else ""),
            f"  this run: {self.processed} inputs in {self.shards_written} shards, {self.seconds:.1f} s, "
            f"{self.images_per_second:.1f} images/s; {self.shards_skipped} of {self.shards} shards were already done",
        ]
        for column, spec in self.columns.items():
            lines.append(f"  {column}: {spec['name']} v{spec['version']} {dumps(spec['params'])}")
        lines.append(f"  rejects: {self.rejects}")
        lines.append(f"  manifest: {self.manifest}")
        return "\n".join(lines)


def run_annotate(config: AnnotateConfig) -> AnnotateResult:
    from annotators import create

    started = time.perf_counter()
    source = Source(config.input, config.storage, config.input_format, config.image_column, config.caption_column)
    output = resolve(config.output_uri(), config.storage)
    check_output_outside(output, source.uri)

    # Built here once to validate names/params and to record exactly what makes each column.
    built = [create(a.name, **a.params) for a in config.annotators]
    for annotator in built:
        multiple = getattr(annotator, "size_multiple", 1)
        if config.resolution % multiple:
            raise ConfigError(
                f"annotator {annotator.name!r} needs sides that are multiples of {multiple}; "
                f"resolution={config.resolution} is not"
            )
    specs = [a.spec() for a in built]
    del built  # the actors build their own
    columns = dict(zip(condition_columns([a.name for a in config.annotators]), specs))
    with tempfile.TemporaryDirectory(prefix="zeroconv-plan-") as spill:
        plan = SpilledPlan.write(source.plan(config.shard_size), spill)  # the driver keeps fingerprints only
        return _annotate(config, source, output, columns, plan, started)


def _annotate(
    config: AnnotateConfig, source: Source, output: Location, columns: dict, plan: SpilledPlan, started: float
) -> AnnotateResult:
    sharded = ShardedOutput(output, len(plan), ANNOTATE_FOOTER_KEY)
    manifest = Manifest(
        output.join(MANIFEST),
        ANNOTATED_FORMAT,
        "annotation",
        _job_identity(config, source, plan, columns),
        _describe(output),
    )

    def annotate(pending: list[int], done) -> None:
        from pipelines.common.cluster import run_actor_pool, storage_runtime_env

        job = ShardJob(
            source=source,
            output=output.uri,
            shards=len(plan),
            storage=config.storage,
            annotators=tuple((a.name, a.params) for a in config.annotators),
            columns=columns,
            resolution=config.resolution,
            min_side=config.min_side,
            jpeg_quality=config.jpeg_quality,
            batch_size=config.compute.batch_size,
            threads=config.compute.threads(),
        )
        batches = run_actor_pool(
            AnnotateShards,
            plan.items(pending),  # read from the plan file where needed, not held by the driver
            compute=config.compute,
            ray_config=config.ray,
            constructor_kwargs={"job": job},
            single_threaded=True,  # annotation is one image at a time: actors scale out on CPUs too
            runtime_env=storage_runtime_env() if is_s3(source.uri) or is_s3(output.uri) else None,
            progress=lambda batch: sum(json.loads(s)["read"] for s in batch["summary"]),
            total=plan.inputs(pending),
            desc="annotate",
            unit="image",
        )
        for batch in batches:  # streams: one small summary per finished shard
            for summary in batch["summary"]:
                done(json.loads(summary))

    summaries, finished = run_resumable(
        sharded, manifest, plan.fingerprints, annotate, lambda index: plan.shard(index).inputs()
    )
    totals = _totals(summaries.values())
    return AnnotateResult(
        output=output.uri,
        rejects=output.join(REJECTS_DIR).uri,
        manifest=manifest.location.uri,
        columns=columns,
        read=totals["read"],
        accepted=totals["accepted"],
        rejected=totals["rejected"],
        reasons=totals["reasons"],
        shards=len(plan),
        shards_written=len(plan) - len(finished),
        shards_skipped=len(finished),
        processed=sum(s["read"] for i, s in summaries.items() if i not in finished),
        seconds=time.perf_counter() - started,
    )


def _job_identity(config: AnnotateConfig, source: Source, plan: SpilledPlan, columns: dict[str, dict]) -> dict:
    """What decides the output's content; a re-run must match it to resume on the same output."""
    identity = {"input": source.uri, "input_format": plan.kind}
    if plan.kind == "parquet":
        identity.update(image_column=config.image_column, caption_column=config.caption_column)
    identity.update(
        resolution=config.resolution,
        min_side=config.min_side,
        shard_size=config.shard_size,
        jpeg_quality=config.jpeg_quality,
        columns=columns,
        plan=plan_identity([plan.fingerprints[i] for i in range(len(plan))]),
    )
    return json.loads(dumps(identity))


def _describe(output: Location):
    """The manifest's annotate fields: where the rejects are, and the counts so far."""

    def describe(summaries: dict[int, dict]) -> dict:
        totals = _totals(summaries.values())
        return {
            "rejects": output.join(REJECTS_DIR).uri,
            "counts": {k: totals[k] for k in ("read", "accepted", "rejected")},
            "reject_reasons": totals["reasons"],
        }

    return describe


def _totals(summaries: Iterable[dict]) -> dict:
    totals = {"read": 0, "accepted": 0, "rejected": 0, "reasons": Counter()}
    for s in summaries:
        for key in ("read", "accepted", "rejected"):
            totals[key] += s[key]
        totals["reasons"].update(s["reasons"])
    totals["reasons"] = dict(sorted(totals["reasons"].items()))
    if totals["read"] != totals["accepted"] + totals["rejected"]:  # by construction; a loud check all the same
        raise AssertionError(
            f"lost inputs: read {totals['read']} != accepted {totals['accepted']} + rejected {totals['rejected']}"
        )
    return totals
