"""A Ray Train worker killed mid-run: FailureConfig restarts the group from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil

from hmn.config import load_config
from pipeline.driver import stage_fingerprints
from pipeline.stages.train import run_train

from .cli_runs import TINY

ROOT = Path(__file__).resolve().parents[2]


def _own_train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this process's own Ray (``ray_local``: its raylet, a child of
    this process, starts every worker process), never another user's or test's Ray."""
    procs = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                procs.append(p)
        except psutil.Error:  # exited meanwhile
            pass
    return procs


def test_killed_worker_resumes_from_checkpoint(smoke_run, tmp_path):
    cfg = load_config(ROOT / "configs/smoke.yaml", TINY + ["train.num_workers=2", "train.max_epochs=6",
                                                            "train.patience=6", "train.max_failures=2",
                                                            "train.optimizer=sparse_adam"])
    # train on the session's smoke run's ingest and memory stages: the ones this config makes
    _, run, _ = smoke_run
    done = run.manifest()["stages"]
    fps = stage_fingerprints(cfg)
    assert all(done[s]["fingerprint"] == fps[s] for s in ("ingest", "embed", "memory"))
    storage = tmp_path / "ray_train"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 240
        while time.time() < deadline:
            if any(storage.glob("hmn-faults/checkpoint_*")):
                workers = _own_train_workers()
                if workers:
                    victim = workers[-1]
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.append(victim.pid)
                    return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = tmp_path / "train_out"
    out.mkdir()
    stats = run_train(cfg.train, cfg.reader, run.stage_dir("ingest"), run.stage_dir("memory"), out,
                      storage, "hmn-faults", {"test": "faults"})
    thread.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert not psutil.pid_exists(killed[0]) or psutil.Process(killed[0]).status() == psutil.STATUS_ZOMBIE
    # every epoch ran exactly once in the surviving history, and the run finished
    assert [h["epoch"] for h in stats["history"]] == list(range(6))
    assert (out / "model.pt").exists()
    assert json.loads(json.dumps(stats["history"]))[-1]["dev_accuracy"] > 0
