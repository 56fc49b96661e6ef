"""``--stages`` with ``--experiment scaling``: every variant asked for runs only those stages
(the shared ones in the size's owner, train and evaluate in the variant); other experiments
refuse it."""

from pathlib import Path

import pytest

from hmn.config import ConfigError, load_config
from pipeline import experiments
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch):
    """The Pipelines the experiment would run: (variant directory, only, until)."""
    seen = []

    class FakePipeline:
        def __init__(self, cfg, run, force=False, only=()):
            self.run, self.only = run, tuple(only)

        def execute(self, until=None):
            seen.append((self.run.root.name, self.only, until))
            return {}

    monkeypatch.setattr(experiments, "Pipeline", FakePipeline)
    monkeypatch.setattr(experiments, "link_shared", lambda *a, **k: None)
    monkeypatch.setattr(experiments, "write_scaling_report", lambda *a, **k: None)
    return seen


def _scaling(tmp_path, variants, stages):
    cfg = load_config(ROOT / "configs/sq-scaling.yaml")
    return experiments.run_experiment("scaling", cfg, RunDir(tmp_path), only=variants,
                                      stages=stages)


def test_stages_limit_every_scaling_variant(tmp_path, calls):
    _scaling(tmp_path, ("10m", "1m-exact"), ("memory",))
    # 1m-exact: its owner 1m builds the memory; train/evaluate are not asked for
    assert calls == [("1m", ("memory",), "memory"), ("10m", ("memory",), None)]


def test_train_only_skips_the_owners_shared_stages(tmp_path, calls):
    _scaling(tmp_path, ("1m-exact",), ("train",))
    assert calls == [("1m-exact", ("train",), None)]


def test_without_stages_every_stage_runs(tmp_path, calls):
    _scaling(tmp_path, ("1m-exact", "10m"), ())
    assert calls == [("1m", (), "memory"), ("1m-exact", ("train", "evaluate"), None),
                     ("10m", (), None)]


def test_table_experiments_refuse_stages(tmp_path):
    cfg = load_config(ROOT / "configs/sq32k.yaml")
    with pytest.raises(ConfigError, match=r"--stages memory: with --experiment only for 'scaling'"):
        experiments.run_experiment("table1", cfg, RunDir(tmp_path), stages=("memory",))
