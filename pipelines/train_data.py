"""What each training worker reads, in an order that survives preemption and a change of worker count.

An epoch is a fixed order of every row of the dataset, a function of ``(seed, epoch)`` alone:

1. the Parquet files are shuffled (seeded by the epoch);
2. their rows, concatenated in that order, are cut into blocks of ``shuffle_buffer`` rows and each block
   is shuffled (seeded by the epoch and the block): a bounded shuffle buffer that can be replayed.

Epochs follow one another as one endless stream of samples. Rank ``r`` of ``w`` takes the stream
positions ``start + r``, ``start + r + w``, ... so one optimizer step consumes the next
``effective_batch`` positions, whatever ``w`` is. The checkpoint keeps ``start`` (the samples consumed
so far): a resumed run, on the same or another number of workers, continues the same epoch where it
stopped and sees every sample once per epoch.

The cost of that guarantee: each rank reads every block it draws from (only the columns training
needs), i.e. the whole dataset once per epoch per worker, and decodes only its own rows. At the rate a
GPU trains a ControlNet (tens of images/s) that is a few MB/s per worker.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.dataset import canonical
from pipelines.data.tensors import PICKED, decode_batch, pick_conditions

BLOCKS_CACHED = 2  # a micro-batch near a block boundary draws from two blocks


@dataclass(frozen=True)
class TrainFiles:
    """The dataset as the workers see it: data files, their row counts, the columns to read (as the files
    name them; rows come out with the canonical ``image`` / ``text`` names and binary image columns)."""

    paths: list[str]
    rows: list[int]
    columns: list[str]
    filesystem: object  # a pyarrow filesystem (picklable: it travels to the workers)
    image_column: str = "image"
    caption_column: str = "text"
    format: str = "parquet"  # or "arrow": a local datasets save_to_disk folder (Arrow stream files)

    @classmethod
    def open(
        cls,
        paths: list[str],
        filesystem,
        columns: list[str],
        image_column: str = "image",
        caption_column: str = "text",
        format: str = "parquet",
    ) -> TrainFiles:
        if format == "arrow":
            rows = [_arrow_table(path).num_rows for path in paths]
        else:
            rows = [pq.read_metadata(path, filesystem=filesystem).num_rows for path in paths]
        return cls(list(paths), rows, list(columns), filesystem, image_column, caption_column, format)


class EpochOrder:
    """Which row (file, index in file) sits at each position of an epoch: files shuffled, then blocks of
    ``buffer`` consecutive rows shuffled; both seeded, so any position can be recomputed anywhere."""

    def __init__(self, rows: list[int], seed: int, buffer: int):
        self.rows, self.seed, self.buffer = np.asarray(rows, dtype=np.int64), seed, buffer
        self.total = int(self.rows.sum())

    def file_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def block(self, epoch: int, index: int) -> tuple[list[tuple[int, int, int]], np.ndarray]:
        """Block ``index`` of ``epoch``: the (file, first row, end row) pieces it is cut from, in order, and
        the permutation that shuffles its rows."""
        order = self.file_order(epoch)
        ends = np.cumsum(self.rows[order])
        begin, end = index * self.buffer, min((index + 1) * self.buffer, self.total)
        pieces = []
        for file, file_end in zip(order, ends):
            file_begin = file_end - self.rows[file]
            lo, hi = max(begin, file_begin), min(end, file_end)
            if lo < hi:
                pieces.append((int(file), int(lo - file_begin), int(hi - file_begin)))
        return pieces, np.random.default_rng([self.seed, epoch, index]).permutation(end - begin)


def _arrow_table(path: str) -> pa.Table:
    return pa.ipc.open_stream(pa.memory_map(path)).read_all()  # memory-mapped: reading copies nothing


def read_rows(files: TrainFiles, file: int, begin: int, end: int) -> pa.Table:
    """Rows ``[begin, end)`` of one file (of Parquet, only the row groups that hold them), canonical names."""
    if files.format == "arrow":
        table = _arrow_table(files.paths[file]).select(files.columns).slice(begin, end - begin)
    else:
        table = _read_parquet_rows(files, file, begin, end)
    return canonical(table, files.image_column, files.caption_column)


def _read_parquet_rows(files: TrainFiles, file: int, begin: int, end: int) -> pa.Table:
    parquet = pq.ParquetFile(files.paths[file], filesystem=files.filesystem)
    groups, first, offset = [], None, 0
    for g in range(parquet.metadata.num_row_groups):
        size = parquet.metadata.row_group(g).num_rows
        if offset < end and offset + size > begin:
            groups.append(g)
            first = offset if first is None else first
        offset += size
    table = parquet.read_row_groups(groups, columns=files.columns)
    return table.slice(begin - first, end - begin)


def to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Columns as numpy, the way Ray Data's ``iter_batches(batch_format="numpy")`` gives them: tensor
    columns as (N, ...) arrays, bytes and strings as object arrays."""
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if isinstance(column.type, pa.FixedShapeTensorType):
            out[name] = column.to_numpy_ndarray()
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out


class SampleStream:
    """Endless micro-batches for one rank, starting at global stream position ``start``.

    ``transform`` turns a batch of raw columns into what the step consumes (e.g. decoding images); it also gets
    ``positions``, each row's global stream position (what union training seeds its pick with). The ``id``
    column, when the dataset has one, is passed through as ``ids`` for the debug recorder."""

    def __init__(
        self,
        files: TrainFiles,
        seed: int,
        buffer: int,
        rank: int,
        world: int,
        batch_size: int,
        start: int,
        transform: Callable[[dict], dict] | None = None,
    ):
        self.files, self.order = files, EpochOrder(files.rows, seed, buffer)
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.next_position = start + rank  # this rank's next global position
        self.transform = transform
        self.blocks: OrderedDict[tuple[int, int], pa.Table] = OrderedDict()

    def _block(self, epoch: int, index: int) -> pa.Table:
        key = (epoch, index)
        if key not in self.blocks:
            pieces, permutation = self.order.block(epoch, index)
            table = pa.concat_tables([read_rows(self.files, *piece) for piece in pieces])
            self.blocks[key] = table.take(pa.array(permutation))
            while len(self.blocks) > BLOCKS_CACHED:
                self.blocks.popitem(last=False)
        return self.blocks[key]

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        positions = self.next_position + self.world * np.arange(self.batch_size)
        self.next_position = int(positions[-1]) + self.world
        parts = []
        for position in positions:
            epoch, offset = divmod(int(position), self.order.total)
            block, row = divmod(offset, self.order.buffer)
            parts.append(self._block(epoch, block).slice(row, 1))
        batch = to_numpy(pa.concat_tables(parts))
        ids = batch.pop("id", None)
        if self.transform:
            batch = self.transform({**batch, "positions": positions})
        if ids is not None:
            batch["ids"] = ids
        return batch


def stream_transform(
    union_columns: list[str], condition_column: str, seed: int, precomputed: bool
) -> Callable[[dict], dict] | None:
    """What the stream does to a batch of raw columns: union training (``union_columns``) first picks each row's
    condition column; rows that are not precomputed get their images decoded."""
    steps = [partial(pick_conditions, columns=union_columns, seed=seed)] if union_columns else []
    if not precomputed:
        steps.append(partial(decode_batch, condition_column=PICKED if union_columns else condition_column))
    return partial(_apply, steps) if steps else None


def _apply(steps: list[Callable[[dict], dict]], batch: dict) -> dict:
    for step in steps:
        batch = step(batch)
    return batch
