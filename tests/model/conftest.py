"""Fixtures for the hand-off tests: a Python that has every installed library but not zeroconv."""

from __future__ import annotations

import os
import subprocess
import sysconfig
import venv
from pathlib import Path
from typing import NamedTuple

import pytest


class Isolated(NamedTuple):
    python: Path  # run it with cwd outside the repository
    env: dict[str, str]  # this environment without PYTHONPATH, the venv's bin first on PATH


@pytest.fixture(scope="session")
def without_zeroconv(session_tmp) -> Isolated:
    """A venv whose site-packages points at this environment's libraries as a plain path entry.

    Plain, so the ``.pth`` hooks there do not run, among them the editable install's import finder:
    torch, diffusers, mlflow... import, ``model`` and ``pipelines`` do not. A ``uvicorn`` shim runs the
    same interpreter, for ``mlflow models serve`` (which starts ``uvicorn`` from PATH).
    """
    env = session_tmp / "no-zeroconv"
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    shim = env / "bin" / "uvicorn"
    shim.write_text(f'#!/bin/sh\nexec "{python}" -I -m uvicorn "$@"\n')
    shim.chmod(0o755)
    check = subprocess.run(
        [python, "-I", "-c", "import mlflow, diffusers; import pipelines"], cwd=env, capture_output=True, text=True
    )
    assert "No module named 'pipelines'" in check.stderr, check.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = f"{python.parent}{os.pathsep}{env.get('PATH', '')}"
    return Isolated(python, env)
