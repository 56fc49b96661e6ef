"""Experiment tracking (pipeline.tracking) through the driver, read back with each backend's own
reader: MLflow's client on a local file store, TensorBoard's EventAccumulator. The stages are
stand-ins (no Ray); the train stand-in logs its epochs the way Ray Train's rank 0 does, from a
pickled `TrackingTarget` (tests/integration/test_tracking_run.py runs the real stages)."""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
import re
import sys
from pathlib import Path

import pytest

import pipeline.driver as driver
from hmn.config import ConfigError, load_config
from pipeline.driver import STAGES, Pipeline, stage_fingerprints
from pipeline.rundir import RunDir
from pipeline.tracking import EXTRA, Tracker, TrackingUnavailable, attach, start_tracking

ROOT = Path(__file__).resolve().parents[2]
REPORT = {"splits": {"dev": {"questions": 150, "readers": {
    "exact": {"accuracy": 0.75, "facts_per_query": 600.0},
    "clustered": {"accuracy": 0.5, "facts_per_query": 80.0, "recall10_vs_exact": 0.9}}}}}
LOSSES = [3.0, 2.0, 1.5]


@pytest.fixture
def stand_ins(monkeypatch):
    """Stand-in stages: train logs three epochs from "rank 0", evaluate writes a report, and
    the stage named in ``fail`` raises."""
    fail: set[str] = set()

    def stand_in(name):
        def run(p, out, fps):
            if name in fail:
                raise RuntimeError(f"{name} failed")
            if name == "train":  # what train_loop_per_worker does on rank 0
                tracker = attach(pickle.loads(pickle.dumps(p.tracker.target)), "train")
                for epoch, loss in enumerate(LOSSES):
                    tracker.log_metrics({"epoch": epoch, "loss": loss, "reader": "exact"},
                                        step=epoch, prefix="train/")
                tracker.close()
            if name == "evaluate":
                (out / "report.json").write_text(json.dumps(REPORT))
            return {"rows": 7, "kind": name}
        return run

    table = tuple(dataclasses.replace(s, run=stand_in(s.name)) for s in driver.STAGE_TABLE)
    monkeypatch.setattr(driver, "STAGE_TABLE", table)
    monkeypatch.setattr(driver, "init_ray", lambda cfg: None)
    return fail


def test_tensorboard_holds_the_config_epoch_metrics_stage_figures_and_report(stand_ins, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    cfg = load_config(None, ["tracking.backend=tensorboard", f"tracking.uri={logdir}"])
    run = RunDir(tmp_path / "run")
    Pipeline(cfg, run).execute()

    def scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
        acc = EventAccumulator(str(folder))
        acc.Reload()
        return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}

    driver_side = scalars(logdir / "smoke")  # the run's folder: <log dir>/<config name>
    manifest = run.manifest()["stages"]
    for stage in STAGES:
        assert driver_side[f"stage/{stage}/seconds"] == [(0, pytest.approx(manifest[stage]["seconds"]))]
        assert f"stage/{stage}/peak_pss_gb" in driver_side
        assert driver_side[f"stage/{stage}/rows"] == [(0, 7.0)]  # the scalar stats
    assert driver_side["eval/dev/exact/accuracy"] == [(0, 0.75)]
    assert driver_side["eval/dev/clustered/recall10_vs_exact"] == [(0, pytest.approx(0.9))]
    assert driver_side["eval/dev/questions"] == [(0, 150.0)]
    acc = EventAccumulator(str(logdir / "smoke"))
    acc.Reload()
    assert "config/text_summary" in acc.Tags()["tensors"]  # the resolved config, as a table
    epochs = scalars(logdir / "smoke" / "train")  # rank 0's own folder
    assert epochs["train/loss"] == [(e, loss) for e, loss in enumerate(LOSSES)]
    assert "train/reader" not in epochs  # strings are not metrics


