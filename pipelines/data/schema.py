"""The data contract between stages: every column name, metadata key, file name and format version.

Annotated and precomputed datasets are folders holding ``data/train-NNNNN-of-MMMMM.parquet`` shards
plus bookkeeping whose names start with "_" (Parquet readers skip those; Hugging Face ``datasets``
reads only the ``data/`` shards, by that name pattern). docs/data-schema.md describes the same
contract for users.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

# Columns of an annotated dataset
ID, IMAGE, TEXT, SOURCE = "id", "image", "text", "source"
WIDTH, HEIGHT, ORIGINAL_WIDTH, ORIGINAL_HEIGHT = "width", "height", "original_width", "original_height"
SINGLE_CONDITION_COLUMN = "conditioning_image"  # the column name ControlNet training scripts expect
CONDITION_PREFIX = "cond_"  # one column per annotator when there are several
CONDITION_COLUMN = re.compile(rf"^({SINGLE_CONDITION_COLUMN}|{CONDITION_PREFIX}.+)$")

# Columns a precomputed dataset adds (Arrow fixed-shape float32 tensors)
LATENT_MEAN, LATENT_STD, TEXT_EMBEDDING = "latent_mean", "latent_std", "text_embedding"
TENSOR_COLUMNS = (LATENT_MEAN, LATENT_STD, TEXT_EMBEDDING)
PROMPT_PREFIX = (
    "prompt_"  # a family's other text tensors (SDXL: prompt_text_embeds; SD3/Flux: prompt_pooled_projections)
)


def prompt_column(key: str) -> str:
    """The column that stores a family's prompt tensor ``key`` (model.families ``text_keys``)."""
    return TEXT_EMBEDDING if key == "prompt_embeds" else f"{PROMPT_PREFIX}{key}"


# Metadata keys
ANNOTATOR_KEY = b"zeroconv.annotator"  # on a condition field: the annotator spec (name, params, weights)
IMAGE_ENCODING_KEY = b"encoding"  # on the image field
HF_FEATURES_KEY = b"huggingface"  # schema metadata `datasets` reads its features from
# Schema metadata of each shard (or its _empty/ marker): the shard's summary (counts, fingerprint)
ANNOTATE_FOOTER_KEY = b"zeroconv.shard"
PRECOMPUTE_FOOTER_KEY = b"zeroconv.precompute"

# Image and condition columns: Hugging Face's Image storage type, so `datasets` decodes them to PIL
# images. `path` is always null; `bytes` holds the JPEG / PNG.
ENCODED_IMAGE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])

# Files of a sharded dataset. Shards are named the way the Hugging Face Hub names Parquet shards:
# datasets.load_dataset(folder) reads exactly data/train-NNNNN-of-MMMMM.parquet and nothing else,
# and the "_" names beside them are skipped by pyarrow and Ray Data.
DATA_DIR = "data"
MANIFEST = "_manifest.json"
REJECTS_DIR = "_rejects"  # per shard: the inputs that could not be used
EMPTY_DIR = "_empty"  # per shard with no rows: its summary (a 0-row Parquet file breaks `datasets`)
EMPTY_PROMPT_FILE = "_empty_prompt.safetensors"
MAX_SHARDS = 100_000  # `datasets` matches exactly five index digits


def shard_file_name(index: int, total: int) -> str:
    """The file name of shard ``index`` of ``total``."""
    return f"train-{index:05d}-of-{total:05d}.parquet"


# Format versions written into manifests
ANNOTATED_FORMAT = "zeroconv.annotated/2"  # 2: data/ shards, image columns as {bytes, path}
PRECOMPUTED_FORMAT = "zeroconv.precomputed/2"

# Reject reasons
READ_ERROR = "read_error"  # the bytes (or the caption) could not be read
UNSUPPORTED_FILE = "unsupported_file"  # a file under the input that is not an image
MISSING_IMAGE = "missing_image"  # a Parquet row with a null image, a WebDataset sample without one


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
    # Image columns are nullable only because `datasets` compares its Image type, nullable, field by field.
    conditions = [pa.field(col, ENCODED_IMAGE, metadata={ANNOTATOR_KEY: dumps(spec)}) for col, spec in columns.items()]
    schema = pa.schema(
        [
            pa.field(ID, pa.string(), nullable=False),
            pa.field(IMAGE, ENCODED_IMAGE, metadata={IMAGE_ENCODING_KEY: b"jpeg"}),
            pa.field(TEXT, pa.string(), nullable=False),
            *conditions,
            pa.field(WIDTH, pa.int32(), nullable=False),
            pa.field(HEIGHT, pa.int32(), nullable=False),
            pa.field(ORIGINAL_WIDTH, pa.int32(), nullable=False),
            pa.field(ORIGINAL_HEIGHT, pa.int32(), nullable=False),
            pa.field(SOURCE, pa.string(), nullable=False),
        ]
    )
    return with_hf_features(schema)


def with_hf_features(schema: pa.Schema) -> pa.Schema:
    """``schema`` plus the metadata `datasets` writes itself: its features, so image columns load as Image."""
    values = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.float32(): "float32"}
    features = {}
    for f in schema:
        if f.type == ENCODED_IMAGE:
            features[f.name] = {"_type": "Image"}
        elif f.type in values:
            features[f.name] = {"dtype": values[f.type], "_type": "Value"}
    info = {"info": {"features": features}}
    return schema.with_metadata({**(schema.metadata or {}), HF_FEATURES_KEY: json.dumps(info).encode()})


def is_image_type(kind: pa.DataType) -> bool:
    """Encoded image bytes: binary, or a struct with a binary 'bytes' field (Hugging Face ``Image``)."""
    if pa.types.is_struct(kind):
        index = kind.get_field_index("bytes")
        return index >= 0 and is_image_type(kind.field(index).type)
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def image_column_from_bytes(values: list[bytes]) -> pa.StructArray:
    """JPEG / PNG bytes -> an image column as written (``ENCODED_IMAGE``, ``path`` null)."""
    return pa.StructArray.from_arrays(
        [pa.array(values, pa.binary()), pa.nulls(len(values), pa.string())], fields=list(ENCODED_IMAGE)
    )


def bytes_from_image_column(column: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """An image column (see :func:`is_image_type`) -> its encoded bytes: a ``{bytes, path}`` struct gives its
    ``bytes`` field, a binary column is returned as it is."""
    if pa.types.is_struct(column.type):
        return pc.struct_field(column, "bytes")
    return column


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
