"""Bad input gets a one-line error naming the file, line or field (issue 19, item 4), before any
work on it; no Ray (the evaluation cases use the stand-in run of test_run_integrity)."""

from __future__ import annotations

import gzip
from pathlib import Path
from types import SimpleNamespace

import pytest

from hmn.config import ConfigError, load_config
from hmn.formats.lines import iter_line_chunks
from hmn.formats.parsed import FormatError
from hmn.synthetic import SyntheticSpec, generate
from pipeline import driver
from pipeline.rundir import input_signature
from pipeline.stages.ingest import IngestSources, run_ingest
from tests.unit.test_run_integrity import stages, trained_run  # noqa: F401  (a fixture)

SPEC = SyntheticSpec(entities=200, relations=10, facts=300, train_questions=60, dev_questions=20,
                     test_questions=0, seed=3)  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    return {k: Path(v) for k, v in generate(SPEC, str(d))["files"].items()}


def _sources(files, **kw) -> IngestSources:
    base = dict(facts=[str(files["kb"])], names=[str(files["names"])],
                questions={"train": [str(files["questions_train"])],
                           "dev": [str(files["questions_dev"])]})
    return IngestSources(**{**base, **kw})


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# --- pipeline.evaluate: the questions file --------------------------------------------------

@pytest.mark.parametrize("kind", ["empty", "names", "facts", "directory", "truncated-gz"])
def test_evaluate_refuses_a_questions_file_it_cannot_score(stages, tmp_path, files, kind):  # noqa: F811
    from pipeline.evaluate import InputError, evaluate_run

    run = trained_run(tmp_path / "run")
    path = tmp_path / "questions.txt"
    if kind == "empty":
        path.write_text("")
        want = "questions.txt: empty: no questions"
    elif kind in ("names", "facts"):
        path.write_bytes(files["names" if kind == "names" else "kb"].read_bytes())
        want = r"questions.txt: not a SimpleQuestions question file .* \(line 1: "
    elif kind == "directory":
        path.mkdir()
        want = "questions.txt' is a directory, not a file"
    else:
        data = gzip.compress(files["questions_dev"].read_bytes())
        path = tmp_path / "questions.txt.gz"
        path.write_bytes(data[: len(data) // 2])
        want = "questions.txt.gz: truncated or corrupt compressed file"
    with pytest.raises(InputError, match=want) as e:
        evaluate_run(run.root, path)
    _one_line(e)


# --- ingest ----------------------------------------------------------------------------------

def test_empty_facts_file_fails_ingest_naming_it(files, tmp_path):
    empty = tmp_path / "kb.txt"
    empty.write_text("")
    with pytest.raises(FormatError, match=f"{empty}: empty: a facts file must hold at least one"):
        run_ingest(_sources(files, facts=[str(empty)]), str(tmp_path / "out"))


def test_byte_order_mark_is_stripped_from_names_and_question_files(files, tmp_path):
    from pipeline.evaluate import read_question_file

    bom = b"\xef\xbb\xbf"
    names, train = tmp_path / "names.tsv", tmp_path / "train.txt"
    names.write_bytes(bom + files["names"].read_bytes())
    train.write_bytes(bom + files["questions_train"].read_bytes())
    stats = run_ingest(_sources(files, names=[str(names)],
                                questions={"train": [str(train)],
                                           "dev": [str(files["questions_dev"])]}),
                       str(tmp_path / "out"))
    assert stats["sources"][str(names)]["malformed"] == 0
    assert stats["sources"][str(train)]["malformed"] == 0
    assert stats["totals"]["questions"]["train"] == SPEC.train_questions
    table, lines, malformed = read_question_file(str(train))  # pipeline.evaluate's reader
    assert malformed == 0 and table.num_rows == lines == SPEC.train_questions


def test_directory_given_as_a_data_file_names_the_field(files, tmp_path, capsys):
    from pipeline.run import main

    folder = tmp_path / "data"
    folder.mkdir()
    sets = ["data.source=files", f"data.facts=['{folder}']",
            f"data.questions_train=['{files['questions_train']}']",
            f"data.questions_dev=['{files['questions_dev']}']"]
    with pytest.raises(ConfigError, match=f"data.facts: '{folder}' is a directory, not a file"):
        driver.check_input_files(load_config(None, sets))
    assert main(["--run-dir", str(tmp_path / "run"), *[a for s in sets for a in ("--set", s)]]) == 2
    err = capsys.readouterr().err
    assert err == f"error: data.facts: '{folder}' is a directory, not a file\n"
    with pytest.raises(IsADirectoryError, match=f"{folder}: is a directory"):
        input_signature((str(folder),))
    with pytest.raises(IsADirectoryError, match=f"ingest.sources.facts: {folder} is a directory"):
        run_ingest(_sources(files, facts=[str(folder)]), str(tmp_path / "out"))


def test_truncated_gzip_names_the_file(files, tmp_path):
    data = gzip.compress(files["kb"].read_bytes())
    gz = tmp_path / "kb.txt.gz"
    gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=f"{gz}: truncated or corrupt compressed file") as e:
        run_ingest(_sources(files, facts=[str(gz)]), str(tmp_path / "out"))
    _one_line(e)
    with pytest.raises(FormatError, match=f"{gz}: truncated"):
        list(iter_line_chunks(str(gz)))


# --- the config file -------------------------------------------------------------------------

def test_non_utf8_yaml_names_the_file_and_byte(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=f"{path}: not UTF-8 text \\(byte 0xe9 at offset 9\\)") as e:
        load_config(path)
    _one_line(e)


def test_directory_given_as_config_says_so(tmp_path, capsys):
    from pipeline.run import main

    with pytest.raises(ConfigError, match="is a directory, not a file"):
        load_config(tmp_path)
    assert main(["--config", str(tmp_path)]) == 2
    assert "is a directory, not a file" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_duplicate_yaml_key_names_the_key_and_lines(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("name: a\ntrain:\n  max_epochs: 3\n  patience: 2\n  max_epochs: 4\n")
    with pytest.raises(ConfigError, match=f"{path}:5: not valid YAML: duplicate key 'max_epochs' "
                                          f"\\(first at line 3\\)") as e:
        load_config(path)
    _one_line(e)
    with pytest.raises(ConfigError, match="duplicate key 'a'"):
        load_config(None, ["train.max_epochs={a: 1, a: 2}"])


# --- reader.k against the memory --------------------------------------------------------------

def test_reader_k_above_the_memory_size_fails_naming_the_field(tmp_path):
    from pipeline.rundir import RunDir, write_json_atomic

    run = RunDir(tmp_path / "run")
    (run.stage_dir("ingest")).mkdir()
    write_json_atomic(run.stage_dir("ingest") / "stats.json", {"totals": {"facts": 8}})
    p = SimpleNamespace(cfg=load_config(None, ["reader.k=10"]), run=run, force=False)
    with pytest.raises(ConfigError, match="reader.k=10: more than the 8 facts in the memory"):
        driver._run_train(p, tmp_path / "out", {})
    p.cfg = load_config(None, ["reader.k=5", "eval.recall_k=9"])
    with pytest.raises(ConfigError, match="eval.recall_k=9: more than the 8 facts"):
        driver._run_evaluate(p, tmp_path / "out", {})
