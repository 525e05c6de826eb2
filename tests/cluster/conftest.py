"""Fixtures of the ``cluster`` group: one simulated autoscaling cluster per pytest session (harness.py)."""

from __future__ import annotations

import pytest

from tests.cluster.harness import running_cluster


@pytest.fixture(scope="session")
def fake_cluster(session_tmp):
    """The simulated cluster (a :class:`tests.cluster.harness.FakeCluster`), this process connected to it."""
    import ray

    if ray.is_initialized():
        pytest.skip("a Ray is already connected in this process; run the cluster group on its own: pytest -m cluster")
    with running_cluster() as cluster:
        yield cluster
