"""Tests for hmn.memory: fact vectors (paper section 3) and the FactMemory."""

import numpy as np
import pytest
import torch

from hmn.memory import FactMemory, build_fact_vectors


def _toy():
    rng = np.random.default_rng(0)
    ent = rng.standard_normal((6, 4)).astype(np.float32)  # (Ne, d)
    rel = rng.standard_normal((3, 4)).astype(np.float32)  # (Nr, d)
    subj = np.array([0, 1, 5])
    rels = np.array([2, 0, 1])
    offsets = np.array([0, 1, 4, 6])  # fact 1 has three objects, fact 2 two
    objs = np.array([3, 2, 4, 5, 0, 0])
    return ent, rel, subj, rels, offsets, objs


def test_build_fact_vectors_concat_and_mean_of_objects():
    ent, rel, subj, rels, offsets, objs = _toy()
    m = build_fact_vectors(ent, rel, subj, rels, offsets, objs)
    assert m.shape == (3, 12) and m.dtype == np.float32
    np.testing.assert_allclose(m[0], np.concatenate([ent[0], rel[2], ent[3]]), rtol=1e-6)
    np.testing.assert_allclose(m[1, 8:], ent[[2, 4, 5]].mean(0), rtol=1e-6)
    np.testing.assert_allclose(m[2, 8:], ent[0], rtol=1e-6)  # repeated object: mean = itself
    np.testing.assert_array_equal(m[:, :4], ent[subj])
    np.testing.assert_array_equal(m[:, 4:8], rel[rels])


def test_build_fact_vectors_chunking_is_invisible():
    rng = np.random.default_rng(1)
    ent = rng.standard_normal((50, 8)).astype(np.float32)
    rel = rng.standard_normal((5, 8)).astype(np.float32)
    n = 37
    lengths = rng.integers(1, 5, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    objs = rng.integers(0, 50, offsets[-1])
    args = (ent, rel, rng.integers(0, 50, n), rng.integers(0, 5, n), offsets, objs)
    np.testing.assert_array_equal(build_fact_vectors(*args, chunk=1), build_fact_vectors(*args))
    np.testing.assert_array_equal(build_fact_vectors(*args, chunk=5), build_fact_vectors(*args))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(offsets=np.array([0, 1, 1, 6])), "fact 1 has no object"),
        (dict(subj=np.array([0, 6, 5])), r"subject_ids\[1\]=6"),
        (dict(rels=np.array([2, -1, 1])), r"relation_ids\[1\]=-1"),
        (dict(objs=np.array([3, 2, 4, 9, 0, 0])), r"object_values\[3\]=9"),
        (dict(offsets=np.array([0, 1, 4])), "N\\+1"),
        (dict(offsets=np.array([0, 4, 1, 6])), "decreases at fact 1"),
        (dict(offsets=np.array([0, 1, 4, 5])), "end at len"),
        (dict(rels=np.array([2, 0])), "relation_ids has 2 rows"),
        (dict(rel=np.zeros((3, 5), np.float32)), "width"),
    ],
)
def test_build_fact_vectors_validation(change, match):
    ent, rel, subj, rels, offsets, objs = _toy()
    kw = dict(ent=ent, rel=rel, subj=subj, rels=rels, offsets=offsets, objs=objs)
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        build_fact_vectors(kw["ent"], kw["rel"], kw["subj"], kw["rels"], kw["offsets"], kw["objs"])


def test_build_fact_vectors_rejects_float_ids():
    ent, rel, subj, rels, offsets, objs = _toy()
    with pytest.raises(TypeError, match="subject_ids"):
        build_fact_vectors(ent, rel, subj.astype(float), rels, offsets, objs)


def test_fact_memory_scores():
    x = torch.randn(10, 6)
    mem = FactMemory(x)
    q = torch.randn(3, 6)
    assert (mem.n, mem.d) == (10, 6)
    torch.testing.assert_close(mem.scores(q), q @ x.T)
    ids = torch.tensor([7, 2, 2])
    torch.testing.assert_close(mem.scores(q, ids), q @ x[ids].T)
    assert mem.to("cpu") is mem


def test_fact_memory_validation():
    with pytest.raises(ValueError):
        FactMemory(torch.randn(4))
    with pytest.raises(TypeError):
        FactMemory(np.zeros((3, 2)))
    mem = FactMemory(torch.randn(5, 3))
    with pytest.raises(ValueError, match="D=3"):
        mem.scores(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        mem.scores(torch.randn(2, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="1-D"):
        mem.scores(torch.randn(2, 3), torch.tensor([[0]]))


# ---- FactorisedMemory ------------------------------------------------------------------------


def _random_kb(n=57, ne=40, nr=6, d=5, seed=0):
    rng = np.random.default_rng(seed)
    ent = rng.standard_normal((ne, d)).astype(np.float32)
    rel = rng.standard_normal((nr, d)).astype(np.float32)
    lengths = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return (ent, rel, rng.integers(0, ne, n), rng.integers(0, nr, n), offsets,
            rng.integers(0, ne, offsets[-1]))


def test_factorised_memory_gathers_the_dense_rows():
    from hmn.memory import FactorisedMemory

    parts = _random_kb()
    dense = build_fact_vectors(*parts)
    fm = FactorisedMemory(*parts)
    assert (fm.n, fm.d, fm.width) == (57, 15, 5)
    torch.testing.assert_close(fm.gather(np.array([3, 0, 56, 3])), torch.from_numpy(dense[[3, 0, 56, 3]]))
    torch.testing.assert_close(fm.rows_between(10, 20), torch.from_numpy(dense[10:20]))
    torch.testing.assert_close(fm.dense().vectors, torch.from_numpy(dense))
    assert fm.nbytes() > 0


def test_factorised_scores_equal_dense_scores():
    from hmn.memory import FactorisedMemory

    parts = _random_kb(seed=2)
    fm = FactorisedMemory(*parts)
    dense = FactMemory(torch.from_numpy(build_fact_vectors(*parts)))
    q = torch.randn(4, 15)
    torch.testing.assert_close(fm.scores(q), dense.scores(q), rtol=1e-5, atol=1e-5)
    ids = torch.tensor([5, 1, 1])
    torch.testing.assert_close(fm.scores(q, ids), dense.scores(q, ids), rtol=1e-5, atol=1e-5)
    parts_ = fm.partial_scores(fm.check_queries(q))
    torch.testing.assert_close(fm.scores_from_parts(parts_, 7, 30), dense.scores(q)[:, 7:30],
                               rtol=1e-5, atol=1e-5)


def test_factorised_memory_validation():
    from hmn.memory import FactorisedMemory

    ent, rel, subj, rels, offsets, objs = _random_kb()
    with pytest.raises(ValueError, match="subject_ids"):
        FactorisedMemory(ent, rel, subj + 100, rels, offsets, objs)
    with pytest.raises(ValueError, match="no object"):
        FactorisedMemory(ent, rel, subj, rels, np.concatenate([[0, 0], offsets[2:]]), objs)
    with pytest.raises(ValueError, match="width"):
        FactorisedMemory(ent, rel[:, :2], subj, rels, offsets, objs)
    fm = FactorisedMemory(ent, rel, subj, rels, offsets, objs)
    with pytest.raises(ValueError, match=r"\[0, 57\)"):
        fm.gather(np.array([57]))
    with pytest.raises(ValueError, match="D=15"):
        fm.scores(torch.randn(2, 4))
