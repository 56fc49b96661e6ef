"""Ray Train's controller polls often enough that per-epoch reports do not wait 2 s each."""

import importlib


def test_poll_interval_is_set_unless_the_user_set_it(monkeypatch):
    stages = importlib.import_module("pipeline.stages")
    monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", raising=False)
    stages.ray_train_env()
    import os

    assert float(os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]) < 0.5
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")
    stages.ray_train_env()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "3"


def test_ray_train_reads_that_variable():
    """The name is Ray Train 2.60's (a renamed variable would silently bring the 2 s back)."""
    from ray.train.v2._internal import constants

    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR in constants.ENV_VARS_TO_PROPAGATE
