"""Serving benchmark on the tiny model: what HTTP + Serve costs, and what batching buys. Prints JSON.

In one run, against one registered ControlNet (embedded SQLite registry, Serve on 127.0.0.1):

* latency  - p50/p95 of sequential ``POST /v1/generate`` vs calling the same pipeline in-process
             (``model.inference.generate``), same steps, size and torch thread count, one of each
             in turn; plus the time the replica reports, ``GET /healthz`` (Serve's own HTTP
             path) and the median of the per-pair differences;
* throughput - requests/s at concurrency 8 against two deployments of the same model, one with
             batching on (``max_batch_size`` 8) and one with it off (``max_batch_size`` 1),
             alternating rounds.

Targets: HTTP overhead p50 <= 15 ms over in-process; batching >= 1.5x throughput at concurrency 8.

    python bench/bench_serve.py [--requests 120] [--steps 2] [--size 64] [--threads 1]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray and Serve on loopback only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import requests
from tqdm import tqdm

MODEL = "bench-controlnet"


def register_tiny_controlnet(work: Path) -> str:
    """A tiny ControlNet registered as MODEL@champion in an embedded registry; returns the tracking URI."""
    import mlflow

    from model.base import TINY, resolve_base_dir
    from model.export import export_model
    from model.families import load
    from model.registry import log_controlnet_model, set_alias
    from pipelines.common.tracking import connect

    uri = f"sqlite:///{work / 'mlflow.db'}"
    connect(uri, "bench-serve")
    base_dir = resolve_base_dir(TINY)
    base = load(str(base_dir))
    exported = export_model(base.family.new_controlnet(base), work / "controlnet")
    with mlflow.start_run():
        info = log_controlnet_model(exported, {"base_model": str(base_dir)}, registered_name=MODEL)
    set_alias(MODEL, "champion", info.registered_model_version)
    return uri


def percentiles(seconds: list[float]) -> dict:
    ms = np.asarray(seconds) * 1e3
    return {"p50": round(float(np.percentile(ms, 50)), 2), "p95": round(float(np.percentile(ms, 95)), 2)}


def latencies(
    port: int, path: str, n: int, condition: np.ndarray, body: dict, steps: int, threads: int
) -> dict[str, list]:
    """Seconds per call, in turn: in-process, over HTTP, the time the replica reports for that request,
    and GET /healthz (Serve's HTTP path with no work). Interleaving makes them all see the same load
    (on a shared machine, load drifts more between phases than the overhead we measure). The client is
    a bare keep-alive http.client connection with bodies encoded up front, so the numbers are the
    server's, not a client library's."""
    import http.client

    import torch

    from model.inference import generate, load_pipeline
    from model.registry import resolve_model

    torch.set_num_threads(threads)
    resolved = resolve_model(MODEL)
    pipe = load_pipeline(resolved.base_model, [resolved.controlnet_dir])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    health = path.replace("/v1/generate", "/healthz")
    bodies = {seed: json.dumps({**body, "seed": seed}).encode() for seed in range(n + 3)}

    def call(method: str, target: str, payload: bytes | None = None) -> bytes:
        conn.request(method, target, body=payload, headers={"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
        if answer.status != 200:
            raise RuntimeError(f"{method} {target}: HTTP {answer.status}: {data[:200]!r}")
        return data

    times: dict[str, list] = {"in_process": [], "http": [], "replica": [], "healthz": []}
    for seed in tqdm(range(n + 3), desc="latency", file=sys.stderr):  # the first 3 rounds warm up
        start = time.perf_counter()
        generate(pipe, [body["prompt"]], condition[None], seed=seed, steps=steps)
        local = time.perf_counter() - start
        start = time.perf_counter()
        answer = call("POST", path, bodies[seed])
        remote = time.perf_counter() - start
        start = time.perf_counter()
        call("GET", health)
        floor = time.perf_counter() - start
        if seed >= 3:
            for key, value in zip(times, (local, remote, json.loads(answer)["elapsed_ms"] / 1e3, floor)):
                times[key].append(value)
    return times


def throughputs(urls: dict[str, str], n: int, concurrency: int, body: dict, rounds: int = 4) -> dict[str, float]:
    """Requests/s per URL at ``concurrency``; rounds alternate between the URLs for the same reason."""

    def one(url: str, seed: int) -> None:
        requests.post(url, json={**body, "seed": seed}, timeout=120).raise_for_status()

    elapsed = dict.fromkeys(urls, 0.0)
    per_round = n // rounds
    with (
        ThreadPoolExecutor(concurrency) as pool,
        tqdm(total=per_round * rounds * len(urls), desc="throughput", file=sys.stderr) as bar,
    ):
        for url in urls.values():  # warm up
            list(pool.map(lambda s: one(url, s), range(concurrency)))
        for _ in range(rounds):
            for name, url in urls.items():
                start = time.perf_counter()
                list(pool.map(lambda s: one(url, s), range(per_round)))
                elapsed[name] += time.perf_counter() - start
                bar.update(per_round)
    return {name: per_round * rounds / seconds for name, seconds in elapsed.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=120, help="requests per latency measurement")
    parser.add_argument("--throughput-requests", type=int, default=128, help="requests per throughput measurement")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2, help="DDIM steps (tiny model: few steps)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in-process and per replica")
    args = parser.parse_args()

    import ray
    from ray import serve

    from deploy.app import build_app
    from pipelines.common.images import encode_png

    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="zc-bench-serve-"))
    os.environ.setdefault("ZEROCONV_CACHE", str(work / "cache"))
    uri = register_tiny_controlnet(work)
    condition = np.zeros((args.size, args.size, 3), np.uint8)
    condition[args.size // 4 : -args.size // 4, args.size // 4 : -args.size // 4] = 255
    body = {
        "prompt": "a red circle",
        "steps": args.steps,
        "width": args.size,
        "height": args.size,
        "controls": [{"image": base64.b64encode(encode_png(condition)).decode()}],
    }

    ray_dir = tempfile.mkdtemp(prefix="zc-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, _temp_dir=ray_dir)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        common = {
            "models": [MODEL],
            "mlflow": {"tracking_uri": uri},
            "reload_interval_s": 0,
            "replicas": {"num_cpus": 0.5, "torch_threads": args.threads},
        }
        for name, batch in (("batched", args.concurrency), ("unbatched", 1)):
            app = build_app({**common, "batching": {"max_batch_size": batch}})
            serve.run(app, name=name, route_prefix=f"/{name}")
        batched, unbatched = (f"http://127.0.0.1:{port}/{name}/v1/generate" for name in ("batched", "unbatched"))

        times = latencies(port, "/batched/v1/generate", args.requests, condition, body, args.steps, args.threads)
        latency = {k: percentiles(v) for k, v in times.items()}
        paired = percentiles([h - i for h, i in zip(times["http"], times["in_process"])])["p50"]
        rps = throughputs({"on": batched, "off": unbatched}, args.throughput_requests, args.concurrency, body)
        on, off = rps["on"], rps["off"]
    finally:
        serve.shutdown()
        ray.shutdown()
        for path in (work, ray_dir):
            shutil.rmtree(path, ignore_errors=True)

    overhead = round(latency["http"]["p50"] - latency["in_process"]["p50"], 2)
    speedup = round(on / off, 2)
    print(
        json.dumps(
            {
                "benchmark": "serve",
                "model": "tiny",
                "steps": args.steps,
                "size": args.size,
                "torch_threads": args.threads,
                "cpus": os.cpu_count(),
                "load_avg_1m": {"start": round(load_before, 1), "end": round(os.getloadavg()[0], 1)},
                "latency_ms": {**latency, "http_overhead_p50": overhead, "paired_overhead_p50": paired},
                "throughput_rps": {
                    "concurrency": args.concurrency,
                    "batching_off": round(off, 2),
                    "batching_on": round(on, 2),
                    "speedup": speedup,
                },
                "targets": {"http_overhead_p50_ms<=15": overhead <= 15, "batching_speedup>=1.5": speedup >= 1.5},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
