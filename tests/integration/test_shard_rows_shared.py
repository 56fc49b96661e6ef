"""Shard actors read the dense memory where it already is: the actors on the driver's node map
their rows of the memory's ``.npy`` file, an in-memory array reaches them through the object
store once and is not copied again, and the index is the same either way."""

import numpy as np
import pytest

from hmn.index import IndexSpec

ray = pytest.importorskip("ray")

from pipeline.kmeans_ray import ShardActor, _start_actors, build_index_on_ray  # noqa: E402


def _facts(n=2000, d=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * np.exp(0.5 * rng.standard_normal((n, 1)))
    return x.astype(np.float32)


def _backings(vectors, num_shards):
    actors, _ = _start_actors(vectors, num_shards, None, None)
    try:
        return ray.get([a.rows_backing.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)


def test_actors_map_the_memory_file_and_build_the_same_index(ray_local, tmp_path):
    x = _facts()
    np.save(tmp_path / "facts.npy", x)
    mapped = np.load(tmp_path / "facts.npy", mmap_mode="r")
    assert _backings(mapped, 3) == [str(tmp_path / "facts.npy")] * 3
    spec = IndexSpec(branching=(6, 3), seed=0, iters=8, max_leaf_size=150)
    got = build_index_on_ray(mapped, spec, num_shards=3)
    ref = build_index_on_ray(x, spec, num_shards=3)
    np.testing.assert_array_equal(got.fact_leaf, ref.fact_leaf)
    for g, r in zip(got.centroids, ref.centroids):
        assert np.array_equal(g.numpy(), r.numpy())
    def iterations(index):  # every k-means iteration's stats but its time
        return [{k: v for k, v in it.items() if k != "seconds"}
                for it in index.stats["levels"][0]["kmeans"]]

    assert iterations(got) == iterations(ref)


def test_in_memory_shards_stay_in_the_object_store(ray_local):
    """No private copy in the actor: its rows lie in a shared-memory mapping (the object
    store's), not in anonymous memory."""
    backings = _backings(_facts(), 2)
    assert all(b not in (None, "", "[heap]") for b in backings), backings


def test_actor_on_another_node_gets_its_rows_from_the_driver(ray_local, tmp_path):
    x = _facts(50, 4)
    np.save(tmp_path / "facts.npy", x)
    elsewhere = {"path": str(tmp_path / "facts.npy"), "offset": 128, "rows": 50, "dim": 4,
                 "node": "another-node"}
    actor = ShardActor(None, 0, rows_file=elsewhere)  # this process plays the actor
    assert actor.needs_rows()  # it must not map a file of the same name on its own node
    here = dict(elsewhere, node=ray.get_runtime_context().get_node_id())
    assert ShardActor(None, 0, rows_file=here).rows_backing() == str(tmp_path / "facts.npy")


def _factorised(tmp_path, mapped: bool):
    from hmn.memory import FactorisedMemory

    rng = np.random.default_rng(3)
    ent = rng.standard_normal((300, 6)).astype(np.float32)
    rel = rng.standard_normal((9, 6)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 4, 1200))])
    facts = (rng.integers(0, 300, 1200), rng.integers(0, 9, 1200), offsets,
             rng.integers(0, 300, offsets[-1]))
    if mapped:  # as the memory stage gives them: its factorised/*.npy, mapped read-only
        np.save(tmp_path / "entity_emb.npy", ent)
        np.save(tmp_path / "relation_emb.npy", rel)
        ent, rel = (np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("entity_emb", "relation_emb"))
    return FactorisedMemory(ent, rel, *facts)


def test_factorised_actors_map_the_tables_file_and_build_the_same_index(ray_local, tmp_path):
    """The memory stage's factorised tables are .npy maps: the actors on the driver's node map
    the same file (one copy in the page cache) instead of getting an object-store copy."""
    mapped, held = _factorised(tmp_path, True), _factorised(tmp_path, False)
    for memory, want in ((mapped, str(tmp_path / "entity_emb.npy")), (held, "/dev/shm")):
        actors, _ = _start_actors(memory, 2, None, None)
        try:
            backings = ray.get([a.tables_backing.remote() for a in actors])
        finally:
            for a in actors:
                ray.kill(a)
        assert all(b is not None and b.startswith(want) for b in backings), (want, backings)
    spec = IndexSpec(branching=(5, 3), seed=0, iters=8)
    got = build_index_on_ray(mapped, spec, num_shards=2)
    ref = build_index_on_ray(held, spec, num_shards=2)
    np.testing.assert_array_equal(got.fact_leaf, ref.fact_leaf)
    for g, r in zip(got.centroids, ref.centroids):
        assert np.array_equal(g.numpy(), r.numpy())


def test_factorised_actor_on_another_node_gets_the_tables_from_the_driver(ray_local, tmp_path):
    from pipeline.kmeans_ray import table_file

    memory = _factorised(tmp_path, True)
    files = {name: dict(table_file(getattr(memory, name)), node="another-node")
             for name in ("entity_emb", "relation_emb")}
    factors = {"subject_ids": memory.subject_ids.numpy(), "relation_ids": memory.relation_ids.numpy(),
               "object_offsets": memory.object_offsets.numpy(), "object_values": memory.object_values.numpy()}
    actor = ShardActor(None, 0, factors=factors, table_files=files)  # this process plays the actor
    assert actor.needs_rows() and actor.num_rows() == 0
    actor.set_tables(memory.entity_emb.numpy(), memory.relation_emb.numpy())
    assert not actor.needs_rows() and actor.num_rows() == 1200
