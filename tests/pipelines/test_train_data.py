"""The training data order: a seeded epoch order over files and a bounded buffer, resumable anywhere (no Ray)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipelines.train_data import EpochOrder, SampleStream, TrainFiles


@pytest.fixture
def files(tmp_path) -> TrainFiles:
    """5 files of uneven sizes (37 rows), ids f<file>-<row>, small row groups."""
    paths = []
    for f, n in enumerate([10, 3, 9, 7, 8]):
        table = pa.table({"id": [f"f{f}-{r}" for r in range(n)], "text": [f"row {r}" for r in range(n)]})
        path = tmp_path / f"part-{f}.parquet"
        pq.write_table(table, path, row_group_size=4)
        paths.append(str(path))
    return TrainFiles.open(paths, pafs.LocalFileSystem(), ["id", "text"])


def ids(stream: SampleStream, batches: int) -> list[str]:
    return [i for _ in range(batches) for i in next(stream)["ids"]]


def test_each_epoch_is_a_permutation_that_changes_with_the_epoch(files):
    assert files.rows == [10, 3, 9, 7, 8]
    order = EpochOrder(files.rows, seed=0, buffer=8)
    assert sorted(order.file_order(0)) == list(range(5))
    stream = SampleStream(files, seed=0, buffer=8, rank=0, world=1, batch_size=1, start=0)
    epoch0, epoch1 = ids(stream, 37), ids(stream, 37)
    everything = {f"f{f}-{r}" for f, n in enumerate(files.rows) for r in range(n)}
    assert set(epoch0) == set(epoch1) == everything and len(set(epoch0)) == 37
    assert epoch0 != epoch1


def test_shuffle_is_bounded_by_the_buffer(files):
    """Within an 8-row block rows are shuffled; blocks follow the epoch's file order."""
    order = EpochOrder(files.rows, seed=3, buffer=8)
    concatenated = [f"f{f}-{r}" for f in order.file_order(0) for r in range(files.rows[f])]
    stream = SampleStream(files, seed=3, buffer=8, rank=0, world=1, batch_size=1, start=0)
    epoch = ids(stream, 37)
    for begin in range(0, 37, 8):
        assert sorted(epoch[begin : begin + 8]) == sorted(concatenated[begin : begin + 8])
    assert epoch != concatenated


def test_ranks_split_the_stream_and_a_resume_on_fewer_workers_continues_it(files):
    """2 ranks for 3 steps of batch 2 (12 samples), then 1 rank from position 12: every sample of the
    epoch exactly once, in the order one rank alone would have seen."""
    single = ids(SampleStream(files, seed=1, buffer=8, rank=0, world=1, batch_size=1, start=0), 37)
    two = [SampleStream(files, seed=1, buffer=8, rank=r, world=2, batch_size=2, start=0) for r in range(2)]
    seen = []
    for _ in range(3):
        a, b = (list(next(s)["ids"]) for s in two)
        seen += [a[0], b[0], a[1], b[1]]  # rank r holds positions r, r+2: interleave back to stream order
    resumed = SampleStream(files, seed=1, buffer=8, rank=0, world=1, batch_size=25, start=12)
    seen += list(next(resumed)["ids"])
    assert seen == single
    assert sorted(seen) == sorted({f"f{f}-{r}" for f, n in enumerate(files.rows) for r in range(n)})


def test_transform_sees_the_columns_and_ids_pass_through(files):
    stream = SampleStream(
        files, seed=0, buffer=4, rank=1, world=3, batch_size=2, start=5, transform=lambda b: {"n": len(b["text"])}
    )
    batch = next(stream)
    assert batch["n"] == 2 and len(batch["ids"]) == 2
