"""Experiment tracking: the run's config, per-epoch metrics, stage figures and report, logged to
MLflow or TensorBoard (``tracking.backend``).

The driver opens one tracked run per `pipeline.driver.Pipeline.execute` (`start_tracking`) and
logs the resolved config as parameters, each stage's manifest entry (seconds, peak memory,
scalar stats) as it finishes and the evaluate stage's report. The per-epoch metrics are logged
live by rank 0 of the Ray Train stages (the HMN reader's epochs, TransE's epochs): the driver
hands them a `TrackingTarget` (picklable, in the stage's job) and rank 0 `attach`-es to the same
run, so curves appear while training runs. Where the driver has no tracking (the default,
``tracking.backend=none``) every call is a no-op.

What is logged (metric names; ``step`` is the epoch for per-epoch metrics, else 0):

* parameters: every config field (``train.lr``, ``memory.branching``, ...), the stage
  fingerprints (``fingerprint.<stage>``) and the run directory (``run_dir``);
* ``train/<metric>`` per epoch (`pipeline.stages.train._epoch_metrics`: loss, dev_accuracy, ...),
  ``embed/<metric>`` per TransE epoch (loss, active, seconds, triples_per_s, ...);
* ``stage/<stage>/<figure>``: seconds, peak_pss_gb, peak_rss_gb and the scalar stats of the
  manifest entry of every stage the run went through (a skipped stage's recorded figures);
* ``eval/<split>/<reader>/<metric>``: the report's accuracy, facts per question, recall.

The backends are optional dependencies (the ``tracking`` extra), imported when a run starts; a
missing one is a `TrackingUnavailable` error naming the extra. MLflow 3 refuses its file store
unless ``MLFLOW_ALLOW_FILE_STORE`` is set ("maintenance mode"); a ``file:`` URI sets it (unless
the user did), since a local folder is the store that needs no server.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmn.config import ConfigError, TrackingConfig, config_to_dict

log = logging.getLogger(__name__)

#: the pip extra that installs the backends
EXTRA = "hmn-pipeline[tracking]"

#: MLflow's limits: params per log_batch call, characters of a param value
_MLFLOW_BATCH = 100
_MLFLOW_VALUE_CHARS = 6000


class TrackingUnavailable(ConfigError):
    """The configured tracking backend's package is not installed; the message names the extra."""


@dataclass(frozen=True)
class TrackingTarget:
    """Where the metrics of one tracked run go; picklable, so Ray Train's rank 0 can log to the
    run the driver opened. ``uri``: MLflow's tracking URI, or the run's TensorBoard folder;
    ``run_id``: the MLflow run."""

    backend: str
    uri: str
    run_id: str = ""


class Tracker:
    """The tracking interface; this base class logs nothing (``tracking.backend=none``).

    Opening a tracker fails loudly (a missing package, a bad URI: before any stage runs);
    logging to an open one never fails the run: an error is logged as a warning (once per
    tracker) and the run goes on, since a tracking server that went away must not cost hours
    of training."""

    target: TrackingTarget | None = None
    _warned = False

    def log_params(self, params: dict[str, Any]) -> None:
        """Parameters: flat ``name -> value`` (see `flatten`)."""
        self._guard(self._log_params, params)

    def log_metrics(self, metrics: dict[str, Any], step: int = 0, prefix: str = "") -> None:
        """The finite numbers of ``metrics`` (others are left out) at ``step``, each name
        prefixed by ``prefix`` (e.g. ``"train/"``)."""
        values = numbers(metrics, prefix)
        if values:
            self._guard(self._log_metrics, values, int(step))

    def close(self, failed: bool = False) -> None:
        """Flush; the driver's tracker also ends the run (as failed when ``failed``)."""
        self._guard(self._close, failed)

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001  tracking must not fail the run
            if not self._warned:
                self._warned = True
                log.warning("tracking (%s): %s: %s; the run goes on, later tracking errors are "
                            "not reported", self.target and self.target.backend,
                            type(e).__name__, e)

    def _log_params(self, params: dict[str, Any]) -> None:
        pass

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def _close(self, failed: bool) -> None:
        pass


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one flat mapping with dotted keys (``{"train": {"lr": 1}}`` ->
    ``{"train.lr": 1}``); lists become their string form."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite int and float values of ``metrics`` (bools and strings left out), keyed
    ``prefix + key``."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(value):
            out[f"{prefix}{key}"] = float(value)
    return out


def _missing(backend: str, module: str) -> TrackingUnavailable:
    return TrackingUnavailable(f"tracking.backend={backend!r}: the {module!r} package is not "
                               f"installed; pip install '{EXTRA}' (or set tracking.backend=none)")


# ---------------------------------------------------------------------------------------------
# MLflow


def _mlflow_client(uri: str):
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise _missing("mlflow", "mlflow") from None
    if uri.startswith("file:"):
        # MLflow 3 raises for its file store unless this is set (the store still works)
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


