"""Experiment tracking on a real smoke-sized run: TransE's and the reader's epochs logged live by
Ray Train's rank 0 (local mode), read back from a TensorBoard log folder and an MLflow file
store (the driver side is tested stage by stage in tests/unit/test_tracking.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmn.config import load_config
from pipeline.driver import Pipeline
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "synthetic.entities=800", "synthetic.relations=20", "synthetic.facts=600",
    "synthetic.train_questions=500", "synthetic.dev_questions=150", "synthetic.test_questions=100",
    "embed.epochs=4", "embed.num_cpus=1", "embed.num_workers=0", "memory.branching=[8]",
    "memory.iters=5", "reader.top_clusters=2", "train.max_epochs=3", "train.batch_size=64",
    "train.num_workers=0", "eval.splits=[dev]", "eval.readers=[exact]",
]


@pytest.mark.slow
def test_a_smoke_run_logs_its_epochs_to_tensorboard_and_mlflow(ray_local, tmp_path):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    cfg = load_config(ROOT / "configs" / "smoke.yaml",
                      TINY + ["tracking.backend=tensorboard", f"tracking.uri={logdir}"])
    run = RunDir(tmp_path / "run")
    Pipeline(cfg, run).execute()
    train_history = json.loads((run.stage_dir("train") / "history.json").read_text())
    embed_history = json.loads((run.stage_dir("embed") / "stats.json").read_text())["history"]

    def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    assert scalars(logdir / "smoke" / "train", "train/loss") == [
        (h["epoch"], pytest.approx(h["loss"])) for h in train_history]
    assert scalars(logdir / "smoke" / "train", "train/dev_accuracy") == [
        (h["epoch"], pytest.approx(h["dev_accuracy"])) for h in train_history]
    assert scalars(logdir / "smoke" / "embed", "embed/loss") == [
        (h["epoch"], pytest.approx(h["loss"])) for h in embed_history]
    report = json.loads((run.stage_dir("evaluate") / "report.json").read_text())
    assert scalars(logdir / "smoke", "eval/dev/exact/accuracy") == [
        (0, pytest.approx(report["splits"]["dev"]["readers"]["exact"]["accuracy"]))]

    # the same run directory, tracked by MLflow instead (tracking is in no fingerprint): only
    # the forced train stage runs again, its epochs go to the MLflow file store
    cfg = load_config(ROOT / "configs" / "smoke.yaml", TINY + ["tracking.backend=mlflow"])
    results = Pipeline(cfg, run, force=True, only=("train",)).execute()
    assert results["embed"].skipped and not results["train"].skipped
    client = MlflowClient(tracking_uri=(run.root / "mlruns").as_uri())
    (tracked,) = client.search_runs([client.get_experiment_by_name("hmn").experiment_id])
    retrained = json.loads((run.stage_dir("train") / "history.json").read_text())
    assert [(m.step, m.value) for m in client.get_metric_history(tracked.info.run_id, "train/loss")] \
        == [(h["epoch"], pytest.approx(h["loss"])) for h in retrained]
    assert tracked.data.params["train.max_epochs"] == "3"
    assert tracked.data.metrics["stage/train/seconds"] == pytest.approx(run.entry("train")["seconds"])
    assert tracked.info.status == "FINISHED"
