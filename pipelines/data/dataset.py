"""What a training (or evaluation) dataset is, and the checks made on it before any worker starts.

Accepted on disk:

* Parquet: a file, folder or ``s3://`` prefix - ``zeroconv annotate`` / ``precompute`` output, or any
  dataset in the Hugging Face ControlNet convention (``image``, ``conditioning_image``, ``text``);
* a ``datasets`` ``save_to_disk`` folder (Arrow stream files beside ``state.json``), local; of a
  ``DatasetDict`` folder, its ``train`` split.

Column names are configurable as in diffusers' ``train_controlnet.py`` (image, conditioning image,
caption). An image column holds encoded bytes: ``binary``, or a Hugging Face ``Image`` struct
``{bytes, path}`` (``pipelines.data.schema.bytes_from_image_column`` turns such a struct into bytes).
Rows passed through :func:`canonical` come out with the names ``image`` and ``text`` and binary image
columns, so everything downstream sees one shape. Wrong types fail here, once, with a one-line error:
a worker that met them would fail the same way on every retry.
"""

from __future__ import annotations

import json
import posixpath
from dataclasses import dataclass
from typing import Literal, Protocol

import pyarrow as pa

from pipelines.common.config import StorageConfig
from pipelines.common.storage import Location, is_s3, resolve
from pipelines.data.schema import (
    IMAGE,
    MANIFEST,
    PRECOMPUTED_FORMAT,
    TENSOR_COLUMNS,
    TEXT,
    bytes_from_image_column,
    is_image_type,
)
from pipelines.data.schema import annotator_spec as field_annotator_spec

ARROW_STATE = "state.json"  # written by datasets' save_to_disk beside its Arrow files
ARROW_SPLITS = "dataset_dict.json"  # a DatasetDict's save_to_disk folder
ARROW_SPLIT = "train"


class TrainingData(Protocol):
    """The fields of TrainConfig that say what to read and what one step needs."""

    data: str
    storage: StorageConfig
    image_column: str
    caption_column: str
    condition_column: str
    condition_columns: list[str]  # several (union training): all are checked; condition_column is the first
    batch_size: int
    num_workers: int
    num_validation: int

    @property
    def base_model(self): ...


@dataclass
class DatasetInfo:
    location: Location
    rows: int
    columns: list[str]
    resolution: tuple[int, int]
    annotator: dict | None
    validation: dict  # {"text": [...], "condition": [PNG bytes, ...]}
    scaling_factor: float | None  # set for a precomputed dataset (latent posteriors + text embeddings)
    files: list[str]  # data files (pyarrow's rules: "_" and "." paths, e.g. annotate's _rejects, are not data)
    format: Literal["parquet", "arrow"] = "parquet"
    image_column: str = IMAGE  # the names in the files; canonical renames them to image / text
    caption_column: str = TEXT


# ---------------------------------------------------------------------------------------------
# One shape: canonical names, binary image columns
# ---------------------------------------------------------------------------------------------


def canonical(table: pa.Table, image_column: str, caption_column: str) -> pa.Table:
    """Rename the image and caption columns to ``image`` / ``text`` and make every image column
    (the image and any binary-or-struct condition) plain binary."""
    names = {image_column: IMAGE, caption_column: TEXT}
    columns = [bytes_from_image_column(c) if is_image_type(c.type) else c for c in table.columns]
    # Field metadata stays: the annotator spec on a condition field is how a model records its annotator.
    fields = [
        pa.field(names.get(f.name, f.name), c.type, f.nullable, f.metadata) for f, c in zip(table.schema, columns)
    ]
    return pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=table.schema.metadata))


# ---------------------------------------------------------------------------------------------
# Opening
# ---------------------------------------------------------------------------------------------


def open_dataset(uri: str, storage: StorageConfig | None = None, what: str = "dataset"):
    """(location, format, pyarrow dataset, data files) for Parquet or a ``save_to_disk`` folder."""
    import pyarrow.dataset as pads

    loc = resolve(uri, storage)
    if not loc.exists():
        raise FileNotFoundError(
            f"{what} {uri!r} does not exist (expected annotated Parquet from 'zeroconv annotate', "
            "or a Hugging Face dataset: Parquet or a save_to_disk folder)"
        )
    if not is_s3(loc.uri) and loc.is_dir() and loc.join(ARROW_SPLITS).exists():
        loc = loc.join(ARROW_SPLIT)  # a DatasetDict: train on its train split
        if not loc.exists():
            raise FileNotFoundError(f"{what} {uri!r} is a DatasetDict without a {ARROW_SPLIT!r} split")
    if not is_s3(loc.uri) and loc.is_dir() and loc.join(ARROW_STATE).exists():
        state = json.loads(loc.join(ARROW_STATE).read_bytes())
        files = [posixpath.join(loc.path, f["filename"]) for f in state["_data_files"]]
        # datasets writes Arrow *stream* files; memory-mapped, reading them copies nothing.
        tables = [pa.ipc.open_stream(pa.memory_map(f)).read_all() for f in files]
        return loc, "arrow", pads.dataset(tables), files
    try:
        dataset = pads.dataset(loc.path, filesystem=loc.fs, format="parquet", exclude_invalid_files=False)
    except Exception as exc:  # pyarrow raises several types for "not parquet"
        raise ValueError(f"{what} {uri!r} is not readable Parquet: {exc}") from None
    return loc, "parquet", dataset, list(dataset.files)


