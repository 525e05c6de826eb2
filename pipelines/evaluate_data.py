"""What ``zeroconv evaluate`` reads: the first rows of a held-out dataset, each with its fixed seed.

Any dataset training reads works here (annotated Parquet, Hugging Face Parquet or a ``save_to_disk``
folder; ``pipelines.data.dataset`` opens them all and brings them to one shape).
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from pipelines.common.config import StorageConfig
from pipelines.common.images import content_id
from pipelines.data.dataset import canonical, open_dataset
from pipelines.data.schema import CONDITION_PREFIX, SINGLE_CONDITION_COLUMN, is_image_type


class HeldOutSettings(Protocol):
    """The fields of EvaluationSettings that say which rows are read, and their seeds."""

    data: str
    condition_column: str | None
    caption_column: str
    limit: int
    seed: int


def condition_column_for(columns: list[str], annotator: str, wanted: str | None, data: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ValueError(f"dataset {data!r} has no column {wanted!r}; its columns are {', '.join(columns)}")
        return wanted
    for column in (SINGLE_CONDITION_COLUMN, f"{CONDITION_PREFIX}{annotator}"):
        if column in columns:
            return column
    raise ValueError(
        f"dataset {data!r} has neither {SINGLE_CONDITION_COLUMN!r} nor '{CONDITION_PREFIX}{annotator}' "
        f"(the model's annotator); its columns are {', '.join(columns)}. Set condition_column."
    )


def read_heldout(config: HeldOutSettings, annotator: str, storage: StorageConfig):
    """The first ``limit`` rows (id, text, condition) of the held-out dataset, in file order. Any
    dataset training reads works here (annotated Parquet, Hugging Face Parquet or save_to_disk);
    one without an ``id`` column gets the condition's content hash as id."""
    _, _, dataset, _ = open_dataset(config.data, storage, what="held-out dataset")
    names = dataset.schema.names
    column = condition_column_for(names, annotator, config.condition_column, config.data)
    kind = dataset.schema.field(column).type
    if not is_image_type(kind):
        raise ValueError(
            f"held-out dataset {config.data!r}: column {column!r} is {kind}, not encoded images "
            "(binary, or a Hugging Face Image struct {bytes, path}); set condition_column"
        )
    if config.caption_column not in names:
        raise ValueError(
            f"held-out dataset {config.data!r} has no column {config.caption_column!r} (set caption_column); "
            f"its columns are {', '.join(names)}"
        )
    wanted = [c for c in ("id", config.caption_column, column) if c in names]
    table = canonical(
        dataset.head(config.limit, columns=wanted), image_column="image", caption_column=config.caption_column
    )
    if table.num_rows == 0:
        raise ValueError(f"held-out dataset {config.data!r} has no rows")
    n = table.num_rows
    conditions = table.column(column)  # canonical made every image column bytes
    ids = (
        table.column("id") if "id" in table.column_names else pa.array([content_id(b) for b in conditions.to_pylist()])
    )
    return column, pa.table(
        {
            "index": pa.array(range(n), pa.int64()),
            "id": ids,
            "text": table.column("text"),
            "condition": conditions,
            "seed": pa.array([config.seed + i for i in range(n)], pa.int64()),
        }
    )
