import json
import os

import pytest

from pipeline.rundir import RunDir, input_signature


def test_stage_skips_when_done_and_reruns_on_new_fingerprint(tmp_path):
    run = RunDir(tmp_path / "run")
    calls = []

    def stage(out):
        calls.append(out.name)
        (out / "x.txt").write_text("hello")
        return {"rows": 1}

    r1 = run.run_stage("s", "fp1", stage)
    assert not r1.skipped and (run.stage_dir("s") / "x.txt").read_text() == "hello"
    assert run.run_stage("s", "fp1", stage).skipped
    assert not run.run_stage("s", "fp2", stage).skipped
    assert len(calls) == 2
    assert run.entry("s")["stats"] == {"rows": 1}
    assert not list(run.root.glob(".s.tmp-*"))


def test_failed_stage_leaves_no_output_and_reruns(tmp_path):
    run = RunDir(tmp_path / "run")

    def boom(out):
        (out / "partial").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run.run_stage("s", "fp", boom)
    assert not run.stage_dir("s").exists()
    assert run.entry("s")["status"] == "failed"
    # a stale staging folder (as a SIGKILL would leave) is removed on the next run
    assert list(run.root.glob(".s.tmp-*"))
    r = run.run_stage("s", "fp", lambda out: {"ok": True})
    assert not r.skipped and run.is_done("s", "fp")
    assert not list(run.root.glob(".s.tmp-*"))


def test_input_signature_follows_content_not_mtime(tmp_path):
    cache = tmp_path / "run" / ".input-digests.json"
    a = tmp_path / "kb.txt"
    a.write_text("m.1\tr\tm.2\n")
    first = input_signature((str(a),), cache)
    assert json.loads(cache.read_text())[os.path.realpath(a)]["digest"] == first[0][2]

    # the same bytes written again later (a fresh copy of shared data): same signature
    os.utime(a, (1_000_000, 1_000_000))
    assert input_signature((str(a),), cache) == first
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "kb.txt").write_bytes(a.read_bytes())
    assert input_signature((str(copy / "kb.txt"),), cache)[0][1:] == first[0][1:]

    # other content of the same size (the write changes the mtime): a new digest
    a.write_text("m.1\tr\tm.3\n")
    changed = input_signature((str(a),), cache)
    assert changed[0][1] == first[0][1] and changed[0][2] != first[0][2]


def test_input_signature_of_a_missing_file_and_without_cache(tmp_path):
    sig = input_signature((str(tmp_path / "absent.txt"),))
    assert sig == [[os.path.realpath(tmp_path / "absent.txt"), None, None]]
    b = tmp_path / "b.txt"
    b.write_text("x")
    assert input_signature((str(b),))[0][2] == input_signature((str(b),))[0][2]
    assert input_signature(()) == []


def test_run_input_signature_uses_the_run_digest_cache(tmp_path):
    run = RunDir(tmp_path / "run")
    a = tmp_path / "kb.txt"
    a.write_text("m.1\tr\tm.2\n")
    sig = run.input_signature((str(a),))
    cached = json.loads((run.root / ".input-digests.json").read_text())
    assert cached[os.path.realpath(a)]["digest"] == sig[0][2]
