"""build_index(max_leaf_size=...): oversized leaves split by a k-means of their own facts."""

import dataclasses

import numpy as np
import pytest
import torch

from hmn.index import (
    ClusterIndex,
    IndexSpec,
    InMemoryDataFactory,
    build_index_from_vectors,
    split_leaves,
)
from hmn.memory import FactMemory, FactorisedMemory
from hmn.readers import make_reader


def _skewed(n_blob=3000, n_rest=2000, d=16, seed=0):
    """One dense blob (k-means puts it in one or two huge leaves) and spread-out points."""
    rng = np.random.default_rng(seed)
    blob = rng.standard_normal((n_blob, d)) * 0.3 + 3 * np.eye(d)[0]
    rest = rng.standard_normal((n_rest, d))
    return torch.tensor(np.concatenate([blob, rest]), dtype=torch.float32)


def _unit_rows(idx: ClusterIndex, x: torch.Tensor) -> torch.Tensor:
    xt = idx.transform.facts(x)
    return xt / xt.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("branching", [[8], [4, 4]])
def test_split_caps_leaves_and_refines_the_tree(branching):
    x = _skewed()
    base = build_index_from_vectors(x, branching=branching, iters=10, seed=2)
    cap = 200
    assert base.leaf_sizes().max() > 3 * cap  # the data makes an oversized leaf
    idx = build_index_from_vectors(x, branching=branching, iters=10, seed=2, max_leaf_size=cap)
    sizes = idx.leaf_sizes()
    split = idx.stats["levels"][-1]
    assert split["level"] == "split" and split["sizes_before"]["max"] == base.leaf_sizes().max()
    # the final assignment to the most similar piece may push a few pieces a little over the cap
    assert split["rounds"][-1]["over_cap"] == (sizes > cap).sum() <= 3
    assert sizes.max() <= 1.25 * cap and sizes.sum() == len(x)
    assert idx.stats["leaf_sizes"]["imbalance"] < base.stats["leaf_sizes"]["imbalance"]
    new = sum(r.get("new_leaves", 0) for r in split["rounds"])
    assert new == idx.num_leaves - base.num_leaves > 0
    assert idx.stats["leaf_sizes"]["max"] == sizes.max()
    # the new partition refines the old one: every new leaf's facts come from one old leaf,
    # and a leaf keeps its old parent
    pairs = np.unique(np.stack([idx.fact_leaf, base.fact_leaf]), axis=1)
    assert len(np.unique(pairs[0])) == pairs.shape[1]  # one old leaf per new leaf
    old_of_new = dict(zip(pairs[0].tolist(), pairs[1].tolist()))
    if len(branching) > 1:
        for new, old in old_of_new.items():
            assert idx.parents[-1][new] == base.parents[-1][old]
        assert (np.diff(idx.parents[-1]) >= 0).all()  # children of a parent stay contiguous
        torch.testing.assert_close(idx.centroids[0], base.centroids[0])  # upper levels unchanged
    # leaves that were not split keep their facts and their centroid
    small = np.flatnonzero(base.leaf_sizes() <= cap)
    for old in small.tolist():
        members = np.flatnonzero(base.fact_leaf == old)
        assert len(np.unique(idx.fact_leaf[members])) == 1
        torch.testing.assert_close(idx.centroids[-1][idx.fact_leaf[members[0]]],
                                   base.centroids[-1][old])  # fmt: skip
    # a fact of a split leaf sits in its most similar leaf among the pieces of that leaf
    xt = _unit_rows(idx, x)
    scores = xt @ idx.centroids[-1].T  # (N, C)
    old_leaf = np.array([old_of_new[c] for c in range(idx.num_leaves)])
    same = torch.from_numpy(old_leaf[None, :] == base.fact_leaf[:, None])
    best = scores.masked_fill(~same, -np.inf).max(1).values
    chosen = scores[torch.arange(len(x)), torch.from_numpy(idx.fact_leaf)]
    assert (chosen >= best - 1e-5).all()


