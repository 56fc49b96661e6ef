"""The run-directory lock (`pipeline.rundir.run_lock`): one writer, readers side by side, a killed
holder's lock taken over, manifest writes that leave no temporary file behind."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import rundir
from pipeline.rundir import RunDir, RunDirError, RunDirLocked

ROOT = Path(__file__).resolve().parents[2]

#: a process that holds a run directory's lock (exclusive or shared) with a live staging folder
HOLDER = """
import sys, time
from pipeline.rundir import RunDir
run = RunDir(sys.argv[1])
with run.lock(shared=sys.argv[2] == "shared"):
    (run.root / ".ingest.tmp-live").mkdir(exist_ok=True)
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold(run_dir: Path, mode: str = "exclusive") -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir), mode], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if line.strip() != "locked":
        proc.kill()
        raise RuntimeError(f"the holder did not start: {line!r}")
    return proc


@pytest.fixture
def holder(tmp_path):
    procs = []

    def start(mode="exclusive"):
        procs.append(_hold(tmp_path / "run", mode))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_second_run_refuses_at_once_naming_the_first(holder, tmp_path, capsys):
    from pipeline.run import main

    first = holder()
    t0 = time.perf_counter()
    rc = main(["--run-dir", str(tmp_path / "run"), "--stages", "generate"])
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t0 < 30
    assert err.startswith("error: ") and err.count("\n") == 1
    assert f"pid {first.pid} on host {socket.gethostname()}" in err and "another run holds it" in err
    # the first run's live staging folder was not removed as "left by an interrupted run"
    assert (tmp_path / "run" / ".ingest.tmp-live").is_dir()
    with pytest.raises(RunDirLocked, match=f"pid {first.pid}"):
        RunDir(tmp_path / "run").run_stage("ingest", "fp", lambda out: {})
    assert (tmp_path / "run" / ".ingest.tmp-live").is_dir()


def test_evaluation_refuses_while_a_run_writes_and_a_run_refuses_while_one_reads(holder, tmp_path):
    from pipeline.evaluate import InputError, reading

    writer = holder()
    with pytest.raises(InputError, match=f"a run is writing it: pid {writer.pid}"):
        with reading(tmp_path / "run"):
            pass
    writer.kill()
    writer.wait()
    reader = holder("shared")
    with reading(tmp_path / "run"):  # readers share the lock
        pass
    with pytest.raises(RunDirLocked, match=f"in use by pid {reader.pid} on this host"):
        with RunDir(tmp_path / "run").lock():
            pass


def test_lock_of_a_killed_run_is_taken_over(holder, tmp_path, caplog):
    dead = holder()
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    lock_file = tmp_path / "run" / rundir.LOCK_NAME
    assert f'"pid": {dead.pid}' in lock_file.read_text()  # the record outlives the process
    run = RunDir(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="pipeline.rundir"), run.lock():
        assert f'"pid": {os.getpid()}' in lock_file.read_text()
        r = run.run_stage("ingest", "fp", lambda out: {"ok": 1})  # re-entrant in this process
    assert not r.skipped and run.is_done("ingest", "fp")
    assert not (tmp_path / "run" / ".ingest.tmp-live").exists()  # the dead run's staging folder
    assert f"taking over the lock of pid {dead.pid}" in caplog.text
    assert lock_file.read_text() == ""  # released: no holder recorded


def test_nested_run_directories_lock_freely_in_one_process(tmp_path):
    base = RunDir(tmp_path / "run")
    variant = RunDir(base.root / "experiments" / "table1" / "full")
    with base.lock():
        assert not variant.run_stage("train", "fp", lambda out: {}).skipped
        with base.lock(shared=True):  # a read inside the process's own write
            assert not base.run_stage("ingest", "fp", lambda out: {}).skipped
    with base.lock(shared=True), pytest.raises(RunDirError, match="cannot also write it"):
        with base.lock():
            pass


def test_failed_manifest_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    run.run_stage("ingest", "fp", lambda out: {})

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run.run_stage("embed", "fp", lambda out: {})
    monkeypatch.undo()
    assert not list(run.root.glob(".manifest.json.tmp-*"))
    assert run.entry("ingest")["status"] == "done"
    # one left by a process killed between its write and its rename is removed by the next holder
    (run.root / ".manifest.json.tmp-deadbeef").write_text("{")
    with run.lock():
        pass
    assert not list(run.root.glob(".manifest.json.tmp-*"))
