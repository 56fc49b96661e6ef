"""One local Ray for the whole integration session (see ../shared/RAY_NOTES.md section 5), and a
two-node local cluster per module for the tests that submit jobs (`ray_cluster.LocalCluster`)."""

import os

import pytest

from .ray_cluster import LocalCluster


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach to a real cluster from tests
    # More logical CPUs than cores: Train excludes worker CPUs from Ray Data's budget, and a
    # 2-CPU cluster with two 1-CPU workers plus a dataset hangs (RAY_NOTES 5).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head (0 CPUs) and a worker node (4 CPUs) started with ``ray start``; never this
    process's Ray (it imports none)."""
    c = LocalCluster(tmp_path_factory.mktemp("ray-cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()
