"""Progress with rate and ETA (pipeline.progress): plain lines at their cadence (a fake clock),
a bar only on a terminal, and the callbacks of the train stage, the index build and its
piecewise assignment pass."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest

import hmn.index
from hmn.index import build_index_from_vectors
from pipeline.progress import Progress, format_seconds, on_terminal

LOG = "test.progress"


class Clock:
    """A fake monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG]


def test_plain_lines_every_n_seconds_with_rate_and_eta(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    clock = Clock()
    bar = Progress("work", 100, unit="items", every_s=30, log=logging.getLogger(LOG),
                   stream=io.StringIO(), clock=clock)
    assert not bar.is_bar
    for _ in range(100):  # one item a second for 100 s
        clock.now += 1
        bar.update(1)
    assert _lines(caplog) == [
        "work: 30/100 items (30%), 1.00 items/s, ETA 1m10s",
        "work: 60/100 items (60%), 1.00 items/s, ETA 40s",
        "work: 90/100 items (90%), 1.00 items/s, ETA 10s",
    ]
    bar.close()  # lines were logged, so a closing line with the total time
    assert _lines(caplog)[-1] == "work: 100 items in 1m40s (1.00 items/s)"
    bar.close()
    assert len(_lines(caplog)) == 4


def test_the_cadence_follows_the_clock_not_the_updates(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    clock = Clock()
    bar = Progress("scan", 1000, unit="facts", every_s=10, log=logging.getLogger(LOG),
                   stream=io.StringIO(), clock=clock)
    for _ in range(50):  # many quick updates: no line before 10 s have passed
        clock.now += 0.125
        bar.update(4, postfix="objective 1.5")
    assert _lines(caplog) == []
    clock.now += 3.75  # 10 s after the start: one line, at 200 facts in 10 s
    bar.update(0)
    assert _lines(caplog) == ["scan: 200/1000 facts (20%), 20.0 facts/s, ETA 40s, objective 1.5"]
    clock.now += 9.875
    bar.update(100)
    assert len(_lines(caplog)) == 1  # the next one comes 10 s after the last, not before
    clock.now += 0.125
    bar.update(0)
    assert _lines(caplog)[-1] == "scan: 300/1000 facts (30%), 15.0 facts/s, ETA 47s, objective 1.5"


def test_a_short_step_is_silent_unless_final_and_unknown_totals_have_no_eta(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    clock = Clock()
    with Progress("quick", 10, log=logging.getLogger(LOG), stream=io.StringIO(), clock=clock) as b:
        clock.now += 2
        b.update(10)
    assert _lines(caplog) == []
    with Progress("level 0", 20, unit="iterations", final=True, log=logging.getLogger(LOG),
                  stream=io.StringIO(), clock=clock) as b:
        clock.now += 4
        b.update(8, postfix="objective 3")
    assert _lines(caplog) == ["level 0: 8 iterations in 4s (2.00 iterations/s), objective 3"]
    open_ended = Progress("rows", None, unit="rows", every_s=1, log=logging.getLogger(LOG),
                          stream=io.StringIO(), clock=clock)
    clock.now += 2
    open_ended.update(5)
    assert _lines(caplog)[-1] == "rows: 5 rows, 2.50 rows/s, ETA ?"


def test_a_bar_only_on_a_terminal():
    assert on_terminal(Tty()) and not on_terminal(io.StringIO())
    assert not on_terminal(object())  # no isatty: plain lines
    closed = io.StringIO()
    closed.close()
    assert not on_terminal(closed)
    pytest.importorskip("tqdm")
    tty = Tty()
    bar = Progress("TransE epoch 1/3", 50, unit="triples", stream=tty)
    assert bar.is_bar
    bar.update(20, postfix="round 1/2")
    bar.close()
    assert "TransE epoch 1/3" in tty.getvalue() and "20/50" in tty.getvalue()
    assert not Progress("x", 5, stream=io.StringIO()).is_bar
    assert not Progress("x", 5, stream=Tty(), bar=False).is_bar  # someone else draws the bar


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3599, 3600 * 2 + 7 * 60)] == \
        ["0s", "59s", "1m01s", "59m59s", "2h07m"]
    assert format_seconds(None) == format_seconds(float("inf")) == "?"


def test_train_epoch_progress_has_the_epoch_eta_and_mean_loss_on_rank_0_only(caplog):
    from pipeline.stages.train import _EpochProgress

    caplog.set_level(logging.INFO, logger="pipeline.stages.train")
    clock = Clock()
    on_step = _EpochProgress(3, rank=0, every_s=30, total=40, clock=clock, stream=io.StringIO())
    quiet = _EpochProgress(3, rank=1, every_s=30, total=40, clock=clock, stream=io.StringIO())
    for step in range(1, 21):  # a step every 2 s, loss 1.0
        clock.now += 2
        on_step(step, 1.0)
        quiet(step, 1.0)
    on_step.close()
    quiet.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.stages.train"]
    assert lines == ["epoch 3: 15/40 steps (38%), 0.50 steps/s, ETA 50s, mean loss 1.0000",
                     "epoch 3: 20 steps in 40s (0.50 steps/s), mean loss 1.0000"]  # not rank 1


def test_index_progress_lines_per_level_and_assignment_pass(caplog):
    from pipeline.stages.memory import IndexProgress

    caplog.set_level(logging.INFO, logger="pipeline.stages.memory")
    clock = Clock()
    progress = IndexProgress(iters=10, levels=1, clock=clock, stream=io.StringIO())
    for it in range(4):
        clock.now += 1
        progress({"level": 0, "parent": -1, "iteration": it, "objective": 5.0 + it,
                  "imbalance": 1.25, "seconds": 1.0})
    for done in (0, 300, 600, 700):  # the pass reports its start (0 done), then each piece
        clock.now += 1 if done else 0
        progress({"level": 0, "parent": -1, "assign_done": done, "assign_total": 700})
    progress.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.stages.memory"]
    assert lines == ["index level 0: k-means: 4 iterations in 4s (1.00 iterations/s), "
                     "objective 8, imbalance 1.25",
                     "index level 0: assignment pass: 700 facts in 3s (233 facts/s)"]


def test_a_piecewise_assignment_pass_reports_progress_and_assigns_the_same(monkeypatch):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 12)).astype(np.float32)
    spec = dict(branching=[6, 2], seed=0, iters=5, fit_sample=500)
    ref = build_index_from_vectors(x, **spec)
    monkeypatch.setattr(hmn.index, "ASSIGN_PIECE", 700)
    monkeypatch.setattr(hmn.index, "_ASSIGN_BLOCK", 64)
    seen: list[dict] = []
    got = build_index_from_vectors(x, progress=seen.append, **spec)
    np.testing.assert_array_equal(got.fact_leaf, ref.fact_leaf)
    passes = [s for s in seen if "assign_total" in s]
    for level in (0, 1):  # its start, then ceil(3000 / 700) = 5 pieces per pass
        done = [s["assign_done"] for s in passes if s["level"] == level]
        assert len(done) == 6 and done[0] == 0 and done[-1] == 3000 and np.all(np.diff(done) > 0)
