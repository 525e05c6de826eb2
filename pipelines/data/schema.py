"""The data contract between stages: every column name, metadata key, file name and format version.

Annotated and precomputed datasets are folders of Parquet shards plus files whose names start with
"_" (Parquet readers skip those). docs/data-schema.md describes the same contract for users.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa

# Columns of an annotated dataset
ID, IMAGE, TEXT, SOURCE = "id", "image", "text", "source"
WIDTH, HEIGHT, ORIGINAL_WIDTH, ORIGINAL_HEIGHT = "width", "height", "original_width", "original_height"
SINGLE_CONDITION_COLUMN = "conditioning_image"  # the column name ControlNet training scripts expect
CONDITION_PREFIX = "cond_"  # one column per annotator when there are several
CONDITION_COLUMN = re.compile(rf"^({SINGLE_CONDITION_COLUMN}|{CONDITION_PREFIX}.+)$")

# Columns a precomputed dataset adds (Arrow fixed-shape float32 tensors)
LATENT_MEAN, LATENT_STD, TEXT_EMBEDDING = "latent_mean", "latent_std", "text_embedding"
TENSOR_COLUMNS = (LATENT_MEAN, LATENT_STD, TEXT_EMBEDDING)

# Metadata keys
ANNOTATOR_KEY = b"zeroconv.annotator"  # on a condition field: the annotator spec (name, params, weights)
IMAGE_ENCODING_KEY = b"encoding"  # on the image field

# Files beside the shards ("_": Parquet readers skip them, so the folder stays a readable dataset)
MANIFEST = "_manifest.json"
REJECTS_DIR = "_rejects"
EMPTY_PROMPT_FILE = "_empty_prompt.safetensors"

# Format versions written into manifests
ANNOTATED_FORMAT = "zeroconv.annotated/1"
PRECOMPUTED_FORMAT = "zeroconv.precomputed/1"

# Reject reasons
READ_ERROR = "read_error"  # the bytes (or the caption) could not be read
UNSUPPORTED_FILE = "unsupported_file"  # a file under the input that is not an image
MISSING_IMAGE = "missing_image"  # a Parquet row with a null image, a WebDataset sample without one
ANNOTATOR_ERROR = "annotator_error"


def dumps(value: Any) -> str:
    """The one JSON form of metadata values (sorted keys: equal specs give equal bytes)."""
    return json.dumps(value, sort_keys=True, default=str)


def condition_columns(annotator_names: list[str]) -> list[str]:
    """The dataset's condition column names (docs/data-schema.md)."""
    if len(annotator_names) == 1:
        return [SINGLE_CONDITION_COLUMN]
    return [f"{CONDITION_PREFIX}{name}" for name in annotator_names]


def annotated_schema(columns: dict[str, dict]) -> pa.Schema:
    """Columns of an annotated shard; ``columns`` maps condition column -> annotator spec."""
    conditions = [
        pa.field(col, pa.binary(), nullable=False, metadata={ANNOTATOR_KEY: dumps(spec)})
        for col, spec in columns.items()
    ]
    return pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(IMAGE, pa.binary(), nullable=False, metadata={IMAGE_ENCODING_KEY: b"jpeg"}),
            pa.field(TEXT, pa.string(), nullable=False),
            *conditions,
            pa.field(WIDTH, pa.int32(), nullable=False),
            pa.field(HEIGHT, pa.int32(), nullable=False),
            pa.field(ORIGINAL_WIDTH, pa.int32(), nullable=False),
            pa.field(ORIGINAL_HEIGHT, pa.int32(), nullable=False),
            pa.field(SOURCE, pa.string(), nullable=False),
        ]
    )


REJECTS_SCHEMA = pa.schema(
    [
        pa.field(ID, pa.string()),  # null when no bytes could be read
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
)


def annotator_spec(field: pa.Field) -> dict | None:
    """The annotator spec recorded on a condition field, or None (e.g. a dataset made elsewhere)."""
    raw = (field.metadata or {}).get(ANNOTATOR_KEY)
    return json.loads(raw) if raw else None
