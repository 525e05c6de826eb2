"""The console: progress lines a person can read, library logs in a file, one line per error."""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest

from pipelines.cli import main, root_cause
from pipelines.common import console


def test_progress_off_a_terminal_prints_a_line_per_tenth_and_a_final_one():
    out = io.StringIO()
    bar = console.Progress(total=260, desc="annotate", unit="image", stream=out)
    for _ in range(26):
        bar.update(10)
    bar.update(0, rejected=4)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 10%, 20%, ... 90%, and the end
    assert lines[0].startswith("annotate: 30/260 images, ") and "ETA" in lines[0]
    assert lines[-1].startswith("annotate: 260/260 images, ") and "elapsed" in lines[-1]
    assert lines[-1].endswith("rejected 4")


def test_progress_shows_status_values():
    out = io.StringIO()
    bar = console.Progress(total=5, desc="train", unit="step", stream=out)
    for step in range(5):
        bar.update(1, loss=1.0 / (step + 1))
    bar.close()
    assert out.getvalue().splitlines()[-1].startswith("train: 5/5 steps") and "loss 0.2" in out.getvalue()


def test_session_sends_library_output_to_a_log_file_and_restores_stderr(tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROCONV_CACHE", str(tmp_path))
    terminal = io.StringIO()
    monkeypatch.setattr(sys, "stderr", terminal)
    # A library that set up its own terminal handler at import, before the session (as Ray does).
    library = logging.getLogger("zc-test-library")
    library.propagate = False
    library.addHandler(logging.StreamHandler())
    with console.session() as log_file:
        library.warning("a library's logger")
        logging.getLogger("mlflow.store").warning("an MLflow message")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        print("a library's own stderr line", file=sys.stderr)
        print("progress line", file=console.terminal())
        assert not console.streams_worker_logs()
    assert sys.stderr is terminal and console.streams_worker_logs()
    assert terminal.getvalue() == "progress line\n"
    logged = log_file.read_text()
    for text in ("a library's logger", "an MLflow message", "a library warning", "a library's own stderr line"):
        assert text in logged
    library.warning("after the session")  # the library's handler is back on the terminal
    assert terminal.getvalue() == "progress line\nafter the session\n"


def test_verbose_session_changes_nothing(monkeypatch):
    before = sys.stderr
    with console.session(verbose=True) as log_file:
        assert log_file is None and sys.stderr is before and console.streams_worker_logs()


def test_a_worker_error_is_found_inside_ray_trains_wrapper():
    from ray.train import WorkerGroupError

    wrapped = WorkerGroupError("Training failed due to worker errors", {0: ValueError("row 7: bad image")})
    assert str(root_cause(wrapped)) == "row 7: bad image"


@pytest.mark.parametrize(
    "argv, status, first_line",
    [
        (["train", "data=/no/such/dataset"], 2, "error: "),
        (["annotate", "jpeg_quality=many"], 2, "error: invalid AnnotateConfig:"),
    ],
)
def test_errors_are_short_and_exit_non_zero(argv, status, first_line, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEROCONV_CACHE", str(tmp_path))
    assert main(argv) == status
    captured = capsys.readouterr()
    assert captured.err.startswith(first_line) and "Traceback" not in captured.err
    assert len(captured.err.splitlines()) <= 2 and captured.out == ""


def test_progress_without_a_total_counts():
    out = io.StringIO()
    with_total_unknown = console.Progress(total=None, desc="annotate", unit="image", stream=out)
    with_total_unknown.update(64)
    with_total_unknown.close()
    assert out.getvalue().startswith("annotate: 64 images, ") and out.getvalue().count("\n") == 1
