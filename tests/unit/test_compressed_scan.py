"""The clustered reader's compressed scan (hmn.compressed): faiss inverted lists of quantised
facts, one per leaf, scanned for each question's leaves, the best re-scored exactly."""

import numpy as np
import pytest
import torch

from hmn.config import ConfigError, load_config
from hmn.index import build_index_from_vectors
from hmn.memory import FactMemory, FactorisedMemory
from hmn.readers import ClusteredReader, recall_at_k


def _factorised(n: int = 3000, seed: int = 0) -> FactorisedMemory:
    rng = np.random.default_rng(seed)
    ne, nr, d = 400, 12, 8
    ent = (rng.standard_normal((ne, d)) * np.exp(0.4 * rng.standard_normal((ne, 1)))).astype(np.float32)
    rel = rng.standard_normal((nr, d)).astype(np.float32)
    counts = rng.integers(1, 4, n)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return FactorisedMemory(ent, rel, rng.integers(0, ne, n), rng.integers(0, nr, n), offsets,
                            rng.integers(0, ne, int(offsets[-1])))


@pytest.fixture(scope="module")
def setup():
    fact = _factorised()
    dense = FactMemory(fact.dense().vectors)
    index = build_index_from_vectors(dense.vectors, branching=[8, 8], seed=0)
    q = torch.randn(40, fact.d, generator=torch.Generator().manual_seed(1))
    return fact, dense, index, q


@pytest.mark.parametrize("layout", ["factorised", "dense"])
@pytest.mark.parametrize("scan", ["sq8", "sq4", "fp16"])
def test_rescoring_every_fact_read_is_the_exact_scan(setup, layout, scan):
    fact, dense, index, q = setup
    mem = fact if layout == "factorised" else dense
    exact = ClusteredReader(mem, index, top_clusters=6).search(q, 10)
    comp = ClusteredReader(mem, index, top_clusters=6, scan=scan, rerank=3000).search(q, 10)
    assert torch.equal(comp.touched, exact.touched)  # the same leaves, every fact of them
    assert torch.equal(comp.ids, exact.ids)
    torch.testing.assert_close(comp.scores, exact.scores)  # exact inner products


def test_a_short_rerank_keeps_nearly_every_top_fact_and_exact_scores(setup):
    fact, _, index, q = setup
    exact = ClusteredReader(fact, index, top_clusters=6).search(q, 10)
    comp = ClusteredReader(fact, index, top_clusters=6, scan="sq8", rerank=30).search(q, 10)
    assert recall_at_k(comp, exact, 10) >= 0.97
    ok = comp.ids >= 0
    rows = fact.gather(comp.ids[ok])
    qi = torch.nonzero(ok, as_tuple=True)[0]
    torch.testing.assert_close(comp.scores[ok], (rows * q[qi]).sum(1))


def test_leaves_are_lists_of_the_index_assignment(setup):
    fact, _, index, q = setup
    reader = ClusteredReader(fact, index, top_clusters=1, scan="sq8", rerank=5000)
    sel = reader.select_leaves(q)
    c = reader.search(q, 50)
    leaf = torch.from_numpy(index.fact_leaf)
    for i in range(q.shape[0]):
        got = c.ids[i][c.ids[i] >= 0]
        assert sel[i, leaf[got]].all()  # every candidate from a leaf the question reads


def test_readers_over_one_memory_share_the_lists(setup):
    fact, _, index, _ = setup
    a = ClusteredReader(fact, index, top_clusters=2, scan="sq6")
    b = ClusteredReader(fact, index, top_clusters=3, scan="sq6")
    assert a._compressed is b._compressed


def test_scan_settings_are_checked():
    with pytest.raises(ConfigError, match="scan"):
        load_config(None, ["reader.scan=sq3"])
    with pytest.raises(ConfigError, match="rand_blocks"):
        load_config(None, ["reader.scan=sq8", "reader.rand_blocks=1"])
    with pytest.raises(ConfigError, match="scan_rerank"):
        load_config(None, ["reader.scan_rerank=0"])
