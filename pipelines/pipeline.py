"""``zeroconv pipeline run CONFIG``: the recurring pipeline, every stage in order, every stage idempotent.

    annotate    each batch of the input not annotated yet -> <annotate.output>/<batch>/data/train-*.parquet
    precompute  (precompute.enabled) each batch's VAE latents and caption embeddings, once
                                                          -> <precompute.output>/<batch>/data/train-*.parquet
    train       continue training on everything annotated (or precomputed)
                                                          -> checkpoints; a new model version, alias candidate
    evaluate    that version on the held-out set          -> fidelity metrics and version tags (MLflow)
    promote     candidate -> champion if it scores better -> the alias Serve follows moves

New images arrive as batches: one sub-folder (or one .parquet / .tar file) per delivery under
``annotate.input``. Annotate fixes a batch's shard plan when it first sees it, so a grown input is
new batches, and a scheduled run annotates only those (each batch's finished shards are skipped).

Train, evaluate and promote follow the annotated data: a new set of batches is a new *generation*. Precompute,
like annotate, runs on every batch and skips the shards it has written, so only a new batch is encoded.
The ledger ``<work_dir>/pipeline/state.json`` records what each finished step of the current
generation produced, so a re-run skips finished steps and resumes the one that stopped (training
from its last checkpoint: same ``train.run_name`` and ``storage_path``). A generation trains
``train.max_steps`` more steps on top of the previous ones, continuing the same run.

Only sequencing lives here; each step is the stage's own ``run_<stage>`` function.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from pydantic import Field, model_validator

from pipelines.annotate import AnnotateConfig, run_annotate
from pipelines.common.config import JobConfig, MLflowConfig, Section
from pipelines.common.storage import Location, resolve
from pipelines.common.tracking import resolve_tracking_uri
from pipelines.evaluate import EvaluateConfig, run_evaluate
from pipelines.precompute import PrecomputeConfig, run_precompute
from pipelines.promote import PromoteConfig, run_promote
from pipelines.train import TrainConfig, run_train

SHARED = ("work_dir", "storage", "ray", "mlflow")  # set once at the top, inherited by every stage
BATCH_FILE_EXTENSIONS = (".parquet", ".tar")
LEDGER = "pipeline/state.json"


class PipelinePrecompute(PrecomputeConfig):
    """The precompute stage inside the pipeline: off unless ``enabled``; it reads each annotated batch and
    encodes it with the train stage's base model (its own ``data`` and ``base_model`` are not used)."""

    enabled: bool = Field(
        default=False,
        description="Encode each annotated batch once (VAE latents + caption embeddings) and train on that: "
        "the same objective, without the VAE and text encoder in every step.",
    )


class PipelineConfig(JobConfig):
    """The whole pipeline in one file: a section per stage (each a stage config; see 'zeroconv STAGE --help').
    work_dir, storage, ray and mlflow are set once here and inherited by every stage that does not set its own.

    Example: zeroconv pipeline run configs/pipeline.yaml annotate.input=s3://bucket/incoming"""

    mlflow: MLflowConfig = MLflowConfig()
    annotate: AnnotateConfig = Field(
        default_factory=AnnotateConfig, description="annotate stage; input holds one sub-folder per batch"
    )
    precompute: PipelinePrecompute = Field(
        default_factory=PipelinePrecompute, description="precompute stage (precompute.enabled=true to run it)"
    )
    train: TrainConfig = Field(
        default_factory=TrainConfig, description="train stage; max_steps: steps added per new generation"
    )
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig, description="evaluate stage; data: the held-out set"
    )
    promote: PromoteConfig = Field(default_factory=PromoteConfig, description="promote stage")

    @model_validator(mode="after")
    def _registers_its_models(self) -> "PipelineConfig":
        if not self.train.registered_model:
            raise ValueError(
                "train.registered_model is empty: the pipeline evaluates and promotes registered versions"
            )
        return self


