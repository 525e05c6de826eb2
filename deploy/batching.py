"""Batched generation: a batch of jobs runs as few pipeline calls as their settings allow, and the
adaptive wait (:class:`BatchWait`) that decides how long a forming batch waits for company."""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np

from deploy.jobs import Job
from deploy.schemas import ModelVersion
from deploy.store import ModelStore

logger = logging.getLogger("ray.serve")


def run_batch(store: ModelStore, jobs: list[Job]) -> list:
    """Run ``jobs`` grouped by settings; per job (PNG bytes, versions, group size) or an exception.

    A group whose requests were all abandoned (timed out, client gone) is skipped, or stopped after
    the denoising step it is in, so the next requests get the model instead of waiting behind it.
    """
    from model.inference import GenerationStopped, generate
    from pipelines.common.images import encode_png

    models = store.models  # one snapshot for the whole batch: a reload mid-batch cannot mix versions
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, job in enumerate(jobs):
        groups[job.batch_key()].append(i)
    results: list = [None] * len(jobs)
    for indices in groups.values():
        group = [jobs[i] for i in indices]
        first = group[0]

        def abandoned(group=group) -> bool:
            return all(job.abandoned.is_set() for job in group)

        try:
            if abandoned():
                raise GenerationStopped("abandoned before it started")
            served = [models[name] for name in first.models]
            logger.info(
                "generating %d request(s) with %s: %d steps at %dx%d",
                len(group),
                [f"{m.name}/{m.version}" for m in served],
                first.steps,
                first.width,
                first.height,
            )
            pipe = store.pipeline(served)
            per_net = [np.stack([job.conditions[k] for job in group]) for k in range(len(served))]
            multi = len(served) > 1
            images = generate(
                pipe,
                [job.prompt for job in group],
                per_net if multi else per_net[0],
                seed=[job.seed for job in group],
                steps=first.steps,
                guidance_scale=first.guidance_scale,
                conditioning_scale=list(first.scales) if multi else first.scales[0],
                negative_prompt=first.negative_prompt,
                guess_mode=first.guess_mode,
                should_stop=abandoned,
                control_mode=first.control_modes[0],  # a union ControlNet serves alone
            )
            versions = [ModelVersion(name=m.name, version=m.version) for m in served]
            for i, image in zip(indices, images):
                results[i] = (encode_png(image), versions, len(group))
        except GenerationStopped as exc:  # nobody is waiting for these answers
            logger.info("dropped a group of %d abandoned request(s): %s", len(group), exc)
            for i in indices:
                results[i] = exc
        except Exception as exc:  # one group's failure must not fail the other requests in the batch
            logger.exception("generation failed for a group of %d request(s)", len(group))
            for i in indices:
                results[i] = exc
    return results


class BatchWait:
    """How long a forming batch waits for company; Serve reads it when a batch's first request arrives.

    A fixed wait either adds its full length to every lone request or, when short, splits a group
    of concurrent requests into several batches. Instead:

    * idle after single requests: no wait; nobody else is coming, so waiting only adds latency;
    * a batch is running: wait until it should end, plus ``window``; arrivals could not run before
      then anyway, and gathering them all makes one batch instead of several;
    * idle right after a batch of several: ``window``; the rest of that group is about to re-send.
    """

    def __init__(self, window: float):
        self.window = window
        self.running_since: float | None = None
        self.last_duration = 0.0
        self.last_size = 0

    def wait_s(self, now: float) -> float:
        if self.running_since is not None:
            return max(self.last_duration - (now - self.running_since), 0.0) + self.window
        return self.window if self.last_size > 1 else 0.0

    def started(self, now: float) -> None:
        self.running_since = now

    def finished(self, now: float, size: int) -> None:
        self.last_duration, self.running_since, self.last_size = now - self.running_since, None, size
