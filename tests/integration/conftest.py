"""Session fixtures of the integration tests. Each expensive thing is made once per session and
shared by every test that can check its behaviour on it:

* ``ray_local``: one local Ray in this process (see ../shared/RAY_NOTES.md section 5);
* ``smoke_run``: every stage on that Ray (test_pipeline's checks; test_train_faults trains again
  on its ingest and memory stages);
* ``reference_run``: one undisturbed ``python -m pipeline.run`` (`cli_runs.KILL_SETTINGS`), the
  result the driver-kill tests' resumed runs must reach (test_pipeline, test_object_store);
* ``cluster``: a two-node local cluster started with ``ray start`` (`ray_cluster.LocalCluster`),
  and ``reference_job``: one undisturbed pipeline job on it (test_job_submit checks it,
  test_worker_node_kill compares its killed runs with it).
"""

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from .cli_runs import KILL_SETTINGS, TINY, finish, run_cli
from .ray_cluster import JOB, LocalCluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_local():
    import ray

    os.environ.pop("RAY_ADDRESS", None)  # never attach to a real cluster from tests
    # More logical CPUs than cores: Train excludes worker CPUs from Ray Data's budget, and a
    # 2-CPU cluster with two 1-CPU workers plus a dataset hangs (RAY_NOTES 5).
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def smoke_run(ray_local, tmp_path_factory):
    """One run of every stage with 2 Ray Train workers (gloo), on ``TINY``. Tests read it, or
    re-run it only to see every stage skipped; none changes it."""
    from hmn.config import load_config
    from pipeline.driver import Pipeline
    from pipeline.rundir import RunDir

    cfg = load_config(ROOT / "configs/smoke.yaml", TINY + ["train.num_workers=2", "train.cpus_per_worker=1"])
    run = RunDir(tmp_path_factory.mktemp("runs") / "smoke")
    results = Pipeline(cfg, run).execute()
    return cfg, run, results


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory) -> Path:
    """The run directory of one undisturbed ``python -m pipeline.run`` with
    `cli_runs.KILL_SETTINGS` (its own embedded Ray, as the killed runs have). Read only."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    finish(run_cli(run_dir, KILL_SETTINGS))
    return run_dir


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """A head (0 CPUs) and a worker node (4 CPUs) started with ``ray start``; never this
    process's Ray (it imports none). One per session: test_job_submit's checks come first (file
    order), test_worker_node_kill then kills worker nodes and starts replacements."""
    c = LocalCluster(tmp_path_factory.mktemp("ray-cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="session")
def reference_job(cluster, tmp_path_factory) -> SimpleNamespace:
    """One undisturbed pipeline job with `ray_cluster.JOB`'s settings on ``cluster``: its run
    directory (on the "shared storage": the same path on both nodes), id, final status and logs."""
    run_dir = tmp_path_factory.mktemp("shared") / "reference"
    job_id = cluster.submit(run_dir, JOB)
    status = cluster.wait_job(job_id)
    return SimpleNamespace(run_dir=run_dir, job_id=job_id, status=status,
                           logs=cluster.job_logs(job_id))
