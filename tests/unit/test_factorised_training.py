"""Training over the factorised memory equals training over the dense one (issue 7: FB2M scale)."""

import numpy as np
import pytest
import torch

from hmn.memory import FactMemory, FactorisedMemory, build_fact_vectors
from hmn.model import BowEncoder, full_softmax_loss, ksoftmax_loss, num_facts
from hmn.readers import make_reader
from hmn.training import iterate_batches, train_epoch


def _tables(seed=0, ne=50, nr=7, n=300, d=8):
    rng = np.random.default_rng(seed)
    ent = rng.normal(size=(ne, d)).astype(np.float32)
    rel = rng.normal(size=(nr, d)).astype(np.float32)
    counts = rng.integers(1, 4, size=n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    values = rng.integers(0, ne, size=offsets[-1])
    subj = rng.integers(0, ne, size=n)
    rels = rng.integers(0, nr, size=n)
    return ent, rel, subj, rels, offsets, values


@pytest.mark.parametrize("sub_batch,chunk", [(16, 1 << 20), (3, 37), (1, 1)])
def test_factorised_full_softmax_matches_dense_loss_and_gradient(sub_batch, chunk):
    tables = _tables()
    fm = FactorisedMemory(*tables)
    dense = torch.from_numpy(build_fact_vectors(*tables))
    rng = torch.Generator().manual_seed(1)
    q = torch.randn(10, dense.shape[1], generator=rng, dtype=torch.float32)
    gold = torch.randint(0, dense.shape[0], (10,), generator=rng)

    q1 = q.clone().requires_grad_(True)
    ref = full_softmax_loss(q1, dense, gold)
    ref.loss.backward()
    q2 = q.clone().requires_grad_(True)
    out = full_softmax_loss(q2, fm, gold, sub_batch=sub_batch, chunk=chunk)
    (2.0 * out.loss).backward()  # the upstream gradient is applied

    assert out.softmax_size == ref.softmax_size == dense.shape[0]
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q2.grad, 2.0 * q1.grad, rtol=1e-4, atol=1e-6)


def test_ksoftmax_reads_rows_of_any_memory_kind():
    tables = _tables(seed=3)
    fm = FactorisedMemory(*tables)
    dense = torch.from_numpy(build_fact_vectors(*tables))
    q = torch.randn(4, dense.shape[1])
    cands = torch.tensor([[0, 5, -1], [7, 8, 9], [1, -1, -1], [2, 3, 4]])
    gold = torch.tensor([5, 100, 1, 299])
    losses = [ksoftmax_loss(q, m, cands, gold) for m in (dense, FactMemory(dense), fm)]
    for lo in losses[1:]:
        torch.testing.assert_close(lo.loss, losses[0].loss, rtol=1e-5, atol=1e-6)
        assert lo.softmax_size == losses[0].softmax_size
    assert num_facts(fm) == num_facts(dense) == 300


@pytest.mark.parametrize("loss", ["full", "ksoftmax"])
def test_an_epoch_on_the_factorised_memory_equals_the_dense_epoch(loss):
    tables = _tables(seed=5)
    fm = FactorisedMemory(*tables)
    dense = FactMemory(torch.from_numpy(build_fact_vectors(*tables)))
    rng = np.random.default_rng(0)
    tokens = [rng.integers(0, 30, size=rng.integers(1, 6)) for _ in range(64)]
    gold = rng.integers(0, fm.n, size=64)
    weights = []
    for mem in (dense, fm):
        torch.manual_seed(0)
        model = BowEncoder(30, fm.d, init_std=0.1)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        reader = make_reader("exact", mem)
        batches = iterate_batches(tokens, gold, 16, shuffle=False)
        stats = train_epoch(model, batches, mem, reader, opt, loss=loss, k=5)
        assert stats.steps == 4
        weights.append(model.words.weight.detach().clone())
    torch.testing.assert_close(weights[0], weights[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rand_blocks", [0, 2])
@pytest.mark.parametrize("factorised", [False, True])
def test_clustered_pair_path_equals_the_dense_union_path(rand_blocks, factorised):
    from hmn.index import build_index_from_vectors

    tables = _tables(seed=7, n=600)
    fm = FactorisedMemory(*tables)
    mem = fm if factorised else FactMemory(torch.from_numpy(build_fact_vectors(*tables)))
    index = build_index_from_vectors(fm, branching=[6, 4], iters=3, seed=0)
    q = torch.randn(9, fm.d, generator=torch.Generator().manual_seed(2))
    out = []
    for factor in (float("inf"), 0.0):  # dense union product, then pairs only
        r = make_reader("clustered", mem, index, top_clusters=3, sample_clusters=1,
                        rand_blocks=rand_blocks, block_size=5)
        r.dense_factor, r.pair_chunk = factor, 17
        out.append(r.search(q, 7, generator=torch.Generator().manual_seed(11)))
    dense, pairs = out
    assert torch.equal(dense.touched, pairs.touched)
    torch.testing.assert_close(pairs.scores, dense.scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.sort(pairs.ids, 1).values, torch.sort(dense.ids, 1).values)



def _path_spy(batch: int):
    """A dense 600-fact memory that records which scoring path the clustered reader takes, its
    [6, 4] index, `batch` queries and the list of calls."""
    from hmn.index import build_index_from_vectors

    tables = _tables(seed=7, n=600)
    fm = FactorisedMemory(*tables)
    index = build_index_from_vectors(fm, branching=[6, 4], iters=3, seed=0)
    q = torch.randn(batch, fm.d, generator=torch.Generator().manual_seed(2))
    calls: list[str] = []

    class Spy(FactMemory):
        def scores(self, queries, ids=None):
            calls.append("dense")
            return super().scores(queries, ids)

        def grouped_scores(self, *a, **kw):
            calls.append("pairs")
            return super().grouped_scores(*a, **kw)

    return Spy(torch.from_numpy(build_fact_vectors(*tables))), index, q, calls


def test_clustered_reader_picks_the_path_by_cost_and_union_size():
    mem, index, q, calls = _path_spy(9)
    r = make_reader("clustered", mem, index, top_clusters=3)
    r.search(q, 5)  # 9 queries reading 3 of 24 leaves each: B |U| / P well under 32
    assert calls == ["dense"]
    calls.clear()
    r.dense_union_bytes = 1024  # the union's rows would not fit: pairs whatever the ratio
    r.search(q, 5)
    assert calls == ["pairs"]


def test_rand_block_union_bound_is_capped_by_the_memory():
    """B R block_size can exceed N; the union cannot: small memories keep the dense product."""
    mem, index, q, calls = _path_spy(64)
    # 64 queries x 4 blocks x 25 facts = 6,400 > 600 facts; pairs read ~ 64 x (3 leaves + 100)
    r = make_reader("clustered", mem, index, top_clusters=3, rand_blocks=4, block_size=25)
    r.search(q, 5, generator=torch.Generator().manual_seed(0))
    assert calls == ["dense"]
