"""Pruned passes of hmn.kmeans.InMemoryData (``bounds=True``): the same results as unpruned
passes (``bounds=False``), for Lloyd's centroids and for arbitrary ones, with and without groups,
and rows really skip the matmul where the bounds prove their centroid."""

import numpy as np
import pytest
import torch

import hmn.kmeans
from hmn.kmeans import (
    InMemoryData,
    _add_segment_sums,
    _bound_drifts,
    _dot_error,
    grouped_spherical_kmeans,
    spherical_kmeans,
)


def _blobs(n: int, d: int, centres: int, noise: float, seed: int) -> torch.Tensor:
    """(n, d) unit rows around ``centres`` random directions."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, d, generator=g)
    x = c[torch.randint(0, centres, (n,), generator=g)] + noise * torch.randn(n, d, generator=g)
    return torch.nn.functional.normalize(x, dim=1)


def _assert_same_run(pruned, plain, rel: float = 1e-6) -> None:
    np.testing.assert_array_equal(pruned.assignments, plain.assignments)
    # the same labels; sums that differ by float32 rounding only (the pruned pass moves the rows
    # that change centroid, the unpruned one adds them all again)
    torch.testing.assert_close(pruned.centroids, plain.centroids, atol=1e-5, rtol=0)
    assert len(pruned.stats) == len(plain.stats)
    for a, b in zip(pruned.stats, plain.stats):
        assert a["objective"] == pytest.approx(b["objective"], rel=rel)
        assert a["empty_splits"] == b["empty_splits"]


@pytest.mark.parametrize("noise", [0.3, 1.5])
def test_pruned_kmeans_equals_unpruned(noise):
    x = _blobs(3000, 24, 30, noise, seed=1)
    kw = dict(iters=12, tol=0.0, seed=4)
    pruned_view = InMemoryData(x, chunk=700)
    pruned = spherical_kmeans(pruned_view, 20, **kw)
    plain = spherical_kmeans(InMemoryData(x, chunk=700, bounds=False), 20, **kw)
    _assert_same_run(pruned, plain)
    # one record per pass: 12 iterations and the final assignment, the first one a full pass
    ps = pruned_view.pass_stats
    assert [p["pass"] for p in ps] == ["stats"] * 12 + ["assign"]
    assert ps[0]["first"] and ps[0]["full_rows"] == 3000 and not ps[1]["first"]
    assert max(p["proved_rows"] for p in ps) > 0


def test_pruned_grouped_kmeans_equals_unpruned_with_an_empty_cluster_split():
    x = _blobs(2400, 16, 12, 0.4, seed=2)
    groups = np.arange(2400) % 3
    # group 1's rows are one direction repeated: its 3 centroids start equal, so two of them
    # are empty after the first pass and get split off the third
    x[groups == 1] = x[1].clone()
    ks = np.array([6, 3, 5])
    kw = dict(iters=10, tol=0.0, seed=0, init="sample")
    pruned_view = InMemoryData(x, chunk=300, groups=groups)
    pruned = grouped_spherical_kmeans(pruned_view, ks, **kw)
    plain = grouped_spherical_kmeans(InMemoryData(x, chunk=300, groups=groups, bounds=False),
                                     ks, **kw)
    assert plain.stats[0]["empty_splits"] >= 2
    _assert_same_run(pruned, plain, rel=1e-5)
    # 800 equal rows: their float32 block sums round by ~1e-6 of the total, and the pruned
    # objective is c . sums (the unpruned one adds 800 cosines of 1)
    np.testing.assert_allclose(pruned.group_objectives, plain.group_objectives, rtol=1e-5)
    assert max(p["proved_rows"] for p in pruned_view.pass_stats) > 0


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("gather_rows", [None, 37])
def test_any_centroids_give_the_unpruned_results(grouped, gather_rows, monkeypatch):
    """The bounds hold for any next centroids, not only Lloyd's: small moves, large jumps, one
    centroid replaced by another's copy (a split), the same centroids twice.  ``gather_rows``:
    the rows to recompute are gathered 37 at a time (else all of a chunk's at once)."""
    if gather_rows is not None:
        monkeypatch.setattr(hmn.kmeans, "_GATHER_BYTES", gather_rows * 4 * 12)
    x = _blobs(1500, 12, 8, 0.3, seed=3)
    groups = np.arange(1500) % 2 if grouped else None
    offsets = np.array([0, 5, 8]) if grouped else np.array([0, 8])
    pruned = InMemoryData(x, chunk=256, groups=groups)
    plain = InMemoryData(x, chunk=256, groups=groups, bounds=False)
    g = torch.Generator().manual_seed(0)
    c = torch.nn.functional.normalize(torch.randn(8, 12, generator=g), dim=1)
    steps = []
    for step in range(8):
        if step == 3:
            c = c.clone()
            c[2] = c[6]  # a copy of another centroid
        elif step == 5:
            pass  # the same centroids again
        else:
            scale = 1.0 if step == 6 else 0.02  # a large jump, else a small move
            c = torch.nn.functional.normalize(c + scale * torch.randn(8, 12, generator=g), dim=1)
        steps.append(c)
    for c in steps:
        sa, ca, oa = pruned.partial_stats_grouped(c, offsets)
        sb, cb, ob = plain.partial_stats_grouped(c, offsets)
        np.testing.assert_array_equal(ca, cb)
        # float32 rounding of sums of <= 1500 unit rows (9e-5 at worst), on centroids whose sums
        # cancel too: the pruned pass adds and takes away the rows that move
        np.testing.assert_allclose(sa, sb, rtol=1e-6, atol=1e-4)
        np.testing.assert_allclose(oa, ob, rtol=1e-6)
        np.testing.assert_array_equal(pruned.assign_grouped(c, offsets),
                                      plain.assign_grouped(c, offsets))
    assert sum(p["proved_rows"] for p in pruned.pass_stats) > 0


def test_rows_skip_the_matmul_on_well_separated_data():
    x = _blobs(4000, 32, 10, 0.05, seed=5)
    view = InMemoryData(x, chunk=1000)
    res = spherical_kmeans(view, 10, iters=6, tol=0.0, seed=0)
    ps = view.pass_stats
    assert ps[0]["skipped_fraction"] == 0.0  # the first pass computes every row
    # converged blobs: the bounds prove every row's centroid, nothing moves, no matmul at all
    assert ps[-1]["pass"] == "assign" and ps[-1]["proved_rows"] == 4000
    assert ps[-1]["full_rows"] == 0 and ps[-1]["skipped_fraction"] == 1.0
    assert ps[-2]["moved_rows"] == 0
    np.testing.assert_array_equal(
        res.assignments, InMemoryData(x, bounds=False).assign(res.centroids)
    )


def test_a_new_shape_or_grouping_starts_afresh():
    x = _blobs(500, 8, 4, 0.2, seed=6)
    view = InMemoryData(x, chunk=128)
    g = torch.Generator().manual_seed(1)
    c5 = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    c3 = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    view.partial_stats(c5)
    view.partial_stats(c5)
    view.partial_stats(c3)
    assert [p["first"] for p in view.pass_stats] == [True, False, True]
    np.testing.assert_array_equal(view.assign(c3), InMemoryData(x, bounds=False).assign(c3))
    view.close()  # drops the bounds
    view.assign(c3)
    assert view.pass_stats[-1]["first"]
    # a grouped view's flat passes (every row against every centroid, row order) and its grouped
    # passes (group order) never share bounds, even with offsets [0, C]
    groups = np.zeros(500, dtype=np.int64)
    groups[::3] = 1
    gview = InMemoryData(x, chunk=128, groups=groups)
    gplain = InMemoryData(x, chunk=128, groups=groups, bounds=False)
    for call, args in [("assign", (c5,)), ("assign_grouped", (c5, np.array([0, 3, 5]))),
                       ("assign", (c5,)), ("partial_stats", (c5,))]:
        got, want = getattr(gview, call)(*args), getattr(gplain, call)(*args)
        np.testing.assert_array_equal(got if call.startswith("assign") else got[1],
                                      want if call.startswith("assign") else want[1])
    assert [p["first"] for p in gview.pass_stats] == [True, True, True, False]


def test_bfloat16_views_and_bounds_false_are_never_pruned():
    x = _blobs(300, 8, 3, 0.2, seed=7)
    c = x[:4].clone()
    for view in (InMemoryData(x, precision="bfloat16"), InMemoryData(x, bounds=False)):
        view.partial_stats(c)
        view.assign(c)
        assert view.pass_stats == [] and view._bound_state is None
    with pytest.raises(ValueError, match="bounds=1"):
        InMemoryData(x, bounds=1)


def test_drifts_exclude_the_rows_own_centroid_per_group():
    old = torch.zeros(5, 3)
    new = torch.zeros(5, 3)
    new[:, 0] = torch.tensor([0.1, 0.5, 0.2, 0.3, 0.05])
    drift, other = _bound_drifts(old, new, np.array([0, 3, 3, 5]))  # groups 0..2 (1 empty), 3..5
    torch.testing.assert_close(drift, new[:, 0], atol=1e-6, rtol=1e-5)
    # group 0 = centroids 0, 1, 2: the largest other drift; group 2 = centroids 3, 4
    torch.testing.assert_close(other, torch.tensor([0.5, 0.2, 0.5, 0.05, 0.3]), atol=1e-6,
                               rtol=1e-5)
    assert bool((drift >= new[:, 0]).all())  # rounded up, never down
    _, alone = _bound_drifts(old[:1], new[:1], np.array([0, 1]))
    assert float(alone[0]) < 1e-6  # a group of one centroid has no competitor


def test_dot_error_bounds_float32_dot_products():
    """gamma_d bounds the difference between a float32 matmul's and a float64 dot product."""
    g = torch.Generator().manual_seed(8)
    for d in (16, 600):
        x = torch.nn.functional.normalize(torch.randn(2000, d, generator=g), dim=1)
        c = torch.nn.functional.normalize(torch.randn(64, d, generator=g), dim=1)
        err = ((x @ c.T).double() - x.double() @ c.double().T).abs().max()
        assert float(err) <= _dot_error(d)
    assert _dot_error(600) == pytest.approx(600 * 2.0**-24, rel=2e-3)


def test_segment_sums_move_rows_between_centroids():
    x = torch.randn(7, 3)
    to = torch.tensor([0, 2, 2, 1, 0, 2, 1])
    fro = torch.tensor([1, 0, 1, 2, 2, 0, 0])
    out = torch.zeros(3, 3, dtype=torch.float64)
    _add_segment_sums(out, x, to, minus=fro)
    want = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(7):
        want[to[i]] += x[i].double()
        want[fro[i]] -= x[i].double()
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
