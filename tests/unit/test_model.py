import numpy as np
import torch

from hmn.model import BowEncoder, candidate_union, full_softmax_loss, ksoftmax_loss


def test_encoder_sums_word_vectors_and_empty_is_zero():
    enc = BowEncoder(5, 4)
    out = enc(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 3]))  # [1,2], [3], []
    w = enc.words.weight
    assert torch.allclose(out[0], w[1] + w[2])
    assert torch.allclose(out[1], w[3])
    assert torch.all(out[2] == 0)


def test_candidate_union_adds_gold_and_ignores_pads():
    union, pos = candidate_union(torch.tensor([[5, 3, -1], [3, 7, 1]]), torch.tensor([9, 3]))
    assert union.tolist() == [1, 3, 5, 7, 9]
    assert union[pos].tolist() == [9, 3]


def test_ksoftmax_equals_full_softmax_when_candidates_cover_memory():
    torch.manual_seed(0)
    memory = torch.randn(20, 6)
    q = torch.randn(4, 6, requires_grad=True)
    gold = torch.tensor([0, 5, 7, 19])
    full = full_softmax_loss(q, memory, gold)
    ks = ksoftmax_loss(q, memory, torch.arange(20).repeat(4, 1), gold)
    assert torch.allclose(full.loss, ks.loss)
    assert full.softmax_size == ks.softmax_size == 20


def test_ksoftmax_is_over_union_only():
    memory = torch.eye(4)
    q = torch.tensor([[10.0, 0, 0, 0]])
    # candidate 1 only (plus gold 0): the huge score of fact 0 vs 0 for fact 1
    out = ksoftmax_loss(q, memory, torch.tensor([[1]]), torch.tensor([0]))
    assert out.softmax_size == 2
    expected = -torch.log_softmax(torch.tensor([10.0, 0.0]), 0)[0]
    assert torch.allclose(out.loss, expected)


def _union_nll_reference(q: np.ndarray, memory: np.ndarray, cands: list[list[int]],
                         gold: list[int]) -> float:
    """Eq. 3-4 by hand: every query's softmax runs over U = all candidates of the batch plus
    all gold facts; the loss is the mean negative log-probability of each query's gold fact."""
    union = sorted({c for row in cands for c in row if c >= 0} | set(gold))
    nll = []
    for b in range(len(gold)):
        s = np.array([q[b] @ memory[f] for f in union], dtype=np.float64)  # (U,)
        log_p = s - s.max() - np.log(np.exp(s - s.max()).sum())
        nll.append(-log_p[union.index(gold[b])])
    return float(np.mean(nll))


def _own_nll_reference(q, memory, cands, gold) -> float:
    """The per-query softmax (each query over its own candidates plus its gold fact): what the
    K-softmax must NOT compute."""
    nll = []
    for b in range(len(gold)):
        own = sorted({c for c in cands[b] if c >= 0} | {gold[b]})
        s = np.array([q[b] @ memory[f] for f in own], dtype=np.float64)
        log_p = s - s.max() - np.log(np.exp(s - s.max()).sum())
        nll.append(-log_p[own.index(gold[b])])
    return float(np.mean(nll))


def test_ksoftmax_softmaxes_each_query_over_the_batch_union():
    """Two queries with different candidate sets: each query's softmax runs over the union of the
    batch's candidates and gold facts (eq. 3-4 with the batch union), not over its own set."""
    rng = np.random.default_rng(0)
    memory = rng.standard_normal((12, 5)).astype(np.float32)
    q = rng.standard_normal((3, 5)).astype(np.float32)
    cands = [[1, 2, -1], [3, 4, 5], [6, 2, 7]]  # overlapping but different sets, one pad
    gold = [0, 4, 9]  # a gold fact outside every candidate set, one inside its own set
    want = _union_nll_reference(q, memory, cands, gold)
    assert abs(want - _own_nll_reference(q, memory, cands, gold)) > 0.1  # the two differ here
    qt = torch.from_numpy(q).requires_grad_(True)
    out = ksoftmax_loss(qt, torch.from_numpy(memory), torch.tensor(cands), torch.tensor(gold))
    assert out.softmax_size == len({0, 1, 2, 3, 4, 5, 6, 7, 9})
    assert abs(float(out.loss.detach()) - want) < 1e-5
    # the gradient too: d loss / d q_b = (softmax over U - onehot(gold_b)) M[U] / B
    out.loss.backward()
    union = sorted({1, 2, 3, 4, 5, 6, 7} | set(gold))
    m_u = memory[union].astype(np.float64)  # (U, D)
    for b in range(3):
        s = m_u @ q[b]
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        p[union.index(gold[b])] -= 1.0
        np.testing.assert_allclose(qt.grad[b].numpy(), p @ m_u / 3, rtol=1e-4, atol=1e-6)


def test_sparse_adam_updates_only_the_batch_words():
    from hmn.model import make_optimizer

    torch.manual_seed(0)
    enc = BowEncoder(10, 4, sparse=True)
    before = enc.words.weight.detach().clone()
    opt = make_optimizer(enc, "sparse_adam", 0.1)
    memory = torch.randn(6, 4)
    loss = full_softmax_loss(enc(torch.tensor([1, 2]), torch.tensor([0])), memory, torch.tensor([3])).loss
    loss.backward()
    assert enc.words.weight.grad.is_sparse
    opt.step()
    changed = (enc.words.weight.detach() != before).any(dim=1)
    assert changed.tolist() == [i in (1, 2) for i in range(10)]


def test_dense_adam_is_fused_and_matches_the_default_adam():
    from hmn.model import make_optimizer

    torch.manual_seed(0)
    a, b = BowEncoder(50, 8), BowEncoder(50, 8)
    b.load_state_dict(a.state_dict())
    start = a.words.weight.detach().clone()
    opt_a = make_optimizer(a, "adam", 0.01)
    opt_b = torch.optim.Adam(b.parameters(), lr=0.01, foreach=False)
    assert opt_a.param_groups[0]["fused"] is True
    memory = torch.randn(20, 8)
    for _step in range(5):
        tokens = torch.randint(0, 50, (12,))
        offsets = torch.tensor([0, 4, 9])
        gold = torch.randint(0, 20, (3,))
        for enc, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            full_softmax_loss(enc(tokens, offsets), memory, gold).loss.backward()
            opt.step()
    assert torch.allclose(a.words.weight, b.words.weight, atol=1e-6)
    assert (a.words.weight - start).abs().max() > 1e-3  # it did train
