"""Run directories on object storage (`pipeline.objectstore`): URIs and their errors, and against
a real S3-protocol server on the loopback address (moto, `s3_server` in tests/conftest.py):
publication before the manifest commit, resume from another cache, changed objects, the lease."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline import objectstore
from pipeline.objectstore import Store
from pipeline.rundir import RunDir, RunDirError, RunDirLocked, is_store_uri, local_run_path

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# URIs (no server)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["ftp://host/runs/x", "hdfs://namenode/runs/x", "http://h/x",
                                   "mock://bucket/x"])
def test_an_unsupported_scheme_is_refused_naming_the_value(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RunDirError, match="is not supported; use a local path, s3://BUCKET/PATH "
                                          "or gs://BUCKET/PATH") as e:
        RunDir(value)
    assert repr(value) in str(e.value)
    assert not any(tmp_path.iterdir())  # not silently a local folder named after the URI


def test_the_cli_refuses_an_unsupported_scheme_in_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.run import main

    monkeypatch.chdir(tmp_path)
    assert main(["--run-dir", "ftp://host/runs/x", "--stages", "generate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run directory 'ftp://host/runs/x': scheme 'ftp://'")
    assert err.count("\n") == 1
    assert not (tmp_path / "ftp:").exists()


def test_s3_and_gs_map_to_pyarrow_file_systems(tmp_path, monkeypatch):
    monkeypatch.setenv("HMN_RUN_CACHE", str(tmp_path / "cache"))
    gs = RunDir("gs://bucket/runs/x")  # no request is made until something is read
    assert isinstance(gs.store.fs, pafs.GcsFileSystem)
    assert (gs.store.base, gs.location) == ("bucket/runs/x", "gs://bucket/runs/x")
    assert gs.root.parent == tmp_path / "cache" / "gs" / "bucket" / "runs"
    assert gs.root.name.startswith("x-")
    with pytest.raises(RunDirError, match="names no bucket"):
        RunDir("s3://")
    assert is_store_uri("s3://b/x") and is_store_uri("GS://b/x")
    assert not is_store_uri("runs/x") and not is_store_uri(Path("s3:/b/x"))
    assert not is_store_uri("file:///tmp/x") and local_run_path("file:///tmp/x") == Path("/tmp/x")
    assert RunDir(f"file://{tmp_path}/local").root == tmp_path / "local"


def test_the_query_and_endpoint_make_separate_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HMN_RUN_CACHE", str(tmp_path))
    a = Store("s3://bucket/x?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1")
    b = Store("s3://bucket/x?endpoint_override=127.0.0.1:10&scheme=http&region=us-east-1")
    assert a.uri == b.uri == "s3://bucket/x" and a.cache_dir != b.cache_dir


# ---------------------------------------------------------------------------------------------
# Against the local S3 server
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def quick_lease(monkeypatch):
    monkeypatch.setattr(objectstore, "LEASE_SETTLE_S", 0.05)


def _stage(text: str):
    def fn(out: Path) -> dict:
        (out / "sub").mkdir()
        (out / "sub" / "a.txt").write_text(text)
        (out / "b.bin").write_bytes(b"\0" * 1000)
        return {"rows": 2}
    return fn


def _other_cache(tmp_path: Path, monkeypatch, name: str) -> None:
    """Later RunDirs work in another cache: a resume on another machine."""
    monkeypatch.setenv("HMN_RUN_CACHE", str(tmp_path / name))


def test_a_stage_is_uploaded_then_committed_and_resumed_from_another_cache(
        s3_bucket, tmp_path, monkeypatch, quick_lease):
    uri = f"s3://{s3_bucket}/runs/one"
    run = RunDir(uri)
    assert not run.run_stage("s", "fp", _stage("hello")).skipped
    store = run.store
    listing = store.listing("s")
    assert listing == {"sub/a.txt": 5, "b.bin": 1000, "stats.json": listing["stats.json"]}
    manifest = json.loads(store.read_bytes("manifest.json"))
    assert manifest["stages"]["s"]["status"] == "done"
    assert set(manifest["stages"]["s"]["outputs"]) == {"sub/a.txt", "b.bin", "stats.json"}
    assert store.read_bytes(objectstore.LEASE_NAME) is None  # released

    _other_cache(tmp_path, monkeypatch, "cache2")
    again = RunDir(uri)
    assert again.root != run.root and not again.stage_dir("s").exists()
    assert again.run_stage("s", "fp", _stage("never")).skipped  # done: judged on the store
    again.fetch("s")
    assert (again.stage_dir("s") / "sub" / "a.txt").read_text() == "hello"
    assert not again.run_stage("s", "fp2", _stage("new")).skipped  # another fingerprint: redone
    assert store.read_bytes("s/sub/a.txt") == b"new"


def test_a_failed_upload_leaves_the_stage_not_done(s3_bucket, tmp_path, monkeypatch, quick_lease):
    """The manifest is written only after every file is uploaded: a kill during the upload (here
    an error after the first file) leaves the stage running/failed, and the next run redoes it."""
    uri = f"s3://{s3_bucket}/runs/two"
    run = RunDir(uri)
    run.run_stage("s", "fp", _stage("old"))  # a done stage, then redone with a new fingerprint

    def upload_one_file_then_die(self, stage, folder, outputs):
        self.delete_tree(stage)
        first = sorted(outputs)[0]
        self.write_bytes(f"{stage}/{first}", (folder / first).read_bytes())
        raise KeyboardInterrupt("killed during the upload")

    monkeypatch.setattr(Store, "upload_stage", upload_one_file_then_die)
    with pytest.raises(KeyboardInterrupt):
        run.run_stage("s", "fp2", _stage("new"))
    monkeypatch.undo()
    _other_cache(tmp_path, monkeypatch, "cache2")
    fresh = RunDir(uri)
    assert fresh.entry("s")["status"] == "running"  # as a kill leaves it
    assert not fresh.is_done("s", "fp2") and not fresh.is_done("s", "fp")
    r = fresh.run_stage("s", "fp2", _stage("new"))
    assert not r.skipped and fresh.is_done("s", "fp2")
    assert fresh.store.read_bytes("s/sub/a.txt") == b"new"


def test_changed_objects_are_found_and_the_stage_redone(s3_bucket, tmp_path, monkeypatch,
                                                         quick_lease):
    uri = f"s3://{s3_bucket}/runs/three"
    RunDir(uri).run_stage("s", "fp", _stage("hello"))
    _other_cache(tmp_path, monkeypatch, "cache2")
    run = RunDir(uri)
    run.store.write_bytes("s/sub/a.txt", b"hi")  # another size
    assert run.stale_reason("s", "fp") == (f"output s/sub/a.txt has 2 bytes in {uri}, 5 when the "
                                           f"stage finished")
    run.store.delete("s/b.bin")
    assert run.stale_reason("s", "fp") == f"output s/b.bin is missing from {uri}"
    assert not run.run_stage("s", "fp", _stage("hello")).skipped

    run.store.write_bytes("s/sub/a.txt", b"HELLO")  # the same size: the digest tells
    _other_cache(tmp_path, monkeypatch, "cache3")
    run = RunDir(uri)
    assert run.stale_reason("s", "fp") is None  # sizes only
    with pytest.raises(RunDirError, match=r"s/sub/a.txt has changed since the stage finished "
                                          r"\(digest\); run pipeline.run again with --verify"):
        run.fetch("s")
    assert "has changed since" in run.stale_reason("s", "fp", digests=True)
    run.verify_digests = True
    assert not run.run_stage("s", "fp", _stage("hello")).skipped
    run.fetch("s")
    assert (run.stage_dir("s") / "sub" / "a.txt").read_text() == "hello"


def test_report_files_are_uploaded_and_ray_storage_is_the_store(s3_bucket, quick_lease):
    run = RunDir(f"s3://{s3_bucket}/runs/four")
    with run.lock():
        run.write_text("config.resolved.yaml", "name: x\n")
    assert run.store.read_bytes("config.resolved.yaml") == b"name: x\n"
    storage = run.train_storage()
    assert storage.path == f"{s3_bucket}/runs/four/train_ray" and storage.filesystem is run.store.fs
    assert storage.run_uri("hmn-1") == f"s3://{s3_bucket}/runs/four/train_ray/hmn-1"
    with pytest.raises(RunDirError, match="written without holding its lease"):
        run.write_text("config.resolved.yaml", "name: y\n")


# -- the lease ---------------------------------------------------------------------------------

HOLDER = """
import sys, time
from pipeline.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    time.sleep(120)
"""


def _hold(uri: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, uri], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "locked":
        proc.kill()
        raise RuntimeError("the holder did not start")
    return proc


def test_the_lease_refuses_a_second_writer_and_a_reader_and_is_taken_over_when_killed(
        s3_bucket, tmp_path, monkeypatch, quick_lease, caplog):
    from pipeline.evaluate import InputError, reading

    uri = f"s3://{s3_bucket}/runs/five"
    holder = _hold(uri)
    try:
        _other_cache(tmp_path, monkeypatch, "elsewhere")  # not the holder's cache: the lease refuses
        with pytest.raises(RunDirLocked, match=rf"{uri}: another run holds it: pid {holder.pid} "
                                               rf"on host {socket.gethostname()}"):
            RunDir(uri).run_stage("s", "fp", _stage("x"))
        with pytest.raises(InputError, match=f"a run is writing it: pid {holder.pid}"):
            with reading(uri):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with caplog.at_level(logging.WARNING, logger="pipeline.objectstore"):
        assert not RunDir(uri).run_stage("s", "fp", _stage("x")).skipped
    assert f"taking over the lease of pid {holder.pid}" in caplog.text


def test_a_live_lease_of_another_host_is_refused_and_an_abandoned_one_taken_over(
        s3_bucket, quick_lease):
    run = RunDir(f"s3://{s3_bucket}/runs/six")
    other = {"owner": "x", "pid": 1, "host": "other-host", "started": time.time(),
             "command": "python -m pipeline.run"}
    run.store.write_bytes(objectstore.LEASE_NAME, json.dumps({**other, "heartbeat": time.time()}).encode())
    with pytest.raises(RunDirLocked, match="pid 1 on host other-host.*lease renewed 0 s ago"):
        run.run_stage("s", "fp", _stage("x"))
    old = time.time() - objectstore.LEASE_TTL_S - 1
    run.store.write_bytes(objectstore.LEASE_NAME, json.dumps({**other, "heartbeat": old}).encode())
    assert not run.run_stage("s", "fp", _stage("x")).skipped


def test_a_run_that_lost_its_lease_does_not_commit(s3_bucket, quick_lease):
    run = RunDir(f"s3://{s3_bucket}/runs/seven")
    with run.lock():
        thief = {"owner": "thief", "pid": 1, "host": "other-host", "started": time.time(),
                 "heartbeat": time.time(), "command": "?"}
        run.store.write_bytes(objectstore.LEASE_NAME, json.dumps(thief).encode())
        with pytest.raises(RunDirLocked, match="no longer holds the run directory's lease"):
            run.run_stage("s", "fp", _stage("x"))
    assert run.store.read_bytes("manifest.json") is None
    assert json.loads(run.store.read_bytes(objectstore.LEASE_NAME))["owner"] == "thief"  # kept


def test_a_missing_bucket_and_an_experiment_are_refused_in_one_line(s3_bucket, capsys):
    from pipeline.run import main

    assert main(["--run-dir", "s3://no-such-bucket/x", "--stages", "generate"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: s3://no-such-bucket/x: cannot use the store: ")
    assert "bucket does not exist" in err and err.count("\n") == 1
    assert main(["--run-dir", f"s3://{s3_bucket}/x", "--experiment", "table1"]) == 2
    assert capsys.readouterr().err == (f"error: --experiment: needs a local run directory, not "
                                       f"s3://{s3_bucket}/x (its variants link each other's "
                                       f"stages)\n")
