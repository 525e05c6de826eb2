"""The benchmarks' local Ray stops every process it started, even one that outlives ``ray.shutdown()``
(bench_train.py once left Ray Train's ``TrainController`` running after it exited)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parents[2] / "bench"

# A worker starts a process in its own session: when Ray stops the worker, that process is re-parented to
# init and lives on - the way an actor still exiting did. Run in a fresh Python: the suite's Ray is not this one.
SCRIPT = """
import json, subprocess, sys
sys.path.insert(0, sys.argv[1])
import ray
from bench_train import local_ray

@ray.remote(num_cpus=0)
def start_straggler():
    return subprocess.Popen(["sleep", "300"], start_new_session=True).pid

with local_ray():
    pid = ray.get(start_straggler.remote())
print(json.dumps({"pid": pid}))
"""


def test_local_ray_stops_a_process_that_outlives_ray_shutdown():
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # On Linux Ray itself kills a dying worker's children (the raylet is a subreaper); the TrainController that
    # stayed behind escaped that. With Ray's own reaping off only local_ray's PID bookkeeping can stop the
    # straggler - the mechanism under test (a plain ray.init()/ray.shutdown() leaves it running).
    env["RAY_kill_child_processes_on_worker_exit"] = "0"
    env["RAY_kill_child_processes_on_worker_exit_with_raylet_subreaper"] = "0"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(BENCH)], capture_output=True, text=True, timeout=300, env=env
    )
    assert done.returncode == 0, done.stderr[-2000:]
    pid = json.loads(done.stdout.strip().splitlines()[-1])["pid"]
    try:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    finally:
        if psutil.pid_exists(pid):
            psutil.Process(pid).kill()
