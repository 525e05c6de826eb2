"""Training throughput from raw images vs from precomputed latents, in one run, on the tiny model.

Both paths train the same model (tiny UNet + a ControlNet, AdamW) on the same batches with the same
seeds; the only difference is where latents and text embeddings come from:

* raw:         JPEG decode + VAE encode + text encode every step  (``precompute.raw_tensors``)
* precomputed: rows written by ``zeroconv precompute`` (Ray Data)  (``precompute.precomputed_tensors``)

The loop is plain PyTorch with the family adapter's ``loss`` on its ``Controlled`` model (what the Ray
Train workers run per step, minus DeepSpeed and the data loader). Batches are read into memory first,
so storage speed is not measured. The two paths alternate in rounds so machine noise hits both.

    python bench/bench_precompute.py [--steps 10] [--rounds 4] [--batch 8] [--resolutions 64 128] [--threads 1]

Prints one JSON object. Published reference: MosaicML measured VAE + CLIP in the loop costing 1.4x
for SD2 on A100s (36 vs ~26 img/s/GPU at 512 px).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on loopback only
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402


def load_batches(path: Path, batch: int) -> list[dict[str, np.ndarray]]:
    """A Parquet dataset as in-memory numpy batches, in id order (tensor columns as (N, ...) arrays)."""
    table = pq.read_table(path).sort_by("id")
    columns = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        columns[name] = (
            column.to_numpy_ndarray()
            if hasattr(column, "to_numpy_ndarray")
            else np.array(column.to_pylist(), dtype=object)
        )
    n = table.num_rows - table.num_rows % batch
    return [{k: v[i : i + batch] for k, v in columns.items()} for i in range(0, n, batch)]


def train_steps(
    model,
    optimizer,
    base,
    batches,
    steps: int,
    path: str,
    seed: int,
) -> tuple[float, float, list]:
    """``steps`` optimizer steps; returns (wall seconds, CPU seconds of this process, losses)."""
    from pipelines.data.tensors import precomputed_tensors, raw_tensors

    fam = base.family
    latent_size = batches[0]["latent_mean"].shape[-2:] if path != "raw" else None
    size = tuple(s * base.pipe.vae_scale_factor for s in latent_size) if latent_size else None
    empty = fam.encode_prompts(base, [""], size) if size else None  # the prompt's size-dependent tensors
    torch.manual_seed(seed)
    losses = []
    start, start_cpu = time.perf_counter(), time.process_time()
    for step in range(steps):
        batch = batches[step % len(batches)]
        if path == "raw":
            latents, text, cond = raw_tensors(base, batch, "conditioning_image")
        else:
            latents, text, cond = precomputed_tensors(batch, base, "conditioning_image", empty)
        loss = fam.loss(model, base, latents, text, [cond])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return time.perf_counter() - start, time.process_time() - start_cpu, losses


def bench_resolution(base, resolution: int, batch: int, steps: int, rounds: int, work: Path) -> dict:
    from model.families import param_groups
    from pipelines.common.config import load_config
    from pipelines.data.synthetic import write_fill50k_parquet
    from pipelines.precompute import PrecomputeConfig, run_precompute

    raw_dir = write_fill50k_parquet(work / f"raw-{resolution}", n=batch * 4, size=resolution, seed=0, shards=2)
    started = time.perf_counter()
    result = run_precompute(
        load_config(
            PrecomputeConfig,
            None,
            [
                f"data={raw_dir}",
                f"output={work / f'pre-{resolution}'}",
                f"base_model.source={base.local_dir}",
                f"compute.batch_size={batch}",
            ],
        )
    )
    precompute_seconds = time.perf_counter() - started
    raw, pre = load_batches(raw_dir, batch), load_batches(work / f"pre-{resolution}", batch)

    fam = base.family
    initial = fam.new_controlnet(base).state_dict()
    wall = {"raw": 0.0, "precomputed": 0.0}
    cpu = {"raw": 0.0, "precomputed": 0.0}
    first_loss = {}
    for r in range(rounds + 1):  # round 0 warms up both paths (allocator, first-call costs) and is not timed
        for path, batches in (("raw", raw), ("precomputed", pre)):
            controlnet = fam.new_controlnet(base)
            controlnet.load_state_dict(initial)
            model = fam.controlled(base, [controlnet])
            optimizer = torch.optim.AdamW(param_groups(model, "locked", lr=1e-5, base_lr=0.0))
            seconds, cpu_seconds, losses = train_steps(
                model, optimizer, base, batches, steps if r else 2, path, seed=r
            )
            if r:
                wall[path] += seconds
                cpu[path] += cpu_seconds
            else:
                first_loss[path] = losses[0]
    samples = steps * batch * rounds
    raw_rate, pre_rate = samples / wall["raw"], samples / wall["precomputed"]
    return {
        "resolution": resolution,
        "batch": batch,
        "steps_per_round": steps,
        "rounds": rounds,
        "raw_samples_per_s": round(raw_rate, 2),
        "precomputed_samples_per_s": round(pre_rate, 2),
        "speedup": round(pre_rate / raw_rate, 3),
        # CPU time of this process: the work each path does, less disturbed by other load on the machine.
        "raw_samples_per_cpu_s": round(samples / cpu["raw"], 2),
        "precomputed_samples_per_cpu_s": round(samples / cpu["precomputed"], 2),
        "speedup_cpu_time": round(cpu["raw"] / cpu["precomputed"], 3),
        "first_step_loss": {k: round(v, 6) for k, v in first_loss.items()},
        "precompute_job": {"rows": result.rows, "seconds": round(precompute_seconds, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per path per round")
    parser.add_argument("--rounds", type=int, default=4, help="alternating raw/precomputed rounds")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads; 1 keeps CPU time an honest measure of work on a shared machine "
        "(idle OpenMP threads spin and bill CPU time when another process has the core)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import ray

    from model.families import load

    base = load("tiny")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-precompute-") as tmp:
        try:
            for resolution in args.resolutions:
                results.append(bench_resolution(base, resolution, args.batch, args.steps, args.rounds, Path(tmp)))
        finally:
            ray.shutdown()
    print(
        json.dumps(
            {
                "bench": "precompute",
                "what": "training samples/s: VAE + text encoder every step (raw) vs precomputed latents + embeddings",
                "loop": "plain PyTorch: the sd adapter's Controlled (tiny UNet + ControlNet, locked) and loss, AdamW; "
                "not Ray Train",
                "device": "cuda" if torch.cuda.is_available() else "cpu",
                "torch_threads": torch.get_num_threads(),
                "model": "tiny (64 px native; larger sizes run the same tiny nets on bigger tensors)",
                "results": results,
                "reference": {
                    "mosaicml_sd2_a100": "VAE + CLIP in the loop cost 1.4x (precomputed ~36 img/s/GPU at 512 px)"
                },
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
