"""The driver loops over the stage table: fingerprints, order, `until` and `only` (no Ray)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import pipeline.driver as driver
from hmn.config import load_config
from pipeline.driver import STAGES, Pipeline, stage_fingerprints
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch):
    """Every stage's runner replaced by one that records (stage, fingerprints so far)."""
    seen: list[tuple[str, dict]] = []

    def recorder(name):
        def run(p, out, fps):
            seen.append((name, dict(fps)))
            return {"stage": name}
        return run

    table = tuple(dataclasses.replace(s, run=recorder(s.name)) for s in driver.STAGE_TABLE)
    monkeypatch.setattr(driver, "STAGE_TABLE", table)
    monkeypatch.setattr(driver, "init_ray", lambda cfg: None)
    return seen


def test_every_stage_runs_in_order_with_the_table_fingerprints(calls, tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    run = RunDir(tmp_path / "run")
    results = Pipeline(cfg, run).execute()
    assert list(results) == list(STAGES) and [c[0] for c in calls] == list(STAGES)
    want = stage_fingerprints(cfg)
    assert {s: run.fingerprint_of(s) for s in STAGES} == want
    assert calls[-1][1] == want  # a stage sees its own and every earlier fingerprint
    assert (run.root / "config.resolved.yaml").exists()
    calls.clear()
    assert all(r.skipped for r in Pipeline(cfg, run).execute().values()) and not calls


def test_until_and_only_stop_early_and_need_the_earlier_stages(calls, tmp_path):
    cfg = load_config(ROOT / "configs" / "smoke.yaml")
    run = RunDir(tmp_path / "run")
    assert list(Pipeline(cfg, run).execute(until="embed")) == ["generate", "ingest", "embed"]
    calls.clear()
    results = Pipeline(cfg, run, only=("memory",)).execute()
    assert list(results) == ["generate", "ingest", "embed", "memory"]
    assert [c[0] for c in calls] == ["memory"]
    with pytest.raises(RuntimeError, match="'train' is needed"):
        Pipeline(cfg, run, only=("evaluate",)).execute()
    with pytest.raises(ValueError, match="unknown stage"):
        Pipeline(cfg, run).execute(until="nope")


def test_files_source_has_no_generate_stage_and_hashes_its_files(calls, tmp_path):
    facts = tmp_path / "kb.txt"
    facts.write_text("www.freebase.com/m/01\twww.freebase.com/r/x\twww.freebase.com/m/02\n")
    cfg = load_config(ROOT / "configs" / "sq32k.yaml", [
        f"data.facts=[{facts}]", "data.names=[]", f"data.questions_train=[{facts}]",
        f"data.questions_dev=[{facts}]", "data.questions_test=[]"])
    run = RunDir(tmp_path / "run")
    assert list(Pipeline(cfg, run).execute(until="ingest")) == ["ingest"]
    assert (run.root / ".input-digests.json").exists()
    want = stage_fingerprints(cfg, run.input_signature)
    assert run.fingerprint_of("ingest") == want["ingest"]
    facts.write_text("www.freebase.com/m/01\twww.freebase.com/r/x\twww.freebase.com/m/03\n")
    assert stage_fingerprints(cfg, run.input_signature)["ingest"] != want["ingest"]


def test_scaling_source_generates_and_hashes_its_section_and_real_files(calls, tmp_path):
    from pipeline.driver import ingest_sources, scaling_files

    data = tmp_path / "data"
    for f in ("simplequestions/kb.txt", "simplequestions/names.tsv",
              "simplequestions/questions_train.txt", "simplequestions/questions_dev.txt",
              "fb15k-237/train.txt", "fb15k-237/valid.txt", "fb15k-237/test.txt",
              "fb15k-237/names.tsv"):
        (data / f).parent.mkdir(parents=True, exist_ok=True)
        (data / f).write_text(f)
    cfg = load_config(ROOT / "configs" / "sq-scaling.yaml", [f"scaling.data_dir={data}"])
    run = RunDir(tmp_path / "run")
    assert list(Pipeline(cfg, run).execute(until="ingest")) == ["generate", "ingest"]
    want = stage_fingerprints(cfg, run.input_signature)
    assert run.fingerprint_of("generate") == want["generate"]
    # 29k reads kb.txt, names and the questions; 131k and up FB15k-237 too
    assert [Path(p).name for p in scaling_files(cfg)] == [
        "kb.txt", "names.tsv", "questions_train.txt", "questions_dev.txt"]
    big = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, size="131k"))
    assert len(scaling_files(big)) == 8
    assert stage_fingerprints(big, run.input_signature)["generate"] != want["generate"]
    seeded = dataclasses.replace(cfg, scaling=dataclasses.replace(cfg.scaling, seed=1))
    assert stage_fingerprints(seeded, run.input_signature)["generate"] != want["generate"]
    (data / "simplequestions/kb.txt").write_text("changed")
    changed = stage_fingerprints(cfg, run.input_signature)
    assert changed["generate"] != want["generate"] and changed["ingest"] != want["ingest"]
    (data / "fb15k-237/train.txt").write_text("not read at 29k")
    assert stage_fingerprints(cfg, run.input_signature) == changed
    src = ingest_sources(cfg, run)
    assert src.facts == [str(run.stage_dir("generate") / "kb.txt")]
    assert set(src.questions) == {"train", "dev"}
