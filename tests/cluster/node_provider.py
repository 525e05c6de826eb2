"""The simulated cluster's node provider: Ray's ``fake_multinode`` provider, with one difference that makes
it behave like a cluster of separate machines.

Ray's fake provider starts every worker node in the head's session directory, so all nodes share one
``runtime_resources/`` folder, where each node's runtime-env agent unpacks a job's ``working_dir``. An
agent unpacks a package it has not set up yet with ``overwrite=True`` (``WorkingDirPlugin.create`` in
``ray/_private/runtime_env/working_dir.py``): it deletes the folder and unpacks it again. On a real
cluster that folder is on the node's own disk; here, the first task of a submitted job on a newly added
node deleted the folder that the job's driver on the head was running in (its working directory), and
the driver's next ``os.getcwd()`` raised ``FileNotFoundError``. Each worker node started by this provider
keeps its runtime environments in a folder of its own, as on separate machines.

The head's autoscaler loads this class (``provider: {type: external, module: ...}`` in the cluster
config), so it must stay importable with only the repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import itertools

from ray._private import ray_constants
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

SHARED_RUNTIME_ENV_DIR = ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME


class SeparateDisksFakeProvider(FakeMultiNodeProvider):
    """``fake_multinode``, each worker node with its own runtime-env folder in the shared session dir."""

    def __init__(self, provider_config, cluster_name):
        super().__init__(provider_config, cluster_name)
        self._node_numbers = itertools.count(1)

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        # The parent builds the node's RayParams, whose runtime_env_dir_name defaults to this constant: it is
        # set for the one call, under the provider's (reentrant) lock that the parent takes too.
        with self.lock:
            ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME = f"{SHARED_RUNTIME_ENV_DIR}_node{next(self._node_numbers)}"
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray_constants.DEFAULT_RUNTIME_ENV_DIR_NAME = SHARED_RUNTIME_ENV_DIR
