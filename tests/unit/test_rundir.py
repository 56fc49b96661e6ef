import pytest

from pipeline.rundir import RunDir


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
