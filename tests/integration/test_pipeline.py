"""The whole pipeline end to end on a tiny synthetic knowledge base, on one shared local Ray."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hmn.formats.keys import normalize_key
from hmn.kb import SKIP_DUPLICATE_NAME, SKIP_NOT_IN_KB
from pipeline.driver import Pipeline
from pipeline.report import write_report
from pipeline.rundir import RunDir

from .cli_runs import copy_upstream, finish, run_cli

ROOT = Path(__file__).resolve().parents[2]

# smoke_run: the session fixture of conftest.py (every stage with 2 Ray Train workers, on TINY)


def test_every_stage_runs_and_the_report_is_written(smoke_run):
    cfg, run, results = smoke_run
    assert [r.name for r in results.values()] == ["generate", "ingest", "embed", "memory", "train", "evaluate"]
    assert not any(r.skipped for r in results.values())
    table = write_report(run, results)
    assert "| dev (150 q) | exact |" in table
    report = json.loads((run.stage_dir("evaluate") / "report.json").read_text())
    dev = report["splits"]["dev"]["readers"]
    # 600 facts: chance is ~0.002; the trained reader must be far above it.
    assert dev["exact"]["accuracy"] > 0.3
    assert dev["exact"]["facts_per_query"] == 600
    assert dev["clustered"]["facts_per_query"] < 600
    assert 0.0 < dev["clustered"]["recall10_vs_exact"] <= 1.0
    assert (run.root / "config.resolved.yaml").exists()
    assert (run.root / "report.json").exists()


def test_training_used_two_workers_and_loss_fell(smoke_run):
    _, run, _ = smoke_run
    stats = json.loads((run.stage_dir("train") / "stats.json").read_text())
    assert stats["num_workers"] == 2
    losses = [h["loss"] for h in stats["history"]]
    assert losses[-1] < losses[0]
    assert stats["artificial_questions"] > 0
    assert stats["mean_softmax_size"] < 600  # K-softmax over the batch union, not the whole memory
    state = torch.load(run.stage_dir("train") / "model.pt", weights_only=False)
    assert set(state["fingerprints"]) == {"ingest", "embeddings", "memory", "train"}


def check_ingest_accounting(ingest: Path) -> dict:
    """The ingest's counts against its source files and its own output files: per source,
    lines (counted in the file) == accepted + rejected + skipped; the rejects table holds one
    row per rejected line (and per skipped name line), each source's accepted questions are the
    rows of its split's Parquet file, and the fact lines accepted, less those merged into an
    earlier line's fact, are the rows of facts.parquet. Returns the stats."""
    stats = json.loads((ingest / "stats.json").read_text())
    rejects = pq.read_table(ingest / "rejects.parquet").to_pylist()
    skip_reasons = {SKIP_NOT_IN_KB, SKIP_DUPLICATE_NAME}
    fact_rows, question_rows = 0, {}
    for path, s in stats["sources"].items():
        with open(path, "rb") as f:
            assert s["lines"] == sum(1 for _ in f), path
        assert min(s["accepted"], s["rejected"], s["skipped"]) >= 0, (path, s)
        assert s["lines"] == s["accepted"] + s["rejected"] + s["skipped"], (path, s)
        rows = [r for r in rejects if r["source"] == path]
        assert sum(r["reason"] not in skip_reasons for r in rows) == s["rejected"], path
        assert sum(r["reason"] in skip_reasons for r in rows) == s["skipped"], path
        assert len({r["line"] for r in rows}) == len(rows), path  # one row per line
        if s["kind"] == "facts":
            fact_rows += s["accepted"] - s["merged_lines"]
        if s["kind"] == "questions":
            question_rows[s["split"]] = question_rows.get(s["split"], 0) + s["accepted"]
            q = pq.read_table(ingest / "questions" / f"{s['split']}.parquet")
            q_lines = [ln for ln, src in zip(q["line"].to_pylist(), q["source"].to_pylist())
                       if src == path]  # fmt: skip
            assert len(q_lines) == s["accepted"], path
            # every line is either a question row or a reject row, never both
            assert sorted(q_lines + [r["line"] for r in rows]) == list(range(1, s["lines"] + 1))
    assert pq.read_metadata(ingest / "kb" / "facts.parquet").num_rows == fact_rows
    assert fact_rows == stats["totals"]["facts"]
    for split, n in question_rows.items():
        assert pq.read_metadata(ingest / "questions" / f"{split}.parquet").num_rows == n, split
    assert question_rows == stats["totals"]["questions"]
    return stats


def test_counts_add_up_in_ingest(smoke_run):
    _, run, _ = smoke_run
    stats = check_ingest_accounting(run.stage_dir("ingest"))
    kinds = sorted(s["kind"] for s in stats["sources"].values())
    assert kinds == ["facts", "names", "questions", "questions", "questions"]
    kb_lines = sum(1 for _ in open(run.stage_dir("generate") / "kb.txt"))
    assert kb_lines == 600 == stats["totals"]["facts"]


