"""benchmarks/chaos.py without the pipeline: the schedule is seeded, and the comparison with the
reference counts a run that differs as a wrong result, not as survived."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_chaos", ROOT / "benchmarks" / "chaos.py")
chaos = importlib.util.module_from_spec(_spec)
sys.modules["bench_chaos"] = chaos  # dataclasses look their module up
_spec.loader.exec_module(chaos)


def test_the_schedule_is_seeded_and_balanced():
    a = chaos.make_schedule(30, seed=4)
    assert a == chaos.make_schedule(30, seed=4)
    assert a != chaos.make_schedule(30, seed=5)
    assert chaos.make_schedule(12, seed=4) == a[:12]  # a longer schedule extends a shorter one
    assert [f.index for f in a] == list(range(30))
    assert {k: sum(f.kind == k for f in a) for k in chaos.KINDS} == dict.fromkeys(chaos.KINDS, 6)
    assert sorted(f.mode for f in a if f.kind == "corrupt_output") == sorted(chaos.CORRUPT_MODES * 2)
    for f in a:
        assert 0.0 <= f.at <= 0.9 and 0.0 <= f.pick < 1.0
        if f.kind == "corrupt_output":
            assert f.start == "" and f.target in chaos.STAGES and f.mode in chaos.CORRUPT_MODES
        else:
            assert f.start in (chaos.RAY_STAGES if f.kind == "kill_worker" else chaos.STAGES)
    two = chaos.make_schedule(8, seed=4, kinds=("kill_driver", "corrupt_output"))
    assert {f.kind for f in two} == {"kill_driver", "corrupt_output"}
    with pytest.raises(ValueError, match="unknown"):
        chaos.make_schedule(3, seed=0, kinds=("kill_everything",))


def _snap(accuracy: float = 0.75, weight: float = 1.0, digest: str = "aa") -> dict:
    return {
        "report": {"splits": {"dev": {"readers": {"exact": {"accuracy": accuracy}}}}},
        "train": {"best_epoch": 3},
        "history": [{"epoch": 0, "loss": 1.0}],
        "model": {"model": {"words.weight": torch.full((3, 2), weight)}, "dim": 2},
        "files": {"embed/entities.parquet": digest},
    }


def test_compare_names_every_difference():
    assert chaos.compare(_snap(), _snap()) == []
    assert chaos.compare(_snap(), _snap(accuracy=0.74)) == [
        "report.splits.dev.readers.exact.accuracy: 0.75 != 0.74"]
    assert chaos.compare(_snap(), _snap(weight=1.5)) == ["model.model.words.weight: tensors differ"]
    assert chaos.compare(_snap(), _snap(digest="bb")) == [
        "files.embed/entities.parquet: 'aa' != 'bb'"]
    missing = _snap()
    del missing["files"]["embed/entities.parquet"]
    assert chaos.compare(_snap(), missing) == ["files.embed/entities.parquet: missing on one side"]


def _record(index: int, rc: int = 0, **kw) -> dict:
    return {"index": index, "kind": "kill_driver", "delivered": True,
            "attempts": [{"rc": -9, "timed_out": False}, {"rc": rc, "timed_out": False}], **kw}


def test_a_run_that_differs_is_a_wrong_result(monkeypatch, tmp_path):
    ref = _snap()
    finished = {"same": _snap(), "other": _snap(accuracy=0.5)}
    monkeypatch.setattr(chaos, "snapshot", lambda run, reference=None: finished[run.name])
    monkeypatch.setattr(chaos, "lost", lambda run: [])
    same, other, unfinished = _record(0), _record(1), _record(2, rc=1)
    chaos.judge(same, ref, tmp_path / "same")
    chaos.judge(other, ref, tmp_path / "other")
    chaos.judge(unfinished, ref, tmp_path / "same")
    assert same["outcome"] == "survived"
    assert other["outcome"] == "wrong_result"
    assert other["differences"] == ["report.splits.dev.readers.exact.accuracy: 0.75 != 0.5"]
    assert unfinished["outcome"] == "failed"
    counts = chaos.tally([same, other, unfinished])
    assert (counts["faults"], counts["survived"], counts["wrong_results"]) == (3, 1, 1)
    assert [n["index"] for n in counts["neither"]] == [2]


def test_lost_rows_are_a_wrong_result_and_unmet_expectations_are_neither(monkeypatch, tmp_path):
    monkeypatch.setattr(chaos, "snapshot", lambda run, reference=None: _snap())
    monkeypatch.setattr(chaos, "lost", lambda run: ["ingest accounting: AssertionError"])
    r = _record(0)
    chaos.judge(r, _snap(), tmp_path)
    assert r["outcome"] == "wrong_result"
    monkeypatch.setattr(chaos, "lost", lambda run: [])
    refused_late = _record(1, problems=["the second start was not refused"])
    stuck = _record(2, rc=1)
    stuck["attempts"][0]["timed_out"] = True
    not_delivered = {**_record(3), "delivered": False}
    for rec in (refused_late, stuck, not_delivered):
        chaos.judge(rec, _snap(), tmp_path)
    assert (refused_late["outcome"], stuck["outcome"]) == ("failed", "stuck")
    counts = chaos.tally([r, refused_late, stuck, not_delivered])
    assert (counts["faults"], counts["survived"], counts["wrong_results"]) == (3, 0, 1)
    assert counts["not_delivered"] == [3]


def test_parquet_rows_are_compared_with_the_run_directory_made_relative(tmp_path):
    """The ingest's rows name their source file by its absolute path: a copy of the run (or of
    the reference) gives the same digest, another row does not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(name: str, root: str, question: str) -> Path:
        path = tmp_path / name
        pq.write_table(pa.table({"question": [question], "line": [1],
                                 "source": [f"{root}/generate/questions_dev.txt"]}), path)
        return path

    ref, run = str(tmp_path / "reference"), str(tmp_path / "f03" / "run")
    a = chaos._parquet_digest(write("a.parquet", ref, "who wrote it"), (ref,))
    assert chaos._parquet_digest(write("b.parquet", run, "who wrote it"), (run, ref)) == a
    assert chaos._parquet_digest(write("c.parquet", ref, "who wrote it"), (run, ref)) == a
    assert chaos._parquet_digest(write("d.parquet", run, "who read it"), (run, ref)) != a


