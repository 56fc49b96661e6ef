"""Tests for hmn.readers: exact and clustered K-MIPS readers (paper section 3.2)."""

import numpy as np
import pytest
import torch

from hmn.index import build_index_from_vectors
from hmn.memory import FactMemory
from hmn.reader_registry import READER_NAMES, READERS, ReaderEntry, reader_class
from hmn.readers import Candidates, ClusteredReader, ExactReader, make_reader, recall_at_k


def heavy_tailed_facts(n: int, d: int, spread: float, queries: int):
    """Seeded (n, d) facts with log-normal norms (so MIPS differs from cosine) and (queries, d)
    queries."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * torch.exp(spread * torch.randn(n, 1, generator=g))
    return x, torch.randn(queries, d, generator=g)


@pytest.fixture(scope="module")
def setup():
    x, q = heavy_tailed_facts(800, 12, 0.5, 32)
    mem = FactMemory(x)
    flat = build_index_from_vectors(x, branching=[16], seed=0)
    hier = build_index_from_vectors(x, branching=[4, 4], seed=0)
    return mem, q, flat, hier


def _brute(mem, q, k):
    s, i = (q @ mem.vectors.T).topk(k, dim=1)
    return i, s


@pytest.mark.parametrize("chunk", [7, 100, 65536])
def test_exact_reader_equals_brute_force(setup, chunk):
    mem, q, _, _ = setup
    c = ExactReader(mem, chunk=chunk).search(q, 10)
    ids, scores = _brute(mem, q, 10)
    torch.testing.assert_close(c.scores, scores)
    assert torch.equal(c.ids, ids)
    assert torch.equal(c.touched, torch.full((32,), 800))


def test_exact_reader_pads_when_k_exceeds_n():
    mem = FactMemory(torch.randn(5, 3))
    c = ExactReader(mem, chunk=2).search(torch.randn(2, 3), 8)
    assert c.ids.shape == (2, 8)
    assert torch.all(c.ids[:, 5:] == -1) and torch.all(torch.isneginf(c.scores[:, 5:]))
    assert sorted(c.ids[0, :5].tolist()) == list(range(5))


@pytest.mark.parametrize("which", ["flat", "hier"])
def test_clustered_reader_with_all_clusters_is_exact(setup, which):
    mem, q, flat, hier = setup
    index = flat if which == "flat" else hier
    c = ClusteredReader(mem, index, top_clusters=index.num_leaves).search(q, 10)
    ids, scores = _brute(mem, q, 10)
    assert torch.equal(c.ids, ids)
    torch.testing.assert_close(c.scores, scores)
    assert torch.equal(c.touched, torch.full((32,), 800))


@pytest.mark.parametrize("which", ["flat", "hier"])
def test_recall_rises_with_top_clusters(setup, which):
    mem, q, flat, hier = setup
    index = flat if which == "flat" else hier
    exact = ExactReader(mem).search(q, 10)
    recalls, touched = [], []
    for t in (1, 2, 4, 8, index.num_leaves):
        c = ClusteredReader(mem, index, top_clusters=t).search(q, 10)
        recalls.append(recall_at_k(c, exact, 10))
        touched.append(float(c.touched.float().mean()))
    assert all(b >= a for a, b in zip(recalls, recalls[1:])), recalls
    assert all(b >= a for a, b in zip(touched, touched[1:])), touched
    assert recalls[-1] == 1.0 and recalls[0] < 1.0


def _top_leaves_reference(index, q: torch.Tensor, top: int, beam: int) -> np.ndarray:
    """(B, top) leaves by brute force in numpy: Q(q) = [q; 0 ... 0] (eq. 8, m zeros), the
    cosine with every centroid; at each upper level keep the ``beam`` best clusters among the
    children of the previous level's kept ones, then the ``top`` best leaves under them."""
    qn = q.numpy().astype(np.float64)
    qt = np.concatenate([qn, np.zeros((qn.shape[0], index.transform.m))], axis=1)  # (B, D + m)
    out = []
    for row in qt:
        allowed = None  # clusters kept at the previous level
        for level, cent in enumerate(index.centroids):
            cent = cent.numpy().astype(np.float64)
            cos = cent @ row / (np.linalg.norm(cent, axis=1) * np.linalg.norm(row))
            ids = list(range(len(cent)))
            if level > 0:
                ids = [c for c in ids if index.parents[level - 1][c] in allowed]
            best = sorted(ids, key=lambda c: -cos[c])
            allowed = set(best[:beam])
        out.append(best[:top])
    return np.array(out)


