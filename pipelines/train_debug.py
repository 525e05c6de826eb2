"""Debug hooks of the train loop (``debug.*`` in TrainConfig); they do nothing unless switched on.

* ``debug.fail_at_step=K``: the last rank exits abruptly right before step K, once per run, like a
  lost node, after Ray has committed the latest checkpoint (so where the run resumes is known exactly).
  A marker file in the run directory makes it fire once, across the restarted worker group too.
* ``debug.record_samples=DIR``: every rank appends, per micro-batch, ``{"step", "ids"}`` to
  ``DIR/samples_rank<R>.jsonl``; steps replayed after a restart are appended again (the last line of a
  step is what trained).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray.train

from pipelines.common.storage import Location

FAILURE_MARKER = "failure_injected"


class StepHooks:
    def __init__(self, debug, run_dir: Location, rank: int, world: int):
        self.fail_at_step = debug.fail_at_step if rank == world - 1 else None
        self.marker = run_dir.join(FAILURE_MARKER)
        self.samples = Path(debug.record_samples) / f"samples_rank{rank:03d}.jsonl" if debug.record_samples else None
        if self.samples:
            self.samples.parent.mkdir(parents=True, exist_ok=True)

    def before_step(self, step: int) -> None:
        if step == self.fail_at_step and not self.marker.exists():
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
            self.marker.write_bytes_atomic(b"")
            os._exit(1)

    def on_batch(self, step: int, ids) -> None:
        if self.samples is not None and ids is not None:
            with open(self.samples, "a") as f:
                f.write(json.dumps({"step": step, "ids": [str(i) for i in ids]}) + "\n")
