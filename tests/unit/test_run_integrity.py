"""Stale or damaged run directories: `pipeline.run` redoes a stage whose recorded outputs changed,
`pipeline.evaluate` refuses a run whose stages are unfinished or disagree with its config (no Ray:
the stages are stand-ins that write small files through the real driver and run directory)."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.driver as driver
from hmn.config import dump_config, load_config
from pipeline.driver import Pipeline, check_evaluable
from pipeline.rundir import RunDir, RunDirError

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _stand_in(name: str, seen: list[str], fail: set[str]):
    """A stage runner writing what the readers of its outputs look for."""

    def run(p, out: Path, fps: dict) -> dict:
        seen.append(name)
        if name in fail:
            raise RuntimeError(f"{name} killed")
        if name == "ingest":
            (out / "kb").mkdir()
            (out / "kb" / "facts.parquet").write_bytes(b"PAR1" * 64)
        elif name == "memory":
            np.save(out / "facts.npy", np.arange(64, dtype=np.float32).reshape(16, 4))
        elif name == "train":
            torch.save({"model": {}, "dim": 4, "fingerprints": {
                s: fps[s] for s in ("ingest", "memory", "train")}}, out / "model.pt")
        return {"stage": name}

    return run


@pytest.fixture
def stages(monkeypatch):
    """The stage table with stand-in runners; ``stages.seen`` lists the stages run, a stage in
    ``stages.fail`` raises."""
    state = type("Stages", (), {"seen": [], "fail": set()})()
    table = tuple(dataclasses.replace(s, run=_stand_in(s.name, state.seen, state.fail))
                  for s in driver.STAGE_TABLE)
    monkeypatch.setattr(driver, "STAGE_TABLE", table)
    monkeypatch.setattr(driver, "init_ray", lambda cfg: None)
    return state


def trained_run(root: Path, overrides: tuple[str, ...] = ()) -> RunDir:
    """A run directory whose stages up to train are done (with the `stages` stand-ins)."""
    run = RunDir(root)
    Pipeline(load_config(SMOKE, list(overrides)), run).execute(until="train")
    return run


def test_evaluate_refuses_an_unfinished_or_restarted_train_stage(stages, tmp_path):
    from pipeline.evaluate import InputError, load_run_config

    run = trained_run(tmp_path / "run")
    assert load_run_config(run.root).train.max_epochs == 10  # consistent: accepted
    # a re-training with new settings fails: the old model is still in train/
    stages.fail.add("train")
    with pytest.raises(RuntimeError, match="train killed"):
        trained_run(run.root, ("train.max_epochs=3",))
    assert (run.stage_dir("train") / "model.pt").exists()
    with pytest.raises(InputError, match="stage 'train' is 'failed', not done"):
        load_run_config(run.root)
    # ... or is killed (SIGKILL leaves the stage "running")
    entry = run.entry("train")
    run._record("train", {**entry, "status": "running"})
    with pytest.raises(InputError, match="stage 'train' is 'running', not done"):
        load_run_config(run.root)
    # killed before the train stage started: done, but with other settings than the config's
    stages.fail.clear()
    trained_run(run.root)
    (run.root / "config.resolved.yaml").write_text(
        dump_config(load_config(SMOKE, ["train.max_epochs=3"])))
    with pytest.raises(InputError, match="stage 'train' was done with other settings"):
        load_run_config(run.root)


def test_evaluate_refuses_a_model_of_other_stages_or_changed_outputs(stages, tmp_path):
    from pipeline.evaluate import InputError, load_run_config

    run = trained_run(tmp_path / "run")
    cfg = load_config(SMOKE)
    fps = {s: run.entry(s)["fingerprint"] for s in ("ingest", "memory", "train")}
    check_evaluable(run, cfg, fps)
    with pytest.raises(RunDirError, match="model.pt was trained against another 'memory' stage"):
        check_evaluable(run, cfg, {**fps, "memory": "0" * 16})
    with open(run.stage_dir("memory") / "facts.npy", "r+b") as f:
        f.truncate(100)
    with pytest.raises(InputError, match=r"stage 'memory': output memory/facts.npy has 100 bytes"):
        load_run_config(run.root)


def test_run_redoes_a_stage_whose_output_was_truncated_or_changed(stages, tmp_path, caplog):
    run = trained_run(tmp_path / "run")
    facts = run.stage_dir("memory") / "facts.npy"
    good = facts.read_bytes()
    assert run.entry("memory")["outputs"]["facts.npy"][0] == len(good)
    stages.seen.clear()
    facts.write_bytes(good[: len(good) // 2])
    with caplog.at_level(logging.WARNING, logger="pipeline.rundir"):
        trained_run(run.root)
    assert stages.seen == ["memory"]  # only the damaged stage (its fingerprint is unchanged)
    assert "output memory/facts.npy has" in caplog.text and "redoing the stage" in caplog.text
    assert facts.read_bytes() == good
    # the same size, other bytes: sizes pass; digests (pipeline.run --verify) catch it
    stages.seen.clear()
    facts.write_bytes(good[:-1] + b"\x01")
    trained_run(run.root)
    assert stages.seen == []
    RunDir.verify_digests = True
    try:
        trained_run(run.root)
    finally:
        RunDir.verify_digests = False
    assert stages.seen == ["memory"] and facts.read_bytes() == good


def test_old_manifest_without_sizes_stays_valid(stages, tmp_path, caplog):
    run = trained_run(tmp_path / "run")
    manifest = run.manifest()
    for entry in manifest["stages"].values():
        entry.pop("outputs")
    run.manifest_path.write_text(json.dumps(manifest))
    stages.seen.clear()
    with caplog.at_level(logging.INFO, logger="pipeline.rundir"):
        trained_run(run.root)
    assert stages.seen == []  # a finished run is not redone
    assert "[memory] recorded before output sizes were kept: its files are not verified" in caplog.text