def test_touched_counts_and_candidates_come_from_selected_leaves(setup):
    mem, q, flat, _ = setup
    reader = ClusteredReader(mem, flat, top_clusters=3)
    c = reader.search(q, 10)
    top = torch.from_numpy(_top_leaves_reference(flat, q, 3, beam=3))  # (B, 3)
    expect = torch.zeros((q.shape[0], flat.num_leaves), dtype=torch.bool).scatter_(1, top, True)
    assert torch.equal(reader.select_leaves(q), expect)
    sizes = torch.from_numpy(np.bincount(flat.fact_leaf, minlength=flat.num_leaves))
    assert torch.equal(c.touched, sizes[top].sum(1))
    leaf = torch.from_numpy(flat.fact_leaf)
    for b in range(q.shape[0]):
        got = c.ids[b][c.ids[b] >= 0]
        assert set(leaf[got].tolist()) <= set(top[b].tolist())
        torch.testing.assert_close(c.scores[b, : got.numel()], mem.scores(q[b : b + 1], got)[0])


def test_sample_k_without_replacement_and_reproducible(setup):
    mem, q, flat, hier = setup
    for index in (flat, hier):
        reader = ClusteredReader(mem, index, top_clusters=2, sample_clusters=5, temperature=0.1)
        sel = reader.select_leaves(q, torch.Generator().manual_seed(1))
        assert torch.equal(sel.sum(1), torch.full((32,), 7))  # 7 distinct leaves per query
    reader = ClusteredReader(mem, flat, top_clusters=2, sample_clusters=5)
    a = reader.search(q, 10, torch.Generator().manual_seed(3))
    b = reader.search(q, 10, torch.Generator().manual_seed(3))
    c = reader.search(q, 10, torch.Generator().manual_seed(4))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.touched, b.touched)
    assert not torch.equal(a.touched, c.touched)


def test_sample_k_at_low_temperature_takes_the_next_best_clusters(setup):
    mem, q, flat, _ = setup
    sampled = ClusteredReader(mem, flat, top_clusters=2, sample_clusters=3, temperature=1e-6)
    top5 = ClusteredReader(mem, flat, top_clusters=5)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sampled.select_leaves(q, g), top5.select_leaves(q))


def test_rand_blocks_add_facts(setup):
    mem, q, flat, _ = setup
    g = torch.Generator().manual_seed(0)
    only_blocks = ClusteredReader(mem, flat, top_clusters=0, rand_blocks=1, block_size=30)
    c = only_blocks.search(q, 10, g)
    assert torch.equal(c.touched, torch.full((32,), 30))
    spans = c.ids.max(1).values - c.ids.min(1).values
    assert torch.all(spans < 30)  # candidates lie in one contiguous block
    base = ClusteredReader(mem, flat, top_clusters=1).search(q, 10)
    more = ClusteredReader(mem, flat, top_clusters=1, rand_blocks=2).search(q, 10, g)
    assert torch.all(more.touched >= base.touched) and more.touched.sum() > base.touched.sum()
    assert only_blocks.block_size == 30
    assert ClusteredReader(mem, flat, rand_blocks=1).block_size == 50  # mean leaf size 800 / 16


def test_search_builds_no_graph(setup):
    mem, q, flat, _ = setup
    qg = q.clone().requires_grad_(True)
    for reader in (ExactReader(mem), ClusteredReader(mem, flat)):
        c = reader.search(qg, 5)
        assert not c.scores.requires_grad


def test_make_reader_and_errors(setup):
    mem, _, flat, _ = setup
    assert isinstance(make_reader("exact", mem, chunk=10), ExactReader)
    r = make_reader("clustered", mem, flat, top_clusters=3)
    assert isinstance(r, ClusteredReader) and r.top_clusters == 3
    assert set(READER_NAMES) >= {"exact", "clustered"}
    with pytest.raises(ValueError, match="known readers.*clustered.*exact"):
        make_reader("nope", mem)
    with pytest.raises(ValueError, match="needs a ClusterIndex"):
        make_reader("clustered", mem)
    with pytest.raises(ValueError, match="covers 800 facts"):
        ClusteredReader(FactMemory(torch.randn(10, 12)), flat)
    with pytest.raises(ValueError, match="read nothing"):
        ClusteredReader(mem, flat, top_clusters=0)
    with pytest.raises(ValueError, match="temperature"):
        ClusteredReader(mem, flat, sample_clusters=1, temperature=0.0)
    with pytest.raises(ValueError, match="k=0"):
        ExactReader(mem).search(torch.randn(2, 12), 0)


