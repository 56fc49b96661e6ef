"""The pipeline's stages, one module each (ingest, embed, memory, train, and score: the evaluate
stage); shared Ray Train settings. `pipeline.driver` runs them in order."""

from __future__ import annotations

import os

#: Ray Train 2.60's ``ray.train.report`` puts the result on a queue of size one that the
#: controller drains when it polls the workers, every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
#: (2 s by default): with a report every epoch, each epoch waited up to 2 s for the poll
#: (measured: TransE on 32k triples 2.6 s an epoch, of which 0.3 s training; 12 tiny epochs
#: 67 s -> 44 s, and the cost no longer grows with the epochs). The driver's value reaches the
#: controller (Ray Train propagates it), so a user-set value wins.
HEALTH_CHECK_INTERVAL_S = "0.1"


def ray_train_env() -> None:
    """Call before building a ``TorchTrainer``: poll the workers every 0.1 s unless set."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