def test_split_is_off_by_default_and_deterministic():
    x = _skewed(n_blob=800, n_rest=400)
    a = build_index_from_vectors(x, branching=[4], iters=5, seed=1)
    b = build_index_from_vectors(x, branching=[4], iters=5, seed=1, max_leaf_size=0)
    assert (a.fact_leaf == b.fact_leaf).all() and b.stats["max_leaf_size"] == 0
    assert all(lv["level"] != "split" for lv in b.stats["levels"])
    c = build_index_from_vectors(x, branching=[4], iters=5, seed=1, max_leaf_size=150)
    d = build_index_from_vectors(x, branching=[4], iters=5, seed=1, max_leaf_size=150)
    assert (c.fact_leaf == d.fact_leaf).all()
    torch.testing.assert_close(c.centroids[-1], d.centroids[-1])


def test_identical_facts_cannot_be_split_and_do_not_loop():
    rng = np.random.default_rng(0)
    same = np.tile(rng.standard_normal((1, 8)), (500, 1))
    x = torch.tensor(np.concatenate([same, rng.standard_normal((300, 8))]), dtype=torch.float32)
    idx = build_index_from_vectors(x, branching=[3], iters=5, seed=0, max_leaf_size=100)
    rounds = idx.stats["levels"][-1]["rounds"]
    assert sum(r.get("unsplittable", 0) for r in rounds) >= 1
    assert idx.leaf_sizes().max() >= 500  # the identical facts stay together
    assert idx.leaf_sizes().sum() == len(x)


def test_split_index_saves_loads_and_reads_less(tmp_path):
    x = _skewed()
    base = build_index_from_vectors(x, branching=[4, 4], iters=10, seed=2)
    idx = build_index_from_vectors(x, branching=[4, 4], iters=10, seed=2, max_leaf_size=300)
    idx.save(str(tmp_path / "index"))
    back = ClusterIndex.load(str(tmp_path / "index"))
    assert (back.fact_leaf == idx.fact_leaf).all()
    assert [p.tolist() for p in back.parents] == [p.tolist() for p in idx.parents]
    q = x[:64] + 0.05 * torch.randn(64, x.shape[1], generator=torch.Generator().manual_seed(0))
    touched = {}
    for name, index in (("base", base), ("split", back)):
        reader = make_reader("clustered", FactMemory(x), index, top_clusters=1)
        cands = reader.search(q, k=10)
        touched[name] = float(cands.touched.float().mean())
    assert touched["split"] < touched["base"]


def test_split_on_the_factorised_memory_matches_dense():
    from hmn.memory import build_fact_vectors

    rng = np.random.default_rng(4)
    ent = rng.standard_normal((200, 6)).astype(np.float32)
    rel = rng.standard_normal((3, 6)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 3, 1200))])
    subj = np.where(rng.random(1200) < 0.6, 7, rng.integers(0, 200, 1200))  # a hub subject
    parts = (ent, rel, subj, rng.integers(0, 3, 1200), offsets, rng.integers(0, 200, offsets[-1]))
    dense = build_fact_vectors(*parts)
    a = build_index_from_vectors(dense, branching=[4, 2], iters=6, seed=0, max_leaf_size=120)
    b = build_index_from_vectors(FactorisedMemory(*parts), branching=[4, 2], iters=6, seed=0,
                                 max_leaf_size=120)  # fmt: skip
    assert a.num_leaves == b.num_leaves and (a.fact_leaf == b.fact_leaf).mean() > 0.99


def test_max_leaf_size_validation():
    with pytest.raises(ValueError, match="max_leaf_size"):
        build_index_from_vectors(_skewed(100, 100), branching=[2], max_leaf_size=-1)


def test_split_leaves_of_a_built_index_equals_the_build_step():
    x = _skewed(n_blob=1500, n_rest=800)
    spec = IndexSpec(branching=(3, 3), iters=6, seed=4, max_leaf_size=150)
    base = build_index_from_vectors(x, spec, max_leaf_size=0)
    built = build_index_from_vectors(x, spec)
    later = split_leaves(base, InMemoryDataFactory(x), spec)
    assert (later.fact_leaf == built.fact_leaf).all()
    for a, b in zip(later.centroids, built.centroids):
        torch.testing.assert_close(a, b)
    assert later.stats["leaf_sizes"] == built.stats["leaf_sizes"]
    assert (base.leaf_sizes().max() > 150) and base.stats.get("max_leaf_size") == 0
    with pytest.raises(ValueError, match="facts"):
        split_leaves(base, InMemoryDataFactory(x[:100]), spec)
    with pytest.raises(ValueError, match="max_leaf_size"):
        split_leaves(base, InMemoryDataFactory(x), dataclasses.replace(spec, max_leaf_size=0))