def test_recall_at_k():
    exact = Candidates(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.zeros(2, 3), torch.zeros(2))
    approx = Candidates(torch.tensor([[3, 9, -1], [6, 5, 4]]), torch.zeros(2, 3), torch.zeros(2))
    assert recall_at_k(approx, exact, 3) == pytest.approx((1 / 3 + 1) / 2)
    assert recall_at_k(approx, exact, 1) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="k=4"):
        recall_at_k(approx, exact, 4)
    assert np.isfinite(recall_at_k(exact, exact, 2))


def test_exact_reader_on_a_factorised_memory_equals_dense_exact():
    from hmn.memory import FactorisedMemory, build_fact_vectors

    rng = np.random.default_rng(0)
    ent = rng.standard_normal((90, 6)).astype(np.float32)
    rel = rng.standard_normal((7, 6)).astype(np.float32)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 4, 400))])
    parts = (ent, rel, rng.integers(0, 90, 400), rng.integers(0, 7, 400), offsets,
             rng.integers(0, 90, offsets[-1]))
    fm, dense = FactorisedMemory(*parts), FactMemory(torch.from_numpy(build_fact_vectors(*parts)))
    q = torch.randn(9, 18)
    ref = ExactReader(dense).search(q, 10)
    for chunk in (33, 1 << 20):
        got = make_reader("exact", fm, chunk=chunk).search(q, 10)
        assert torch.equal(got.ids, ref.ids)
        torch.testing.assert_close(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(got.touched, ref.touched)
    # the clustered reader reads a factorised memory too
    idx = build_index_from_vectors(fm, branching=[4], seed=0)
    a = ClusteredReader(fm, idx, top_clusters=2).search(q, 10)
    b = ClusteredReader(dense, idx, top_clusters=2).search(q, 10)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.touched, b.touched)


def test_every_registered_reader_is_built_from_the_config(setup):
    from hmn.config import READER_NAMES as CONFIG_NAMES
    from hmn.config import ReaderConfig

    mem, _, flat, _ = setup
    assert CONFIG_NAMES == READER_NAMES == ("exact", "clustered", "pca-tree", "wta-hash",
                                            "faiss-ivf")
    with pytest.raises(ValueError, match="known readers.*clustered.*exact.*faiss-ivf.*pca-tree"):
        make_reader("nope", mem)
    with pytest.raises(ValueError, match="known readers"):
        ReaderConfig().params("nope", training=True)
    cfg = ReaderConfig(top_clusters=2, pca_depth=2, wta_bands=2, wta_window=4, ivf_nlist=4,
                       ivf_nprobe=2, baseline_seed=3)
    for name in READER_NAMES:
        assert reader_class(name).name == name
        for training in (True, False):
            reader = make_reader(name, mem, flat, **cfg.params(name, training=training))
            assert type(reader) is reader_class(name)
    assert make_reader("pca-tree", mem, **cfg.params("pca-tree", False)).depth == 2
    assert make_reader("wta-hash", mem, **cfg.params("wta-hash", False)).params.seed == 3


def test_reader_defaults_are_the_declared_params(setup):
    mem, _, flat, _ = setup
    clustered = ClusteredReader(mem, flat)
    defaults = READERS["clustered"].params()
    assert (clustered.top_clusters, clustered.sample_clusters, clustered.rand_blocks,
            clustered.temperature) == (defaults.top_clusters, defaults.sample_clusters,
                                       defaults.rand_blocks, defaults.temperature)
    wta = make_reader("wta-hash", mem)
    assert wta.params == READERS["wta-hash"].params()
    assert (wta.bands, wta.perms, wta.window) == (16, 4, 8)


def test_a_shared_config_field_must_be_declared_alike(monkeypatch):
    from dataclasses import dataclass, field

    from hmn.reader_registry import ReaderParams, config_fields

    @dataclass(frozen=True)
    class OtherSeed(ReaderParams):
        seed: int = field(default=1, metadata={"config": "baseline_seed", "help": "a seed"})

    names = [c.name for c in config_fields()]
    assert names[0] == "top_clusters" and names[-1] == "baseline_seed"
    assert len(names) == len(set(names))
    monkeypatch.setitem(READERS, "other", ReaderEntry("hmn.readers:ExactReader", OtherSeed))
    with pytest.raises(TypeError, match="reader.baseline_seed is declared differently"):
        config_fields()


