"""ControlNet-Union training's data side and checks (no Ray): each row's condition column is a seeded pick by
stream position; the driver resolves the columns, their annotators and control modes, or refuses in one line."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.data.schema import annotated_schema
from pipelines.data.tensors import PICKED, PICKED_INDEX, pick_conditions
from pipelines.train import resolve_union
from pipelines.train_config import TrainConfig
from pipelines.train_data import SampleStream, TrainFiles

COLUMNS = ["cond_canny", "cond_lineart_standard"]


def picks(stream: SampleStream, batches: int) -> list[tuple[str, bytes]]:
    out = []
    for _ in range(batches):
        batch = next(stream)
        out += list(zip(batch["ids"], batch[PICKED], batch[PICKED_INDEX]))
    return out


@pytest.fixture
def files(tmp_path) -> TrainFiles:
    """2 files, 20 rows; each condition cell says which row and column it is."""
    paths = []
    for f in range(2):
        ids = [f"f{f}-{r}" for r in range(10)]
        table = pa.table({"id": ids, **{c: [f"{i}|{c}".encode() for i in ids] for c in COLUMNS}})
        pq.write_table(table, tmp_path / f"part-{f}.parquet", row_group_size=3)
        paths.append(str(tmp_path / f"part-{f}.parquet"))
    return TrainFiles.open(paths, pafs.LocalFileSystem(), ["id", *COLUMNS])


def test_each_row_trains_on_a_seeded_pick_that_a_resume_on_other_workers_repeats(files):
    pick = lambda b: pick_conditions(b, COLUMNS, seed=7)  # noqa: E731
    first = picks(SampleStream(files, 7, 8, rank=0, world=1, batch_size=2, start=0, transform=pick), 20)
    # The picked bytes are that row's cell of the picked column; both columns are used.
    assert all(cell == f"{i}|{COLUMNS[k]}".encode() for i, cell, k in first)
    assert {k for _, _, k in first[:20]} == {0, 1}
    # Another epoch (other positions) draws afresh: not the same picks for every row.
    epochs = [{i: k for i, _, k in first[:20]}, {i: k for i, _, k in first[20:]}]
    assert epochs[0].keys() == epochs[1].keys() and epochs[0] != epochs[1]
    # 2 workers from position 0 for 3 steps, then 1 worker from position 12: the same rows and the same picks.
    two = [SampleStream(files, 7, 8, rank=r, world=2, batch_size=2, start=0, transform=pick) for r in range(2)]
    seen = []
    for _ in range(3):
        a, b = (picks(s, 1) for s in two)
        seen += [a[0], b[0], a[1], b[1]]
    seen += picks(SampleStream(files, 7, 8, rank=0, world=1, batch_size=28, start=12, transform=pick), 1)
    assert seen == first
    # Another seed, other picks.
    other = lambda b: pick_conditions(b, COLUMNS, seed=8)  # noqa: E731
    assert picks(SampleStream(files, 7, 8, rank=0, world=1, batch_size=20, start=0, transform=other), 1) != first[:20]


def annotated(tmp_path, specs: dict[str, dict]) -> str:
    """An empty annotated shard whose condition fields record ``specs`` (what resolve_union reads)."""
    schema = annotated_schema(specs)
    pq.write_table(schema.empty_table(), tmp_path / "train-00000-of-00001.parquet")
    return str(tmp_path)


def union_config(data: str, source: str = "tiny-sdxl", **values) -> TrainConfig:
    return TrainConfig(data=data, base_model={"source": source}, union=True, **values)


def test_resolve_union_reads_each_columns_annotator_and_its_control_mode(tmp_path):
    specs = {"cond_canny": {"name": "canny", "version": "1"}, "cond_midas": {"name": "midas", "version": "1"}}
    config, union = resolve_union(union_config(annotated(tmp_path, specs)))
    assert config.condition_columns == ["cond_canny", "cond_midas"] and config.condition_column == "cond_canny"
    assert [(u["column"], u["control_mode"], u["control_type"]) for u in union] == [
        ("cond_canny", 3, "canny"),
        ("cond_midas", 1, "depth"),
    ]
    assert union[1]["annotator"]["name"] == "midas"
    named, _ = resolve_union(union_config(str(tmp_path), condition_columns=["cond_midas"]))
    assert named.condition_columns == ["cond_midas"]


@pytest.mark.parametrize(
    "specs, values, error",
    [
        ({"cond_canny": {"name": "canny"}}, {"source": "tiny"}, "union=true: sd base models have no ControlNet-Union"),
        (
            {"cond_canny": {"name": "canny"}},
            {"condition_columns": ["cond_canny", "cond_depth"]},
            "condition_columns: dataset .* has no column 'cond_depth'",
        ),
        (
            {"cond_canny": {"name": "canny"}, "cond_content_shuffle": {"name": "content_shuffle"}},
            {},
            "annotator 'content_shuffle' has no ControlNet-Union type",
        ),
        ({"conditioning_image": {"name": "canny"}}, {}, "has no cond_<annotator> columns"),
    ],
)
def test_resolve_union_refuses_in_one_line(tmp_path, specs, values, error):
    with pytest.raises(ValueError, match=error) as caught:
        resolve_union(union_config(annotated(tmp_path, specs), **values))
    assert "\n" not in str(caught.value)


def test_union_options_are_checked_with_the_config():
    with pytest.raises(ValueError, match="condition_columns applies to union=true"):
        TrainConfig(condition_columns=["cond_canny"])
    with pytest.raises(ValueError, match="fidelity.every is not supported with union=true"):
        TrainConfig(union=True, fidelity={"every": 5, "data": "x"})
