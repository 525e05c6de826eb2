"""MLflow, the one place every stage talks to it: connect, open/resume a run, log metrics and images.

* :func:`resolve_tracking_uri`, :func:`check_tracking_server`, :func:`connect` - which store, is it up,
  point this process at it (every stage, the server and the registry use these).
* :func:`redact_uri` - a URI as it may appear in logs, params and files: no passwords or tokens.

* :func:`open_run` (driver) - fail fast on a dead tracking server, create the MLflow run or pick up
  the one an earlier attempt of the same training run left (its id is kept next to the checkpoints),
  and log the resolved config as params.
* :class:`Tracker` (rank 0 worker) - metrics, validation image grids and tags by run id, no global state;
  a metric's history (a resumed run's curve).
* :func:`close_run` (driver) - mark the run finished or failed.
* :func:`follow_metric` (driver) - show a running run's steps and loss on a progress bar.
"""

from __future__ import annotations

import base64
import json
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from pipelines.common.config import ConfigError
from pipelines.common.storage import Location

RUN_FILE = "mlflow_run.json"
# Query parameters whose values are secrets (?token=..., presigned X-Amz-Signature=..., ?password=...).
_SECRET_QUERY_KEY = re.compile(r"token|secret|passw|pwd|key|auth|sig|credential|session", re.IGNORECASE)


def redact_uri(uri: str) -> str:
    """``http://user:pass@host/x?token=t&a=1`` -> ``http://***@host/x?token=***&a=1``.

    Every URI zeroconv logs, records as an MLflow param or writes to a file goes through this."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.scheme or not (parts.netloc or parts.query):
        return uri
    netloc = "***@" + parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = "&".join(
        f"{k}=***" if _SECRET_QUERY_KEY.search(k) else (f"{k}={v}" if sep else k)
        for k, sep, v in (item.partition("=") for item in parts.query.split("&") if item)
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def resolve_tracking_uri(tracking_uri: str | None, work_dir: str, must_exist: bool = False) -> str:
    """Config value, else MLFLOW_TRACKING_URI, else an embedded SQLite store under a local ``work_dir``.

    Creates nothing. ``must_exist`` (stages that only read the registry: evaluate, promote, serve)
    refuses a SQLite store that is not there, instead of reading an empty one MLflow would create.
    """
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    source = (
        "mlflow.tracking_uri" if tracking_uri else "MLFLOW_TRACKING_URI" if uri else f"default for work_dir={work_dir}"
    )
    if not uri:
        if "://" in work_dir:
            raise ConfigError(
                f"work_dir {work_dir} is not on this machine, so the default MLflow store (SQLite under "
                "work_dir) cannot live there: set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to your tracking server"
            )
        uri = f"sqlite:///{Path(work_dir).expanduser().resolve() / 'mlflow.db'}"
    database = _sqlite_path(uri)
    if must_exist and database is not None and not database.is_file():
        raise FileNotFoundError(
            f"no MLflow registry at {database} ({source}): run from "
            "the folder you trained in, or set work_dir or mlflow.tracking_uri to the registry that holds the model"
        )
    return uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear error when a remote tracking server is down (MLflow itself retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    parts = urllib.parse.urlsplit(uri)
    # urllib takes user:pass@ for part of the host name: send it as a Basic auth header instead.
    health = parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1], path=parts.path.rstrip("/") + "/health")
    request = urllib.request.Request(health.geturl())
    if parts.username:
        login = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            if r.status == 200:
                return
            problem = f"HTTP {r.status}"
    except urllib.error.HTTPError as exc:
        problem = f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", exc))
    raise ValueError(
        f"MLflow tracking server {redact_uri(uri)} is not reachable ({problem}); start it or fix mlflow.tracking_uri"
    )


def connect(tracking_uri: str, experiment: str, artifact_root: str | None = None) -> str:
    """Point this process at ``tracking_uri`` and ``experiment`` (created if missing); returns the experiment id."""
    import mlflow

    check_tracking_server(tracking_uri)
    if redact_uri(tracking_uri) != tracking_uri:
        # MLflow prints "View run at <tracking URI>/#/..." when a run ends, credentials included.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    database = _sqlite_path(tracking_uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)  # MLflow creates the file, not its folder
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
        if artifact_root is None and database is not None:
            # Without a server, artifacts must be told where to live (next to the database).
            artifact_root = database.parent.joinpath("mlartifacts").as_uri()
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
            json.dumps({"run_id": run_id, "tracking_uri": redact_uri(tracking_uri)}).encode()
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
    text = redact_uri(value) if isinstance(value, str) and "://" in value else str(value)
    return text[:6000]  # MLflow's limit on a param value


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


@contextmanager
def follow_metric(tracking_uri: str, run_id: str, bar, key: str = "loss", every: float = 5.0):
    """While the block runs, move ``bar`` (a console progress bar) to the run's latest step of ``key``.

    The workers already log ``key`` by step to MLflow (rank 0); reading it back from a driver thread
    gives the terminal the same numbers with no channel of its own. Best effort: a failed read waits
    for the next one.
    """
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    stop = threading.Event()

    def show_latest() -> None:
        try:
            history = client.get_metric_history(run_id, key)
        except Exception:  # the server is busy or restarting: the next poll will do
            return
        if history:
            latest = max(history, key=lambda m: m.step)
            bar.update(max(0, latest.step - bar.done), **{key: latest.value})

    def poll() -> None:
        while not stop.wait(every):
            show_latest()

    thread = threading.Thread(target=poll, name="follow-metric", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show_latest()


class NullTracker:
    """What ranks other than 0 get: the same calls, doing nothing (no ``if rank == 0`` at call sites)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_grid(self, grid: np.ndarray, step: int) -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return []


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

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of every value logged for ``key``, by step."""
        return sorted((m.step, m.value) for m in self.client.get_metric_history(self.run_id, key))


def image_grid(conditions: np.ndarray, images: np.ndarray) -> np.ndarray:
    """One row per sample: condition | generated. uint8 (N, H, W, 3) each -> uint8 (N*H, 2*W, 3)."""
    if conditions.shape != images.shape:
        raise ValueError(f"conditions {conditions.shape} and images {images.shape} must have the same shape")
    return np.concatenate([np.concatenate([c, i], axis=1) for c, i in zip(conditions, images)], axis=0)
