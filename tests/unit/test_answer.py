"""pipeline.answer's inputs and errors, without a trained run (the answers themselves are tested
on the smoke run in tests/integration/test_pipeline.py)."""

import bz2
import gzip
import json

import pytest

from pipeline.answer import main, read_questions
from pipeline.evaluate import InputError

SQ_LINE = "www.freebase.com/m/01\twww.freebase.com/film/film/genre\twww.freebase.com/m/02\t{}"


@pytest.mark.parametrize("opener", [open, gzip.open, bz2.open], ids=["plain", "gz", "bz2"])
def test_read_questions_takes_lines_and_the_simplequestions_question_column(tmp_path, opener):
    suffix = {open: "", gzip.open: ".gz", bz2.open: ".bz2"}[opener]
    path = tmp_path / f"q.txt{suffix}"
    with opener(path, "wt") as f:
        f.write("what is the book e about\n" + SQ_LINE.format(" who directed x ") + "\n")
    assert read_questions(path) == ["what is the book e about", "who directed x"]


@pytest.mark.parametrize("text, message", [
    ("a question\n\nanother\n", ":2: empty question"),
    (SQ_LINE.format("  ") + "\n", ":1: empty question"),
    ("fine\nonly\ttwo\n", ":2: expected a question or 4 tab-separated"),
    ("", "has no questions"),
])  # fmt: skip
def test_read_questions_names_the_bad_line(tmp_path, text, message):
    path = tmp_path / "q.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_questions(path)


def _cli_error(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err  # one line, no traceback
    return err


def test_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert "does not exist" in _cli_error(capsys, ["--run-dir", str(run), "q"])
    run.mkdir()
    assert "not a run directory" in _cli_error(capsys, ["--run-dir", str(run), "q"])
    (run / "config.resolved.yaml").write_text("name: smoke\n")
    for stage in ("ingest/kb", "memory", "train"):
        (run / stage).mkdir(parents=True)
    # the train stage never published its model (a failed or running training)
    (run / "manifest.json").write_text(json.dumps({"stages": {"train": {"status": "failed"}}}))
    err = _cli_error(capsys, ["--run-dir", str(run), "q"])
    assert "train stage has not finished (manifest: failed)" in err
    assert "does not exist" in _cli_error(capsys, ["--run-dir", str(run), "--questions",
                                                   str(tmp_path / "none.txt")])
    assert "one of the two" in _cli_error(capsys, ["--run-dir", str(run)])
    assert "question 2 is empty" in _cli_error(capsys, ["--run-dir", str(run), "q", " "])
    assert "k=0" in _cli_error(capsys, ["--run-dir", str(run), "--k", "0", "q"])
