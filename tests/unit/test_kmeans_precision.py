"""k-means with a bfloat16 assignment matmul: counts, sums and objective exact for the assignment
it makes, and a clustering as good as float32's."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hmn.index import build_index_from_vectors
from hmn.kmeans import InMemoryData, similarity_dtype, spherical_kmeans


def _blobs(n: int = 3000, d: int = 48, k: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g)
    x = centres[torch.randint(0, k, (n,), generator=g)] + 0.6 * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def test_similarity_dtype_names() -> None:
    assert similarity_dtype("float32") == torch.float32
    assert similarity_dtype("bfloat16") == torch.bfloat16
    assert similarity_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="precision"):
        similarity_dtype("float16")
    with pytest.raises(ValueError, match="precision"):
        InMemoryData(_blobs(10), precision="half")


def test_bfloat16_partial_stats_are_exact_for_its_assignment() -> None:
    x = _blobs()
    c = torch.nn.functional.normalize(torch.randn(20, x.shape[1], generator=torch.Generator().manual_seed(1)), dim=1)
    sums, counts, objective = InMemoryData(x, chunk=700, precision="bfloat16").partial_stats(c)
    lab = (x.to(torch.bfloat16) @ c.to(torch.bfloat16).T).argmax(dim=1)  # the assignment made
    assert counts.tolist() == torch.bincount(lab, minlength=20).tolist()
    ref = torch.zeros(20, x.shape[1], dtype=torch.float64).index_add_(0, lab, x.double())
    assert np.allclose(sums, ref.numpy(), atol=1e-4)
    exact_obj = float((x.double() * c.double()[lab]).sum())
    assert objective == pytest.approx(exact_obj, rel=1e-6)
    # and it is the float32 assignment for nearly every row
    lab32 = (x @ c.T).argmax(dim=1)
    assert float((lab == lab32).float().mean()) > 0.97


def test_bfloat16_kmeans_matches_float32_objective() -> None:
    x = _blobs()
    r32 = spherical_kmeans(InMemoryData(x), 12, iters=10, seed=0)
    r16 = spherical_kmeans(InMemoryData(x, precision="bfloat16"), 12, iters=10, seed=0)
    assert abs(r16.objective - r32.objective) / r32.objective < 0.01
    # final assignments are float32 argmaxes of the final centroids
    assert r16.assignments.tolist() == (x @ r16.centroids.T).argmax(dim=1).tolist()


def test_bfloat16_grouped_stats_are_exact_per_group() -> None:
    x = _blobs(n=1200)
    groups = np.arange(1200) % 3
    offsets = np.array([0, 4, 9, 12])  # group g joins centroids offsets[g]:offsets[g+1]
    c = torch.nn.functional.normalize(torch.randn(12, x.shape[1], generator=torch.Generator().manual_seed(2)), dim=1)
    view = InMemoryData(x, chunk=150, groups=groups, precision="bfloat16")
    sums, counts, objectives = view.partial_stats_grouped(c, offsets)
    assert counts.sum() == 1200
    for g in range(3):
        rows = x[torch.from_numpy(groups == g)]
        a, b = offsets[g], offsets[g + 1]
        lab = (rows.to(torch.bfloat16) @ c[a:b].to(torch.bfloat16).T).argmax(dim=1)
        assert counts[a:b].tolist() == torch.bincount(lab, minlength=b - a).tolist()
        exact = float((rows.double() * c[a:b].double()[lab]).sum())
        assert objectives[g] == pytest.approx(exact, rel=1e-6)


def _leaf_cosine(index, x: torch.Tensor) -> float:
    """Mean cosine of every fact (transformed, unit) with its leaf's centroid."""
    xt = torch.nn.functional.normalize(index.transform.facts(x), dim=1)
    c = index.centroids[-1][torch.from_numpy(index.fact_leaf)]
    return float((xt * c).sum(dim=1).mean())


def test_bfloat16_hierarchical_index_is_as_good() -> None:
    x = _blobs(n=2400, k=16) * torch.linspace(0.5, 1.5, 2400)[:, None]  # varied norms (MIPS)
    i32 = build_index_from_vectors(x, branching=[4, 3], iters=6, seed=0)
    i16 = build_index_from_vectors(x, branching=[4, 3], iters=6, seed=0, precision="bfloat16")
    assert i16.num_leaves == i32.num_leaves == 12
    assert i16.fact_leaf.shape == (2400,)
    assert abs(_leaf_cosine(i16, x) - _leaf_cosine(i32, x)) < 0.01 * _leaf_cosine(i32, x)
