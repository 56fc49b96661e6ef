"""The Ray sharded build runs the same hmn k-means loop and matches the in-memory build."""

import time

import numpy as np
import pytest
import torch

from hmn.index import IndexSpec, build_index_from_vectors

ray = pytest.importorskip("ray")

from pipeline.kmeans_ray import build_index_on_ray  # noqa: E402


def _facts(n=3000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.exp(0.5 * rng.standard_normal((n, 1)))
    return x.astype(np.float32)


@pytest.mark.parametrize("branching, num_shards, precision",
                         [([12], 3, "float32"), ([5, 3], 2, "float32"), ([5, 3], 2, "bfloat16")])
def test_ray_build_matches_in_memory(ray_local, branching, num_shards, precision):
    x = _facts()
    seen = []
    spec = IndexSpec(branching=tuple(branching), seed=0, iters=10, precision=precision)
    ref = build_index_from_vectors(x, spec)
    got = build_index_on_ray(x, spec, num_shards=num_shards, progress=seen.append)
    assert got.transform == ref.transform
    assert got.num_leaves == ref.num_leaves
    for a, b in zip(got.centroids, ref.centroids):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(got.parents, ref.parents):
        np.testing.assert_array_equal(a, b)
    assert (got.fact_leaf == ref.fact_leaf).mean() > 0.999
    obj_ref = [s["objective"] for s in ref.stats["levels"][0]["kmeans"]]
    obj_got = [s["objective"] for s in got.stats["levels"][0]["kmeans"]]
    # bfloat16: the objective is summed from float32 block sums, shard by shard
    np.testing.assert_allclose(obj_got, obj_ref, rtol=1e-6 if precision == "float32" else 1e-5)
    assert len(seen) >= len(obj_got)

    # the shard actors are killed at the end: their CPUs come back
    deadline = time.time() + 10
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.time() < deadline, "shard actors still hold CPUs"
        time.sleep(0.1)


def test_ray_build_validation(ray_local):
    with pytest.raises(ValueError, match="num_shards=0"):
        build_index_on_ray(_facts(n=10), IndexSpec(branching=(2,)), num_shards=0)
    with pytest.raises(ValueError, match="k <= n"):
        build_index_on_ray(_facts(n=10), IndexSpec(branching=(11,)), num_shards=2)


def test_ray_build_on_factorised_shards_matches_in_memory(ray_local):
    from hmn.memory import FactorisedMemory, build_fact_vectors

    rng = np.random.default_rng(1)
    ent = rng.standard_normal((300, 6)).astype(np.float32)
    rel = rng.standard_normal((9, 6)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 4, 1500))])
    parts = (ent, rel, rng.integers(0, 300, 1500), rng.integers(0, 9, 1500), offsets,
             rng.integers(0, 300, offsets[-1]))
    fm = FactorisedMemory(*parts)
    dense = build_fact_vectors(*parts)
    spec = IndexSpec(branching=(5, 3), seed=0, iters=8)
    ref = build_index_from_vectors(dense, spec)
    got = build_index_on_ray(fm, spec, num_shards=2)
    assert got.num_leaves == ref.num_leaves
    for a, b in zip(got.centroids, ref.centroids):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (got.fact_leaf == ref.fact_leaf).mean() > 0.999
    assert got.stats["levels"][1]["batched"] is True


def test_shard_actor_threads_follow_its_cpus_and_build_matches(ray_local):
    from pipeline.kmeans_ray import ShardActor

    x = _facts(n=1200)
    actor = ray.remote(ShardActor).options(num_cpus=2).remote(ray.put(x[:10]), 0, threads=2)
    try:
        assert ray.get(actor.num_threads.remote()) == 2
    finally:
        ray.kill(actor)
    spec = IndexSpec(branching=(4, 3), seed=0, iters=6, fit_sample=700)
    ref = build_index_from_vectors(x, spec)
    got = build_index_on_ray(x, spec, num_shards=2, actor_options={"num_cpus": 2})
    assert got.stats["fit_sample"] == 700
    for a, b in zip(got.centroids, ref.centroids):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (got.fact_leaf == ref.fact_leaf).mean() > 0.999


def test_ray_build_with_split_leaves_matches_in_memory(ray_local):
    rng = np.random.default_rng(5)
    blob = rng.standard_normal((900, 8)) * 0.2 + 3 * np.eye(8)[0]  # one oversized leaf
    x = np.concatenate([blob, rng.standard_normal((600, 8))]).astype(np.float32)
    spec = IndexSpec(branching=(3, 2), seed=0, iters=6, max_leaf_size=150)
    ref = build_index_from_vectors(x, spec)
    got = build_index_on_ray(x, spec, num_shards=2)
    assert got.stats["levels"][-1]["level"] == "split"
    assert got.num_leaves == ref.num_leaves > 6
    assert (got.parents[-1] == ref.parents[-1]).all()
    for a, b in zip(got.centroids, ref.centroids):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (got.fact_leaf == ref.fact_leaf).mean() > 0.999


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


@pytest.mark.parametrize("factorised", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_shard_actor_computes_on_its_device(device, factorised):
    """The actor class itself, in this process (no Ray started): with ``device`` its rows move
    to (or are staged to) the device, and its partial sums equal those of a default actor."""
    from hmn.memory import FactorisedMemory
    from hmn.mips import fit_transform
    from pipeline.kmeans_ray import ShardActor

    rng = np.random.default_rng(0)
    if factorised:
        offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 3, 400))])
        mem = FactorisedMemory(rng.standard_normal((90, 4)).astype(np.float32),
                               rng.standard_normal((5, 4)).astype(np.float32),
                               rng.integers(0, 90, 400), rng.integers(0, 5, 400), offsets,
                               rng.integers(0, 90, offsets[-1]))
        factors = {"subject_ids": mem.subject_ids.numpy(), "relation_ids": mem.relation_ids.numpy(),
                   "object_offsets": offsets, "object_values": mem.object_values.numpy()}
        make = lambda **kw: ShardActor(None, 0, 64, factors=factors,  # noqa: E731
                                       entity_emb=mem.entity_emb.numpy(),
                                       relation_emb=mem.relation_emb.numpy(), **kw)
    else:
        x = _facts(400, 12)
        make = lambda **kw: ShardActor(x, 0, 64, **kw)  # noqa: E731
    d = 12  # the facts' width, both layouts
    transform = fit_transform(100.0, U=0.75, m=3).to_dict()  # above every row's norm
    centroids = torch.nn.functional.normalize(torch.randn(6, d + 3), dim=1).numpy()
    offsets = np.array([0, 2, 6])
    groups = np.arange(400) % 2
    got_actor, ref_actor = make(device=device), make()
    assert got_actor.placement()["device"].startswith(device)
    for actor in (got_actor, ref_actor):
        assert actor.open_view(0, transform, None, groups) == 400
    got = got_actor.partial_stats_grouped(0, centroids, offsets)
    ref = ref_actor.partial_stats_grouped(0, centroids, offsets)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert np.array_equal(got[1], ref[1])
    assert isinstance(got_actor.rows(0, np.array([0, 5])), np.ndarray)  # back as numpy
    if device == "cpu":
        assert got_actor.placement() == ref_actor.placement() == {"device": "cpu", "rows": "cpu"}
