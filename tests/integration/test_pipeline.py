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
import pytest
import torch

from hmn.config import load_config
from pipeline.driver import Pipeline
from pipeline.report import write_report
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "synthetic.entities=800", "synthetic.relations=20", "synthetic.facts=600",
    "synthetic.train_questions=500", "synthetic.dev_questions=150", "synthetic.test_questions=100",
    "embed.epochs=10", "embed.num_cpus=1", "memory.branching=[8]", "memory.iters=8",
    "reader.top_clusters=2", "train.max_epochs=4", "train.batch_size=64",
]


@pytest.fixture(scope="module")
def smoke_run(ray_local, tmp_path_factory):
    """One run of every stage with 2 Ray Train workers (gloo), shared by the tests below."""
    cfg = load_config(ROOT / "configs/smoke.yaml", TINY + ["train.num_workers=2", "train.cpus_per_worker=1"])
    run = RunDir(tmp_path_factory.mktemp("runs") / "smoke")
    results = Pipeline(cfg, run).execute()
    return cfg, run, results


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


def test_counts_add_up_in_ingest(smoke_run):
    _, run, _ = smoke_run
    stats = json.loads((run.stage_dir("ingest") / "stats.json").read_text())
    text = json.dumps(stats)
    assert "lines" in text
    kb_lines = sum(1 for _ in open(run.stage_dir("generate") / "kb.txt"))
    assert kb_lines == 600


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
    from pipeline import evaluate

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
    assert evaluate.main(["--run-dir", str(run.root), "--questions", str(qfile)]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["questions"] == 53 and out["malformed_lines"] == 1 and out["lines"] == 54
    assert out["unknown_subject"] == 1 and out["unknown_relation"] == 1
    assert out["questions_with_unknown_fact"] == 2
    assert out["questions_without_known_words"] >= 1
    assert 0.0 <= out["accuracy"] <= out["accuracy_known_facts"] <= 1.0
    assert "exact" in out["readers"]


def _run_cli(run_dir: Path, extra: list[str], **kw) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [sys.executable, "-m", "pipeline.run", "--run-dir", str(run_dir)]
    for s in TINY + ["train.num_workers=1", "train.max_epochs=5", "train.patience=5", "ray.num_cpus=3"] + extra:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **kw)


@pytest.mark.slow
def test_killed_run_resumes_with_the_same_result(tmp_path):
    """SIGKILL the driver after the first training checkpoint; the re-run resumes and matches."""
    straight = tmp_path / "straight"
    p = _run_cli(straight, [])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]

    # The killed run starts from a copy of the straight run's finished upstream stages (generate
    # to memory: what is tested is a kill during training), so only training and evaluation run
    # twice; the copy's manifest keeps those stages' fingerprints, hence they are skipped.
    killed = tmp_path / "killed"
    killed.mkdir()
    for stage in ("generate", "ingest", "embed", "memory"):
        shutil.copytree(straight / stage, killed / stage)
    manifest = json.loads((straight / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k not in ("train", "evaluate")}
    (killed / "manifest.json").write_text(json.dumps(manifest))
    p = _run_cli(killed, [])
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
    p = _run_cli(killed, [])
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert "[ingest] done already" in out  # finished stages are not redone
    assert "resuming at epoch" in out       # training restarts from its last checkpoint

    a = json.loads((straight / "evaluate" / "report.json").read_text())
    b = json.loads((killed / "evaluate" / "report.json").read_text())
    assert a["splits"] == b["splits"]
    ma = torch.load(straight / "train" / "model.pt", weights_only=False)["model"]
    mb = torch.load(killed / "train" / "model.pt", weights_only=False)["model"]
    for k in ma:
        assert np.array_equal(ma[k].numpy(), mb[k].numpy())
