"""MLflow, the one place every stage talks to it: connect, open/resume a run, log metrics and images.

* :func:`resolve_tracking_uri`, :func:`check_tracking_server`, :func:`connect` - which store, is it up,
  point this process at it (every stage, the server and the registry use these).

* :func:`open_run` (driver) - fail fast on a dead tracking server, create the MLflow run or pick up
  the one an earlier attempt of the same training run left (its id is kept next to the checkpoints),
  and log the resolved config as params.
* :class:`Tracker` (rank 0 worker) - metrics and validation image grids, by run id, no global state.
* :func:`close_run` (driver) - mark the run finished or failed.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from pipelines.common.storage import Location

RUN_FILE = "mlflow_run.json"


def resolve_tracking_uri(tracking_uri: str | None, work_dir: str) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else an embedded SQLite store under ``work_dir``."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = Path(work_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}"


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear error when a remote tracking server is down (MLflow itself retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise ValueError(f"MLflow tracking server {uri} is not reachable ({problem}); start it or fix mlflow.tracking_uri")


def connect(tracking_uri: str, experiment: str, artifact_root: str | None = None) -> str:
    """Point this process at ``tracking_uri`` and ``experiment`` (created if missing); returns the experiment id."""
    import mlflow

    check_tracking_server(tracking_uri)
    user_value = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    # MLflow also exports the URI as MLFLOW_TRACKING_URI; undo that, or the next stage run in this
    # process would take this stage's store for the user's setting instead of its own default.
    if user_value is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = user_value
    client = mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        if artifact_root is None and tracking_uri.startswith("sqlite:"):
            # Without a server, artifacts must be told where to live (next to the database).
            artifact_root = Path(tracking_uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts").as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=artifact_root)
    else:
        experiment_id = found.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def open_run(tracking_uri: str, experiment: str, run_dir: Location, run_name: str, params: dict) -> str:
    """Return the MLflow run id for this training run, creating it on first use; log ``params``."""
    import mlflow
    from mlflow.entities import Param, RunTag

    experiment_id = connect(tracking_uri, experiment)  # raises a clear ValueError if the server is down
    client = mlflow.MlflowClient(tracking_uri)
    run_id = _previous_run_id(client, run_dir.join(RUN_FILE))
    if run_id is None:
        run_id = client.create_run(experiment_id, run_name=run_name, tags={"zeroconv.stage": "train"}).info.run_id
        run_dir.join(RUN_FILE).write_bytes_atomic(
            json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}).encode()
        )
    else:
        client.update_run(run_id, status="RUNNING")
    # MLflow params are immutable: on resume log only new keys and record changed ones as tags.
    logged = client.get_run(run_id).data.params
    new = [Param(k, _param_value(v)) for k, v in params.items() if k not in logged]
    changed = [
        RunTag(f"resume.changed.{k}", _param_value(v))
        for k, v in params.items()
        if k in logged and logged[k] != _param_value(v)
    ]
    for i in range(0, len(new), 100):  # MLflow takes at most 100 params per request
        client.log_batch(run_id, params=new[i : i + 100])
    if changed:
        client.log_batch(run_id, tags=changed)
    return run_id


def _param_value(value) -> str:
    return str(value)[:6000]  # MLflow's limit on a param value


def _previous_run_id(client, run_file: Location) -> str | None:
    if not run_file.exists():
        return None
    run_id = json.loads(run_file.read_bytes())["run_id"]
    try:
        client.get_run(run_id)
    except Exception:  # deleted, or a different tracking server: start a fresh run
        return None
    return run_id


def close_run(tracking_uri: str, run_id: str, ok: bool) -> None:
    import mlflow

    mlflow.MlflowClient(tracking_uri).set_terminated(run_id, status="FINISHED" if ok else "FAILED")


class NullTracker:
    """What ranks other than 0 get: the same calls, doing nothing (no ``if rank == 0`` at call sites)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_grid(self, grid: np.ndarray, step: int) -> None:
        pass


class Tracker:
    """Rank 0's handle on the run: metrics by step and validation grids as step-tracked images."""

    def __init__(self, tracking_uri: str, run_id: str):
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri)
        self.run_id = run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def log_grid(self, grid: np.ndarray, step: int) -> None:
        self.client.log_image(self.run_id, grid, key="validation", step=step)


def image_grid(conditions: np.ndarray, images: np.ndarray) -> np.ndarray:
    """One row per sample: condition | generated. uint8 (N, H, W, 3) each -> uint8 (N*H, 2*W, 3)."""
    if conditions.shape != images.shape:
        raise ValueError(f"conditions {conditions.shape} and images {images.shape} must have the same shape")
    return np.concatenate([np.concatenate([c, i], axis=1) for c, i in zip(conditions, images)], axis=0)
