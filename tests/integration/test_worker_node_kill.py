"""A worker node lost during training, on the two-node local cluster of test_job_submit.

The head has no CPUs, so both Ray Train workers (and every other task) run on the worker node,
while the job driver, the Ray Train controller and the dataset split coordinator run on the head.
Losing the node means SIGKILLing every process of it at once (raylet, object store, agents, the
training workers), after training has registered an epoch checkpoint. Two cases, one after the
other in the same run directory:

1. No node replaces it: Ray Train retries starting the worker group, each try waiting
   ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`` (shortened here), gives up after
   ``train.max_failures`` retries, and the job fails saying so and where the checkpoints are;
   once a node is back, the same command resumes from the last checkpoint.
2. A replacement node starts (as an autoscaler or KubeRay would start one): the same job
   finishes by itself, Ray Train restarting the worker group from the last checkpoint.

The final report equals that of an undisturbed reference run: the session's ``reference_job``
(conftest.py, the job test_job_submit checks), whose finished stages before training the killed
runs also start from.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from .cli_runs import copy_upstream
from .ray_cluster import EPOCHS, JOB, RAY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(RAY).exists(), reason="the ray CLI is not next to this Python"),
]

RUN = JOB  # kills after epoch 0's and a later epoch's checkpoints, both before the last epoch ends
# Each try to start the worker group waits this long (3 tries, then the job fails): short where
# no node comes back, long enough for a replacement node to join where one does.
START_TIMEOUT_S = {"no replacement": 5, "replaced": 15}
ENV = {k: {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": str(v),
           "RAY_DEDUP_LOGS": "0"}  # every worker line in the job logs, checked below
       for k, v in START_TIMEOUT_S.items()}


def _last_checkpoint_epoch(run_dir: Path) -> int:
    """The epoch of the last checkpoint the Ray Train controller registered (its snapshot,
    rewritten after each), -1 before the first."""
    for snap in (run_dir / "train_ray").glob("hmn-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result")
        except (OSError, ValueError):
            return -1  # being written
        return latest["metrics"]["epoch"] if latest else -1
    return -1


def _kill_after_checkpoint(cluster, job: str, run_dir: Path, epoch: int) -> int:
    """Kill the worker node once the checkpoint of ``epoch`` or later is registered; the epoch
    of the last checkpoint then."""
    deadline = time.monotonic() + 180
    while _last_checkpoint_epoch(run_dir) < epoch:
        status = cluster.job_status(job)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint of epoch {epoch} to kill after ({status}):\n"
                        f"{cluster.job_logs(job)[-6000:]}")
        time.sleep(0.1)
    cluster.kill_worker()
    time.sleep(1.0)  # a report the controller drained at the kill is registered by now
    last = _last_checkpoint_epoch(run_dir)
    assert last < EPOCHS - 1, "training ended before the kill"
    return last


def _resumed(logs: str) -> list[int]:
    """The epochs the workers resumed at (from a checkpoint), in a job's logs."""
    return sorted({int(e) for e in re.findall(r"rank \d+: resuming at epoch (\d+)", logs)})


def _trained(logs: str) -> list[int]:
    """The epochs rank 0 finished (validated), in a job's logs."""
    return sorted({int(e) for e in re.findall(r"epoch (\d+): loss ", logs)})


def test_lost_worker_node_fails_clearly_or_is_replaced_and_training_resumes(cluster, reference_job,
                                                                           tmp_path):
    ref = reference_job.run_dir
    assert reference_job.status == "SUCCEEDED", (
        f"{reference_job.status}\n{reference_job.logs[-6000:]}\n{cluster.node_logs()}")
    t0 = time.monotonic()
    times = {}

    # 1. the node lost and not replaced: the job fails, saying why and where the checkpoints are
    run = tmp_path / "shared" / "killed"  # the "shared storage": same path on both nodes
    copy_upstream(ref, run)
    job = cluster.submit(run, RUN, ENV["no replacement"])
    first = _kill_after_checkpoint(cluster, job, run, 0)
    t_kill = time.monotonic()
    status = cluster.wait_job(job, timeout=120)
    times["failed after the kill"] = time.monotonic() - t_kill
    logs = cluster.job_logs(job)
    assert status == "FAILED", f"{status}\n{logs[-8000:]}\n{cluster.node_logs()}"
    assert "TrainingFailed: training failed, Ray Train gave up (train.max_failures=2)" in logs, logs[-6000:]
    timeout = float(START_TIMEOUT_S["no replacement"])
    assert f"worker group startup timed out after {timeout} seconds" in logs
    assert f"Its checkpoints are kept in {run / 'train_ray'}/hmn-" in logs
    assert "the same command resumes from the last one" in logs
    assert _last_checkpoint_epoch(run) == first
    print(next(line for line in logs.splitlines() if "TrainingFailed:" in line))

    # the same command again, a node back: training resumes from that checkpoint; then lose
    # this node too, a replacement starting at once: the job finishes by itself
    t1 = time.monotonic()
    cluster.start_worker()
    times["replacement node up"] = time.monotonic() - t1
    job = cluster.submit(run, RUN, ENV["replaced"])
    second = _kill_after_checkpoint(cluster, job, run, first + 1)
    t_kill = time.monotonic()
    cluster.start_worker()
    times["second replacement up"] = time.monotonic() - t_kill
    status = cluster.wait_job(job)
    times["finished after the second kill"] = time.monotonic() - t_kill
    logs = cluster.job_logs(job)
    assert status == "SUCCEEDED", f"{status}\n{logs[-8000:]}\n{cluster.node_logs()}"
    assert "[FailurePolicy] RETRY" in logs
    assert "[ingest] done already" in logs  # the finished stages were not redone
    # resumed from the checkpoint the failed job left, then from the one before the second kill
    assert _resumed(logs) == [first + 1, second + 1], _resumed(logs)
    assert _trained(logs) == list(range(first + 1, EPOCHS)), _trained(logs)  # none from scratch

    # the same result as the undisturbed run
    a = json.loads((ref / "report.json").read_text())["report"]
    b = json.loads((run / "report.json").read_text())["report"]
    assert a["splits"] == b["splits"], json.dumps({"reference": a["splits"], "killed": b["splits"]})
    ta = json.loads((ref / "train" / "stats.json").read_text())
    tb = json.loads((run / "train" / "stats.json").read_text())
    assert [h["epoch"] for h in tb["history"]] == list(range(EPOCHS))
    for key in ("loss", "dev_accuracy", "best_dev_accuracy", "dev_facts_touched", "steps", "questions"):
        assert [h[key] for h in ta["history"]] == [h[key] for h in tb["history"]], key
    times["total"] = time.monotonic() - t0
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
