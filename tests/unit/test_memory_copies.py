"""The dense memory is built and served without copies of the (N, D) matrix (no Ray started).

At 1m facts x 600 the matrix is 2.4 GB; the memory stage once held about five copies of it (the
built array, a squared temporary for its norms, a ``ray.put`` per shard and a heap copy in every
shard actor). These tests fail if a copy comes back: `write_dense_memory` is measured with
tracemalloc (numpy reports its allocations to it; pages of a file map are not allocations), and
a shard actor's rows are checked to lie in the file mapping they came from.
"""

import tracemalloc

import numpy as np
import pytest

from hmn.memory import build_fact_vectors
from pipeline.artifacts import KnowledgeBase
from pipeline.kmeans_ray import ShardActor, mapped_file
from pipeline.stages.memory import write_dense_memory


def _kb(n: int, num_entities: int, seed: int = 0) -> KnowledgeBase:
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return KnowledgeBase(
        entity_keys=np.array([], dtype=object), entity_names=[],
        relation_keys=np.array([], dtype=object),
        fact_subject=rng.integers(0, num_entities, n), fact_relation=rng.integers(0, 7, n),
        object_offsets=offsets, object_values=rng.integers(0, num_entities, int(offsets[-1])),
    )


def _tables(num_entities: int, d: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((num_entities, d)).astype(np.float32),
            rng.standard_normal((7, d)).astype(np.float32))


def test_write_dense_memory_writes_what_np_save_would(tmp_path):
    kb = _kb(3000, 50)
    ent, rel = _tables(50, 6)
    ref = build_fact_vectors(ent, rel, kb.fact_subject, kb.fact_relation, kb.object_offsets,
                             kb.object_values)  # (N, 18)
    np.save(tmp_path / "ref.npy", ref)
    got, norm_max, norm_mean = write_dense_memory(tmp_path / "facts.npy", ent, rel, kb, chunk=7)
    assert (tmp_path / "facts.npy").read_bytes() == (tmp_path / "ref.npy").read_bytes()
    assert isinstance(got, np.memmap) and not got.flags.writeable
    assert mapped_file(got) == (str(tmp_path / "facts.npy"), 128)  # the rows of that file
    np.testing.assert_array_equal(got, ref)
    norms = np.linalg.norm(ref, axis=1)  # what the stage used to compute: bit for bit
    assert (norm_max, norm_mean) == (float(norms.max()), float(norms.mean()))


def test_write_dense_memory_holds_no_copy_of_the_matrix(tmp_path):
    """The peak of numpy allocations while the memory is built, written and its norms taken
    stays far below the matrix (an in-memory build, np.save of it or a whole-matrix norm would
    each allocate at least one matrix)."""
    n, d = 200_000, 8
    kb = _kb(n, 1000)
    ent, rel = _tables(1000, d)
    matrix = n * 3 * d * 4  # 19.2 MB
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        vectors, _, _ = write_dense_memory(tmp_path / "facts.npy", ent, rel, kb, chunk=4096)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert vectors.shape == (n, 3 * d)
    # the (N,) norms (4 bytes a fact, 1/24 of the matrix here) and chunk temporaries only
    assert peak < 0.25 * matrix, f"peak {peak / 1e6:.1f} MB for a {matrix / 1e6:.1f} MB matrix"