def test_index_json_is_compared_without_its_timings(tmp_path):
    """The index's index.json carries k-means timings: a redone memory stage with the same
    index must compare equal, and one with a different index must not."""
    import json

    assert "memory/index/index.json" in chaos.TIMED_JSON
    doc = {"n": 600, "stats": {"seconds": 0.27, "levels": [{"kmeans": [
        {"iteration": 0, "objective": 444.5, "seconds": 0.02}]}]}}
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(doc))
    doc["stats"]["seconds"] = 0.9
    doc["stats"]["levels"][0]["kmeans"][0]["seconds"] = 0.05
    b.write_text(json.dumps(doc))
    doc["stats"]["levels"][0]["kmeans"][0]["objective"] = 444.6
    c.write_text(json.dumps(doc))
    digest = chaos._json_digest_without_timings
    assert digest(a) == digest(b)
    assert digest(a) != digest(c)


def test_rejudge_recounts_kept_wrong_results_and_keeps_the_first_verdict(tmp_path, monkeypatch):
    (tmp_path / "f01-kill_worker" / "run").mkdir(parents=True)  # kept: judged again
    result = {"records": [
        {"index": 0, "kind": "kill_driver", "at": 0.5, "seconds": 9.0, "delivered": True, "outcome": "survived",
         "attempts": [{"rc": 0, "timed_out": False}]},
        {"index": 1, "kind": "kill_worker", "at": 0.5, "seconds": 9.0, "delivered": True, "outcome": "wrong_result",
         "differences": ["files.memory/index/index.json: 'a' != 'b'"],
         "attempts": [{"rc": 0, "timed_out": False}]},
        {"index": 2, "kind": "kill_worker", "at": 0.5, "seconds": 9.0, "delivered": True, "outcome": "wrong_result",
         "differences": ["report: x"], "attempts": [{"rc": 0, "timed_out": False}]},  # no folder
    ]}
    monkeypatch.setattr(chaos, "snapshot", lambda run, reference=None: {"root": str(run)})
    monkeypatch.setattr(chaos, "compare", lambda ref, got: [])
    monkeypatch.setattr(chaos, "lost", lambda run: [])
    import copy

    out = chaos.rejudge(copy.deepcopy(result), tmp_path)
    assert out["rejudged"] == [1] and out["redelivered"] == []
    assert out["records"][1]["outcome"] == "survived"
    assert out["records"][1]["first_judgement"]["outcome"] == "wrong_result"
    assert out["records"][2]["outcome"] == "wrong_result"  # its folder is gone: left as judged
    assert (out["faults"], out["survived"], out["wrong_results"]) == (3, 2, 1)
    # with a way to deliver a fault again, the one without a folder is run again
    fresh = {"index": 2, "kind": "kill_worker", "at": 0.5, "seconds": 9.0, "delivered": True,
             "outcome": "survived", "attempts": [{"rc": 0, "timed_out": False}]}
    out = chaos.rejudge(copy.deepcopy(result), tmp_path, redeliver=lambda i: dict(fresh))
    assert out["redelivered"] == [2] and out["records"][2]["outcome"] == "survived"
    assert out["records"][2]["first_judgement"]["differences"] == ["report: x"]
    assert (out["faults"], out["survived"], out["wrong_results"]) == (3, 3, 0)
