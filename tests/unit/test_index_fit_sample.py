"""build_index(fit_sample=...): k-means fitted on a sample, every fact assigned (FB2M-scale builds)."""

import numpy as np
import pytest
import torch

from hmn.index import build_index_from_vectors
from hmn.memory import FactorisedMemory


def _data(n=3000, d=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(20, d))
    x = centres[rng.integers(0, 20, size=n)] + 0.3 * rng.normal(size=(n, d))
    return torch.from_numpy(x.astype(np.float32))


@pytest.mark.parametrize("branching", [[16], [8, 4]])
def test_fit_sample_assigns_every_fact_to_its_best_leaf(branching):
    x = _data()
    idx = build_index_from_vectors(x, branching=branching, iters=5, seed=1, fit_sample=500)
    assert idx.stats["fit_sample"] == 500
    assert idx.fact_leaf.shape == (3000,)
    assert idx.leaf_sizes().sum() == 3000
    # every fact sits in the most similar leaf among the children of its parent (or among all
    # leaves for a flat index)
    xt = idx.transform.facts(x)
    xt = xt / xt.norm(dim=1, keepdim=True)
    leaf_scores = xt @ idx.centroids[-1].T  # (N, C)
    if len(branching) == 1:
        allowed = torch.ones_like(leaf_scores, dtype=torch.bool)
    else:
        top = (xt @ idx.centroids[0].T).argmax(1)
        parents = torch.from_numpy(idx.parents[0])
        own = parents[torch.from_numpy(idx.fact_leaf)]  # (N,) parent of each fact's leaf
        allowed = parents[None, :] == own[:, None]
        assert (own == top).all()
    best = leaf_scores.masked_fill(~allowed, -np.inf).argmax(1).numpy()
    chosen = leaf_scores[torch.arange(3000), torch.from_numpy(idx.fact_leaf)]
    assert torch.allclose(chosen, leaf_scores[torch.arange(3000), torch.from_numpy(best)], atol=1e-5)


def test_fit_sample_at_least_n_is_the_plain_build():
    x = _data(n=800)
    a = build_index_from_vectors(x, branching=[8, 2], iters=4, seed=3)
    b = build_index_from_vectors(x, branching=[8, 2], iters=4, seed=3, fit_sample=800)
    assert np.array_equal(a.fact_leaf, b.fact_leaf)
    assert b.stats["fit_sample"] == 0


def test_fit_sample_on_the_factorised_memory():
    rng = np.random.default_rng(0)
    ent = rng.normal(size=(40, 6)).astype(np.float32)
    rel = rng.normal(size=(5, 6)).astype(np.float32)
    n = 900
    counts = rng.integers(1, 3, size=n)
    offs = np.concatenate([[0], np.cumsum(counts)])
    fm = FactorisedMemory(ent, rel, rng.integers(0, 40, n), rng.integers(0, 5, n), offs,
                          rng.integers(0, 40, offs[-1]))
    idx = build_index_from_vectors(fm, branching=[6, 3], iters=3, fit_sample=200)
    assert idx.n == n and idx.leaf_sizes().sum() == n


def test_fit_sample_errors():
    x = _data(n=500)
    with pytest.raises(ValueError, match="fit_sample"):
        build_index_from_vectors(x, branching=[8], fit_sample=-1)
    with pytest.raises(ValueError, match="smaller than branching"):
        build_index_from_vectors(x, branching=[64], fit_sample=10)
