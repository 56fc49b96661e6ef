"""Tests for hmn.kmeans (spherical k-means over a DataAccess) and hmn.index (cluster index)."""

import dataclasses
import json
import os

import faiss
import numpy as np
import pytest
import torch

from hmn.config import MemoryConfig
from hmn.index import (
    ClusterIndex,
    IndexSpec,
    InMemoryDataFactory,
    build_index,
    build_index_from_vectors,
)
from hmn.kmeans import DataAccess, InMemoryData, grouped_spherical_kmeans, spherical_kmeans
from hmn.mips import fit_transform


def _blobs(n_per=60, centres=5, d=16, noise=0.05, seed=0):
    """Well-separated clusters on the sphere with known labels."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    labels = np.repeat(np.arange(centres), n_per)
    x = c[labels] + noise * rng.standard_normal((labels.size, d))
    perm = rng.permutation(labels.size)
    return torch.from_numpy(x[perm].astype(np.float32)), labels[perm]


def _objective(x: torch.Tensor, centroids: torch.Tensor) -> float:
    xn = torch.nn.functional.normalize(x, dim=1)
    return float((xn @ centroids.T).max(dim=1).values.double().sum())


def test_in_memory_data_is_a_data_access_and_chunking_is_invisible():
    x = torch.randn(103, 8)
    c = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    a, b = InMemoryData(x), InMemoryData(x, chunk=7)
    assert isinstance(a, DataAccess) and (a.n, a.d) == (103, 8)
    sa, ca, oa = a.partial_stats(c)
    sb, cb, ob = b.partial_stats(c)
    np.testing.assert_array_equal(ca, cb)
    assert ca.sum() == 103 and sa.dtype == np.float64
    np.testing.assert_allclose(sa, sb, rtol=1e-6, atol=1e-6)
    assert oa == pytest.approx(ob, rel=1e-6)
    np.testing.assert_array_equal(a.assign(c), b.assign(c))
    torch.testing.assert_close(a.rows(np.array([3, 0])).norm(dim=1), torch.ones(2))
    assert a.max_norm() == pytest.approx(float(x.norm(dim=1).max()))


def test_objective_never_decreases():
    x = torch.randn(600, 12)
    res = spherical_kmeans(InMemoryData(x), 16, iters=15, tol=0.0, seed=3)
    obj = [s["objective"] for s in res.stats]
    assert len(obj) == 15
    for a, b in zip(obj, obj[1:]):
        assert b >= a - 1e-6 * abs(a)
    assert obj[-1] > obj[0]
    assert set(res.stats[0]) >= {"iteration", "objective", "imbalance", "empty_splits", "seconds"}
    torch.testing.assert_close(res.centroids.norm(dim=1), torch.ones(16))


@pytest.mark.parametrize("init", ["kmeans++", "sample"])
def test_recovers_well_separated_clusters(init):
    x, labels = _blobs()
    res = spherical_kmeans(InMemoryData(x), 5, seed=1, init=init, iters=30)
    # Every found cluster is pure and every true cluster is found once.
    pairs = set(zip(res.assignments.tolist(), labels.tolist()))
    assert len(pairs) == 5
    assert len({a for a, _ in pairs}) == 5


def test_same_seed_same_result():
    x = torch.randn(500, 10)
    r1 = spherical_kmeans(InMemoryData(x), 8, seed=7)
    r2 = spherical_kmeans(InMemoryData(x, chunk=64), 8, seed=7)
    torch.testing.assert_close(r1.centroids, r2.centroids)
    np.testing.assert_array_equal(r1.assignments, r2.assignments)
    r3 = spherical_kmeans(InMemoryData(x), 8, seed=8)
    assert not torch.equal(r1.centroids, r3.centroids)


def test_validation():
    data = InMemoryData(torch.randn(10, 3))
    with pytest.raises(ValueError, match="k=11.*n=10"):
        spherical_kmeans(data, 11)
    with pytest.raises(ValueError, match="k=0"):
        spherical_kmeans(data, 0)
    with pytest.raises(ValueError, match="unknown"):
        spherical_kmeans(data, 2, init="nope")
    with pytest.raises(ValueError, match="iters"):
        spherical_kmeans(data, 2, iters=0)
    with pytest.raises(TypeError, match="DataAccess"):
        spherical_kmeans(np.zeros((10, 3)), 2)
    with pytest.raises(ValueError, match=r"\(C, d=3\)"):
        data.partial_stats(torch.zeros(2, 4))


class _SameRowsData(InMemoryData):
    """Serves one row for every index: the initial centroids all coincide."""

    def rows(self, idx):
        return super().rows(np.zeros(len(idx), dtype=np.int64))


def test_empty_clusters_are_split():
    x, _ = _blobs(n_per=40, centres=4)
    seen = []
    res = spherical_kmeans(
        _SameRowsData(x), 4, init="sample", iters=20, tol=0.0, progress=seen.append
    )
    assert res.stats[0]["empty_splits"] == 3  # 4 equal centroids: 1 takes everything, 3 re-seeded
    assert seen == res.stats
    obj = [s["objective"] for s in res.stats]
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(obj, obj[1:]))
    assert np.bincount(res.assignments, minlength=4).min() > 0


def test_matches_faiss_spherical_kmeans():
    x, _ = _blobs(n_per=100, centres=20, d=32, noise=0.4, seed=5)
    xn = torch.nn.functional.normalize(x, dim=1)
    km = faiss.Kmeans(32, 20, niter=20, spherical=True, seed=1234)
    km.train(xn.numpy())
    ref = _objective(x, torch.from_numpy(km.centroids))
    ours = spherical_kmeans(InMemoryData(x), 20, iters=20, seed=0)
    assert _objective(x, ours.centroids) >= 0.99 * ref


# ---- hmn.index ---------------------------------------------------------------------------


def _facts(n=600, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.exp(0.5 * torch.randn(n, 1, generator=g))


def test_flat_index():
    x = _facts()
    idx = build_index_from_vectors(x, branching=[10], seed=0)
    assert idx.num_leaves == 10 and idx.num_levels == 1 and idx.parents == []
    assert idx.fact_leaf.shape == (600,) and idx.leaf_sizes().sum() == 600
    assert idx.centroids[0].shape == (10, 15)
    torch.testing.assert_close(idx.centroids[0].norm(dim=1), torch.ones(10))
    assert idx.transform.scale == pytest.approx(0.75 / float(x.norm(dim=1).max()))
    # fact_leaf is the most similar leaf of the transformed, normalised facts
    px = torch.nn.functional.normalize(idx.transform.facts(x), dim=1)
    agree = (px @ idx.centroids[0].T).argmax(1).numpy() == idx.fact_leaf
    assert agree.mean() > 0.99


def test_hierarchical_index():
    x = _facts()
    levels = []
    idx = build_index_from_vectors(x, branching=[4, 3], seed=0, progress=levels.append)
    assert idx.num_levels == 2 and idx.centroids[0].shape[0] == 4
    assert idx.num_leaves == 12  # every top cluster has >= 3 facts here
    parents = idx.parents[0]
    np.testing.assert_array_equal(np.bincount(parents, minlength=4), [3, 3, 3, 3])
    assert np.all(np.diff(parents) >= 0)  # children of parent 0 first
    # every fact in exactly one leaf, and leaves of one top cluster share the top cluster's facts
    assert idx.leaf_sizes().sum() == 600 and idx.leaf_sizes().min() > 0
    px = torch.nn.functional.normalize(idx.transform.facts(x), dim=1)
    top = (px @ idx.centroids[0].T).argmax(1).numpy()
    assert (parents[idx.fact_leaf] == top).mean() > 0.99
    assert {s["level"] for s in levels} == {0, 1}
    assert [lv["num_clusters"] for lv in idx.stats["levels"]] == [4, 12]


def test_hierarchical_index_small_clusters_get_fewer_children():
    x = _facts(n=40)
    idx = build_index_from_vectors(x, branching=[8, 30], seed=1)
    counts = np.bincount(idx.parents[0], minlength=8)
    top_sizes = np.bincount(idx.parents[0][idx.fact_leaf], minlength=8)
    np.testing.assert_array_equal(counts, np.maximum(np.minimum(30, top_sizes), 1))
    assert idx.leaf_sizes().sum() == 40


def test_index_save_load_round_trip(tmp_path):
    idx = build_index_from_vectors(_facts(), branching=[4, 3], seed=0)
    path = str(tmp_path / "index")
    idx.save(path)
    idx.save(path)  # overwriting an existing index works too
    assert sorted(os.listdir(tmp_path)) == ["index"]  # no temp or old directories left behind
    back = ClusterIndex.load(path)
    assert back.transform == idx.transform
    for a, b in zip(back.centroids, idx.centroids):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(back.parents[0], idx.parents[0])
    np.testing.assert_array_equal(back.fact_leaf, idx.fact_leaf)
    assert back.stats == json.loads(json.dumps(back.stats))
    assert back.stats["branching"] == [4, 3]
    with pytest.raises(FileNotFoundError):
        ClusterIndex.load(str(tmp_path / "missing"))


def test_build_index_validation():
    x = _facts(n=20)
    factory = InMemoryDataFactory(x)
    with pytest.raises(ValueError, match="branching"):
        IndexSpec(branching=())
    with pytest.raises(ValueError, match=r"branching\[1\]=0"):
        IndexSpec(branching=(2, 0))
    with pytest.raises(ValueError, match="k <= n"):
        build_index(factory, IndexSpec(branching=(21,)))
    with pytest.raises(TypeError, match="IndexSpec"):
        build_index(factory, {"branching": (2,)})
    with pytest.raises(ValueError, match="sorted"):
        factory(fit_transform(1.0), np.array([3, 1]))
    with pytest.raises(ValueError, match="parents"):
        ClusterIndex(fit_transform(1.0), [torch.zeros(2, 3), torch.zeros(4, 3)], [], np.zeros(3))


# ---- factorised data access and grouped (batched) levels --------------------------------------


def _factorised(n=300, ne=120, nr=7, d=6, seed=0):
    from hmn.memory import FactorisedMemory, build_fact_vectors

    rng = np.random.default_rng(seed)
    ent = (rng.standard_normal((ne, d)) * np.exp(0.4 * rng.standard_normal((ne, 1)))).astype(
        np.float32
    )
    rel = rng.standard_normal((nr, d)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 4, n))])
    parts = (ent, rel, rng.integers(0, ne, n), rng.integers(0, nr, n), offsets,
             rng.integers(0, ne, offsets[-1]))
    return FactorisedMemory(*parts), torch.from_numpy(build_fact_vectors(*parts))


def test_factorised_data_equals_in_memory_data():
    from hmn.kmeans import FactorisedData

    fm, x = _factorised()
    t = fit_transform(float(x.norm(dim=1).max()))
    c = torch.nn.functional.normalize(torch.randn(9, x.shape[1] + 3), dim=1)
    ids = np.arange(3, 300, 4)
    for a, b in [
        (FactorisedData(fm, chunk=37, transform=t.facts), InMemoryData(x, transform=t.facts)),
        (FactorisedData(fm, ids, transform=t.facts), InMemoryData(x[ids], transform=t.facts)),
    ]:
        assert (a.n, a.d) == (b.n, b.d)
        sa, ca, oa = a.partial_stats(c)
        sb, cb, ob = b.partial_stats(c)
        np.testing.assert_array_equal(ca, cb)
        # float32 sums per block, float64 across blocks: chunking changes the rounding only
        np.testing.assert_allclose(sa, sb, rtol=1e-5, atol=1e-5)
        assert oa == pytest.approx(ob, rel=1e-6)
        np.testing.assert_array_equal(a.assign(c), b.assign(c))
        assert a.max_norm() == pytest.approx(b.max_norm(), rel=1e-6)
        torch.testing.assert_close(a.rows(np.array([5, 1])), b.rows(np.array([5, 1])))


def test_factorised_index_equals_dense_index():
    fm, x = _factorised()
    a = build_index_from_vectors(fm, branching=[4, 3], seed=0, iters=8)
    b = build_index_from_vectors(x, branching=[4, 3], seed=0, iters=8)
    assert a.transform.scale == pytest.approx(b.transform.scale, rel=1e-6)
    assert (a.fact_leaf == b.fact_leaf).mean() > 0.99
    for ca, cb in zip(a.centroids, b.centroids):
        torch.testing.assert_close(ca, cb, atol=1e-4, rtol=0)


def test_grouped_kmeans_matches_separate_runs_per_group():
    x, labels = _blobs(n_per=50, centres=6, d=10, noise=0.3, seed=2)
    groups = labels % 3  # 3 groups of 100 rows
    ks = np.array([4, 2, 3])
    res = grouped_spherical_kmeans(InMemoryData(x, chunk=17, groups=groups), ks, iters=15, seed=0)
    offsets = np.concatenate([[0], np.cumsum(ks)])
    assert res.centroids.shape == (9, 10) and res.group_objectives.shape == (3,)
    for g in range(3):  # every row joined a centroid of its own group
        a = res.assignments[groups == g]
        assert a.min() >= offsets[g] and a.max() < offsets[g + 1]
        sep = spherical_kmeans(InMemoryData(x[groups == g]), int(ks[g]), iters=15, seed=g)
        ours = _objective(x[groups == g], res.centroids[offsets[g] : offsets[g + 1]])
        assert ours >= 0.99 * _objective(x[groups == g], sep.centroids)
    obj = [s["objective"] for s in res.stats]
    assert all(b >= a - 1e-6 * abs(a) for a, b in zip(obj, obj[1:]))
    with pytest.raises(ValueError, match=r"ks\[1\]=0"):
        grouped_spherical_kmeans(InMemoryData(x, groups=groups), np.array([1, 0, 1]))
    with pytest.raises(ValueError, match=r"ks\[1\]=2.*group size 0"):
        grouped_spherical_kmeans(InMemoryData(x), ks)  # no groups: one group of 300 rows
    with pytest.raises(ValueError, match="grouped_spherical_kmeans"):
        spherical_kmeans(InMemoryData(x, groups=groups), 3)


def test_a_view_without_groups_is_one_group():
    x, labels = _blobs(n_per=50, centres=4, d=6, noise=0.1, seed=3)
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(5, 6, generator=g), dim=1)
    data = InMemoryData(x, chunk=40)
    assert data.groups is None
    sums, counts, obj = data.partial_stats(c)
    gsums, gcounts, gobj = data.partial_stats_grouped(c, np.array([0, 5]))
    np.testing.assert_array_equal(gsums, sums)
    np.testing.assert_array_equal(gcounts, counts)
    assert gobj.tolist() == [obj]
    np.testing.assert_array_equal(data.assign_grouped(c, np.array([0, 5])), data.assign(c))
    with pytest.raises(ValueError, match=r"offsets must be \[0, 5\]"):
        data.partial_stats_grouped(c, np.array([0, 2, 5]))
    # the grouped k-means over one group runs the same loop as the flat one: both find the blobs
    res = grouped_spherical_kmeans(data, np.array([4]), iters=30, tol=0.0, seed=1)
    flat = spherical_kmeans(data, 4, iters=30, tol=0.0, seed=1)
    assert res.centroids.shape == (4, 6) and res.group_objectives.shape == (1,)
    for r in (res, flat):
        assert len(set(zip(r.assignments.tolist(), labels.tolist()))) == 4
    assert res.objective == pytest.approx(flat.objective, rel=1e-5)
    assert flat.group_objectives.tolist() == [flat.objective]


def test_index_spec_from_config_takes_every_field():
    cfg = MemoryConfig(U=0.8, m=2, branching=(5, 3), iters=7, tol=1e-3, init="sample",
                       fit_sample=90, kmeans_precision="bfloat16", max_leaf_size=40, seed=9)
    spec = IndexSpec.from_config(cfg)
    assert spec == IndexSpec(branching=(5, 3), U=0.8, m=2, iters=7, tol=1e-3, init="sample",
                             fit_sample=90, precision="bfloat16", max_leaf_size=40, seed=9)
    defaults = IndexSpec.from_config(MemoryConfig())
    assert all(getattr(spec, f.name) != getattr(defaults, f.name)
               for f in dataclasses.fields(IndexSpec))  # every field follows the config
    with pytest.raises(ValueError, match="U=1.5"):
        IndexSpec(branching=(2,), U=1.5)
    with pytest.raises(ValueError, match="precision='half'"):
        IndexSpec(branching=(2,), precision="half")
    with pytest.raises(ValueError, match="init='nope'"):
        IndexSpec(branching=(2,), init="nope")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 1


@pytest.mark.parametrize("transform", [False, True])
def test_cached_unit_rows_give_the_same_results(transform):
    torch.manual_seed(0)
    x = torch.randn(307, 9) * 3
    t = fit_transform(float(x.norm(dim=1).max())) if transform else None
    fn = None if t is None else t.facts
    d = x.shape[1] + (3 if transform else 0)
    c = torch.nn.functional.normalize(torch.randn(6, d), dim=1)
    groups = np.arange(307) % 4
    offsets = np.array([0, 2, 3, 5, 6])
    ref = InMemoryData(x, chunk=50, transform=fn, groups=groups, cache_rows=False)
    got = InMemoryData(x, chunk=50, transform=fn, groups=groups, cache_rows=True)
    for a, b in [(ref.partial_stats(c), got.partial_stats(c)),
                 (ref.partial_stats_grouped(c, offsets), got.partial_stats_grouped(c, offsets))]:
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(a[1], b[1])
        np.testing.assert_allclose(a[2], b[2], rtol=1e-6, atol=1e-4)  # objectives may be ~0
    np.testing.assert_array_equal(ref.assign(c), got.assign(c))
    np.testing.assert_array_equal(ref.assign_grouped(c, offsets), got.assign_grouped(c, offsets))
    idx = np.array([5, 300, 0, 5])
    torch.testing.assert_close(ref.rows(idx), got.rows(idx))
    assert got._unit is not None and ref._unit is None


def test_unit_rows_are_used_in_place_and_validation():
    x = torch.nn.functional.normalize(torch.randn(100, 7), dim=1)
    data = InMemoryData(x)  # cache_rows=None: small, already unit -> no copy
    data.partial_stats(x[:3])
    assert data._unit is data._x
    y = InMemoryData(x * 2)
    y.partial_stats(x[:3])
    assert y._unit is not None and y._unit is not y._x
    torch.testing.assert_close(y._unit, x)
    with pytest.raises(ValueError, match="cache_rows='yes'"):
        InMemoryData(x, cache_rows="yes")


def test_factorised_data_does_not_cache_by_default():
    from hmn.kmeans import FactorisedData

    fm, x = _factorised()
    c = torch.nn.functional.normalize(torch.randn(4, x.shape[1]), dim=1)
    a = FactorisedData(fm)
    b = FactorisedData(fm, cache_rows=True)
    np.testing.assert_array_equal(a.assign(c), b.assign(c))
    assert a._unit is None and b._unit is not None


def test_large_k_caps_the_similarity_buffer():
    from hmn import kmeans

    data = InMemoryData(torch.randn(10, 4), chunk=65536)
    assert data._step(1000) == kmeans._SIM_BYTES // 4000
    assert data._step(1) == 65536