class MlflowTracker(Tracker):
    """Logs to MLflow run ``target.run_id`` through an ``MlflowClient`` (no global state: the
    driver and the workers log to the same run side by side)."""

    def __init__(self, target: TrackingTarget, owner: bool = False):
        self.target, self.owner = target, owner
        self.client = _mlflow_client(target.uri)

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, tags: dict[str, str]) -> MlflowTracker:
        client = _mlflow_client(uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            try:
                experiment_id = client.create_experiment(experiment)
            except Exception:  # created meanwhile by another run
                experiment_id = client.get_experiment_by_name(experiment).experiment_id
        run = client.create_run(experiment_id, run_name=run_name, tags=tags)
        log.info("tracking: MLflow run %s (%s) in experiment %r at %s", run.info.run_id, run_name,
                 experiment, uri)
        return cls(TrackingTarget("mlflow", uri, run.info.run_id), owner=True)

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:_MLFLOW_VALUE_CHARS]) for k, v in params.items()]
        for i in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.target.run_id, params=items[i:i + _MLFLOW_BATCH])

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), _MLFLOW_BATCH):
            self.client.log_batch(self.target.run_id, metrics=items[i:i + _MLFLOW_BATCH])

    def _close(self, failed: bool) -> None:
        if self.owner:
            self.client.set_terminated(self.target.run_id, "FAILED" if failed else "FINISHED")


# ---------------------------------------------------------------------------------------------
# TensorBoard


def _summary_writer(logdir: str):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch raises it when the tensorboard package is missing
        raise _missing("tensorboard", "tensorboard") from None
    return SummaryWriter(log_dir=logdir)


class TensorBoardTracker(Tracker):
    """Scalars (and the config as text) in a TensorBoard log folder. The driver writes to the
    run's folder; a stage's rank 0 writes to a subfolder named by the stage (``<run>/train``,
    ``<run>/embed``): TensorBoard follows one event file per folder live, so two processes
    never share one."""

    def __init__(self, target: TrackingTarget, logdir: str):
        self.target = target
        self.writer = _summary_writer(logdir)

    def _log_params(self, params: dict[str, Any]) -> None:
        rows = "\n".join(f"| {k} | {str(v).replace('|', '/')} |" for k, v in params.items())
        self.writer.add_text("config", f"| parameter | value |\n|---|---|\n{rows}", 0)

    def _log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def _close(self, failed: bool) -> None:
        self.writer.close()


# ---------------------------------------------------------------------------------------------
# Opening a run (driver) and attaching to it (rank 0 of a stage)


def default_uri(cfg: TrackingConfig, run_root: Path) -> str:
    """``tracking.uri``, or the default store inside the run directory."""
    if cfg.backend == "mlflow":
        if cfg.uri:
            if ":" in cfg.uri or cfg.uri == "databricks":  # a URI, not a folder
                return cfg.uri
            return Path(cfg.uri).resolve().as_uri()
        return (Path(run_root).resolve() / "mlruns").as_uri()
    return str(Path(cfg.uri).resolve()) if cfg.uri else str(Path(run_root).resolve() / "tensorboard")


def start_tracking(cfg: TrackingConfig, run_root: Path, run_name: str) -> Tracker:
    """The driver's tracker for one execution of the pipeline: a new MLflow run (named
    ``tracking.run_name`` or ``run_name``, tagged with the run directory), or the TensorBoard
    folder ``<log dir>/<name>``; a no-op `Tracker` for ``tracking.backend=none``."""
    if cfg.backend == "none":
        return Tracker()
    name = cfg.run_name or run_name
    uri = default_uri(cfg, run_root)
    if cfg.backend == "mlflow":
        return MlflowTracker.start(uri, cfg.experiment, name,
                                   {"run_dir": str(Path(run_root).resolve())})
    folder = str(Path(uri) / name)
    log.info("tracking: TensorBoard log folder %s (tensorboard --logdir %s)", folder, uri)
    return TensorBoardTracker(TrackingTarget("tensorboard", folder), folder)


def attach(target: TrackingTarget | None, stage: str) -> Tracker:
    """A tracker logging to the driver's run ``target`` from another process (Ray Train's rank
    0 of ``stage``); a no-op `Tracker` when ``target`` is None (no tracking)."""
    if target is None:
        return Tracker()
    if target.backend == "mlflow":
        return MlflowTracker(target)
    if target.backend == "tensorboard":
        return TensorBoardTracker(target, str(Path(target.uri) / stage))
    raise ValueError(f"unknown tracking backend {target.backend!r}")


def config_params(cfg: Any, fingerprints: dict[str, str], run_root: Path) -> dict[str, Any]:
    """The parameters a run logs: every config field (dotted names), the stage fingerprints and
    the run directory."""
    params = flatten(config_to_dict(cfg))
    params.update({f"fingerprint.{s}": fp for s, fp in fingerprints.items()})
    params["run_dir"] = str(Path(run_root).resolve())
    return params


def stage_figures(stage: str, entry: dict | None) -> dict[str, float]:
    """``stage/<stage>/<figure>`` of a manifest entry: its scalar stats, seconds and peaks."""
    if not entry or entry.get("status") != "done":
        return {}
    figures = numbers(entry.get("stats") or {}, f"stage/{stage}/")
    figures.update(numbers({k: entry.get(k) for k in ("seconds", "peak_pss_gb", "peak_rss_gb")},
                           f"stage/{stage}/"))
    return figures


def report_figures(report: dict) -> dict[str, float]:
    """``eval/<split>/<reader>/<metric>`` of the evaluate stage's report (and the questions
    scored per split)."""
    out: dict[str, float] = {}
    for split, r in report.get("splits", {}).items():
        out.update(numbers({"questions": r.get("questions")}, f"eval/{split}/"))
        for reader, m in r.get("readers", {}).items():
            out.update(numbers(m, f"eval/{split}/{reader}/"))
    return out
