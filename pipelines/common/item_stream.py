"""Work items read into Ray Data on the driver's node, for inputs too large to hold as a list.

    dataset = read_streamed(ItemStream(keys, read), rows_per_block=1)

``ray.data.from_items`` takes a list: the driver holds every item, then copies them into the object store
at once. An :class:`~pipelines.common.cluster.ItemStream` holds a small key per item (e.g. a byte offset
in a file on this node) and a function that reads the items of some keys. Each block of
``rows_per_block`` items is one Ray Data read task that reads its items when the pipeline asks for it:
the driver holds the keys, not the items. One task per block, not one task yielding every block: Ray
Data joins the small blocks one task yields into one block, which would hand the whole input to a
single actor of the pool. The tasks run on the driver's node (where the items are) and ask for no CPU,
so they run on a head started with ``num-cpus 0``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask


class _KeyedItems(Datasource):
    def __init__(self, keys: list, read: Callable[[list], list[dict]], rows_per_block: int):
        self._keys, self._read, self._rows_per_block = keys, read, rows_per_block

    @property
    def supports_distributed_reads(self) -> bool:
        return False  # Ray Data then pins the read tasks to the driver's node, where the items are

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown without reading them all: the point is not to

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        tasks = []
        for start in range(0, len(self._keys), self._rows_per_block):
            keys = self._keys[start : start + self._rows_per_block]
            metadata = BlockMetadata(num_rows=len(keys), size_bytes=None, input_files=None, exec_stats=None)
            tasks.append(ReadTask(partial(_block, self._read, keys), metadata, per_task_row_limit=per_task_row_limit))
        return tasks


def _block(read: Callable[[list], list[dict]], keys: list) -> list[pa.Table]:
    return [pa.Table.from_pylist(read(keys))]


def read_streamed(keys: list, read: Callable[[list], list[dict]], rows_per_block: int):
    """A Ray Data dataset of the items ``read(keys)`` gives (``read`` must pickle), one read task (no CPU, on
    this node) per ``rows_per_block`` keys."""
    import ray

    blocks = -(-len(keys) // rows_per_block)
    return ray.data.read_datasource(
        _KeyedItems(keys, read, rows_per_block), num_cpus=0, override_num_blocks=max(blocks, 1)
    )
