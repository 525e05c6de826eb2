"""What a person sees in the terminal: zeroconv's own lines and progress bars; everything else goes to log files.

    with console.session(verbose=False):     # the CLI, around a stage's run
    with console.progress(260, "annotate", "image") as bar:
        bar.update(64)                  # counts, rate, ETA; bar.update(1, loss=0.12) adds a status
    console.log_locations()             # where the libraries' logs went, for the run's summary

Quiet (the default of the ``zeroconv`` command, inside :func:`session`): this process's stderr - where Python logging,
warnings and library progress bars write (Ray, Ray Data, MLflow, DeepSpeed, diffusers) - is a log
file under the cache dir, and Ray keeps its workers' output in its session's log folder instead of
streaming it to the driver (``ensure_ray`` asks :func:`streams_worker_logs`). Progress and errors
go to the real terminal. ``zeroconv --verbose`` leaves all streams alone, as if zeroconv did nothing.

Code that never enters :func:`session` (tests, notebooks, ``import pipelines``) sees no change either.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO

from pipelines.common.storage import cache_dir

# The real terminal, saved before session() points sys.stderr at the log file.
_terminal: IO[str] = sys.stderr
_log_file: Path | None = None
_log_locations: dict[str, str] = {}  # what -> where, e.g. "Ray workers" -> session log folder


@contextmanager
def session(verbose: bool = False):
    """Route library output to a log file for the block (unless ``verbose``); yields the file's path.

    The CLI runs a stage inside it; on exit stderr, logging and warnings are as they were.
    """
    global _terminal, _log_file
    if verbose or _log_file is not None:
        yield _log_file
        return
    folder = cache_dir() / "logs"
    folder.mkdir(parents=True, exist_ok=True)
    _log_file = folder / f"zeroconv-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"
    _terminal = sys.stderr
    # Line-buffered, so the log is readable while the stage runs and complete if it dies.
    log = sys.stderr = open(_log_file, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
    # Handlers made before this (Ray's, at import) hold the terminal itself: point them at the log too.
    moved = _move_handlers(log)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    # Ray Data's own progress output would duplicate ours; the Hub's download bars only fill the log.
    saved_env = {k: os.environ.get(k) for k in _QUIET_ENV}
    os.environ.update({k: v for k, v in _QUIET_ENV.items() if k not in os.environ})
    _log_locations["log"] = str(_log_file)
    try:
        yield _log_file
    finally:
        logging.captureWarnings(False)
        root.removeHandler(handler)
        root.setLevel(level)
        for h, stream in moved:
            h.setStream(stream)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
        sys.stderr = _terminal
        log.close()
        _log_file = None
        _log_locations.clear()


_QUIET_ENV = {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def _move_handlers(to: IO[str]) -> list:
    """Point every logging handler that writes to the terminal (stderr or stdout) at ``to``.

    Returns (handler, old stream) pairs, to put them back."""
    terminal = (_terminal, sys.stdout, sys.__stderr__, sys.__stdout__)
    moved = []
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, logging.StreamHandler) and any(handler.stream is t for t in terminal):
                moved.append((handler, handler.stream))
                handler.setStream(to)
    return moved


def streams_worker_logs() -> bool:
    """Whether Ray should stream its workers' output to this process (``ray.init(log_to_driver=...)``)."""
    return _log_file is None


def record_log_location(what: str, where: str) -> None:
    """Remember a log folder the summary should name (e.g. Ray's session logs, once Ray is up)."""
    if _log_file is not None:
        _log_locations[what] = where


def log_locations() -> dict[str, str]:
    return dict(_log_locations)


def terminal() -> IO[str]:
    """The stream a person reads: stderr as it was before :func:`session` (today's stderr outside one)."""
    return _terminal if _log_file is not None else sys.stderr


def log_exception(message: str) -> None:
    """Put the current exception's traceback in the log, if there is one (the caller prints one line)."""
    if _log_file is not None:
        logging.getLogger("zeroconv").exception(message)


class Progress:
    """Counts, rate and ETA for one loop of the driver.

    On a terminal it is a tqdm bar; elsewhere (CI logs, a pipe) it prints a plain line at every tenth
    of the way and at the end, so a log holds a few readable lines instead of carriage-return noise.
    """

    def __init__(self, total: int | None, desc: str, unit: str, stream: IO[str]):
        self.total, self.desc, self.unit, self.stream = total, desc, unit, stream
        self.done, self.status = 0, {}
        self.started = time.perf_counter()
        self._next_line = 0.1
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)

    def update(self, n: int = 1, **status: float | str) -> None:
        self.done += n
        self.status.update(status)
        if self._bar is not None:
            if status:
                self._bar.set_postfix(self.status, refresh=False)
            self._bar.update(n)
        elif self.total and self.done / self.total >= self._next_line and self.done < self.total:
            while self._next_line <= self.done / self.total:
                self._next_line += 0.1
            self._print()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._print()

    def _print(self) -> None:
        elapsed = time.perf_counter() - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        parts = [f"{self.desc}: {count} {self.unit}s", f"{rate:.1f} {self.unit}s/s"]
        if self.total is not None and self.done < self.total and rate > 0:
            parts.append(f"ETA {_clock((self.total - self.done) / rate)}")
        else:
            parts.append(f"{_clock(elapsed)} elapsed")
        parts += [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.status.items()]
        print(", ".join(parts), file=self.stream, flush=True)


@contextmanager
def progress(total: int | None, desc: str, unit: str = "item"):
    """A :class:`Progress` on the terminal, closed (final line printed) when the block ends.
    ``total`` None: counts and rate, no ETA (e.g. inputs whose number is known only at the end)."""
    bar = Progress(total, desc, unit, terminal())
    try:
        yield bar
    finally:
        bar.close()


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"
