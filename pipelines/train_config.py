"""``TrainConfig``: everything ``zeroconv train`` reads, shared by the driver and the per-worker loop."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field, model_validator

from model.families.base import Policy, TimestepSampling
from pipelines.common.config import BaseModelConfig, JobConfig, MLflowConfig, PathStr, Section

LRSchedule = Literal["constant_with_warmup", "cosine"]
TrainPrecision = Literal["auto", "fp32", "bf16", "fp16"]


class TrainDebug(Section):
    """Debug options (``debug.*``): exercise recovery and check the data order; off by default."""

    fail_at_step: int | None = Field(
        default=None,
        description="The last rank exits abruptly once, before this step (after the latest checkpoint is "
        "committed), like a lost node: exercises recovery.",
    )
    record_samples: str | None = Field(
        default=None,
        description="A local directory (on the workers' nodes): each rank appends the sample ids of every step to "
        "samples_rank<R>.jsonl there.",
    )


class FidelityCurveConfig(Section):
    """Control fidelity during training (``fidelity.*``): every ``every`` steps rank 0 generates from a small
    held-out set, re-annotates and scores it (docs/training.md, "Fidelity curves"); off unless every > 0."""

    every: int = Field(default=0, ge=0, description="Steps between fidelity scores (0: off).")
    data: PathStr | None = Field(
        default=None, description="Held-out annotated dataset (not trained on), local or s3://; needed if every > 0."
    )
    limit: int = Field(default=16, ge=1, description="Score the held-out dataset's first N rows.")
    condition_column: str | None = Field(
        default=None, description="Its condition column. Default: conditioning_image, else cond_<annotator>."
    )
    caption_column: str = Field(default="text", description="Its caption column.")
    annotator: str | None = Field(
        default=None,
        description="Annotator that re-annotates the generated images. Default: the one the held-out "
        "dataset's condition column records (zeroconv annotate records it).",
    )
    mask_iou: bool = Field(default=False, description="Fill50K-style data: also score the filled circle's mask IoU.")
    seed: int = Field(default=0, description="Row i is generated with seed + i, at every scoring alike.")
    steps: int = Field(default=20, ge=1, description="DDIM steps per image.")
    guidance_scale: float = Field(default=9.0, ge=0, description="CFG scale.")

    @model_validator(mode="after")
    def _has_data(self) -> "FidelityCurveConfig":
        if self.every and not self.data:
            raise ValueError("fidelity.every > 0 needs fidelity.data: a held-out annotated dataset to score")
        return self


class TrainConfig(JobConfig):
    """Train a ControlNet (and, by policy, parts of the UNet) on an annotated Parquet dataset; or, with
    policy=pretrain, the base's UNet alone (how ``zeroconv pretrain-base`` makes the shapes base)."""

    data: PathStr = Field(
        default="runs/annotated",
        description="Annotated Parquet (a directory or file, local or s3://), or a Hugging Face dataset: "
        "Parquet, or a local save_to_disk folder (docs/huggingface.md).",
    )
    condition_column: str = Field(
        default="conditioning_image",
        validation_alias=AliasChoices("condition_column", "conditioning_image_column"),
        description="Column holding the condition images: 'conditioning_image' for one annotator, "
        "'cond_<annotator>' for several. Also accepted as conditioning_image_column (diffusers' name).",
    )
    union: bool = Field(
        default=False,
        description="ControlNet-Union (SDXL bases): one ControlNet trained on several condition columns, each "
        "sample on one of them (a seeded pick) with its type, from the column's annotator (docs/families/sdxl.md).",
    )
    condition_columns: list[str] = Field(
        default_factory=list,
        description="union=true: the condition columns to train on (e.g. [cond_canny, cond_midas]). "
        "Default: every cond_<annotator> column of the dataset.",
    )
    image_column: str = Field(
        default="image", description="Column holding the images: binary, or Hugging Face Image structs."
    )
    caption_column: str = Field(default="text", description="Column holding the captions (strings).")
    base_model: BaseModelConfig = BaseModelConfig()
    run_name: str = Field(
        default="controlnet",
        description="Run name: checkpoints live under storage_path/run_name; re-run the same name to resume.",
    )
    storage_path: PathStr | None = Field(
        default=None, description="Checkpoints and exports, local or s3://. Default: <work_dir>/train."
    )
    registered_model: str | None = Field(
        default="zeroconv-controlnet",
        description="MLflow registered model name (alias 'candidate'); empty: log without registering.",
    )
    # Scale
    num_workers: int = Field(
        default=1, ge=1, description="Ray Train workers (data-parallel ranks); with min_workers, the most."
    )
    min_workers: int | None = Field(
        default=None,
        ge=1,
        description="Elastic training: start as soon as this many workers fit, grow to num_workers as nodes join "
        "(and shrink on node loss) by restarting from the latest checkpoint. None: exactly num_workers.",
    )
    cpus_per_worker: float = Field(
        default=1.0, gt=0, description="CPUs reserved per worker (fractions allowed); leave some for Ray Data."
    )
    use_gpu: bool | None = Field(
        default=None,
        description="One GPU per worker. Default: yes if a node of the Ray cluster has a GPU now; on an "
        "autoscaling cluster that starts without GPU nodes set it to true (the workers then wait for them).",
    )
    zero_stage: Literal[0, 1, 2, 3] = Field(
        default=2, description="DeepSpeed ZeRO stage (2: shard optimizer state and grads; 3: also params)."
    )
    precision: TrainPrecision = Field(
        default="auto", description="auto (bf16 on GPU, fp32 on CPU), fp32, bf16, fp16 (GPU only)."
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations in backward: less memory, ~30% slower."
    )
    # Optimisation
    max_steps: int = Field(default=1000, ge=1, description="Optimizer steps to train for (in total, across resumes).")
    batch_size: int = Field(default=4, ge=1, description="Micro-batch per worker.")
    grad_accum: int = Field(
        default=1,
        ge=1,
        description="Micro-batches per optimizer step (effective batch = batch_size * grad_accum * workers).",
    )
    lr: float = Field(default=1e-5, gt=0, description="ControlNet learning rate (paper: 1e-5).")
    unet_lr: float = Field(
        default=2e-6, gt=0, description="Learning rate of UNet weights a policy unlocks (paper: 2e-6)."
    )
    weight_decay: float = Field(default=1e-2, ge=0, description="AdamW weight decay.")
    lr_schedule: LRSchedule = Field(default="constant_with_warmup", description="Learning-rate schedule after warmup.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup steps.")
    max_grad_norm: float = Field(default=1.0, ge=0, description="Gradient clipping norm (0: off).")
    policy: Policy = Field(
        default="locked",
        description="What trains: locked (ControlNet only), unlock_decoder, unlock_full; pretrain: no ControlNet, "
        "every UNet weight at lr (text-to-image pretraining; nothing is registered).",
    )
    prompt_dropout: float = Field(
        default=0.5, ge=0, le=1, description="Probability of replacing a prompt by the empty prompt (paper: 0.5)."
    )
    snr_gamma: float = Field(
        default=0.0, ge=0, description="Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is usual); 0: plain MSE."
    )
    offset_noise: float = Field(
        default=0.0, ge=0, description="Offset noise: per-channel constant noise of this std (e.g. 0.1); 0: off."
    )
    timestep_sampling: TimestepSampling = Field(
        default="uniform",
        description="Where training timesteps fall: uniform (diffusers' train_controlnet.py), or cubic, "
        "t = (1 - u^3) T, mostly high noise where layout is decided (T2I-Adapter); DDPM families (sd, sdxl) only.",
    )
    ema: bool = Field(
        default=False, description="Keep an EMA of the trained weights and export it instead of the raw weights."
    )
    ema_decay: float = Field(
        default=0.9999, gt=0, lt=1, description="EMA decay (warmed up as min(decay, (1+n)/(10+n)))."
    )
    seed: int = Field(default=0, description="Random seed (noise, timesteps, prompt dropout, data order).")
    shuffle_buffer: int = Field(
        default=1024,
        ge=1,
        description="Rows shuffled together after the per-epoch shuffle of the files (memory: this many encoded rows "
        "per worker).",
    )
    allow_incomplete_data: bool = Field(
        default=False,
        description="Train on an annotated dataset whose annotate run did not finish (its manifest status is not "
        "complete).",
    )
    # Checkpoints, logging, validation
    checkpoint_every: int = Field(
        default=500, ge=1, description="Steps between checkpoints (a final one is always written)."
    )
    keep_checkpoints: int = Field(default=2, ge=1, description="Checkpoints to keep (oldest deleted first).")
    max_failures: int = Field(
        default=3, ge=0, description="Worker-group restarts from the latest checkpoint before giving up."
    )
    log_every: int = Field(default=10, ge=1, description="Steps between metric logs (loss, lr, grad norm, samples/s).")
    validate_every: int = Field(
        default=500, ge=0, description="Steps between validation image grids (0: only at the end)."
    )
    num_validation: int = Field(
        default=4, ge=0, description="Validation images per grid: the dataset's first rows (0: no grids)."
    )
    validation_steps: int = Field(default=20, ge=1, description="DDIM steps for validation images.")
    fidelity: FidelityCurveConfig = FidelityCurveConfig()
    mlflow: MLflowConfig = MLflowConfig()
    debug: TrainDebug = TrainDebug()

    def effective_batch(self, workers: int | None = None) -> int:
        """Samples per optimizer step with ``workers`` ranks (default num_workers; elastic runs vary)."""
        return self.batch_size * self.grad_accum * (workers or self.num_workers)

    @model_validator(mode="after")
    def _min_workers_at_most_num_workers(self) -> "TrainConfig":
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"min_workers={self.min_workers} is more than num_workers={self.num_workers}")
        return self

    @model_validator(mode="after")
    def _union_options(self) -> "TrainConfig":
        if self.condition_columns and not self.union:
            raise ValueError("condition_columns applies to union=true (one ControlNet, several columns)")
        if self.union and self.policy == "pretrain":
            raise ValueError("union=true trains a ControlNet; policy=pretrain trains none")
        if self.union and self.fidelity.every:
            raise ValueError("fidelity.every is not supported with union=true yet (set 0; evaluate scores each type)")
        return self

    @model_validator(mode="after")
    def _fidelity_needs_a_controlnet(self) -> "TrainConfig":
        if self.fidelity.every and self.policy == "pretrain":
            raise ValueError("fidelity.every scores a ControlNet's control; policy=pretrain trains none (set 0)")
        return self