def test_counts_add_up_in_ingest_with_bad_lines(smoke_run, tmp_path):
    """The run's generated files with a few lines of every kind of reject and skip appended,
    ingested again (no other stage): the same accounting, with nonzero counts."""
    from pipeline.stages.ingest import IngestSources, run_ingest

    _, run, _ = smoke_run
    gen = run.stage_dir("generate")
    for name in ("kb.txt", "names.tsv", "questions_train.txt", "questions_dev.txt",
                 "questions_test.txt"):
        shutil.copy(gen / name, tmp_path / name)
    facts = [ln.split("\t") for ln in (gen / "kb.txt").read_text().splitlines()]
    pairs = {(s, r) for s, r, _ in facts}
    subject = facts[0][0]
    relation = next(r for _, r, _ in facts if (subject, r) not in pairs)  # known, not with subject
    name_line = (gen / "names.tsv").read_text().splitlines()[0]

    def append(name: str, lines: list[str]) -> None:
        with open(tmp_path / name, "a") as f:
            f.write("".join(ln + "\n" for ln in lines))

    append("kb.txt", [
        f"{facts[0][0]}\t{facts[0][1]}",  # malformed: 2 fields
        f"{facts[1][0]}\t{facts[1][1]}\twww.freebase.com/m/0zzzzzz",  # merges into fact 1
    ])
    append("names.tsv", ["www.freebase.com/m/0notinkb\tNobody",  # skipped: not in the KB
                         name_line.split("\t")[0] + "\tSecond Name"])  # skipped: duplicate
    append("questions_dev.txt", [
        f"{subject}\t{relation}\twww.freebase.com/m/01\tno such fact",  # no (subject, relation)
        f"www.freebase.com/m/0nosubject\t{relation}\twww.freebase.com/m/01\tunknown subject",
    ])
    srcs = IngestSources(facts=[str(tmp_path / "kb.txt")], names=[str(tmp_path / "names.tsv")],
                         questions={split: [str(tmp_path / f"questions_{split}.txt")]
                                    for split in ("train", "dev", "test")})  # fmt: skip
    out = tmp_path / "ingest"
    run_ingest(srcs, str(out))
    stats = check_ingest_accounting(out)
    s = {Path(p).name: v for p, v in stats["sources"].items()}
    assert (s["kb.txt"]["rejected"], s["kb.txt"]["merged_lines"]) == (1, 1)
    assert (s["names.tsv"]["rejected"], s["names.tsv"]["skipped"]) == (0, 2)
    assert (s["questions_dev.txt"]["rejected"], s["questions_dev.txt"]["accepted"]) == (2, 150)
    reasons = pq.read_table(out / "rejects.parquet").column("reason").to_pylist()
    assert f"no fact ({normalize_key(subject)}, {normalize_key(relation)}) in the knowledge base" \
        in reasons
    assert stats["totals"]["facts"] == 600


def test_rerun_skips_finished_stages(smoke_run):
    cfg, run, _ = smoke_run
    again = Pipeline(cfg, run).execute()
    assert all(r.skipped for r in again.values())


def test_stages_subset_stops_after_its_last_stage(smoke_run, tmp_path):
    cfg, run, _ = smoke_run
    # a fresh run directory: --stages generate,ingest runs those two and asks nothing of embed
    fresh = RunDir(tmp_path / "subset")
    results = Pipeline(cfg, fresh, only=("ingest", "generate")).execute()
    assert list(results) == ["generate", "ingest"]
    assert not any(r.skipped for r in results.values())
    assert fresh.is_done("ingest", fresh.manifest()["stages"]["ingest"]["fingerprint"])
    assert not fresh.stage_dir("embed").exists()
    # a stage whose upstream is missing still says which one
    with pytest.raises(RuntimeError, match="stage 'generate' is needed"):
        Pipeline(cfg, RunDir(tmp_path / "other"), only=("memory",)).execute()
    # on the finished run, --stages memory skips memory and stops there
    again = Pipeline(cfg, run, only=("memory",)).execute()
    assert list(again) == ["generate", "ingest", "embed", "memory"]
    assert all(r.skipped for r in again.values())


