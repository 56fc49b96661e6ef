"""Tests for hmn.baselines: PCA-tree, WTA-hash and faiss IVF readers."""

import numpy as np
import pytest
import torch

from hmn.baselines import FaissIVFReader, PCATreeReader, WTAHashReader
from hmn.memory import FactMemory, FactorisedMemory, build_fact_vectors
from hmn.readers import ExactReader, make_reader, recall_at_k
from tests.unit.test_readers import heavy_tailed_facts


@pytest.fixture(scope="module")
def setup():
    x, q = heavy_tailed_facts(2000, 16, 0.3, 40)
    mem = FactMemory(x)
    return mem, q, ExactReader(mem).search(q, 10)


SETTINGS = {
    "pca-tree": [dict(depth=5, probes=1), dict(depth=5, probes=4), dict(depth=5, probes=32)],
    "wta-hash": [dict(bands=2, perms=4), dict(bands=8, perms=4), dict(bands=64, perms=2)],
    "faiss-ivf": [dict(nlist=16, nprobe=1), dict(nlist=16, nprobe=4), dict(nlist=16, nprobe=16)],
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_recall_rises_with_budget(setup, name):
    mem, q, exact = setup
    recalls, touched = [], []
    for params in SETTINGS[name]:
        c = make_reader(name, mem, seed=0, **params).search(q, 10)
        recalls.append(recall_at_k(c, exact, 10))
        touched.append(float(c.touched.float().mean()))
        assert c.ids.shape == (40, 10) and c.touched.shape == (40,)
        got = c.ids >= 0  # returned scores are exact inner products
        ref = torch.gather(q @ mem.vectors.T, 1, c.ids.clamp_min(0))
        torch.testing.assert_close(c.scores[got], ref[got], rtol=1e-4, atol=1e-4)
    assert all(b >= a for a, b in zip(touched, touched[1:])), touched
    assert recalls[-1] > recalls[0], recalls
    if name != "wta-hash":  # reading every leaf / list is exact
        assert recalls[-1] == 1.0 and touched[-1] == 2000


def _pca_tree_reference(x: np.ndarray, q: np.ndarray, depth: int):
    """PCA-Tree by brute force (Bachrach et al. 2014, as hmn.baselines' docstring defines it):
    x' = [x; sqrt(phi^2 - ||x||^2)], q' = [q; 0]; the ``depth`` first principal directions of the
    centred x' (sign: largest-magnitude component positive); level l splits every node at the
    lower median of its facts' projection on direction l (projection > threshold: right child).
    Returns the leaf of each fact (N,) and the cost of each leaf for each query (B, L): the sum
    of |projection - threshold| over the splits on the leaf's path that the query's path does
    not take."""
    x = x.astype(np.float64)
    norms2 = (x**2).sum(1)
    lifted = np.concatenate([x, np.sqrt(np.maximum(norms2.max() - norms2, 0))[:, None]], axis=1)
    mean = lifted.mean(0)
    cov = (lifted - mean).T @ (lifted - mean) / len(x)
    evals, evecs = np.linalg.eigh(cov)
    dirs = evecs[:, np.argsort(-evals)[:depth]]  # (D + 1, depth)
    for j in range(depth):
        dirs[:, j] *= np.sign(dirs[np.argmax(np.abs(dirs[:, j])), j])
    proj = (lifted - mean) @ dirs  # (N, depth)
    node = np.zeros(len(x), dtype=np.int64)
    thresholds = []
    for level in range(depth):
        thr = {}
        for nd in range(2**level):
            values = np.sort(proj[node == nd, level])
            thr[nd] = values[(len(values) - 1) // 2]  # lower median
        thresholds.append(thr)
        node = np.array([2 * nd + (p > thr[nd]) for nd, p in zip(node, proj[:, level])])
    qp = (np.concatenate([q.astype(np.float64), np.zeros((len(q), 1))], axis=1) - mean) @ dirs
    cost = np.zeros((len(q), 2**depth))
    for b in range(len(q)):
        for leaf in range(2**depth):
            for level in range(depth):
                nd = leaf >> (depth - level)  # the leaf's ancestor at this level
                goes_right = (leaf >> (depth - 1 - level)) & 1
                t = thresholds[level][nd]
                if (qp[b, level] > t) != goes_right:
                    cost[b, leaf] += abs(qp[b, level] - t)
    return node, cost


def test_pca_tree_leaves_and_leaf_costs_equal_a_brute_force_tree(setup):
    mem, q, _ = setup
    leaf, cost = _pca_tree_reference(mem.vectors.numpy(), q.numpy(), depth=4)
    sizes = np.bincount(leaf, minlength=16)
    assert sizes.max() - sizes.min() <= 16  # median splits: balanced up to rounding
    assert np.array_equal(np.sort(cost, 1)[:, 0], np.zeros(len(q)))  # own leaf costs nothing
    for probes in (1, 4):
        r = PCATreeReader(mem, depth=4, probes=probes)
        np.testing.assert_array_equal(r.leaf_of_fact, leaf)
        np.testing.assert_allclose(r.leaf_costs(mem.check_queries(q)).numpy(), cost, atol=1e-4)
        read = np.argsort(cost, 1)[:, :probes]  # (B, probes) the cheapest leaves
        c = r.search(q, 10)
        np.testing.assert_array_equal(c.touched.numpy(), sizes[read].sum(1))
        for b in range(len(q)):
            got = c.ids[b][c.ids[b] >= 0].numpy()
            assert set(leaf[got]) <= set(read[b])
            inside = np.flatnonzero(np.isin(leaf, read[b]))
            best = inside[np.argsort(-(mem.vectors.numpy()[inside] @ q[b].numpy()))[:10]]
            assert set(got) == set(best)


def _wta_band_keys(x: np.ndarray, coords: np.ndarray, bands: int, perms: int) -> np.ndarray:
    """(n, bands) WTA band keys by the definition (Yagnik et al. 2011): for each permutation,
    the position of the largest of the first ``window`` permuted coordinates; a band's key is the
    tuple of its ``perms`` positions (here as one object per band)."""
    keys = np.empty((len(x), bands), dtype=object)
    for i, row in enumerate(x):
        for band in range(bands):
            keys[i, band] = tuple(int(np.argmax(row[coords[band * perms + k]]))
                                  for k in range(perms))
    return keys


def test_wta_candidates_are_the_facts_colliding_in_some_band(setup):
    mem, q, _ = setup
    bands, perms, window = 3, 2, 4
    r = WTAHashReader(mem, bands=bands, perms=perms, window=window, seed=1)
    coords = r._coords.numpy()  # the first `window` coordinates of each random permutation
    assert coords.shape == (bands * perms, window)
    assert all(len(set(row)) == window for row in coords) and coords.max() < mem.d
    assert len({tuple(row) for row in coords}) == bands * perms
    x, qn = mem.vectors.numpy(), q.numpy()
    fk, qk = _wta_band_keys(x, coords, bands, perms), _wta_band_keys(qn, coords, bands, perms)
    c = r.search(q, 10)
    for b in range(len(q)):
        collide = np.flatnonzero((fk == qk[b]).any(1))  # same key in at least one band
        assert int(c.touched[b]) == len(collide)
        best = collide[np.argsort(-(x[collide] @ qn[b]))[:10]]
        got = c.ids[b][c.ids[b] >= 0].numpy()
        assert set(got) == set(best)
    assert 0 < int(c.touched.sum()) < len(q) * mem.n  # some but not all facts collide


def test_faiss_ivf_touched_is_probed_list_sizes(setup):
    mem, q, _ = setup
    r = FaissIVFReader(mem, nlist=8, nprobe=2)
    assert r.list_sizes.sum() == 2000 and not r.on_gpu
    c = r.search(q, 10)
    assert torch.all(c.touched <= 2000) and torch.all(c.touched > 0)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_deterministic_with_seed(setup, name):
    mem, q, _ = setup
    params = SETTINGS[name][1]
    a = make_reader(name, mem, seed=3, **params).search(q, 10)
    b = make_reader(name, mem, seed=3, **params).search(q, 10)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.touched, b.touched)


def test_factorised_memory_works_with_baselines():
    rng = np.random.default_rng(0)
    ent, rel = rng.standard_normal((80, 4)).astype(np.float32), rng.standard_normal((5, 4))
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 3, 300))])
    parts = (ent, rel.astype(np.float32), rng.integers(0, 80, 300), rng.integers(0, 5, 300),
             offsets, rng.integers(0, 80, offsets[-1]))
    fm, dense = FactorisedMemory(*parts), FactMemory(torch.from_numpy(build_fact_vectors(*parts)))
    q = torch.randn(6, 12)
    for name, params in [("pca-tree", dict(depth=3, probes=2)), ("wta-hash", dict(bands=4)),
                         ("faiss-ivf", dict(nlist=4, nprobe=2))]:
        a = make_reader(name, fm, **params).search(q, 5)
        b = make_reader(name, dense, **params).search(q, 5)
        assert torch.equal(a.touched, b.touched), name
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "name, params, match",
    [
        ("pca-tree", dict(depth=0), "depth=0"),
        ("pca-tree", dict(depth=3, probes=9), "probes=9"),
        ("wta-hash", dict(bands=0), "bands=0"),
        ("wta-hash", dict(window=1), "window=1"),
        ("wta-hash", dict(window=16, perms=20), "64-bit"),
        ("faiss-ivf", dict(nlist=4, nprobe=5), "nprobe=5"),
        ("faiss-ivf", dict(nlist=0), "nlist=0"),
    ],
)
def test_bad_params(setup, name, params, match):
    mem, _, _ = setup
    with pytest.raises(ValueError, match=match):
        make_reader(name, mem, **params)


def test_faiss_ivf_set_nprobe_equals_a_fresh_reader(setup):
    mem, q, _ = setup
    r = FaissIVFReader(mem, nlist=8, nprobe=1)
    r.set_nprobe(3)
    ref = FaissIVFReader(mem, nlist=8, nprobe=3).search(q, 10)
    got = r.search(q, 10)
    assert torch.equal(got.ids, ref.ids) and torch.equal(got.touched, ref.touched)
    with pytest.raises(ValueError, match="nprobe=9"):
        r.set_nprobe(9)