def inherit(section: Section, shared: Section, names: tuple[str, ...]) -> Section:
    """``section`` with each of ``names`` it did not set itself taken from ``shared`` (sub-sections field by field)."""
    updates = {}
    for name in names:
        if name not in type(section).model_fields:
            continue
        mine, theirs = getattr(section, name), getattr(shared, name)
        if isinstance(mine, Section) and isinstance(theirs, Section):
            updates[name] = inherit(mine, theirs, tuple(type(theirs).model_fields))
        elif name not in section.model_fields_set:
            updates[name] = theirs
    return section.model_copy(update=updates)


def resolved_stages(config: PipelineConfig) -> PipelineConfig:
    """The config with the shared settings pushed into every stage, and the stages wired to each other."""
    stages = {
        name: inherit(getattr(config, name), config, SHARED)
        for name in ("annotate", "precompute", "train", "evaluate", "promote")
    }
    # Training refuses data precomputed with another base: precompute with the one train loads.
    stages["precompute"] = stages["precompute"].model_copy(update={"base_model": stages["train"].base_model})
    model = stages["train"].registered_model
    stages["evaluate"] = stages["evaluate"].model_copy(update={"model": model})
    stages["promote"] = stages["promote"].model_copy(update={"model": model})
    return config.model_copy(update=stages)


# ---------------------------------------------------------------------------------------------
# Input batches and the ledger
# ---------------------------------------------------------------------------------------------


def input_batches(config: AnnotateConfig) -> list[Location]:
    """The batches under ``annotate.input``, sorted by name: sub-folders, .parquet or .tar files."""
    import pyarrow.fs as pafs

    if not config.input:
        raise ValueError("annotate.input is empty: set it to the folder or s3:// prefix new image batches arrive in")
    root = resolve(config.input, config.storage)
    if not root.is_dir():
        raise FileNotFoundError(f"annotate.input {config.input!r} is not a folder or s3:// prefix")
    entries = root.fs.get_file_info(pafs.FileSelector(root.path, recursive=False))
    batches, loose = [], []
    for info in sorted(entries, key=lambda i: i.base_name):
        if info.base_name.startswith((".", "_")):
            continue
        if info.type == pafs.FileType.Directory or info.base_name.lower().endswith(BATCH_FILE_EXTENSIONS):
            batches.append(root.join(info.base_name))
        else:
            loose.append(info.base_name)
    if loose:
        raise ValueError(
            f"annotate.input {root.uri} holds files at its top level ({', '.join(loose[:3])}...); the "
            "pipeline annotates one sub-folder per batch, e.g. incoming/2026-11-21/, so put new images "
            "in a new sub-folder"
        )
    if not batches:
        raise FileNotFoundError(f"annotate.input {root.uri} holds no batches (sub-folders, .parquet or .tar files)")
    return batches


def batch_name(batch: Location) -> str:
    name = batch.uri.rsplit("/", 1)[-1]
    for extension in BATCH_FILE_EXTENSIONS:
        if name.lower().endswith(extension):
            return name[: -len(extension)]
    return name


@dataclass
class Ledger:
    """What the finished steps of the current generation produced; read and written atomically."""

    location: Location
    state: dict

    @classmethod
    def load(cls, location: Location) -> "Ledger":
        return cls(location, json.loads(location.read_bytes()) if location.exists() else {})

    def start(self, generation: str) -> None:
        """Keep the finished steps if ``generation`` is the ledger's own, else forget them."""
        if self.state.get("generation") != generation:
            self.state = {"generation": generation, "trained_steps": self.state.get("trained_steps", 0)}
            self.save()

    def save(self) -> None:
        self.location.write_bytes_atomic(json.dumps(self.state, indent=2).encode())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass
