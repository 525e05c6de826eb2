"""A test run cleans up after itself: the session folder (``zc-test-*``, which holds ZEROCONV_CACHE)
is made by a fixture and removed at the end of the run, not made when ``conftest`` is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_a_pytest_run_leaves_no_session_folder(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/pipelines/test_images.py::test_exif_orientation_is_applied",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.glob("zc-test-*")) == []
