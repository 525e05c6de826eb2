"""Work items streamed into Ray Data from the driver's node, for inputs too large to hold as a list.

    dataset = read_streamed(partial(plan.items, pending), rows_per_block=1)

``ray.data.from_items`` takes a list: the driver holds every item, then copies them into the object store
at once. An :class:`~pipelines.common.cluster.ItemStream` is read instead by one Ray Data read task on the
driver's node (the items may come from a local file there; it asks for no CPU, so it runs on a head started
with ``num-cpus 0``), block by block as the pipeline downstream asks for more: the driver holds a way to
open the items, not the items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


class _StreamedItems(Datasource):
    def __init__(self, open_items: Callable[[], Iterator[dict]], rows_per_block: int):
        self._open_items, self._rows_per_block = open_items, rows_per_block

    @property
    def supports_distributed_reads(self) -> bool:
        return False  # Ray Data then pins the one read task to the driver's node, where the items are

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown without reading them all: the point is not to

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        metadata = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        read = partial(_blocks, self._open_items, self._rows_per_block)
        return [ReadTask(read, metadata, per_task_row_limit=per_task_row_limit)]


def _blocks(open_items: Callable[[], Iterator[dict]], rows_per_block: int) -> Iterator[pa.Table]:
    rows: list[dict] = []
    for item in open_items():
        rows.append(item)
        if len(rows) == rows_per_block:
            yield pa.Table.from_pylist(rows)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows)


def read_streamed(open_items: Callable[[], Iterator[dict]], rows_per_block: int):
    """A Ray Data dataset of what ``open_items()`` yields (it must pickle, and yield the same items each time),
    read in blocks of ``rows_per_block`` rows by one task (no CPU) on this node."""
    import ray

    return ray.data.read_datasource(_StreamedItems(open_items, rows_per_block), num_cpus=0, override_num_blocks=1)