def test_batch_evaluation_counts_unknowns(smoke_run, tmp_path, capsys):
    from pipeline.evaluate import main as evaluate_main

    _, run, _ = smoke_run
    dev = (run.stage_dir("generate") / "questions_dev.txt").read_text().splitlines()
    bad = [
        "www.freebase.com/m/0zzzz\twww.freebase.com/people/person/place_of_birth\twww.freebase.com/m/0x\twho is it",
        dev[0].split("\t")[0] + "\twww.freebase.com/no/such/relation\twww.freebase.com/m/0x\twhat is it",
        "only\ttwo",
        dev[1].split("\t")[0] + "\t" + dev[1].split("\t")[1] + "\t" + dev[1].split("\t")[2] + "\tqwxz vbnm",
    ]
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(dev[:50] + bad) + "\n")
    assert evaluate_main(["--run-dir", str(run.root), "--questions", str(qfile)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["questions"] == 53 and out["malformed_lines"] == 1 and out["lines"] == 54
    assert out["unknown_subject"] == 1 and out["unknown_relation"] == 1
    assert out["questions_with_unknown_fact"] == 2
    assert out["questions_without_known_words"] >= 1
    assert 0.0 <= out["accuracy"] <= out["accuracy_known_facts"] <= 1.0
    assert "exact" in out["readers"]


def test_answer_agrees_with_batch_evaluation_and_names_the_facts(smoke_run, tmp_path):
    """pipeline.answer's top fact for every dev question has the subject and relation of
    pipeline.evaluate's prediction, with the run's infer reader and with clustered."""
    from pipeline import answer, evaluate
    from pipeline.answer import read_questions
    from pipeline.artifacts import KnowledgeBase

    cfg, run, _ = smoke_run
    dev = run.stage_dir("generate") / "questions_dev.txt"
    out = evaluate(run.root, dev, readers=["exact", "clustered"], output=tmp_path / "p.parquet")
    assert out["malformed_lines"] == 0 and out["questions"] == 150  # rows align with the lines
    pred = pq.read_table(tmp_path / "p.parquet")
    kb = KnowledgeBase.load(run.stage_dir("ingest"))
    questions = read_questions(dev)
    assert cfg.train.infer_reader == "exact"
    for reader in (None, "clustered"):
        answers = answer(run.root, questions, k=3, reader=reader)
        assert len(answers) == len(questions)
        name = reader or cfg.train.infer_reader
        expected = pred[f"pred_{name}"].to_numpy()
        got = [(a["facts"][0]["subject"]["key"], a["facts"][0]["relation"]) for a in answers]
        want = [(kb.entity_keys[kb.fact_subject[f]], kb.relation_keys[kb.fact_relation[f]])
                for f in expected]
        assert got == want, name
        assert all(a["reader"] == name and len(a["facts"]) == 3 for a in answers)
        assert all(a["facts"][0]["score"] >= a["facts"][1]["score"] for a in answers)
    # names: the subject's and the objects', as the knowledge base has them
    top = answers[0]["facts"][0]
    fact = top["fact_id"]
    assert top["subject"]["name"] == kb.entity_names[kb.fact_subject[fact]] is not None
    objects = kb.object_values[kb.object_offsets[fact]:kb.object_offsets[fact + 1]]
    assert [o["key"] for o in top["objects"]] == [kb.entity_keys[o] for o in objects]
    assert [o["name"] for o in top["objects"]] == [kb.entity_names[o] for o in objects]
    assert any(o["name"] for a in answers for f in a["facts"] for o in f["objects"])


def test_answer_reports_unknown_words_and_needs_no_ray(smoke_run):
    _, run, _ = smoke_run
    first = (run.stage_dir("generate") / "questions_dev.txt").read_text().splitlines()[0]
    question = first.split("\t")[3]
    code = (
        "import json, sys\n"
        "from pipeline.answer import main\n"
        "rc = main(sys.argv[1:])\n"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "sys.exit(rc or (3 if bad else 0))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code, "--run-dir", str(run.root), "--k", "2",
                          question, f"{question} zqxj", "qwxz vbnm"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr  # 3: Ray was imported
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [a["question"] for a in lines] == [question, f"{question} zqxj", "qwxz vbnm"]
    assert [a["unknown_words"] for a in lines] == [[], ["zqxj"], ["qwxz", "vbnm"]]
    ids = [[f["fact_id"] for f in a["facts"]] for a in lines]
    assert ids[0] == ids[1]  # the unknown word changes nothing else
    assert "no known word" in out.stderr  # the third one's answer is arbitrary, and says so


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_result(reference_run, tmp_path):
    """SIGKILL the driver after the first training checkpoint; the re-run resumes and matches the
    undisturbed run (``reference_run``: the same command and settings, once per session)."""
    straight = reference_run
    # The killed run starts from a copy of the straight run's finished upstream stages (generate
    # to memory: what is tested is a kill during training), so only training and evaluation run
    # twice; the copy's manifest keeps those stages' fingerprints, hence they are skipped.
    killed = tmp_path / "killed"
    copy_upstream(straight, killed)
    p = run_cli(killed)
    deadline = time.time() + 600
    ckpt_root = killed / "train_ray"
    while time.time() < deadline:
        if p.poll() is not None:
            pytest.fail("run ended before it could be killed:\n" + p.stdout.read()[-3000:])
        if ckpt_root.exists() and any(ckpt_root.glob("hmn-*/checkpoint_*")):
            break
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert not RunDir(killed).is_done("train", RunDir(killed).entry("train")["fingerprint"])
    out = finish(run_cli(killed))
    assert "[ingest] done already" in out  # finished stages are not redone
    assert "resuming at epoch" in out       # training restarts from its last checkpoint

    a = json.loads((straight / "evaluate" / "report.json").read_text())
    b = json.loads((killed / "evaluate" / "report.json").read_text())
    assert a["splits"] == b["splits"]
    ma = torch.load(straight / "train" / "model.pt", weights_only=False)["model"]
    mb = torch.load(killed / "train" / "model.pt", weights_only=False)["model"]
    for k in ma:
        assert np.array_equal(ma[k].numpy(), mb[k].numpy())