def test_hierarchical_beam_default_and_full_beam(setup):
    mem, q, _, hier = setup
    assert ClusteredReader(mem, hier, top_clusters=1).beam == 2
    assert ClusteredReader(mem, hier, top_clusters=2, sample_clusters=1).beam == 6
    assert ClusteredReader(mem, hier, top_clusters=2, beam=1).beam == 1
    # a beam over every parent selects the top leaves among all leaves, as a flat index would;
    # a narrower beam only the top leaves under the beam's parents (brute force in numpy)
    for beam in (4, 2, 1):
        reader = ClusteredReader(mem, hier, top_clusters=3, beam=beam)
        top = torch.from_numpy(_top_leaves_reference(hier, q, 3, beam))
        expect = torch.zeros((q.shape[0], hier.num_leaves), dtype=torch.bool).scatter_(1, top, True)
        assert torch.equal(reader.select_leaves(q), expect), beam
    narrow = _top_leaves_reference(hier, q, 3, 1)
    assert not np.array_equal(np.sort(narrow, 1), np.sort(_top_leaves_reference(hier, q, 3, 4), 1))
    with pytest.raises(ValueError, match="beam=0"):
        ClusteredReader(mem, hier, beam=0)


def _eye_index(scores: np.ndarray):
    """A flat index whose C leaf centroids are the unit axes, with no MIPS components (m = 0),
    and the query whose leaf scores (cosines) are ``scores`` (a unit vector of length C)."""
    from hmn.index import ClusterIndex
    from hmn.mips import MipsTransform

    c = len(scores)
    index = ClusterIndex(MipsTransform(U=0.5, m=0, scale=1.0), [torch.eye(c)], [],
                         np.arange(2 * c) % c)
    mem = FactMemory(torch.randn(2 * c, c, generator=torch.Generator().manual_seed(0)))
    return mem, index, torch.tensor(scores, dtype=torch.float32)[None, :]


# chi-square critical values at p = 0.001 (tables): degrees of freedom -> value
_CHI2_999 = {5: 20.515, 14: 36.123}


def _chi2(counts: np.ndarray, p: np.ndarray) -> float:
    expected = counts.sum() * p
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [1.0, 0.15])
def test_sample_k_draws_leaves_with_p_proportional_to_exp_score_over_t(temperature):
    """Sample-K draws, among the leaves Top-K did not take, leaf c with p ~ exp(score_c / T):
    empirical frequencies over many seeded draws against that distribution (chi-square)."""
    scores = np.array([0.6, 0.5, 0.35, 0.3, 0.2, 0.1, -0.05, -0.2])
    scores /= np.linalg.norm(scores)  # the cosines of the query with the axes
    mem, index, q = _eye_index(scores)
    n = 40000
    reader = ClusteredReader(mem, index, top_clusters=2, sample_clusters=1,
                             temperature=temperature)
    sel = reader.select_leaves(q.expand(n, -1), torch.Generator().manual_seed(5)).numpy()
    assert sel[:, :2].all() and (sel.sum(1) == 3).all()  # Top-2 always, plus one sampled leaf
    counts = sel[:, 2:].sum(0)  # (6,) draws of each non-top leaf
    logits = scores[2:] / temperature
    p = np.exp(logits - logits.max())
    p /= p.sum()
    assert _chi2(counts, p) < _CHI2_999[5], (counts / n, p)
    # and each frequency is within 5 standard errors of its probability
    np.testing.assert_array_less(np.abs(counts / n - p), 5 * np.sqrt(p * (1 - p) / n))


def test_sample_k_draws_without_replacement_from_the_same_distribution():
    """Two Sample-K leaves per draw: the unordered pair {a, b} has the probability of drawing
    a then b or b then a without replacement from p ~ exp(score / T) over the non-top leaves."""
    scores = np.array([0.6, 0.5, 0.35, 0.3, 0.2, 0.1, -0.05, -0.2])
    scores /= np.linalg.norm(scores)
    mem, index, q = _eye_index(scores)
    temperature, n = 0.3, 40000
    reader = ClusteredReader(mem, index, top_clusters=2, sample_clusters=2,
                             temperature=temperature)
    sel = reader.select_leaves(q.expand(n, -1), torch.Generator().manual_seed(6)).numpy()
    assert sel[:, :2].all() and (sel.sum(1) == 4).all()
    p = np.exp(scores[2:] / temperature)
    p /= p.sum()
    pairs = [(a, b) for a in range(6) for b in range(a + 1, 6)]
    want = np.array([p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b]) for a, b in pairs])
    assert abs(want.sum() - 1.0) < 1e-12
    rest = sel[:, 2:]
    counts = np.array([(rest[:, a] & rest[:, b]).sum() for a, b in pairs])
    assert counts.sum() == n
    assert _chi2(counts, want) < _CHI2_999[14]
