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


def test_pca_tree_touched_is_leaf_size_and_leaves_are_balanced(setup):
    mem, q, _ = setup
    r = PCATreeReader(mem, depth=4)
    sizes = np.bincount(r.leaf_of_fact, minlength=16)
    assert sizes.max() - sizes.min() <= 16  # median splits: balanced up to rounding
    c = r.search(q, 10)
    own = r.leaf_costs(mem.check_queries(q)).argmin(1).numpy()
    np.testing.assert_array_equal(c.touched.numpy(), sizes[own])
    leaf = torch.from_numpy(r.leaf_of_fact)
    for b in range(5):
        got = c.ids[b][c.ids[b] >= 0]
        assert set(leaf[got].tolist()) == {int(own[b])}


def test_wta_touched_counts_colliding_facts(setup):
    mem, q, _ = setup
    r = WTAHashReader(mem, bands=3, perms=2, window=4, seed=1)
    c = r.search(q, 10)
    fh, qh = r._hash(mem.vectors), r._hash(q)
    collide = (fh[None, :, :] == qh[:, None, :]).any(2)  # (B, N)
    np.testing.assert_array_equal(c.touched.numpy(), collide.sum(1).numpy())


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
