"""hmn on CUDA without Ray (skipped where no GPU is present)."""

import numpy as np
import pytest
import torch

from hmn.memory import FactMemory
from hmn.model import BowEncoder
from hmn.readers import ExactReader
from hmn.training import iterate_batches, predict, train_epoch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_training_step_on_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    memory = torch.from_numpy(rng.standard_normal((500, 32)).astype(np.float32))
    tokens = [np.array([i, 500 + i % 7]) for i in range(500)]
    gold = np.arange(500)
    results = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = BowEncoder(507, 32).to(device)
        mem = memory.to(device)
        reader = ExactReader(FactMemory(mem))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for _ in range(3):
            stats = train_epoch(model, iterate_batches(tokens, gold, 64, shuffle=False, device=device),
                                mem, reader, opt, k=10)
        preds = predict(model, reader, tokens, k=10, device=device)
        results[device] = (stats.loss, (preds.fact_ids == gold).mean())
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=1e-3)
    assert results["cuda"][1] == pytest.approx(results["cpu"][1], abs=0.01)
