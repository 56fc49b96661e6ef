"""Tests for hmn.mips: the MIPS -> cosine reduction of eq. 6-8."""

import math

import pytest
import torch

from hmn.mips import MipsTransform, fit_transform


def _varied_norm_data(n=4000, d=16, b=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x = x * torch.exp(torch.randn(n, 1, generator=g) * 0.7)  # norms vary over ~ a factor 20
    q = torch.randn(b, d, generator=g)
    return x, q


def test_shapes_and_components():
    x, q = _varied_norm_data(n=50)
    max_norm = float(x.norm(dim=1).max())
    t = fit_transform(max_norm, U=0.75, m=3)
    px, qq = t.facts(x), t.queries(q)
    assert px.shape == (50, 19) and qq.shape == (64, 19)
    assert math.isclose(float(px[:, :16].norm(dim=1).max()), 0.75, rel_tol=1e-5)
    r = px[:, :16].norm(dim=1)
    torch.testing.assert_close(px[:, 16], 0.5 - r**2)
    torch.testing.assert_close(px[:, 18], 0.5 - r**8)
    assert torch.all(qq[:, 16:] == 0)
    # eq. 8: the inner product is preserved up to the scale s.
    torch.testing.assert_close(qq @ px.T, t.scale * (q @ x.T), rtol=1e-4, atol=1e-5)
    assert fit_transform(max_norm, m=0).facts(x).shape == (50, 16)


def _cosine_recall(x, q, m, k=10):
    t = fit_transform(float(x.norm(dim=1).max()), U=0.75, m=m)
    px = torch.nn.functional.normalize(t.facts(x), dim=1)
    qq = torch.nn.functional.normalize(t.queries(q), dim=1)
    approx = (qq @ px.T).topk(k, dim=1).indices
    exact = (q @ x.T).topk(k, dim=1).indices
    hits = (approx[:, :, None] == exact[:, None, :]).any(2).sum()
    return float(hits) / approx.numel()


def test_cosine_recovers_mips_better_as_m_grows():
    x, q = _varied_norm_data()
    recall = [_cosine_recall(x, q, m) for m in range(6)]
    assert recall[0] < 0.7  # plain cosine ignores the norms
    for a, b in zip(recall, recall[1:]):
        assert b >= a - 0.02, recall
    assert recall[3] > recall[1] > recall[0], recall
    assert min(recall[3:]) > 0.9, recall


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_norm=1.0, U=0.0), "U=0.0"),
        (dict(max_norm=1.0, U=1.0), "U=1.0"),
        (dict(max_norm=1.0, m=-1), "m=-1"),
        (dict(max_norm=1.0, m=1.5), "m=1.5"),
        (dict(max_norm=0.0), "max_norm"),
        (dict(max_norm=float("nan")), "max_norm"),
    ],
)
def test_fit_transform_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit_transform(**kwargs)


def test_facts_beyond_the_fitted_norm_are_rejected():
    t = fit_transform(1.0)
    with pytest.raises(ValueError, match="norm"):
        t.facts(torch.tensor([[3.0, 0.0]]))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        t.facts(torch.zeros(3))


def test_dict_round_trip_and_validation():
    t = fit_transform(2.0, U=0.5, m=4)
    assert MipsTransform.from_dict(t.to_dict()) == t
    with pytest.raises(ValueError, match="unknown"):
        MipsTransform.from_dict({**t.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match="scale"):
        MipsTransform(U=0.5, m=1, scale=-1.0)