class PipelineResult:
    generation: str
    batches: dict[str, int]  # batch -> inputs annotated by this run (0: done before)
    steps: dict[str, str] = field(default_factory=dict)  # step -> one-line outcome
    ran: list[str] = field(default_factory=list)  # the steps this run executed (the rest were done before)
    seconds: float = 0.0

    @property
    def annotated(self) -> int:
        return sum(self.batches.values())

    def __str__(self) -> str:
        new = [name for name, n in self.batches.items() if n]
        lines = [
            f"pipeline generation {self.generation} ({len(self.batches)} batches; annotated this run: "
            f"{', '.join(new) or 'none'}, {self.annotated} inputs) in {self.seconds:.0f} s"
        ]
        for step, outcome in self.steps.items():
            lines.append(f"  {step:<10} {'' if step in self.ran else '(done before) '}{outcome}")
        return "\n".join(lines)


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    started = time.perf_counter()
    config = resolved_stages(config)
    for stage in (config.train, config.evaluate, config.promote):  # an S3 work_dir with no tracking server fails
        resolve_tracking_uri(stage.mlflow.tracking_uri, stage.work_dir)  # here, not after annotating everything
    annotated_root = config.annotate.output_uri()

    # 1. Annotate: every batch; annotate itself skips the shards that are written.
    batches: dict[str, int] = {}
    totals = {}
    for batch in input_batches(config.annotate):
        name = batch_name(batch)
        print(f"[pipeline] annotate {batch.uri}", flush=True)
        annotated = run_annotate(
            config.annotate.model_copy(update={"input": batch.uri, "output": f"{annotated_root.rstrip('/')}/{name}"})
        )
        batches[name] = annotated.processed
        totals[name] = [annotated.read, annotated.accepted]
    generation = hashlib.sha256(json.dumps(totals, sort_keys=True).encode()).hexdigest()[:12]

    ledger = Ledger.load(resolve(f"{config.work_dir.rstrip('/')}/{LEDGER}", config.storage))
    ledger.start(generation)
    state = ledger.state
    result = PipelineResult(
        generation,
        batches,
        steps={
            "annotate": f"{sum(a for _, a in totals.values())} images in {len(totals)} batches -> {annotated_root}"
        },
        ran=["annotate"],
    )

    # 2. Precompute (precompute.enabled): every batch; finished shards are skipped, so only new batches cost.
    train_data = annotated_root
    if config.precompute.enabled:
        train_data, encoded = config.precompute.output_uri(), 0
        for name in batches:
            print(f"[pipeline] precompute {name}", flush=True)
            batch = {"data": f"{annotated_root.rstrip('/')}/{name}", "output": f"{train_data.rstrip('/')}/{name}"}
            encoded += run_precompute(config.precompute.model_copy(update=batch)).rows_written
        result.steps["precompute"] = f"{encoded} rows encoded in {len(batches)} batches -> {train_data}"
        result.ran.append("precompute")

    # 3. Train: continue the run up to this generation's target (fixed before it starts, so a re-run resumes).
    if "train" not in state:
        state.setdefault("train_target", state["trained_steps"] + config.train.max_steps)
        ledger.save()
        print(f"[pipeline] train {config.train.run_name} to step {state['train_target']} on {train_data}", flush=True)
        trained = run_train(config.train.model_copy(update={"data": train_data, "max_steps": state["train_target"]}))
        state["train"] = {"version": trained.model_version, "steps": trained.steps, "run_id": trained.mlflow_run_id}
        state["trained_steps"] = trained.steps
        ledger.save()
        result.ran.append("train")
    version = state["train"]["version"]
    result.steps["train"] = (
        f"{config.train.registered_model} v{version} (candidate) after "
        f"{state['train']['steps']} steps of run {config.train.run_name!r}"
    )

    # 4. Evaluate that version on the held-out set.
    if "evaluate" not in state:
        print(f"[pipeline] evaluate {config.evaluate.model} v{version} on {config.evaluate.data}", flush=True)
        evaluated = run_evaluate(config.evaluate.model_copy(update={"version": version}))
        state["evaluate"] = {
            "metric": evaluated.metric,
            "score": evaluated.score,
            "baseline": evaluated.baseline_score,
        }
        ledger.save()
        result.ran.append("evaluate")
    e = state["evaluate"]
    result.steps["evaluate"] = f"{e['metric']} {e['score']:.4f}" + (
        "" if e["baseline"] is None else f" (no control: {e['baseline']:.4f})"
    )

    # 5. Promote: the candidate alias (set by train) to champion if it beats the champion.
    if "promote" not in state:
        print(f"[pipeline] promote {config.promote.model} candidate", flush=True)
        promoted = run_promote(config.promote)
        state["promote"] = {"decision": promoted.decision, "summary": str(promoted).splitlines()[0]}
        ledger.save()
        result.ran.append("promote")
    result.steps["promote"] = state["promote"]["summary"]
    result.seconds = time.perf_counter() - started
    return result