def dataset_manifests(data: str, storage: StorageConfig | None = None) -> dict[str, dict]:
    """folder -> manifest (``_manifest.json``, written by annotate and precompute) of a dataset folder,
    or, for a folder without one whose sub-folders are datasets (the pipeline's ``<root>/<batch>/``), of
    each sub-folder ({} for a sub-folder without one). Nothing for a file or a folder of loose files."""
    import pyarrow.fs as pafs

    def manifest_of(folder: Location) -> dict | None:
        file = folder.join(MANIFEST)
        return json.loads(file.read_bytes()) if file.exists() else None

    location = resolve(data, storage)
    own = manifest_of(location)
    if own is not None:
        return {location.uri: own}
    if not location.is_dir():
        return {}
    entries = location.fs.get_file_info(pafs.FileSelector(location.path, recursive=False))
    folders = [
        location.join(info.base_name)
        for info in sorted(entries, key=lambda i: i.base_name)
        if info.type == pafs.FileType.Directory and not info.base_name.startswith(("_", "."))
    ]
    return {folder.uri: manifest_of(folder) or {} for folder in folders}


# ---------------------------------------------------------------------------------------------
# Checks before training
# ---------------------------------------------------------------------------------------------


def inspect_dataset(config: TrainingData) -> DatasetInfo:
    """Open the metadata (not the images) and check what training needs: columns, their types, rows,
    one image size."""
    loc, form, dataset, files = open_dataset(config.data, config.storage)
    schema = dataset.schema
    columns = schema.names
    precomputed = set(TENSOR_COLUMNS) <= set(columns)
    image, caption, condition = config.image_column, config.caption_column, config.condition_column
    conditions = config.condition_columns or [condition]
    fields = {caption: "caption_column", **{c: "condition_column" for c in conditions}, image: "image_column"}
    needed = [caption, *conditions, *(() if precomputed else (image,))]
    missing = [c for c in needed if c not in columns]
    if missing:
        raise ValueError(
            f"dataset {config.data!r} has no column "
            + ", ".join(f"{c!r} (set {fields[c]})" for c in missing)
            + f"; its columns are {', '.join(columns)}"
        )
    for name in needed:
        kind = schema.field(name).type
        if name == caption and not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise ValueError(f"dataset {config.data!r}: caption column {name!r} is {kind}, not strings")
        if name != caption and not is_image_type(kind):
            raise ValueError(
                f"dataset {config.data!r}: column {name!r} is {kind}, not encoded images "
                "(binary, or a Hugging Face Image struct {bytes, path})"
            )
    rows = dataset.count_rows()
    need = config.batch_size * config.num_workers
    if rows < need:
        raise ValueError(
            f"dataset {config.data!r} has {rows} rows; one batch across {config.num_workers} worker(s) needs {need}"
        )
    sizes: set[tuple[int, int]] = set()
    if {"width", "height"} <= set(columns):
        table = dataset.to_table(columns=["width", "height"])
        sizes = set(zip(table.column("width").to_pylist(), table.column("height").to_pylist()))
    if len(sizes) > 1:
        raise ValueError(
            f"dataset {config.data!r} mixes image sizes {sorted(sizes)[:5]}; "
            "training needs one size (re-annotate with a fixed resolution)"
        )
    resolution = next(iter(sizes), (0, 0))
    scaling_factor = check_precomputed(config) if precomputed else None
    head = canonical(dataset.head(max(config.num_validation, 1), columns=[caption, condition]), image, caption)
    if head.column(condition).null_count:
        raise ValueError(
            f"dataset {config.data!r}: column {condition!r} has images without bytes "
            "(Image structs that only name a path); embed the images (datasets' embed_external_files)"
        )
    return DatasetInfo(
        location=loc,
        rows=rows,
        columns=columns,
        resolution=resolution,
        scaling_factor=scaling_factor,
        annotator=annotator_spec(schema, condition),
        validation={
            "text": head.column(TEXT).to_pylist()[: config.num_validation],
            "condition": head.column(condition).to_pylist()[: config.num_validation],
        },
        files=files,
        format=form,
        image_column=image,
        caption_column=caption,
    )


def check_precomputed(config: TrainingData) -> float:
    """A precomputed dataset (or every batch folder of one) must be complete and made with this base
    model; returns its VAE scaling factor."""
    manifests = dataset_manifests(config.data, config.storage) or {config.data: {}}
    for folder, manifest in manifests.items():
        if manifest.get("format") != PRECOMPUTED_FORMAT or manifest.get("status") != "complete":
            raise ValueError(
                f"dataset {folder!r} has precomputed tensor columns but no complete precompute manifest; "
                "finish 'zeroconv precompute' (re-run it to resume) or train on the annotated data"
            )
        made_with = manifest["job"]["base_model"]
        if made_with != config.base_model.source:
            raise ValueError(
                f"dataset {folder!r} was precomputed with base model {made_with!r}, not "
                f"{config.base_model.source!r}: set base_model.source={made_with} or precompute again"
            )
    return float(next(iter(manifests.values()))["scaling_factor"])  # one base model: one scaling factor


def annotator_spec(schema: pa.Schema, column: str) -> dict | None:
    """How the condition column was made: the spec ``zeroconv annotate`` stores in the field's metadata."""
    return field_annotator_spec(schema.field(column))