def test_mlflow_file_store_holds_params_metrics_and_run_status(stand_ins, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    cfg = load_config(None, ["tracking.backend=mlflow", "tracking.experiment=hmn-test"])
    run = RunDir(tmp_path / "run")
    Pipeline(cfg, run).execute()
    client = MlflowClient(tracking_uri=(run.root / "mlruns").as_uri())  # the default store
    experiment = client.get_experiment_by_name("hmn-test")
    (tracked,) = client.search_runs([experiment.experiment_id])
    assert tracked.info.run_name == "smoke" and tracked.info.status == "FINISHED"
    params = tracked.data.params
    assert params["train.lr"] == "0.001" and params["memory.branching"] == "[32]"
    assert params["tracking.backend"] == "mlflow" and params["run_dir"] == str(run.root)
    assert {params[f"fingerprint.{s}"] for s in STAGES} == {run.fingerprint_of(s) for s in STAGES}
    history = client.get_metric_history(tracked.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == list(enumerate(LOSSES))
    metrics = tracked.data.metrics
    assert metrics["eval/dev/exact/accuracy"] == 0.75
    assert metrics["stage/train/seconds"] == pytest.approx(run.entry("train")["seconds"])
    assert "stage/memory/peak_rss_gb" in metrics and "stage/memory/kind" not in metrics

    # a second run of the same directory skips every stage: a new tracked run with the figures
    # the manifest recorded; a stage that fails ends its tracked run as FAILED
    Pipeline(cfg, run).execute()
    stand_ins.add("evaluate")
    with pytest.raises(RuntimeError, match="evaluate failed"):
        Pipeline(cfg, run, force=True).execute()
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    assert [r.info.status for r in runs] == ["FINISHED", "FINISHED", "FAILED"]
    assert runs[1].data.metrics["stage/train/seconds"] == metrics["stage/train/seconds"]


def test_tracking_is_in_no_fingerprint_and_its_settings_are_checked():
    base = load_config(ROOT / "configs" / "smoke.yaml")
    tracked = load_config(ROOT / "configs" / "smoke.yaml", [
        "tracking.backend=mlflow", "tracking.uri=http://localhost:5000",
        "tracking.experiment=other", "tracking.run_name=r1"])
    assert stage_fingerprints(tracked) == stage_fingerprints(base)
    with pytest.raises(ConfigError, match=r"tracking.backend='wandb': must be one of none, mlflow"):
        load_config(None, ["tracking.backend=wandb"])
    with pytest.raises(ConfigError, match="tracking.run_name"):
        load_config(None, ["tracking.run_name=a/b"])


@pytest.mark.parametrize("backend, module", [("mlflow", "mlflow.tracking"),
                                             ("tensorboard", "torch.utils.tensorboard")])
def test_a_missing_backend_names_the_extra_before_any_stage_runs(stand_ins, tmp_path,
                                                                 monkeypatch, backend, module):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    cfg = load_config(None, [f"tracking.backend={backend}"])
    with pytest.raises(TrackingUnavailable, match=rf"'{backend}' package .*{re.escape(EXTRA)}"):
        start_tracking(cfg.tracking, tmp_path, "smoke")
    run = RunDir(tmp_path / "run")
    with pytest.raises(ConfigError, match=re.escape(EXTRA)):  # pipeline.run: one line
        Pipeline(cfg, run).execute()
    assert run.manifest()["stages"] == {}


def test_no_tracking_logs_nothing_and_a_tracking_error_does_not_fail_the_run(caplog):
    assert start_tracking(load_config().tracking, Path("."), "smoke").target is None
    assert attach(None, "train").target is None

    class Broken(Tracker):
        def _log_metrics(self, metrics, step):
            raise OSError("server went away")

    broken = Broken()
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        broken.log_metrics({"loss": 1.0})
        broken.log_metrics({"loss": 0.5})
    warnings = [r.getMessage() for r in caplog.records if r.name == "pipeline.tracking"]
    assert len(warnings) == 1 and "server went away" in warnings[0]