@pytest.mark.parametrize("rows", [slice(None), slice(1, 500), slice(777, 1000)])
def test_mapped_file_finds_the_rows_of_a_memory_map(tmp_path, rows):
    x = np.random.default_rng(0).standard_normal((1000, 12)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    view = np.load(tmp_path / "x.npy", mmap_mode="r")[rows]
    path, offset = mapped_file(view)
    assert path == str(tmp_path / "x.npy")
    n = view.shape[0]
    again = np.memmap(path, dtype=np.float32, mode="r", offset=offset, shape=(n, 12))
    np.testing.assert_array_equal(again, x[rows])


def test_mapped_file_refuses_what_is_not_a_shared_file_map(tmp_path):
    x = np.ones((10, 4), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    assert mapped_file(x) is None  # in memory
    assert mapped_file(np.asarray(np.load(tmp_path / "x.npy", mmap_mode="r"))) is None  # plain view
    assert mapped_file(np.load(tmp_path / "x.npy", mmap_mode="c")) is None  # copy-on-write
    assert mapped_file(np.load(tmp_path / "x.npy", mmap_mode="r")[:, :2]) is None  # not contiguous


def test_shard_actor_maps_its_rows_of_the_file(tmp_path):
    """The actor class in this process: its rows are a view of the file's pages, not a copy, and
    its views compute what an actor given the rows in memory computes."""
    from hmn.mips import fit_transform

    x = np.random.default_rng(0).standard_normal((600, 12)).astype(np.float32)
    np.save(tmp_path / "facts.npy", x)
    path, offset = mapped_file(np.load(tmp_path / "facts.npy", mmap_mode="r"))
    rows_file = {"path": path, "offset": offset + 100 * 12 * 4, "rows": 400, "dim": 12,
                 "node": None}
    mapped = ShardActor(None, 100, 64, rows_file=rows_file)
    held = ShardActor(x[100:500].copy(), 100, 64)
    assert mapped.rows_backing() == path
    assert held.rows_backing() in ("", "[heap]")  # a private array, for contrast
    assert not mapped.needs_rows() and mapped.num_rows() == 400
    transform = fit_transform(100.0, U=0.75, m=3).to_dict()
    centroids = np.eye(15, dtype=np.float32)[:5]
    for actor in (mapped, held):
        assert actor.open_view(0, transform, None) == 400
    got = mapped.partial_stats_grouped(0, centroids, np.array([0, 5]))
    ref = held.partial_stats_grouped(0, centroids, np.array([0, 5]))
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(g, r)


def test_shard_actor_without_its_file_waits_for_rows(tmp_path):
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    missing = {"path": str(tmp_path / "gone.npy"), "offset": 128, "rows": 6, "dim": 4,
               "node": None}
    actor = ShardActor(None, 0, rows_file=missing)
    assert actor.needs_rows() and actor.num_rows() == 0
    actor.set_rows(x)
    assert not actor.needs_rows() and actor.num_rows() == 6
    with pytest.raises(ValueError, match="needs a shard or a rows_file"):
        ShardActor(None, 0)


def test_run_memory_hands_the_file_map_to_the_index_build(tmp_path, monkeypatch):
    """The stage passes build_index_on_ray the rows of facts.npy (which its actors then map),
    not an array in the driver's heap; the index comes out as the in-memory build's."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    import pipeline.stages.memory as stage
    from hmn.config import MemoryConfig
    from hmn.index import build_index_from_vectors
    from pipeline.artifacts import write_vectors

    n, ne = 400, 60
    kb = _kb(n, ne)
    ent, rel = _tables(ne, 4)
    (tmp_path / "ingest" / "kb").mkdir(parents=True)
    (tmp_path / "embed").mkdir()
    (tmp_path / "memory").mkdir()
    write_vectors(tmp_path / "embed" / "entities.parquet", ent)
    write_vectors(tmp_path / "embed" / "relations.parquet", rel)
    kb_dir = tmp_path / "ingest" / "kb"
    pq.write_table(pa.table({"entity_id": np.arange(ne), "key": [f"e{i}" for i in range(ne)],
                             "name": [None] * ne}), kb_dir / "entities.parquet")
    pq.write_table(pa.table({"relation_id": np.arange(7), "key": [f"r{i}" for i in range(7)]}),
                   kb_dir / "relations.parquet")
    objects = pa.ListArray.from_arrays(pa.array(kb.object_offsets.astype(np.int32)),
                                       pa.array(kb.object_values))
    pq.write_table(pa.table({"fact_id": np.arange(n), "subject_id": kb.fact_subject,
                             "relation_id": kb.fact_relation, "object_ids": objects}),
                   kb_dir / "facts.parquet")
    seen = []

    def build_in_process(data, spec, **kw):
        seen.append(mapped_file(data))
        return build_index_from_vectors(np.array(data), spec)

    monkeypatch.setattr(stage, "build_index_on_ray", build_in_process)
    cfg = MemoryConfig(branching=(4, 2), iters=3, layout="dense")
    stats = stage.run_memory(cfg, tmp_path / "ingest", tmp_path / "embed", "fp",
                             tmp_path / "memory")
    assert seen == [(str(tmp_path / "memory" / "facts.npy"), 128)]
    ref = build_fact_vectors(ent, rel, kb.fact_subject, kb.fact_relation, kb.object_offsets,
                             kb.object_values)
    np.testing.assert_array_equal(np.load(tmp_path / "memory" / "facts.npy"), ref)
    assert stats["fact_norm_max"] == float(np.linalg.norm(ref, axis=1).max())


def test_build_fact_vectors_fills_out_or_refuses_it():
    kb = _kb(30, 10)
    ent, rel = _tables(10, 3)
    args = (ent, rel, kb.fact_subject, kb.fact_relation, kb.object_offsets, kb.object_values)
    out = np.full((30, 9), np.nan, dtype=np.float32)
    assert build_fact_vectors(*args, out=out) is out
    np.testing.assert_array_equal(out, build_fact_vectors(*args))
    for bad in (np.zeros((30, 8), np.float32), np.zeros((30, 9), np.float64), [[0.0] * 9] * 30):
        with pytest.raises(ValueError, match=r"out must be an \(30, 9\) float32 array"):
            build_fact_vectors(*args, out=bad)


def test_vectors_stream_into_a_given_array_in_id_order(tmp_path):
    """read_vectors reads a vectors file batch by batch into ``out`` (a .npy map: the memory
    stage's factorised tables), row i = id i, whatever the file's row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.artifacts import read_vectors, write_vectors

    x = np.random.default_rng(0).standard_normal((70_000, 3)).astype(np.float32)  # 2 batches
    write_vectors(tmp_path / "v.parquet", x)
    out = np.lib.format.open_memmap(tmp_path / "v.npy", mode="w+", dtype=np.float32, shape=x.shape)
    assert read_vectors(tmp_path / "v.parquet", out=out) is out
    np.testing.assert_array_equal(np.load(tmp_path / "v.npy"), x)
    order = np.random.default_rng(1).permutation(len(x))  # rows written in another order
    flat = pa.array(x[order].reshape(-1))
    pq.write_table(pa.table({"id": pa.array(order.astype(np.int64)),
                             "vector": pa.FixedSizeListArray.from_arrays(flat, 3)}), tmp_path / "s.parquet")
    np.testing.assert_array_equal(read_vectors(tmp_path / "s.parquet"), x)
    pq.write_table(pa.table({"id": pa.array(np.array([0, 2, 2], np.int64)),
                             "vector": pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(6, np.float32)), 2)}),
                   tmp_path / "gap.parquet")
    with pytest.raises(ValueError, match=r"gap\.parquet: ids \[1\]\.\.\. missing"):
        read_vectors(tmp_path / "gap.parquet")
    with pytest.raises(ValueError, match=r"v\.parquet: 70000 rows of 3, the output has shape"):
        read_vectors(tmp_path / "v.parquet", out=np.zeros((5, 3), np.float32))
