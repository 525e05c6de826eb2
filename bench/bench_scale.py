"""Benchmark: planning (and dry-running) annotate's input at 100k and 1M inputs, driver memory.

    python bench/bench_scale.py                      # 100k and 1M
    python bench/bench_scale.py --sizes 10000 100000

For each size, in a fresh subprocess (so peak RSS is that size's own):

  (a) images: a synthetic sorted listing of N image files with captions (1,000 per folder, as
      img2dataset lays them out) goes through the real planner (caption pairing, shard cut) and a
      dry run of annotate's driver: the plan streams into its plan file (fingerprints and counts
      kept) and every shard streams back as the work item sent to the actors. No input file is
      touched: this measures the driver, not the disk.
  (b) parquet: a real Parquet file of N tiny rows is planned through ``Source`` (footer, row ranges)
      and dry-run the same way.
  (c) baseline: the same listing held whole before cutting (what a one-shot ``FileSelector``
      listing plus a list of shards costs).

Prints one JSON object (``cpu_seconds``: the process's own CPU time, meaningful on a busy machine
where wall ``seconds`` is not). Targets: peak RSS at 1M <= 1.3x peak RSS at 100k for (a) and (b);
planning 1M inputs in under 60 s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHARD_SIZE = 500
PER_FOLDER = 1000


def synthetic_listing(n: int):
    from pipelines.data.listing import ListedFile

    for i in range(n):
        folder = f"/data/photos/{i // PER_FOLDER:05d}"
        yield ListedFile(f"{folder}/{i:09d}.jpg", f"{40_000 + i % 977}:{1_700_000_000_000_000_000 + i}")
        yield ListedFile(f"{folder}/{i:09d}.txt", f"{60 + i % 13}:{1_700_000_000_000_000_000 + i}")


def dry_run(shards, spill_dir: str) -> dict:
    """What annotate's driver does with a plan before any work starts: stream it into its plan file
    (keeping each shard's fingerprint and count), then stream every shard back as the work item the
    actor pool is sent (pipelines.data.plan)."""
    from pipelines.data.plan import SpilledPlan

    plan = SpilledPlan.write(shards, spill_dir)
    digest = hashlib.sha256("".join(plan.fingerprints[i] for i in range(len(plan))).encode())
    stream = plan.items(range(len(plan)))
    sent_bytes = sum(len(item["shard"]) for key in stream.keys for item in stream.read([key]))  # a task each
    return {
        "shards": len(plan),
        "inputs": plan.inputs(range(len(plan))) or 0,
        "plan_sha256": digest.hexdigest()[:16],
        "json_mb": sent_bytes / 2**20,
    }


def measure(kind: str, n: int, tmp: str) -> dict:
    from pipelines.data.sources import Source, plan_images

    before = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = before.ru_utime + before.ru_stime
    started = time.perf_counter()
    spill = tempfile.mkdtemp(dir=tmp)
    if kind == "images":
        result = dry_run(plan_images(synthetic_listing(n), SHARD_SIZE), spill)
    elif kind == "baseline":
        listing = list(synthetic_listing(n))  # held whole, as a one-shot listing is
        result = dry_run(list(plan_images(iter(listing), SHARD_SIZE)), spill)
    else:
        result = dry_run(Source(str(Path(tmp) / f"tiny-{n}.parquet"), image_column="image").plan(SHARD_SIZE), spill)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        **result,
        "seconds": round(seconds, 2),  # wall clock: inflated on a busy machine
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime - cpu_before, 2),  # this process's own work
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def write_tiny_parquet(path: Path, n: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"image": pa.array([b"\xff"] * n, pa.binary()), "text": pa.array(["c"] * n, pa.string())})
    pq.write_table(table, path, row_group_size=10_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--child", nargs=3, metavar=("KIND", "N", "TMP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, n, tmp = args.child
        print(json.dumps(measure(kind, int(n), tmp)))
        return

    out: dict = {"shard_size": SHARD_SIZE}
    with tempfile.TemporaryDirectory(prefix="zc-bench-scale-") as tmp:
        for n in args.sizes:
            write_tiny_parquet(Path(tmp) / f"tiny-{n}.parquet", n)
        for kind in ("images", "parquet", "baseline"):
            for n in args.sizes:
                child = subprocess.run(
                    [sys.executable, __file__, "--child", kind, str(n), tmp],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                out.setdefault(kind, {})[str(n)] = json.loads(child.stdout.strip().splitlines()[-1])
    low, high = (str(s) for s in (min(args.sizes), max(args.sizes)))
    out["rss_ratio"] = {
        k: round(out[k][high]["peak_rss_mb"] / out[k][low]["peak_rss_mb"], 2) for k in out if k != "shard_size"
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
